"""End to end: the official anthropic SDK -> a real mitmdump with the addon -> the fake upstream socket."""

from __future__ import annotations

import json
import re
import threading
import time

import anthropic
import httpx
import pytest

from tests.conftest import (
    CLIENT_KEY,
    HASHED_TOKEN,
    MANAGED_TOKEN,
    NOPASS_TOKEN,
    OAUTH_TOKEN,
    PASS_TOKEN,
    REAL_KEY,
    SECRETS,
    Proxy,
)
from tests.fake_upstream import FakeUpstream, Scenario

MODEL = "claude-sonnet-5-5"  # $2 in / $10 out / $2.5 5m write / $4 1h write / $0.1 read per MTok
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def client(proxy: Proxy, **kw) -> anthropic.Anthropic:
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=proxy.url, **kw)


def upstream_headers(fake: FakeUpstream, rid: str) -> dict[str, str]:
    return fake.received[rid].headers


def assert_clean_upstream(fake: FakeUpstream, rid: str) -> None:
    """Nothing of metrion reaches the upstream: no x-metrion-* header, no proxy token anywhere."""
    rec = fake.received[rid]
    assert not [k for k in rec.headers if k.startswith("x-metrion-")]
    blob = json.dumps(rec.raw_headers) + rec.body.decode("utf-8", "replace")
    assert "sk-metrion-" not in blob


def test_managed_non_stream_sdk(proxy: Proxy, fake: FakeUpstream) -> None:
    usage = {
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    fake.add("managed-json", Scenario(usage=usage, text="hi there"))
    c = client(
        proxy,
        api_key=MANAGED_TOKEN,
        default_headers={"x-metrion-user": "alice", "x-fake-scenario": "managed-json"},
    )
    raw = c.messages.with_raw_response.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hello"}]
    )
    msg = raw.parse()
    assert msg.content[0].text == "hi there"
    rid = raw.headers["request-id"]
    assert raw.http_response.content == fake.sent[rid]  # byte-identical body

    up = upstream_headers(fake, rid)
    assert up["x-api-key"] == REAL_KEY
    assert "authorization" not in up
    assert up["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    assert fake.received[rid].path == "/v1/messages"
    assert_clean_upstream(fake, rid)

    row = proxy.row(rid)
    assert TS_RE.match(row["ts"])
    expect = {
        "account": "acme",
        "user": "alice",
        "mode": "managed",
        "method": "POST",
        "path": "/v1/messages",
        "model": MODEL,
        "stream": 0,
        "status": 200,
        "request_id": rid,
        "message_id": msg.id,
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "completed": 1,
        "error": None,
        "stop_reason": "end_turn",
        "session_id": None,
    }
    assert {k: row[k] for k in expect} == expect
    assert row["cost_usd"] == pytest.approx(1000 * 2 / 1e6 + 500 * 10 / 1e6, abs=1e-12)
    assert row["price_source"].startswith("genai-prices@") and row["price_source"].endswith(":claude-sonnet-5-5")
    assert row["client"].startswith("Anthropic/Python")
    assert row["latency_ms"] > 0 and 0 <= row["ttft_ms"] <= row["latency_ms"]


def test_managed_stream_sdk_cumulative_usage(proxy: Proxy, fake: FakeUpstream) -> None:
    usage = {
        "input_tokens": 2000,
        "output_tokens": 300,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 4000,
        "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
    }
    fake.add("managed-sse", Scenario(usage=usage, text="streamed words here", delta_count=4))
    c = client(
        proxy,
        api_key=MANAGED_TOKEN,
        default_headers={
            "x-metrion-user": "bob",
            "x-fake-scenario": "managed-sse",
            "x-claude-code-session-id": "sess-123",
        },
    )
    with c.messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
        rid = s.response.headers["request-id"]
    assert text == "streamed words here"
    assert final.usage.output_tokens == 300
    assert fake.received[rid].headers["x-api-key"] == REAL_KEY
    assert_clean_upstream(fake, rid)

    row = proxy.row(rid)
    assert (row["stream"], row["completed"], row["error"], row["status"]) == (1, 1, None, 200)
    # message_delta repeats every field cumulatively: summing would double them.
    assert (row["input_tokens"], row["output_tokens"]) == (2000, 300)
    assert (row["cache_creation_input_tokens"], row["cache_read_input_tokens"]) == (1000, 4000)
    assert (row["cache_creation_5m_input_tokens"], row["cache_creation_1h_input_tokens"]) == (400, 600)
    assert row["message_id"] == final.id
    assert (row["user"], row["session_id"], row["mode"]) == ("bob", "sess-123", "managed")
    expected = (2000 * 2 + 300 * 10 + 400 * 2.5 + 600 * 4 + 4000 * 0.1) / 1e6
    assert row["cost_usd"] == pytest.approx(expected, abs=1e-12)
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]


def test_bearer_auth_token_with_hashed_proxy_token(proxy: Proxy, fake: FakeUpstream) -> None:
    c = client(proxy, auth_token=HASHED_TOKEN)
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    rid = raw.headers["request-id"]
    up = upstream_headers(fake, rid)
    assert up["x-api-key"] == REAL_KEY
    assert "authorization" not in up
    assert_clean_upstream(fake, rid)
    assert proxy.row(rid)["account"] == "acme"


@pytest.mark.parametrize("how", ["api_key", "oauth_bearer"])
def test_passthrough_forwards_client_credential_untouched(proxy: Proxy, fake: FakeUpstream, how: str) -> None:
    kw = {"api_key": CLIENT_KEY} if how == "api_key" else {"auth_token": OAUTH_TOKEN}
    c = client(proxy, default_headers={"x-metrion-token": PASS_TOKEN, "x-metrion-user": f"svc-{how}"}, **kw)
    with c.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
        s.until_done()
        rid = s.response.headers["request-id"]
    up = upstream_headers(fake, rid)
    if how == "api_key":
        assert CLIENT_KEY in (up.get("x-api-key"), up.get("authorization", "").removeprefix("Bearer "))
    else:
        assert up["authorization"] == f"Bearer {OAUTH_TOKEN}"
        assert "x-api-key" not in up
    assert_clean_upstream(fake, rid)
    row = proxy.row(rid)
    assert (row["account"], row["mode"], row["user"], row["stream"]) == (
        "labs",
        "passthrough",
        f"svc-{how}",
        1,
    )


def _post(proxy: Proxy, path: str, headers: dict[str, str], body: dict | None = None) -> httpx.Response:
    body = (
        body if body is not None else {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    )
    return httpx.post(
        proxy.url + path,
        headers={"content-type": "application/json", **headers},
        content=json.dumps(body),
        timeout=10,
    )


@pytest.mark.parametrize(
    ("headers", "label", "fragment"),
    [
        ({"x-api-key": "sk-metrion-unknown-eeeeeeeeeeeeeeee"}, "unknown-token", "invalid proxy token"),
        ({}, "missing", "missing credentials"),
        ({"x-api-key": CLIENT_KEY}, "no-metrion-token", "needs a proxy token"),
        (
            {"x-api-key": CLIENT_KEY, "x-metrion-token": "sk-metrion-nope-ffffffffffffffff"},
            "bad-metrion-token",
            "invalid x-metrion-token",
        ),
        (
            {"x-api-key": CLIENT_KEY, "x-metrion-token": NOPASS_TOKEN},
            "no-passthrough",
            "does not allow pass-through",
        ),
        ({"authorization": f"Bearer {PASS_TOKEN}"}, "no-upstream-key", "has no Anthropic key"),
    ],
)
def test_auth_failures_get_local_401(proxy: Proxy, fake: FakeUpstream, headers, label, fragment) -> None:
    before = len(fake.order)
    r = _post(proxy, "/v1/messages", {**headers, "x-metrion-user": f"auth-{label}"})
    assert r.status_code == 401
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert fragment in body["error"]["message"]
    for secret in SECRETS:
        assert secret not in r.text
    assert len(fake.order) == before  # never forwarded
    row = proxy.wait_rows("user = ?", (f"auth-{label}",))[0]
    assert (row["status"], row["error"], row["account"], row["completed"]) == (
        401,
        "authentication_error",
        None,
        0,
    )
    assert row["model"] == MODEL and row["cost_usd"] == 0


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/messages", "/v1/messages"),
        ("/v1/messages?beta=true", "/v1/messages?beta=true"),
        ("/api/proxy/v1/messages?beta=true", "/v1/messages?beta=true"),
        ("/api/proxy/messages", "/v1/messages"),
    ],
)
def test_paths_reach_v1_messages(proxy: Proxy, fake: FakeUpstream, path: str, upstream: str) -> None:
    r = _post(
        proxy,
        path,
        {
            "x-api-key": MANAGED_TOKEN,
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "a-2025-01-01,b-2026-02-02",
        },
    )
    assert r.status_code == 200, r.text
    rid = r.headers["request-id"]
    rec = fake.received[rid]
    assert rec.path == upstream
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["anthropic-beta"] == "a-2025-01-01,b-2026-02-02"
    assert proxy.row(rid)["path"] == "/v1/messages"


def test_other_endpoints_forwarded_and_recorded(proxy: Proxy, fake: FakeUpstream) -> None:
    c = client(proxy, api_key=MANAGED_TOKEN)
    raw = c.messages.with_raw_response.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert raw.parse().input_tokens == 42
    row = proxy.row(raw.headers["request-id"])
    assert (row["path"], row["cost_usd"], row["price_source"]) == (
        "/v1/messages/count_tokens",
        0,
        "free:count_tokens",
    )
    r = httpx.get(proxy.url + "/v1/models", headers={"x-api-key": MANAGED_TOKEN}, timeout=10)
    assert r.status_code == 200
    row = proxy.row(r.headers["request-id"])
    assert (row["method"], row["path"], row["status"], row["account"]) == ("GET", "/v1/models", 200, "acme")


def test_stream_is_byte_identical_and_not_buffered(proxy: Proxy, fake: FakeUpstream) -> None:
    """The upstream sends its first event, then waits until the client has seen it: a proxy that buffered the
    stream would deliver nothing before the end, and the upstream would wait in vain (no timing involved)."""
    gate = threading.Event()
    fake.add("gated-sse", Scenario(gate=gate, delta_count=4, text="é漢字🙂 split everywhere", chunk_size=7))
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    got = bytearray()
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        content=json.dumps(body),
        timeout=20,
        headers={"x-api-key": MANAGED_TOKEN, "x-fake-scenario": "gated-sse"},
    ) as r:
        for chunk in r.iter_raw():
            got += chunk
            if b"message_start" in got and b"\n\n" in got and not gate.is_set():
                assert b"message_stop" not in got
                gate.set()  # the first event arrived while the upstream was still holding the rest
        rid = r.headers["request-id"]
    assert gate.is_set(), "the first event never arrived before the end: the stream was buffered"
    assert bytes(got) == fake.sent[rid]
    row = proxy.row(rid)
    assert (row["completed"], row["output_tokens"], row["input_tokens"]) == (1, 12, 25)


def test_no_secret_in_db_or_log(proxy: Proxy, fake: FakeUpstream) -> None:
    # Make sure each kind of credential has passed through at least once.
    _post(proxy, "/v1/messages", {"x-api-key": MANAGED_TOKEN})
    _post(proxy, "/v1/messages", {"authorization": f"Bearer {OAUTH_TOKEN}", "x-metrion-token": PASS_TOKEN})
    _post(proxy, "/v1/messages", {"x-api-key": "sk-metrion-unknown-eeeeeeeeeeeeeeee"})
    proxy.wait_rows("1", n=3)
    time.sleep(0.3)
    blobs = [proxy.log.read_bytes()] + [p.read_bytes() for p in proxy.db.parent.glob("metrion.db*")]
    for blob in blobs:
        for secret in (*SECRETS, "sk-metrion-unknown-eeeeeeeeeeeeeeee"):
            assert secret.encode() not in blob
