"""Prometheus metrics: counters and histograms fed from finished rows, served on their own listener.

Nothing here runs on mitmproxy's event loop: rows reach `Metrics.observe` from the observer thread (see
ops.py), and the gauges (writer backlog, rows written and dropped, budgets) are read when Prometheus scrapes,
on prometheus_client's server thread.

Label values are bounded whatever clients send: accounts come from the config (requests that did not
authenticate are `none`); users only when listed in `metrics_users`, every other user is `other`; models only
when a price is known for them, and at most MAX_MODELS of those, else `other`; error types from a fixed list,
else `other`; statuses are HTTP codes or `none`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

OTHER = "other"
NONE = "none"
MAX_MODELS = 100  # distinct model label values at most; more (even priced ones) are `other`
MODEL_CACHE = 1000
ERROR_TYPES = frozenset(
    {
        # Anthropic's error types
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
        "billing_error",
        "timeout_error",
        # the proxy's own
        "client_disconnect",
        "response_too_large",
        "upstream_timeout",
        "upstream_disconnect",
        "upstream_unreachable",
        "proxy_error",
        "proxy_shutdown",
        "metrion_internal_error",
        "unknown_model_blocked",
        "budget_exceeded",
        "client_protocol_error",
        "incomplete_stream",
        "usage_unreadable",
    }
)
_HTTP_ERROR_RE = re.compile(r"^http_[1-5]\d\d$")
TOKEN_KINDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_write": "cache_creation_input_tokens",
    "cache_read": "cache_read_input_tokens",
}
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)


def error_label(error: str | None) -> str:
    if error is None:
        return NONE
    return error if error in ERROR_TYPES or _HTTP_ERROR_RE.match(error) else OTHER


def status_label(status: Any) -> str:
    return str(status) if type(status) is int and 100 <= status <= 599 else NONE


class Labels:
    """Row values -> bounded label values."""

    def __init__(self, accounts: Iterable[str], users: Iterable[str], model_known: Callable[[str], bool]) -> None:
        self.accounts = frozenset(accounts)
        self.users = frozenset(users)
        self.model_known = model_known
        self._models: dict[str, str] = {}
        self._named = 0

    def account(self, value: str | None) -> str:
        if value is None:
            return NONE
        return value if value in self.accounts else OTHER

    def user(self, value: str | None) -> str:
        return value if value is not None and value in self.users else OTHER

    def model(self, value: str | None) -> str:
        if not value:
            return NONE
        label = self._models.get(value)
        if label is None:
            label = value if self._named < MAX_MODELS and self._known(value) else OTHER
            if label != OTHER:
                self._named += 1
                self._models[value] = label
            elif len(self._models) < MODEL_CACHE:  # the cache is bounded too: past it, other names cost a lookup
                self._models[value] = label
        return label

    def _known(self, model: str) -> bool:
        try:
            return bool(self.model_known(model))
        except Exception:  # noqa: BLE001 - a label is never worth an exception
            return False


class _StateCollector(Collector):
    """Values read at scrape time: the accounting and writer backlogs, the writer's counts, and the budgets'
    remaining amounts."""

    def __init__(
        self, store: Any, budgets: Callable[[], list[tuple[dict[str, str], float]]], accounting: Callable[[], int]
    ) -> None:
        self.store = store
        self.budgets = budgets
        self.accounting = accounting

    def collect(self) -> Iterator[Any]:
        store = self.store
        yield GaugeMetricFamily(
            "metrion_accounting_backlog", "Finished requests waiting to be made rows", value=self.accounting()
        )
        yield GaugeMetricFamily("metrion_writer_backlog", "Request rows waiting to be written", value=store.pending())
        yield CounterMetricFamily("metrion_rows_written", "Request rows written to the database", value=store.written)
        yield CounterMetricFamily(
            "metrion_rows_dropped", "Request rows dropped: database unwritable and backlog full", value=store.dropped
        )
        yield GaugeMetricFamily(
            "metrion_spool_depth",
            "Rows in the local spool, waiting for PostgreSQL (fleet mode; 0 with SQLite)",
            value=int(getattr(store, "spooled", 0) or 0),
        )
        g = GaugeMetricFamily(
            "metrion_budget_remaining_usd",
            "What is left of each budget in its current period (USD; negative when overspent)",
            labels=["account", "user", "scope", "period"],
        )
        for labels, remaining in self.budgets():
            g.add_metric([labels["account"], labels["user"], labels["scope"], labels["period"]], remaining)
        yield g


class Metrics:
    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "metrion_requests",
            "Requests recorded (one per upstream attempt), by account, user, model, status and error type",
            ["account", "user", "model", "status", "error"],
            registry=r,
        )
        self.tokens = Counter(
            "metrion_tokens", "Billed tokens by kind", ["account", "user", "model", "kind"], registry=r
        )
        self.cost = Counter("metrion_cost_usd", "Cost in USD as metered", ["account", "user", "model"], registry=r)
        self.unpriced = Counter(
            "metrion_unpriced_requests", "Requests whose cost is unknown", ["account", "model"], registry=r
        )
        self.latency = Histogram(
            "metrion_request_latency_seconds",
            "From the request's start to its end",
            ["account", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "metrion_ttft_seconds",
            "Time to first token (streamed answers: first byte of the stream; others: response headers)",
            ["account", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self._server: Any = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def add_state(
        self,
        store: Any,
        budgets: Callable[[], list[tuple[dict[str, str], float]]],
        accounting: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry.register(_StateCollector(store, budgets, accounting))

    def observe(self, row: dict[str, Any]) -> None:
        """One finished row (runs on the observer thread)."""
        lb = self.labels
        account, user, model = lb.account(row.get("account")), lb.user(row.get("user")), lb.model(row.get("model"))
        status, error = status_label(row.get("status")), error_label(row.get("error"))
        self._child(self.requests, account, user, model, status, error).inc()
        for kind, column in TOKEN_KINDS.items():
            n = row.get(column)
            if type(n) is int and n > 0:
                self._child(self.tokens, account, user, model, kind).inc(n)
        cost = row.get("cost_usd")
        if isinstance(cost, int | float) and cost >= 0:
            self._child(self.cost, account, user, model).inc(cost)
        elif cost is None and row.get("account") is not None and row.get("status") is not None:
            self._child(self.unpriced, account, model).inc()
        latency = row.get("latency_ms")
        if isinstance(latency, int | float) and latency >= 0:
            self._child(self.latency, account, model).observe(latency / 1000)
        ttft = row.get("ttft_ms")
        if isinstance(ttft, int | float) and ttft >= 0 and row.get("status") is not None:
            self._child(self.ttft, account, model).observe(ttft / 1000)

    def _child(self, metric: Any, *values: str) -> Any:
        """metric.labels(*values), remembered: the label values are bounded, and the lookup is half the cost."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def serve(self, host: str, port: int) -> None:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def budget_samples(budgets: Any, labels: Labels) -> list[tuple[dict[str, str], float]]:
    """Each budget's remaining USD, with bounded labels. Users not listed in `metrics_users` are folded into
    `other`, keeping the least remaining (the one closest to blocking)."""
    if budgets is None:
        return []
    for _ in range(3):  # the event loop may add a spend key while we read: read again
        try:
            states = budgets.status()
            break
        except RuntimeError:
            continue
    else:
        return []
    out: dict[tuple[str, str, str, str], float] = {}
    for s in states:
        account, user, is_user = s.scope
        key = (labels.account(account), labels.user(user) if is_user else NONE, "user" if is_user else "account")
        k = (*key, s.limit.period)
        out[k] = min(out.get(k, s.remaining), s.remaining)
    return [({"account": a, "user": u, "scope": sc, "period": p}, v) for (a, u, sc, p), v in out.items()]
