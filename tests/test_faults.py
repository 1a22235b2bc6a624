"""Fault injection, end to end through a real mitmdump: every fault leaves one correct row and the client gets
exactly the bytes (and headers) the upstream sent, or mitmproxy's 502 when there was no upstream at all."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MANAGED_TOKEN, Proxy, free_port, start_proxy, stop_proxy
from tests.fake_upstream import ERROR_TYPES, FakeUpstream, Scenario, encode_event, sse_events

MODEL = "claude-sonnet-5-5"
BODY = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
STREAM_BODY = {**BODY, "stream": True}


def send(
    proxy: Proxy,
    label: str,
    *,
    scenario: str | None = None,
    body: Any = BODY,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20,
) -> tuple[httpx.Response, bytes]:
    """POST through the proxy; return the response and its raw (still content-encoded) body."""
    h = {"x-api-key": MANAGED_TOKEN, "x-metrion-user": label, "content-type": "application/json", **(headers or {})}
    if scenario:
        h["x-fake-scenario"] = scenario
    data = content if content is not None else json.dumps(body).encode()
    with httpx.stream("POST", proxy.url + "/v1/messages", content=data, headers=h, timeout=timeout) as r:
        raw = b"".join(r.iter_raw())
    return r, raw


def row_for(proxy: Proxy, label: str) -> dict[str, Any]:
    rows = proxy.wait_rows("user = ?", (label,))
    time.sleep(0.1)
    rows = proxy.rows("user = ?", (label,))
    assert len(rows) == 1, f"exactly one row per request, got {len(rows)}"
    return rows[0]


# --- upstream errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(ERROR_TYPES))
def test_upstream_json_error_forwarded_and_recorded(proxy: Proxy, fake: FakeUpstream, status: int) -> None:
    extra = {"x-upstream-extra": f"kept-{status}", "anthropic-ratelimit-requests-remaining": "0"}
    if status == 429:
        extra["retry-after"] = "17"
    fake.add(f"err-{status}", Scenario(status=status, headers=extra, error_message=f"upstream says {status}"))
    r, raw = send(proxy, f"err-{status}", scenario=f"err-{status}")
    rid = r.headers["request-id"]
    assert r.status_code == status
    assert raw == fake.sent[rid]
    for k, v in {**extra, "content-type": "application/json", "content-length": str(len(raw))}.items():
        assert r.headers[k] == v
    row = row_for(proxy, f"err-{status}")
    assert (row["status"], row["error"], row["completed"], row["request_id"]) == (status, ERROR_TYPES[status], 0, rid)
    assert row["error_message"] == f"upstream says {status}"
    assert (row["account"], row["model"], row["cost_usd"]) == ("acme", MODEL, 0)


# --- mid-stream faults ------------------------------------------------------------------------------


def test_event_error_overloaded_mid_stream(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("sse-overloaded", Scenario(error_after=4, delta_count=5))
    r, raw = send(proxy, "sse-overloaded", scenario="sse-overloaded", body=STREAM_BODY)
    assert raw == fake.sent[r.headers["request-id"]]
    assert b"event: error" in raw and b"content_block_delta" in raw
    row = row_for(proxy, "sse-overloaded")
    assert (row["status"], row["stream"], row["completed"], row["error"]) == (200, 1, 0, "overloaded_error")
    assert (row["input_tokens"], row["error_message"]) == (25, "Overloaded")


@pytest.mark.parametrize("how", ["reset_after", "cut_after"])
def test_upstream_connection_lost_mid_stream(proxy: Proxy, fake: FakeUpstream, how: str) -> None:
    name = f"sse-lost-{how}"
    fake.add(name, Scenario(delta_count=5, **{how: 5}))
    got = bytearray()
    h = {"x-api-key": MANAGED_TOKEN, "x-metrion-user": name, "x-fake-scenario": name}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", proxy.url + "/v1/messages", json=STREAM_BODY, headers=h, timeout=10) as r,
    ):
        rid = r.headers["request-id"]
        for chunk in r.iter_raw():
            got += chunk
    row = row_for(proxy, name)
    assert bytes(got) == fake.sent[rid]  # everything that arrived was passed on, unchanged
    assert b"content_block_delta" in got and b"message_stop" not in got
    assert (row["status"], row["stream"], row["completed"], row["error"]) == (200, 1, 0, "upstream_disconnect")
    assert (row["input_tokens"], row["request_id"]) == (25, rid)


@pytest.fixture(scope="module")
def dead_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(tmp_path_factory.mktemp("dead"), f"http://127.0.0.1:{free_port()}")  # nothing listens there
    yield p
    stop_proxy(p)


def test_upstream_unreachable_gives_502_and_a_row(dead_proxy: Proxy) -> None:
    r, _ = send(dead_proxy, "unreachable")
    assert r.status_code == 502
    row = row_for(dead_proxy, "unreachable")
    assert (row["status"], row["error"], row["completed"], row["account"]) == (502, "upstream_unreachable", 0, "acme")
    assert row["model"] == MODEL and row["error_message"]
    assert dead_proxy.proc.poll() is None


def test_upstream_stalls_before_headers(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("stall-headers", Scenario(delay=4))
    with pytest.raises(httpx.ReadTimeout):
        send(proxy, "stall-headers", scenario="stall-headers", timeout=1)
    row = row_for(proxy, "stall-headers")
    assert (row["status"], row["error"], row["completed"]) == (None, "client_disconnect", 0)
    assert 900 <= row["latency_ms"] < 3500  # recorded when the client gave up, not when upstream answered


def test_upstream_stalls_mid_stream(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("stall-stream", Scenario(event_delay=3))
    got = bytearray()
    h = {"x-api-key": MANAGED_TOKEN, "x-metrion-user": "stall-stream", "x-fake-scenario": "stall-stream"}
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("POST", proxy.url + "/v1/messages", json=STREAM_BODY, headers=h, timeout=1) as r,
    ):
        for chunk in r.iter_raw():
            got += chunk
    assert got.startswith(b"event: message_start")
    row = row_for(proxy, "stall-stream")
    assert (row["status"], row["stream"], row["error"], row["completed"]) == (200, 1, "client_disconnect", 0)
    assert row["input_tokens"] == 25  # what message_start said before the stall


def test_client_disconnects_after_one_event(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("client-leaves", Scenario(event_delay=0.05, delta_count=40, text="y" * 40))
    h = {"x-api-key": MANAGED_TOKEN, "x-metrion-user": "client-leaves", "x-fake-scenario": "client-leaves"}
    with httpx.stream("POST", proxy.url + "/v1/messages", json=STREAM_BODY, headers=h, timeout=10) as r:
        first = next(r.iter_raw())
    assert first.startswith(b"event: message_start")
    row = row_for(proxy, "client-leaves")
    assert (row["status"], row["stream"], row["error"], row["completed"]) == (200, 1, "client_disconnect", 0)
    assert (row["input_tokens"], row["output_tokens"], row["model"]) == (25, 1, MODEL)
    assert row["message_id"] and row["cost_usd"] > 0  # usage so far is billed


# --- malformed upstream output ----------------------------------------------------------------------


def stream_bytes(**kw: Any) -> bytes:
    sc = Scenario(**kw)
    return b"".join(encode_event(n, d) for n, d in sse_events(MODEL, sc.usage, sc.text, "msg_x", sc))


@pytest.mark.parametrize(
    ("name", "body", "error"),
    [
        ("json-invalid", b'{"type":"message","usage":{"input_tokens":5', "usage_unreadable"),
        (
            "json-not-utf8",
            b'{"type":"message","usage":{"input_tokens":5,"output_tokens":\xff\xfe}}',
            "usage_unreadable",
        ),
        ("json-not-an-object", b"[1, 2]", "usage_unreadable"),
    ],
)
def test_malformed_json_body(proxy: Proxy, fake: FakeUpstream, name: str, body: bytes, error: str | None) -> None:
    fake.add(name, Scenario(body=body))
    r, raw = send(proxy, name, scenario=name)
    assert (r.status_code, raw) == (200, body)
    row = row_for(proxy, name)
    # A billed answer whose usage cannot be read is unpriced (NULL), never a silent $0.
    assert (row["status"], row["error"], row["input_tokens"], row["cost_usd"]) == (200, error, None, None)
    assert proxy.proc.poll() is None


def _broken_delta(sse: bytes) -> bytes:
    head, sep, tail = sse.partition(b"event: message_delta\ndata: ")
    return head + sep + b'{"type":"message_delta","usage":{"output_tokens":' + tail[tail.index(b"\n\n") :]


@pytest.mark.parametrize(
    ("name", "raw_sse", "error", "tokens"),
    [
        ("sse-broken-json", _broken_delta(stream_bytes()), "usage_unreadable", (25, 1)),
        (
            "sse-truncated",
            stream_bytes()[: stream_bytes().index(b"event: message_delta") + 40],
            "incomplete_stream",
            (25, 1),
        ),
        (
            "sse-not-utf8",
            stream_bytes()
            .replace(b'"text":"Hello', b'"text":"\xff\xfe\xc3(Hello')
            .replace(b"event: ping", b"event: p\xffing"),
            None,
            (25, 12),
        ),
        ("sse-garbage", b"\x00\xff not an event stream \r\r\n\n data \xc3(", "incomplete_stream", (None, None)),
    ],
)
def test_malformed_sse(proxy: Proxy, fake: FakeUpstream, name: str, raw_sse: bytes, error, tokens) -> None:
    fake.add(name, Scenario(raw_sse=raw_sse, chunk_size=13, stream=True))
    r, raw = send(proxy, name, scenario=name, body=STREAM_BODY)
    assert raw == raw_sse
    row = row_for(proxy, name)
    assert (row["status"], row["stream"], row["error"]) == (200, 1, error)
    assert (row["input_tokens"], row["output_tokens"]) == tokens
    assert row["completed"] == int(error is None)


def test_absurd_usage_values_do_not_stop_the_writer(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("absurd", Scenario(usage={"input_tokens": 10**30, "output_tokens": [1], "cache_read_input_tokens": -5}))
    r, raw = send(proxy, "absurd", scenario="absurd")
    assert r.status_code == 200 and raw == fake.sent[r.headers["request-id"]]
    row = row_for(proxy, "absurd")
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == (200, None, None)
    # Not a 1e24 USD bill, and not a silent $0 either: unpriced, with the reason named.
    assert (row["error"], row["cost_usd"], row["price_source"]) == ("usage_unreadable", None, "implausible_usage")
    assert "1000000000000000000000000000000" in row["usage_json"]  # kept for an audit
    r, _ = send(proxy, "after-absurd")  # the writer thread is still alive
    assert row_for(proxy, "after-absurd")["input_tokens"] == 25


# --- big and encoded responses ----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_compressed_json(proxy: Proxy, fake: FakeUpstream, encoding: str) -> None:
    name = f"json-{encoding}"
    fake.add(name, Scenario(encoding=encoding, usage={"input_tokens": 321, "output_tokens": 45}))
    r, raw = send(proxy, name, scenario=name, headers={"accept-encoding": encoding})
    rid = r.headers["request-id"]
    assert (r.headers["content-encoding"], raw) == (encoding, fake.sent[rid])
    row = row_for(proxy, name)
    assert (row["input_tokens"], row["output_tokens"], row["completed"], row["error"]) == (321, 45, 1, None)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_compressed_stream(proxy: Proxy, fake: FakeUpstream, encoding: str) -> None:
    name = f"sse-{encoding}"
    fake.add(name, Scenario(encoding=encoding, usage={"input_tokens": 321, "output_tokens": 45}, chunk_size=5))
    r, raw = send(proxy, name, scenario=name, body=STREAM_BODY, headers={"accept-encoding": encoding})
    assert raw == fake.sent[r.headers["request-id"]]
    row = row_for(proxy, name)
    assert (row["input_tokens"], row["output_tokens"], row["completed"], row["error"]) == (321, 45, 1, None)


def test_5mb_json_response(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("big-json", Scenario(text="z" * 5_000_000, usage={"input_tokens": 9, "output_tokens": 1_250_000}))
    r, raw = send(proxy, "big-json", scenario="big-json")
    assert len(raw) > 5_000_000 and raw == fake.sent[r.headers["request-id"]]
    row = row_for(proxy, "big-json")
    assert (row["output_tokens"], row["completed"]) == (1_250_000, 1)


def test_50000_event_stream(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add(
        "many-events",
        Scenario(text="ab" * 50_000, delta_count=50_000, usage={"input_tokens": 7, "output_tokens": 50_000}),
    )
    r, raw = send(proxy, "many-events", scenario="many-events", body=STREAM_BODY, timeout=60)
    assert raw == fake.sent[r.headers["request-id"]] and raw.count(b"content_block_delta\n") == 50_000
    row = row_for(proxy, "many-events")
    assert (row["input_tokens"], row["output_tokens"], row["completed"]) == (7, 50_000, 1)


# --- odd requests: forwarded as they are, recorded with what is known -------------------------------


@pytest.mark.parametrize(
    ("name", "content", "model"),
    [
        ("req-not-json", b"this is not json \xff", MODEL),  # model from the response
        ("req-no-model", json.dumps({"max_tokens": 5, "messages": []}).encode(), MODEL),
        (
            "req-10mb",
            json.dumps(
                {
                    "model": "claude-haiku-5-5",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "q" * 10_000_000}],
                }
            ).encode(),
            "claude-haiku-5-5",
        ),
    ],
)
def test_odd_requests_forwarded(proxy: Proxy, fake: FakeUpstream, name: str, content: bytes, model: str) -> None:
    r, _ = send(proxy, name, content=content, timeout=60)
    rid = r.headers["request-id"]
    assert r.status_code == 200
    assert fake.received[rid].body == content
    row = row_for(proxy, name)
    assert (row["status"], row["model"], row["input_tokens"], row["account"]) == (200, model, 25, "acme")


def test_proxy_survived(proxy: Proxy, tmp_path: Path) -> None:
    """After every fault above, the proxy is still up and still records."""
    assert proxy.proc.poll() is None
    r, _ = send(proxy, "still-alive")
    assert r.status_code == 200 and row_for(proxy, "still-alive")["completed"] == 1
