"""The addon's hooks in-process, with mitmproxy's own test helpers (as mitmproxy tests its addons): fail-closed
decisions that a real process cannot be made to show (a bug inside our own code), header handling, shutdown."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import ctx
from mitmproxy.test import taddons, tflow, tutils

from metrion_addon import addon as addon_module
from metrion_addon import guards
from metrion_addon.addon import Metrion, classify_error
from tests.conftest import MANAGED_TOKEN, PASS_TOKEN, REAL_KEY, configured_addon


@pytest.fixture
def metrion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Metrion, Path]]:
    with configured_addon(tmp_path, monkeypatch) as m:
        yield m, tmp_path / "m.db"


def rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]
    finally:
        conn.close()


def flow(**headers: str) -> Any:
    f = tflow.tflow()
    f.request.path = "/v1/messages"
    f.request.content = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 5}).encode()
    f.request.headers.clear()
    f.request.headers["content-type"] = "application/json"
    for k, v in headers.items():
        f.request.headers[k.replace("_", "-")] = v
    return f


def error_of(f: Any) -> tuple[int, str]:
    return f.response.status_code, json.loads(f.response.content)["error"]["type"]


def test_a_bug_in_our_checks_refuses_the_request(metrion, monkeypatch: pytest.MonkeyPatch) -> None:
    m, db = metrion

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug in authentication")

    monkeypatch.setattr(m.rt.auth, "authenticate", broken)
    f = flow(x_api_key=MANAGED_TOKEN, x_metrion_user="bug")
    m.requestheaders(f)
    assert error_of(f) == (500, "api_error")  # answered locally: never forwarded
    m.response(f)
    m.done()
    assert [(r["user"], r["error"], r["status"]) for r in rows(db)] == [("bug", "metrion_internal_error", 500)]


def test_a_bug_before_anything_is_known_still_refuses(metrion, monkeypatch: pytest.MonkeyPatch) -> None:
    m, db = metrion

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug in path handling")

    monkeypatch.setattr(addon_module, "upstream_path", broken)
    f = flow(x_api_key=MANAGED_TOKEN)
    m.requestheaders(f)
    assert error_of(f) == (500, "api_error")
    m.response(f)
    m.done()
    assert [r["error"] for r in rows(db)] == ["metrion_internal_error"]


def test_a_bug_that_escapes_the_handler_leaves_the_refusal_in_place(metrion, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even if the error handling itself fails, the local answer set first is what the client gets."""
    m, _ = metrion
    monkeypatch.setattr(m, "_admit", lambda *a: (_ for _ in ()).throw(RuntimeError("bug")))
    monkeypatch.setattr(m, "_answer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug in the handler")))
    f = flow(x_api_key=MANAGED_TOKEN)
    with pytest.raises(RuntimeError):
        m.requestheaders(f)  # mitmproxy would log this as "Addon error" and go on with the flow...
    assert error_of(f) == (500, "api_error")  # ...which already carries a refusal, not the request


@pytest.mark.parametrize("header", ["x-api-key", "authorization", "x-metrion-token"])
def test_undecodable_credentials_get_401(metrion, header: str) -> None:
    m, _ = metrion
    value = "Bearer sk-metrion-\udcff" if header == "authorization" else "sk-metrion-\udcff"
    f = flow(**{header.replace("-", "_"): value, "x_api_key" if header == "x-metrion-token" else "x_other": "k"})
    m.requestheaders(f)
    assert error_of(f) == (401, "authentication_error")


def test_admitted_request_is_rewritten_for_upstream(metrion) -> None:
    m, _ = metrion
    f = flow(x_api_key=MANAGED_TOKEN, x_metrion_user="alice", x_metrion_other="x", user_agent=f"ua {MANAGED_TOKEN}")
    f.request.headers["authorization"] = "Bearer whatever"
    m.requestheaders(f)
    assert f.response is None
    h = f.request.headers
    assert h["x-api-key"] == REAL_KEY
    assert not [k for k in h if k.lower().startswith("x-metrion-") or k.lower() in ("authorization", "user-agent")]


def test_passthrough_keeps_the_client_key(metrion) -> None:
    m, _ = metrion
    f = flow(x_api_key="sk-ant-own-key", x_metrion_token=PASS_TOKEN)
    m.requestheaders(f)
    assert f.response is None and f.request.headers["x-api-key"] == "sk-ant-own-key"
    assert "x-metrion-token" not in f.request.headers


def test_shutdown_records_a_finished_stream_as_complete(metrion) -> None:
    m, db = metrion
    f = flow(x_api_key=MANAGED_TOKEN, x_metrion_user="finished")
    m.requestheaders(f)
    m.request(f)
    f.response = tutils.tresp(headers=[(b"content-type", b"text/event-stream"), (b"request-id", b"req_1")])
    f.response.content = None
    m.responseheaders(f)
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-5-5",'
        b'"usage":{"input_tokens":7,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"output_tokens":3}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert f.response.stream(events) == events
    m.done()  # no response hook: the proxy stopped before the upstream closed the stream
    (row,) = rows(db)
    assert (row["request_id"], row["completed"], row["error"], row["input_tokens"]) == ("req_1", 1, None, 7)


@pytest.mark.parametrize(
    ("msg", "started", "kind"),
    [
        ("Client disconnected.", True, "client_disconnect"),
        ("Request body exceeds mitmproxy's body_size_limit.", False, "request_too_large"),
        ("Response body exceeds mitmproxy's body_size_limit.", True, "response_too_large"),
        ("Connection timed out", False, "upstream_timeout"),
        ("peer closed connection without sending complete message body", True, "upstream_disconnect"),
        ("[Errno 111] Connect call failed", False, "upstream_unreachable"),
        ("something else", False, "proxy_error"),
    ],
)
def test_classify_error(msg: str, started: bool, kind: str) -> None:
    assert classify_error(msg, started) == kind


def test_without_a_loaded_config_every_request_is_refused() -> None:
    """A proxy whose config failed to load (or was never given) has nothing to check credentials against."""
    m = Metrion()
    with taddons.context(m):
        f = flow(x_api_key=MANAGED_TOKEN)
        m.requestheaders(f)
        assert error_of(f) == (503, "api_error")


def test_a_runtime_option_rebuilds_the_runtime_and_loses_no_row(metrion, tmp_path: Path) -> None:
    """The old runtime is closed (its writer flushed) before the new one starts and seeds its budgets."""
    m, db = metrion
    for i in range(50):
        f = flow(x_api_key=MANAGED_TOKEN, x_metrion_user=f"reload-{i}")
        m.requestheaders(f)
        f.response = tutils.tresp()  # the upstream's answer
        m.response(f)  # its row is queued for the writer
    old = m.rt
    ctx.options.update(metrion_max_backlog=1000)  # any of the runtime's options rebuilds it
    assert m.rt is not None and m.rt is not old
    assert len(rows(db)) == 50  # everything the old writer had queued


def test_every_credential_header_is_masked_whatever_its_case_and_count() -> None:
    from mitmproxy import http

    from metrion_addon.guards import REDACTED, redact_credentials

    h = http.Headers(
        [(b"X-Api-Key", b"k1"), (b"accept", b"*/*"), (b"Cookie", b"a=1"), (b"cookie", b"b=2"), (b"AUTHORIZATION", b"B")]
    )
    redact_credentials(h)
    assert h.fields == (
        (b"X-Api-Key", REDACTED.encode()),
        (b"accept", b"*/*"),
        (b"Cookie", REDACTED.encode()),
        (b"cookie", REDACTED.encode()),
        (b"AUTHORIZATION", REDACTED.encode()),
    )
    clean = http.Headers([(b"accept", b"*/*")])
    redact_credentials(clean)
    assert clean.fields == ((b"accept", b"*/*"),)


def test_the_placeholder_refusal_is_an_anthropic_error() -> None:
    from mitmproxy import http

    r = guards.placeholder_refusal()
    assert (r.status_code, r.reason, r.headers["content-type"]) == (500, "Internal Server Error", "application/json")
    assert json.loads(r.content) == {"type": "error", "error": {"type": "api_error", "message": "metrion proxy error"}}
    assert int(r.headers["content-length"]) == len(r.content)
    other = guards.placeholder_refusal()
    assert other is not r and other.headers is not r.headers  # one per flow: a flow may change its own
    made = http.Response.make(500, r.content, {"content-type": "application/json"})  # the documented way
    assert {**r.get_state(), "timestamp_start": 0, "timestamp_end": 0} == {
        **made.get_state(),
        "timestamp_start": 0,
        "timestamp_end": 0,
    }
    assert r.stream is False and r.trailers is None and r.timestamp_start > 0
