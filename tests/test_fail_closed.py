"""Fail closed, end to end through a real mitmdump: hostile bytes, folded headers, streamed bodies, unreadable
usage. Raw sockets send what no HTTP library would. Each test failed on the code before the fix (issue 17)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    MANAGED_TOKEN,
    PASS_TOKEN,
    REAL_KEY,
    Proxy,
    free_port,
    proc_rss_mb,
    start_proxy,
    stop_proxy,
)
from tests.fake_upstream import DEFAULT_USAGE, FakeUpstream, Scenario, message_json
from tests.rawhttp import request_bytes, send_raw

MODEL = "claude-sonnet-5-5"
BODY = json.dumps({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).encode()


def managed(label: str | bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    raw = label if isinstance(label, bytes) else label.encode()
    return [(b"x-api-key", MANAGED_TOKEN.encode()), (b"x-metrion-user", raw), *extra]


def one_row(proxy: Proxy, where: str, params: tuple[Any, ...]) -> dict[str, Any]:
    proxy.wait_rows(where, params)
    rows = proxy.rows(where, params)
    assert len(rows) == 1, f"exactly one row per request, got {len(rows)}"
    return rows[0]


def forwarded_since(fake: FakeUpstream, before: int) -> list[Any]:
    return [fake.received[rid] for rid in fake.order[before:]]


# --- 1. raw bytes in a credential header --------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-api-key", b"sk-metrion-\xff\xfe")],
        [(b"x-api-key", b"sk-ant-client"), (b"x-metrion-token", PASS_TOKEN.encode() + b"\xff")],
        [(b"authorization", b"Bearer sk-metrion-\xff")],
        [(b"x-api-key", MANAGED_TOKEN.encode() + b"\x01")],
    ],
    ids=["x-api-key", "x-metrion-token", "authorization", "control-char"],
)
def test_raw_bytes_in_credentials_are_refused_not_forwarded(proxy: Proxy, fake: FakeUpstream, headers) -> None:
    before = len(fake.order)
    label = f"rawcred-{len(headers)}-{headers[-1][0].decode()}-{headers[-1][1][-1]}"
    r = send_raw(
        proxy.port, request_bytes("POST", b"/v1/messages", [*headers, (b"x-metrion-user", label.encode())], BODY)
    )
    assert r.status == 401
    assert r.json()["error"]["type"] == "authentication_error"
    row = one_row(proxy, "user = ?", (label,))
    assert (row["status"], row["error"], row["account"]) == (401, "authentication_error", None)
    assert forwarded_since(fake, before) == []  # nothing reached upstream


# --- 2. strings SQLite cannot bind: every row written, and the rows after it too ---------------------------


def test_hostile_strings_are_stored_cleaned_and_the_writer_keeps_writing(proxy: Proxy, fake: FakeUpstream) -> None:
    ua = b"evil-agent/\xff\xfe\x1b[31m"
    session = b"sess-\xff"
    cases = [
        # no token at all: the 401 row carries every field
        request_bytes("POST", b"/v1/messages/\xff", [(b"user-agent", ua), (b"x-metrion-user", b"bad-\xff-user")], BODY),
        request_bytes(
            "POST",
            b"/v1/messages",
            managed(b"bad-\xffmanaged", (b"x-claude-code-session-id", session), (b"user-agent", ua)),
            BODY,
        ),
        request_bytes(
            "POST",
            b"/v1/messages",
            managed("bad-json-model"),
            b'{"model": "\\ud800-claude", "max_tokens": 5, "messages": []}',
        ),
    ]
    for data in cases:
        assert send_raw(proxy.port, data).status in (200, 401)
    after = httpx.post(
        proxy.url + "/v1/messages",
        content=BODY,
        headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": "after-bad"},
        timeout=30,
    )
    assert after.status_code == 200
    one_row(proxy, "user = ?", ("after-bad",))  # the writer did not stop at the bad rows
    bad = proxy.wait_rows("user LIKE 'bad-%'", n=3)
    assert len(bad) == 3
    for row in bad:
        for value in row.values():
            if isinstance(value, str):
                value.encode("utf-8")  # valid UTF-8: no lone surrogates
                assert "\x1b" not in value and "\ufffd\ufffd\ufffd" not in value
    by_user = {r["user"]: r for r in bad}
    assert by_user["bad-\ufffd-user"]["client"] == "evil-agent/\ufffd\ufffd[31m"
    assert by_user["bad-\ufffd-user"]["path"] == "/v1/messages/\ufffd"
    assert by_user["bad-\ufffdmanaged"]["session_id"] == "sess-\ufffd"
    assert by_user["bad-json-model"]["model"] == "\ufffd-claude"


# --- 3. stream_large_bodies: checks happen before the body goes upstream ---------------------------------


@pytest.fixture(scope="module")
def streaming_proxy(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(tmp_path_factory.mktemp("slb"), fake.url, extra_args=("--set", "stream_large_bodies=1k"))
    yield p
    stop_proxy(p)


def big_body(**extra: Any) -> bytes:
    return json.dumps(
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 3000}], **extra}
    ).encode()


def test_streamed_request_body_unauthenticated_never_reaches_upstream(
    streaming_proxy: Proxy, fake: FakeUpstream
) -> None:
    before = len(fake.order)
    headers = [(b"x-api-key", b"sk-metrion-not-a-token-000000000000"), (b"x-metrion-user", b"slb-unauth")]
    r = send_raw(streaming_proxy.port, request_bytes("POST", b"/v1/messages", headers, big_body()))
    assert r.status in (None, 401)  # refused: the body is not read, the connection is closed
    row = one_row(streaming_proxy, "user = ?", ("slb-unauth",))
    assert (row["error"], row["account"]) == ("authentication_error", None)
    assert forwarded_since(fake, before) == []


def test_streamed_request_body_managed_sends_only_the_real_key(streaming_proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("slb-big-json", Scenario(text="y" * 5000))  # a JSON answer over 1k: mitmproxy streams it too
    r = httpx.post(
        streaming_proxy.url + "/v1/messages",
        content=big_body(),
        headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": "slb-managed", "x-fake-scenario": "slb-big-json"},
        timeout=20,
    )
    assert r.status_code == 200
    got = fake.received[r.headers["request-id"]]
    assert got.headers["x-api-key"] == REAL_KEY
    assert not any(k.startswith("x-metrion-") for k in got.headers)
    assert MANAGED_TOKEN not in json.dumps(got.raw_headers)
    row = one_row(streaming_proxy, "user = ?", ("slb-managed",))
    assert (row["input_tokens"], row["output_tokens"], row["completed"], row["error"]) == (25, 12, 1, None)
    assert row["cost_usd"] and row["cost_usd"] > 0 and row["price_source"].startswith("genai-prices")


# --- 4. obs-fold --------------------------------------------------------------------------------------


def test_folded_header_cannot_smuggle_a_token(proxy: Proxy, fake: FakeUpstream) -> None:
    before = len(fake.order)
    headers = managed("obs-fold", (b"x-foo", b"a\r\n x-metrion-token: " + PASS_TOKEN.encode()))
    r = send_raw(proxy.port, request_bytes("POST", b"/v1/messages", headers, BODY))
    assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert forwarded_since(fake, before) == []
    assert one_row(proxy, "user = ?", ("obs-fold",))["error"] == "invalid_request_error"


# --- risks ------------------------------------------------------------------------------------------------


def test_huge_unauthenticated_body_is_refused_before_it_is_read(proxy: Proxy, fake: FakeUpstream) -> None:
    before, rss = len(fake.order), proc_rss_mb(proxy.proc.pid)
    head = request_bytes("POST", b"/v1/messages", [(b"x-metrion-user", b"huge-unauth")], b"", length=False)
    head = head.replace(b"\r\n\r\n", b"\r\ncontent-length: 200000000\r\n\r\n", 1)
    # A first slice of the body; the rest is never sent: a proxy that waited for it would never answer.
    r = send_raw(proxy.port, head + b"x" * 32_000)
    assert r.status in (None, 401)
    row = one_row(proxy, "user = ?", ("huge-unauth",))
    assert row["error"] == "authentication_error" and forwarded_since(fake, before) == []
    assert proc_rss_mb(proxy.proc.pid) - rss < 50


def test_body_over_the_default_limit_gets_a_json_413_before_upstream(proxy: Proxy, fake: FakeUpstream) -> None:
    before = len(fake.order)
    head = request_bytes("POST", b"/v1/messages", managed("too-large"), b"", length=False)
    head = head.replace(b"\r\n\r\n", b"\r\ncontent-length: 300000000\r\n\r\n", 1)
    r = send_raw(proxy.port, head)
    assert r.status == 413 and r.json()["error"]["type"] == "request_too_large"
    assert one_row(proxy, "user = ?", ("too-large",))["error"] == "request_too_large"
    assert forwarded_since(fake, before) == []


UNREADABLE = {
    "no-content-type": Scenario(content_type=""),
    "text-plain": Scenario(content_type="text/plain"),
    "octet-stream": Scenario(content_type="application/octet-stream"),
    "json-without-usage": Scenario(body=json.dumps({"type": "message", "id": "msg_x", "content": []}).encode()),
    "negative-count": Scenario(usage={**DEFAULT_USAGE, "input_tokens": -5}),
    "string-count": Scenario(usage={**DEFAULT_USAGE, "output_tokens": "12"}),
    "float-count": Scenario(usage={**DEFAULT_USAGE, "output_tokens": 12.5}),
    "nan-count": Scenario(
        body=json.dumps(message_json(MODEL, DEFAULT_USAGE, "x", "m"))
        .replace('"output_tokens": 12', '"output_tokens": NaN')
        .encode()
    ),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_billed_answer_without_readable_usage_is_flagged_not_free(proxy: Proxy, fake: FakeUpstream, name: str) -> None:
    fake.add(f"unreadable-{name}", UNREADABLE[name])
    r = httpx.post(
        proxy.url + "/v1/messages",
        content=BODY,
        headers={
            "x-api-key": MANAGED_TOKEN,
            "x-metrion-user": f"unreadable-{name}",
            "x-fake-scenario": f"unreadable-{name}",
        },
        timeout=30,
    )
    assert r.status_code == 200
    row = one_row(proxy, "user = ?", (f"unreadable-{name}",))
    assert (row["error"], row["cost_usd"], row["completed"]) == ("usage_unreadable", None, 0)


def test_unreachable_upstream_answers_in_anthropic_json(tmp_path: Path) -> None:
    dead = start_proxy(tmp_path, f"http://127.0.0.1:{free_port()}")
    try:
        r = httpx.post(
            dead.url + "/v1/messages",
            content=BODY,
            headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": "dead"},
            timeout=30,
        )
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/json"
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
        assert one_row(dead, "user = ?", ("dead",))["error"] == "upstream_unreachable"
    finally:
        stop_proxy(dead)


@pytest.mark.parametrize(
    "path", [b"/v1/messages;x/count_tokens", b"/v1/messages%2Fcount_tokens", b"/v1/messages/count_tokens/"]
)
def test_only_the_exact_count_tokens_path_is_free(proxy: Proxy, path: bytes) -> None:
    label = "path-" + path.decode()
    r = send_raw(proxy.port, request_bytes("POST", path, managed(label), BODY))
    assert r.status == 200
    row = one_row(proxy, "user = ?", (label.casefold(),))  # labels are stored normalised (case-folded)
    assert row["price_source"] != "free:count_tokens"
    assert row["cost_usd"] and row["cost_usd"] > 0


def test_request_trailers_get_an_answer_and_a_row(proxy: Proxy, fake: FakeUpstream) -> None:
    before = len(fake.order)
    head = request_bytes(
        "POST",
        b"/v1/messages",
        managed("trailers", (b"transfer-encoding", b"chunked"), (b"trailer", b"x-t")),
        length=False,
    )
    # Only the head: the proxy must refuse without reading the body (mitmproxy 12 cannot parse HTTP/1 request
    # trailers and would drop the connection with no answer); a proxy that waited for the body never answers.
    r = send_raw(proxy.port, head)
    assert r.status in (None, 400)
    assert one_row(proxy, "user = ?", ("trailers",))["error"] == "invalid_request_error"
    assert forwarded_since(fake, before) == []
    assert proxy.proc.poll() is None


def test_shutdown_keeps_what_is_known_of_streams_already_finished(fake: FakeUpstream, tmp_path: Path) -> None:
    """The client has read the whole stream (message_stop) but the upstream has not closed it when the proxy
    stops: the row is complete, with its request id and usage, not a `proxy_shutdown` without an id."""
    fake.add("held-open", Scenario(hold_open=60))
    p = start_proxy(tmp_path, fake.url)
    stream_body = json.dumps({"model": MODEL, "max_tokens": 5, "stream": True, "messages": []})
    headers = {"x-api-key": MANAGED_TOKEN, "x-metrion-user": "held", "x-fake-scenario": "held-open"}
    try:
        with httpx.stream("POST", p.url + "/v1/messages", content=stream_body, headers=headers, timeout=30) as r:
            rid = r.headers["request-id"]
            seen = b""
            for chunk in r.iter_raw():
                seen += chunk
                if b"message_stop" in seen:
                    break
            p.proc.terminate()
            p.proc.wait(30)
    finally:
        stop_proxy(p)
    row = one_row(p, "user = ?", ("held",))
    assert (row["request_id"], row["completed"], row["error"], row["input_tokens"]) == (rid, 1, None, 25)
    assert row["cost_usd"] > 0


def test_proxy_still_serves(proxy: Proxy) -> None:
    assert proxy.proc.poll() is None
    time.sleep(0)  # nothing to wait for: every test above waited for its own row


def test_a_credential_pasted_into_a_label_is_not_stored(proxy: Proxy, fake: FakeUpstream) -> None:
    """A client that copies its proxy token or its own key into User-Agent, a session id or x-metrion-user: the
    request is served, the label is masked in the row (the database holds no secrets), the token never upstream."""
    headers = {
        "x-api-key": MANAGED_TOKEN,
        "user-agent": f"my-app token={MANAGED_TOKEN}",
        "x-claude-code-session-id": "sk-ant-api03-pasted-here",
        "x-metrion-user": "pasted sk-metrion-whatever-0000",
    }
    r = httpx.post(proxy.url + "/v1/messages", content=BODY, headers=headers, timeout=30)
    assert r.status_code == 200
    row = proxy.row(r.headers["request-id"])
    assert (row["client"], row["session_id"], row["user"]) == ("<redacted by metrion>",) * 3
    assert "user-agent" not in fake.received[r.headers["request-id"]].headers  # it held the token
    proxy.wait_rows("1")
    for f in proxy.db.parent.glob("metrion.db*"):
        assert MANAGED_TOKEN.encode() not in f.read_bytes()
