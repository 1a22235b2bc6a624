"""Issue 14 without a proxy: which requests are probes, the health rule, bounded labels, config, attempts."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy import http

from metrion_addon.budget import Budgets
from metrion_addon.budget_settings import AccountBudgets, BudgetSettings, Limit
from metrion_addon.config import ConfigError, parse_config
from metrion_addon.metrics import MAX_MODELS, Labels, Metrics, budget_samples, error_label, status_label
from metrion_addon.ops import Health, probe_kind, request_line
from metrion_addon.record import attempt_headers, counted_tokens


def headers(**kw: str) -> http.Headers:
    return http.Headers(**{k.replace("_", "-"): v for k, v in kw.items()})


@pytest.mark.parametrize(
    ("method", "path", "hdrs", "prefix", "kind"),
    [
        ("HEAD", "/", {}, "", "root"),
        ("GET", "/", {"content_length": "0"}, "", "root"),
        ("GET", "/-/health", {}, "", "health"),
        ("HEAD", "/-/health", {}, "", "health"),
        ("GET", "/api/proxy", {}, "/api/proxy", "root"),
        ("GET", "/api/proxy/", {}, "/api/proxy", "root"),
        ("GET", "/api/proxy/-/health", {}, "/api/proxy", "health"),
        ("POST", "/", {}, "", None),
        ("OPTIONS", "/", {}, "", None),
        ("get", "/", {}, "", None),
        ("GET", "/?", {}, "", None),
        ("GET", "/?a=1", {}, "", None),
        ("GET", "//", {}, "", None),
        ("GET", "/-/health/", {}, "", None),
        ("GET", "/-/health?x", {}, "", None),
        ("GET", "/-/Health", {}, "", None),
        ("GET", "/", {"content_length": "1"}, "", None),
        ("GET", "/", {"transfer_encoding": "chunked"}, "", None),
        ("GET", "/v1/messages", {}, "", None),
        ("GET", "/api/proxy", {}, "", None),
        ("GET", "/api/proxyx", {}, "/api/proxy", None),
    ],
)
def test_probe_kind_matches_exactly(method: str, path: str, hdrs: dict, prefix: str, kind: str | None) -> None:
    assert probe_kind(method, path, headers(**hdrs), prefix) == kind


class FakeStore:
    def __init__(self, pending: int = 0, failing: bool = False, busy_since: float | None = None) -> None:
        self._pending, self.failing, self.busy_since = pending, failing, busy_since
        self.written = self.dropped = 0

    def pending(self) -> int:
        return self._pending


class FakePgStore:
    """The PostgreSQL store's surface: no `failing`/`busy_since`; `spooling` and `spooled` instead."""

    def __init__(self, queued: int, spooled: int) -> None:
        self.queued, self.spooled, self.spooling = queued, spooled, spooled > 0
        self.written = self.dropped = 0

    def pending(self) -> int:
        return self.queued + self.spooled


@pytest.mark.parametrize(
    ("store", "status", "reachable"),
    [
        (FakeStore(), 200, True),
        (FakeStore(pending=5000), 200, True),  # a busy but working writer is healthy
        (FakeStore(pending=9, failing=True), 200, False),  # unwritable, but below the threshold
        (FakeStore(pending=10, failing=True), 503, False),
        (FakeStore(pending=10, busy_since=100.0), 200, True),  # a write in progress for 1 s
        (FakeStore(pending=10, busy_since=90.0), 503, False),  # stuck for 11 s
        (FakePgStore(queued=50, spooled=0), 200, True),
        (FakePgStore(queued=2, spooled=5000), 200, False),  # spooling: rows are on disk, it still records
        (FakePgStore(queued=10, spooled=5000), 503, False),  # and rows pile up in memory too
    ],
)
def test_health_rule(store: FakeStore | FakePgStore, status: int, reachable: bool) -> None:
    code, body = Health(store, 10, started=0.0).check(now=101.0)
    assert (code, body["database_reachable"]) == (status, reachable)
    assert body["spooling"] == bool(getattr(store, "spooling", False))
    assert body["status"] == ("ok" if status == 200 else "unavailable")


def test_health_counts_requests_not_yet_accounted() -> None:
    """Finished requests waiting for the accounting thread are rows in memory too: with an unwritable database
    they count toward the threshold with the writer's own backlog."""
    health = Health(FakeStore(pending=6, failing=True), 10, started=0.0)
    assert health.check(now=1.0)[0] == 200
    health.accounting = lambda: 4
    code, body = health.check(now=1.0)
    assert (code, body["accounting_backlog"], body["writer_backlog"]) == (503, 4, 6)


def test_metrics_export_both_backlogs() -> None:
    from prometheus_client import generate_latest

    metrics = Metrics(Labels(["acme"], [], lambda m: True))
    metrics.add_state(FakeStore(pending=6), lambda: [], lambda: 4)
    text = generate_latest(metrics.registry).decode()
    assert "metrion_accounting_backlog 4.0" in text and "metrion_writer_backlog 6.0" in text


def test_health_not_configured() -> None:
    assert Health(None, 10, 0.0).check()[0] == 503


def test_labels_are_bounded() -> None:
    labels = Labels(["acme"], ["alice"], lambda m: m.startswith("claude-"))
    assert [labels.account(a) for a in ("acme", None, "intruder")] == ["acme", "none", "other"]
    assert [labels.user(u) for u in ("alice", "bob", None)] == ["alice", "other", "other"]
    assert labels.model("claude-x") == "claude-x" and labels.model("gpt-5") == "other" and labels.model(None) == "none"
    names = {labels.model(f"claude-{i}") for i in range(3 * MAX_MODELS)}
    assert len(names - {"other"}) <= MAX_MODELS and "other" in names
    assert labels.model("claude-x") == "claude-x"  # once named, always named
    assert error_label("overloaded_error") == "overloaded_error" and error_label("http_418") == "http_418"
    assert error_label("Overloaded ") == "other" and error_label("x" * 500) == "other" and error_label(None) == "none"
    assert [status_label(s) for s in (200, 529, None, 99, 600, "200")] == ["200", "529", "none", "none", "none", "none"]


def test_budget_gauge_samples_fold_unlisted_users() -> None:
    spec = AccountBudgets(
        account=(Limit("daily", 100.0),),
        user_default=(Limit("daily", 10.0),),
        users={"alice": (Limit("monthly", 50.0),)},
    )
    budgets = Budgets(BudgetSettings(accounts={"acme": spec}), clock=lambda: 1_800_000_000.0)
    for user, cost in (("alice", 5.0), ("u1", 2.0), ("u2", 7.0), (None, 1.0)):
        budgets.add("acme", user, cost)
    labels = Labels(["acme"], ["alice"], lambda m: True)
    got = {tuple(lb.values()): v for lb, v in budget_samples(budgets, labels)}
    assert got[("acme", "none", "account", "daily")] == pytest.approx(100 - 15)
    assert got[("acme", "alice", "user", "monthly")] == pytest.approx(45)
    assert got[("acme", "other", "user", "daily")] == pytest.approx(3)  # u2, the least left of the unlisted
    assert budget_samples(None, labels) == []


def config(extra: str) -> str:
    return f"accounts:\n  - name: a\n    tokens: [sk-metrion-aaaaaaaaaaaa]\n{extra}\n"


def test_metrics_config() -> None:
    c = parse_config(config("metrics_listen: 127.0.0.1:9464\nmetrics_users: [alice, bob]"), Path("/x.yaml"), {})
    assert c.metrics_listen == ("127.0.0.1", 9464) and c.metrics_users == ("alice", "bob")
    assert parse_config(config("metrics_listen: '[::1]:9464'"), Path("/x.yaml"), {}).metrics_listen == ("::1", 9464)
    assert parse_config(config(""), Path("/x.yaml"), {}).metrics_listen is None  # off by default
    for bad in ("9464", "127.0.0.1:0", "127.0.0.1:99999", "host:port", "127.0.0.1:8080"):
        with pytest.raises(ConfigError, match="metrics_listen"):
            parse_config(config(f"metrics_listen: '{bad}'"), Path("/x.yaml"), {})
    with pytest.raises(ConfigError, match="metrics_users"):
        parse_config(config("metrics_users: alice"), Path("/x.yaml"), {})


def test_attempt_headers_and_counted_tokens() -> None:
    assert attempt_headers(headers(x_stainless_retry_count="2", idempotency_key="k")) == (2, "k")
    assert attempt_headers(headers(x_client_request_id="c-1")) == (None, "c-1")
    for junk in ("-1", "1.5", "", "9" * 20, "\u0663"):
        assert attempt_headers(headers(x_stainless_retry_count=junk))[0] is None
    assert counted_tokens("/v1/messages/count_tokens", 200, b'{"input_tokens": 42}') == 42
    assert counted_tokens("/v1/messages", 200, b'{"input_tokens": 42}') is None
    assert counted_tokens("/v1/messages/count_tokens", 400, b'{"input_tokens": 42}') is None
    for body in (b"", b"[]", b"{", b'{"input_tokens": -1}', b'{"input_tokens": true}', b'{"input_tokens": 1e3}'):
        assert counted_tokens("/v1/messages/count_tokens", 200, body) is None


def test_request_line() -> None:
    row = {"account": "acme", "user": "alice", "method": "POST", "path": "/v1/messages", "model": "m", "status": 529}
    line = request_line({**row, "latency_ms": 12.4, "cost_usd": None, "retry_count": 2, "error": "overloaded_error"})
    assert line == "metrion: acme/alice POST /v1/messages m 529 in=0 out=0 $? 12ms retry=2 error=overloaded_error"


def test_rows_put_inline_are_observed_on_the_putting_thread_and_others_on_the_observer() -> None:
    """The accounting thread observes its own rows (no second thread woken per request); other writers' rows
    (batch results) still go to the observer thread's queue."""
    from metrion_addon.ops import Observer, Service

    class Rows:
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def put(self, row: dict) -> None:
            self.rows.append(row)

    svc = Service()
    svc.observer = Observer(None, None, "off", 0)  # never started: only an inline put can be observed
    store = Rows()
    svc.observed(store, inline=True).put({"error": None, "cost_usd": 0.25})
    assert svc.observer.observed == 1 and (svc.observer._summary.requests, svc.observer._summary.cost) == (1, 0.25)
    svc.observed(store).put({"error": "overloaded_error", "cost_usd": None})
    assert svc.observer.observed == 1 and svc.observer._queue.qsize() == 1  # queued for the observer thread
    assert len(store.rows) == 2
