"""Issue 14 end to end: health and probes, Prometheus metrics equal to the database, attempts vs calls,
count_tokens' counted number, JSON request logs and the periodic summary. Real mitmdump, fake upstream."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metrion_addon.metrics import MAX_MODELS
from metrion_addon.report import main as report_main
from tests.conftest import MANAGED_TOKEN, SECRETS, Proxy, start_proxy, stop_proxy
from tests.fake_upstream import FakeUpstream, Scenario
from tests.netutil import free_port
from tests.rawhttp import request_bytes, send_raw

MODEL = "claude-sonnet-5-5"
KINDS = (("input", "input_tokens"), ("output", "output_tokens"), ("cache_read", "cache_read_input_tokens"))
# Exactly what Claude Code 2.1 sends before each session (captured against a fake upstream).
CLAUDE_CODE_PROBE = b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nUser-Agent: Bun/1.2.19\r\n"
CLAUDE_CODE_PROBE += b"Accept: */*\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n\r\n"


def until(check, timeout: float = 30, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `check` until it returns something truthy (no assertion depends on how long that takes)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.05)


def count(proxy: Proxy) -> int:
    return len(proxy.rows())


def sdk(proxy: Proxy, **kw) -> anthropic.Anthropic:  # type: ignore[no-untyped-def]
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=proxy.url, api_key=MANAGED_TOKEN, **kw)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and match.items() <= dict(labels).items())


@pytest.fixture(scope="module")
def ops_proxy(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, int]]:
    mport = free_port()
    extra = f"metrics_listen: 127.0.0.1:{mport}\nmetrics_users: [alice]"
    p = start_proxy(
        tmp_path_factory.mktemp("ops"),
        fake.url,
        extra,
        ("--set", "metrion_log_format=json", "--set", "metrion_summary_interval=1"),
    )
    yield p, mport
    stop_proxy(p)


# --- probes and health ----------------------------------------------------------------------------


def test_claude_code_probe_answered_locally_not_recorded(ops_proxy: tuple[Proxy, int], fake: FakeUpstream) -> None:
    proxy, _ = ops_proxy
    before, upstream_before = count(proxy), len(fake.order)
    r = send_raw(proxy.port, CLAUDE_CODE_PROBE)
    assert r.status == 200 and r.body == b""
    r = send_raw(proxy.port, request_bytes("GET", b"/", [(b"user-agent", b"Bun/1.2.19")], length=False))
    assert r.status == 200 and r.body == b"ok\n"
    r = send_raw(proxy.port, request_bytes("HEAD", b"/api/proxy", [(b"user-agent", b"Bun/1.2.19")], length=False))
    assert r.status == 200  # the configured path_prefix's root is the root too
    # A later recorded request is written after the probes: had they been recorded, they would be there.
    c = sdk(proxy)
    rid = c.messages.with_raw_response.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
    ).headers["request-id"]
    proxy.row(rid)
    assert count(proxy) == before + 1
    assert len(fake.order) == upstream_before + 1  # the probes never went upstream


def test_only_exact_probes_skip_auth(ops_proxy: tuple[Proxy, int], fake: FakeUpstream) -> None:
    """Anything that is not exactly a probe is authenticated and recorded as usual."""
    proxy, _ = ops_proxy
    before, upstream_before = count(proxy), len(fake.order)
    ua = [(b"user-agent", b"Bun/1.2.19")]
    not_probes = [
        request_bytes("HEAD", b"/?x=1", ua, length=False),  # a query string
        request_bytes("GET", b"/", ua, b"hello"),  # a body
        request_bytes("POST", b"/", ua, b"{}"),  # another method
        request_bytes("GET", b"//", ua, length=False),
        request_bytes("GET", b"/-/health/", ua, length=False),
        request_bytes("GET", b"/-/health?x", ua, length=False),
        request_bytes("POST", b"/-/health", ua, b"{}"),
        request_bytes("POST", b"/v1/messages", ua, b'{"model":"claude-sonnet-5-5"}'),
    ]
    for raw in not_probes:
        r = send_raw(proxy.port, raw)
        assert r.status in (401, 404), raw
        assert r.json()["type"] == "error"
    # Under the reserved prefix nothing is forwarded, even with a valid token.
    auth = [(b"x-api-key", MANAGED_TOKEN.encode())]
    for method, path in (("POST", b"/-/health"), ("GET", b"/-/metrics"), ("POST", b"/api/proxy/-/x")):
        r = send_raw(proxy.port, request_bytes(method, path, auth, b"{}"))
        assert r.status == 404 and r.json()["error"]["type"] == "not_found_error"
    rows = proxy.wait_rows("id > 0", n=before + len(not_probes) + 3)
    assert len(rows) == before + len(not_probes) + 3
    assert len(fake.order) == upstream_before  # none of them went upstream
    assert {r["error"] for r in rows[before:]} <= {"authentication_error", "not_found_error"}


def test_health_ok(ops_proxy: tuple[Proxy, int]) -> None:
    proxy, _ = ops_proxy
    before = count(proxy)
    r = httpx.get(f"{proxy.url}/-/health", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == "ok" and body["database_reachable"] is True and body["spooling"] is False
    assert body["version"] and body["uptime_s"] >= 0 and body["writer_backlog"] >= 0
    r = httpx.head(f"{proxy.url}/-/health", timeout=10)
    assert r.status_code == 200 and r.content == b""
    r = httpx.get(f"{proxy.url}/api/proxy/-/health", timeout=10)
    assert r.status_code == 200
    assert count(proxy) == before


def test_health_503_while_database_unwritable(fake: FakeUpstream, tmp_path: Path) -> None:
    """Another process holds the write lock: rows wait, and past the backlog threshold health answers 503."""
    proxy = start_proxy(tmp_path, fake.url, extra_args=("--set", "metrion_health_max_backlog=1"))
    blocker = sqlite3.connect(proxy.db, timeout=30)
    try:
        assert httpx.get(f"{proxy.url}/-/health", timeout=10).status_code == 200
        blocker.execute("BEGIN IMMEDIATE")
        rid = (
            sdk(proxy)
            .messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
            .headers["request-id"]
        )
        r = until(lambda: (h := httpx.get(f"{proxy.url}/-/health", timeout=10)).status_code == 503 and h, what="503")
        body = r.json()
        assert body["status"] == "unavailable" and body["database_reachable"] is False
        assert body["writer_backlog"] >= 1 and body["backlog_threshold"] == 1
        blocker.rollback()
        until(lambda: httpx.get(f"{proxy.url}/-/health", timeout=10).status_code == 200, what="200 again")
        assert proxy.row(rid)["status"] == 200  # the waiting row was written once the lock was gone
    finally:
        blocker.close()
        stop_proxy(proxy)
    assert not any(r["path"] in ("/", "/-/health") for r in proxy.rows())


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_equal_database_sums(ops_proxy: tuple[Proxy, int], fake: FakeUpstream) -> None:
    proxy, mport = ops_proxy
    fake.add("ops-529", Scenario(status=529))
    fake.add("ops-usage", Scenario(usage={"input_tokens": 1234, "output_tokens": 56, "cache_read_input_tokens": 700}))
    before = count(proxy)
    for user, scenario, stream in (
        ("alice", "ops-usage", False),
        ("alice", "ops-usage", True),
        ("bob", "ops-usage", False),
        (None, "ops-529", False),
        ("carol", "", True),
    ):
        headers = {"x-fake-scenario": scenario} | ({"x-metrion-user": user} if user else {})
        c = sdk(proxy, default_headers=headers)
        try:
            if stream:
                with c.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
                    s.get_final_message()
            else:
                c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
        except anthropic.APIStatusError:
            pass
    httpx.post(f"{proxy.url}/v1/messages", headers={"x-api-key": "wrong"}, json={}, timeout=10)
    proxy.wait_rows("id > 0", n=before + 6)

    def settled() -> dict | None:
        m = scrape(mport)
        return m if total(m, "metrion_requests_total") == len(proxy.rows()) else None

    m = until(settled, what="metrics to catch up with the database")
    rows = proxy.rows()
    assert total(m, "metrion_rows_written_total") == len(rows)
    for account in {r["account"] for r in rows}:
        mine = [r for r in rows if r["account"] == account]
        label = account or "none"
        assert total(m, "metrion_requests_total", account=label) == len(mine)
        assert total(m, "metrion_cost_usd_total", account=label) == pytest.approx(
            sum(r["cost_usd"] or 0 for r in mine), abs=1e-9
        )
        for kind, column in KINDS:
            assert total(m, "metrion_tokens_total", account=label, kind=kind) == sum(r[column] or 0 for r in mine)
    assert total(m, "metrion_cost_usd_total", model=MODEL) == pytest.approx(
        sum(r["cost_usd"] or 0 for r in rows if r["model"] == MODEL), abs=1e-9
    )
    errors = sum(1 for r in rows if r["error"] is not None)
    assert total(m, "metrion_requests_total") - total(m, "metrion_requests_total", error="none") == errors
    assert total(m, "metrion_requests_total", status="529", error="overloaded_error") == sum(
        1 for r in rows if r["status"] == 529
    )
    assert total(m, "metrion_request_latency_seconds_count") == len(rows)
    # users: only the configured one has a label of its own
    users = {dict(labels).get("user") for (name, labels) in m if name == "metrion_requests_total"}
    assert users <= {"alice", "other"} and "alice" in users
    assert total(m, "metrion_requests_total", user="alice") == sum(1 for r in rows if r["user"] == "alice")
    assert m[("metrion_writer_backlog", ())] >= 0 and m[("metrion_accounting_backlog", ())] >= 0  # both exported


def test_metrics_high_cardinality_guard(ops_proxy: tuple[Proxy, int], fake: FakeUpstream) -> None:
    """Random users, models and upstream error types never become label values."""
    proxy, mport = ops_proxy
    fake.add("ops-odd-error", Scenario(status=400, body=b'{"type":"error","error":{"type":"zz_odd_7","message":"x"}}'))
    before = count(proxy)
    sent = 0
    for i in range(40):
        headers = {"x-api-key": MANAGED_TOKEN, "x-metrion-user": f"user-{i}-\u00e9".encode()}
        if i % 3 == 0:
            headers["x-fake-scenario"] = "ops-odd-error"
        body = {"model": f"made-up-model-{i}", "max_tokens": 1, "messages": []}
        httpx.post(f"{proxy.url}/v1/messages", headers=headers, json=body, timeout=10)
        sent += 1
    proxy.wait_rows("id > 0", n=before + sent)

    def settled() -> dict | None:
        m = scrape(mport)
        return m if total(m, "metrion_requests_total") == len(proxy.rows()) else None

    m = until(settled, what="metrics to catch up")
    labels = [dict(lb) for (name, lb) in m if name.startswith("metrion_")]
    assert {lb["user"] for lb in labels if "user" in lb} <= {"alice", "other", "none"}
    models = {lb["model"] for lb in labels if "model" in lb}
    assert not any(x.startswith("made-up-model") for x in models)
    assert len(models) <= MAX_MODELS + 2
    assert {lb["error"] for lb in labels if "error" in lb}.isdisjoint({"zz_odd_7"})
    assert total(m, "metrion_requests_total", model="other", error="other") == sum(1 for i in range(40) if i % 3 == 0)


# --- attempts vs calls, count_tokens ----------------------------------------------------------------


def test_sdk_retries_stored_and_reported(ops_proxy: tuple[Proxy, int], fake: FakeUpstream) -> None:
    proxy, _ = ops_proxy
    fake.add("ops-retry-529", Scenario(status=529, headers={"retry-after-ms": "1"}))
    before = count(proxy)
    c = sdk(
        proxy,
        max_retries=2,
        default_headers={"x-fake-scenario": "ops-retry-529", "x-metrion-user": "retrier", "idempotency-key": "k-1"},
    )
    with pytest.raises(anthropic.APIStatusError):
        c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    rows = proxy.wait_rows("user = 'retrier'", n=3)
    assert [r["retry_count"] for r in rows] == [0, 1, 2]
    assert {r["request_key"] for r in rows} == {"k-1"}
    assert {(r["status"], r["error"]) for r in rows} == {(529, "overloaded_error")}
    assert count(proxy) >= before + 3

    summary = tmp_report(proxy, ["--json", "--user", "retrier"])["rows"][0]
    assert (summary["requests"], summary["calls"], summary["retried_calls"], summary["errors"]) == (3, 1, 1, 3)
    errors = tmp_report(proxy, ["errors", "--json", "--user", "retrier"])
    row = next(r for r in errors["rows"] if r["error"] == "overloaded_error")
    assert (row["requests"], row["calls"], row["retries"]) == (3, 1, 2)


def tmp_report(proxy: Proxy, args: list[str]) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = report_main(["--db", str(proxy.db), *args])
    assert code == 0, buf.getvalue()
    return json.loads(buf.getvalue())


def test_count_tokens_keeps_counted_number(ops_proxy: tuple[Proxy, int], fake: FakeUpstream) -> None:
    proxy, _ = ops_proxy
    c = sdk(proxy)
    raw = c.messages.with_raw_response.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert raw.parse().input_tokens == 42
    row = proxy.row(raw.headers["request-id"])
    assert row["counted_tokens"] == 42
    assert not row["input_tokens"] and row["cost_usd"] == 0 and row["error"] is None


# --- logs -----------------------------------------------------------------------------------------


def test_json_request_log_and_summary(ops_proxy: tuple[Proxy, int]) -> None:
    proxy, _ = ops_proxy
    rid = (
        sdk(proxy, default_headers={"user-agent": f"pasted {MANAGED_TOKEN} by mistake"})
        .messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
        .headers["request-id"]
    )
    row = proxy.row(rid)

    def logged() -> dict | None:
        for line in proxy.log.read_text(errors="replace").split("\n")[:-1]:  # whole lines: not one being written
            if rid in line and "{" in line:
                return json.loads(line[line.index("{") :])
        return None

    entry = until(logged, what="the request's JSON log line")
    assert {k: entry[k] for k in ("request_id", "account", "model", "status", "cost_usd", "input_tokens")} == {
        k: row[k] for k in ("request_id", "account", "model", "status", "cost_usd", "input_tokens")
    }
    until(lambda: "metrion: summary (last 1s)" in proxy.log.read_text(errors="replace"), what="a summary line")
    assert entry["client"] == "<redacted by metrion>"
    text = proxy.log.read_text(errors="replace")
    assert not [s for s in SECRETS if s in text]


def test_health_while_spooling_fleet_mode(fake: FakeUpstream, tmp_path: Path) -> None:
    """PostgreSQL unreachable: rows go to the local spool, so the proxy still records and stays in (200), and
    health and metrics say it is spooling."""
    mport = free_port()
    url = "postgresql://metrion@127.0.0.1:1/metrion"  # nothing listens on port 1: refused at once
    proxy = start_proxy(tmp_path, fake.url, f"metrics_listen: 127.0.0.1:{mport}", db=url)  # type: ignore[arg-type]
    try:
        sdk(proxy).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
        h = until(lambda: (r := httpx.get(f"{proxy.url}/-/health", timeout=10).json())["spooling"] and r, what="spool")
        assert h["status"] == "ok" and h["database_reachable"] is False and h["spool_depth"] >= 1
        assert total(scrape(mport), "metrion_spool_depth") >= 1
    finally:
        stop_proxy(proxy)


def test_log_options_through_metrion_proxy(fake: FakeUpstream, tmp_path: Path) -> None:
    """`metrion proxy` sets options one by one after the config: the log format and summary still apply, and
    Claude Code's probe is answered there too."""
    from tests.test_lean_proxy import start_lean

    proxy = start_lean(tmp_path, fake.url, "--set", "metrion_log_format=json", "--set", "metrion_summary_interval=1")
    try:
        assert send_raw(proxy.port, CLAUDE_CODE_PROBE).status == 200
        rid = (
            sdk(proxy)
            .messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
            .headers["request-id"]
        )
        proxy.row(rid)
        until(lambda: f'"request_id":"{rid}"' in proxy.log.read_text(errors="replace"), what="a JSON log line")
        until(lambda: "metrion: summary (last 1s)" in proxy.log.read_text(errors="replace"), what="a summary")
    finally:
        stop_proxy(proxy)
    assert len(proxy.rows()) == 1
