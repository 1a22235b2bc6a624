"""Running it as a service: the health endpoint, connectivity probes, metrics, request logs and the summary.

Probes. Exactly these requests are answered by the proxy itself, before authentication, never forwarded and
never recorded (nothing that is not forwarded can cost money):

- `GET /-/health` and `HEAD /-/health`: the health answer (200, or 503 when the proxy cannot record);
- `GET /` and `HEAD /`: a connectivity check (Claude Code sends an unauthenticated `HEAD /` before each
  session); answered 200.

A request is a probe only with that method and that exact path (no query string; with `path_prefix` set, the
prefix and the prefix plus `/` are the root too) and no body (no Content-Length other than 0, no
Transfer-Encoding). Any other request under the reserved prefix `/-/` is refused with 404 and recorded.

Everything else here runs off the event loop. Request rows are observed (the Prometheus metrics, one log line
per request) on the accounting thread that built them (`observed(store, inline=True)`); rows from other writers
(batch results) go on a queue (`observe`, one `SimpleQueue.put`) for the observer thread, which also writes,
every `metrion_summary_interval` seconds, a one-line summary.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from metrion_addon import __version__

if TYPE_CHECKING:  # prometheus_client (2 MB) loads only when the config asks for metrics: configure imports it
    from metrion_addon.metrics import Metrics
from metrion_addon.record import upstream_path
from metrion_addon.text import REDACTED, looks_like_credential

log = logging.getLogger(__name__)
request_log = logging.getLogger("metrion.requests")

RESERVED_PREFIX = "/-/"
HEALTH_PATH = "/-/health"
PROBE_METHODS = ("GET", "HEAD")
# A write that has not finished after this long means the database is not taking writes now (a lock held by
# another process waits up to the busy timeout, 10 s, before it even counts as a failure).
STALLED_WRITE_S = 2.0
LOG_FORMATS = ("text", "json", "off")
_STOP = object()
_RESCHEDULE = object()


def probe_kind(method: str, path: str, headers: Any, path_prefix: str) -> str | None:
    """The probe `health` or `root` (see the module's docstring), else None."""
    if method not in PROBE_METHODS:
        return None
    if headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers:
        return None
    p = upstream_path(path, path_prefix)
    if p == HEALTH_PATH:
        return "health"
    if p == "/":
        return "root"
    return None


def reserved(path: str) -> bool:
    """Paths of the proxy's own: never forwarded."""
    return path.startswith(RESERVED_PREFIX) or path == RESERVED_PREFIX.rstrip("/")


@dataclass
class Health:
    store: Any  # metrion_addon.store.Store, or None before the config is loaded
    max_backlog: int  # past this many waiting rows, an unwritable database makes the proxy unhealthy
    started: float
    accounting: Callable[[], int] = lambda: 0  # finished requests not yet made rows (the accountant's queue)

    def check(self, now: float | None = None) -> tuple[int, dict[str, Any]]:
        """The SQLite store is unreachable when its last write failed or one is stuck; the PostgreSQL store
        (fleet mode) when it spools. Rows in the spool are on disk: only rows held in memory count toward the
        threshold, so a proxy that spools (and so still records) stays in."""
        now = time.monotonic() if now is None else now
        store = self.store
        if store is None:
            return 503, {"status": "unavailable", "version": __version__, "reason": "not configured"}
        busy = getattr(store, "busy_since", None)
        spooling = bool(getattr(store, "spooling", False))
        spooled = int(getattr(store, "spooled", 0) or 0)
        stuck = busy is not None and now - busy >= STALLED_WRITE_S
        reachable = not getattr(store, "failing", False) and not spooling and not stuck
        accounting = self.accounting()
        backlog = store.pending()
        healthy = reachable or accounting + backlog - spooled < self.max_backlog
        body = {
            "status": "ok" if healthy else "unavailable",
            "version": __version__,
            "uptime_s": round(now - self.started, 3),
            "database_reachable": reachable,
            "accounting_backlog": accounting,
            "writer_backlog": backlog,
            "backlog_threshold": self.max_backlog,
            "rows_written": store.written,
            "rows_dropped": store.dropped,
            "spooling": spooling,
            "spool_depth": spooled,
        }
        return (200 if healthy else 503), body


def loggable(row: dict[str, Any]) -> dict[str, Any]:
    """The row as logged: the same fields, credential-looking values masked (labels are masked when stored;
    this covers every other text field too)."""
    return {k: REDACTED if isinstance(v, str) and looks_like_credential(v) else v for k, v in row.items()}


def request_line(row: dict[str, Any]) -> str:
    """The per-request log line (text format)."""
    who = row.get("account") or "-"
    if row.get("user"):
        who += "/" + str(row["user"])
    cost = row.get("cost_usd")
    parts = [
        who,
        f"{row.get('method')} {row.get('path')}",
        str(row.get("model") or "-"),
        str(row.get("status") if row.get("status") is not None else "-"),
        f"in={row.get('input_tokens') or 0} out={row.get('output_tokens') or 0}",
        "$?" if cost is None else f"${cost:.6f}",
        f"{row.get('latency_ms') or 0:.0f}ms",
    ]
    if row.get("retry_count"):
        parts.append(f"retry={row['retry_count']}")
    if row.get("error"):
        parts.append(f"error={row['error']}")
    return "metrion: " + " ".join(parts)


class Summary:
    """Counts since the last summary line."""

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.cost = 0.0

    def add(self, row: dict[str, Any]) -> None:
        self.requests += 1
        self.errors += row.get("error") is not None
        cost = row.get("cost_usd")
        if isinstance(cost, int | float):
            self.cost += cost

    def line(self, interval: float, store: Any) -> str:
        backlog = store.pending() if store is not None else 0
        dropped = store.dropped if store is not None else 0
        return (
            f"metrion: summary (last {interval:g}s): {self.requests} requests, ${self.cost:.4f}, "
            f"{self.errors} errors, writer backlog {backlog}, {dropped} rows dropped in total"
        )


class Observer:
    """The thread that takes finished rows off the event loop: metrics, request log lines, the summary."""

    def __init__(self, metrics: Any, store: Any, log_format: str, summary_interval: float) -> None:
        self.metrics = metrics
        self.store = store
        self.log_format = log_format
        self.summary_interval = summary_interval
        self.observed = 0
        self._summary = Summary()
        self._lock = threading.Lock()  # the summary and the count: rows are observed on two threads
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="metrion-observer", daemon=True)

    def start(self) -> Observer:
        self._thread.start()
        return self

    def put(self, row: dict[str, Any]) -> None:
        self._queue.put(row)

    def observe_here(self, row: dict[str, Any]) -> None:
        """Observe a row on the calling thread (the accounting thread's rows: no other thread is woken)."""
        with self._lock:
            self._summary.add(row)
        self._observe(row)

    def set_options(self, log_format: str, summary_interval: float) -> None:
        self.log_format = log_format
        if summary_interval != self.summary_interval:
            self.summary_interval = summary_interval
            self._queue.put(_RESCHEDULE)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        due = self._next_due()
        while True:
            timeout = None if due is None else max(0.0, due - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is _RESCHEDULE:
                due = self._next_due()
            elif item is not None:
                self.observe_here(item)
            if due is not None and time.monotonic() >= due:
                with self._lock:
                    summary, self._summary = self._summary, Summary()
                log.info(summary.line(self.summary_interval, self.store))
                due = self._next_due()

    def _next_due(self) -> float | None:
        return time.monotonic() + self.summary_interval if self.summary_interval > 0 else None

    def _observe(self, row: dict[str, Any]) -> None:
        try:
            if self.metrics is not None:
                self.metrics.observe(row)
            if self.log_format == "text":
                request_log.info(request_line(loggable(row)))
            elif self.log_format == "json":
                request_log.info(json.dumps(loggable(row), separators=(",", ":"), default=str))
        except Exception:  # noqa: BLE001 - the observer must outlive any one row
            log.exception("metrion: failed to observe a request row")
        finally:
            with self._lock:
                self.observed += 1


def mode_ports(modes: list[str]) -> set[int]:
    """The ports mitmproxy listens on for these `--mode` specs (the metrics listener must not be one)."""
    from mitmproxy.proxy.mode_specs import ProxyMode

    ports = set()
    for spec in modes:
        try:
            port = ProxyMode.parse(spec).listen_port()
        except Exception:  # noqa: BLE001 - mitmproxy reports a bad mode itself
            continue
        if port is not None:
            ports.add(port)
    return ports


class Service:
    """What addon.py wires: probes and health on the request side; metrics, logs and the summary off it."""

    def __init__(self) -> None:
        self.health = Health(None, 1000, time.monotonic())
        self.path_prefix = ""
        self.observer: Observer | None = None
        self.metrics: Metrics | None = None

    @staticmethod
    def add_options(loader: Any) -> None:
        loader.add_option(
            "metrion_log_format",
            str,
            "text",
            "One log line per request: text, json (the row's fields, for log shippers) or off.",
            choices=LOG_FORMATS,
        )
        loader.add_option(
            "metrion_health_max_backlog",
            int,
            1000,
            f"{HEALTH_PATH} answers 503 when the database is unwritable and more rows than this wait.",
        )
        loader.add_option(
            "metrion_summary_interval",
            int,
            60,
            "Seconds between the one-line summaries logged at info level (0: none).",
        )

    def update(self, options: Any) -> None:
        """Options that may change without a new config (mitmproxy sets `--set` options one by one)."""
        self.health.max_backlog = max(0, options.metrion_health_max_backlog)
        if self.observer is not None:
            self.observer.set_options(options.metrion_log_format, options.metrion_summary_interval)

    def configure(self, options: Any, config: Any, store: Any, budgets: Any, pricer: Any) -> None:
        """(Re)start with a new config; raises ValueError when the metrics listener cannot be opened."""
        self.close()
        self.path_prefix = config.path_prefix
        self.health = Health(store, max(0, options.metrion_health_max_backlog), self.health.started)
        self.metrics = None
        if config.metrics_listen is not None:
            host, port = config.metrics_listen
            if port in mode_ports(list(options.mode)):
                raise ValueError(f"metrics_listen port {port} is the proxy's own port")
            from metrion_addon.metrics import Labels, Metrics, budget_samples

            labels = Labels(
                (a.name for a in config.accounts),
                config.metrics_users,
                lambda model: pricer.knows(model, time.time()),
            )
            metrics = Metrics(labels)
            metrics.add_state(store, lambda: budget_samples(budgets, labels), lambda: self.health.accounting())
            try:
                metrics.serve(host, port)
            except OSError as e:
                raise ValueError(f"cannot listen for metrics on {host}:{port}: {e}") from None
            self.metrics = metrics
            if host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("metrion: metrics listen on %s:%d, not loopback: they name accounts and spend", host, port)
            log.info("metrion: Prometheus metrics on http://%s:%d/metrics", host, port)
        self.observer = Observer(self.metrics, store, options.metrion_log_format, options.metrion_summary_interval)
        self.observer.start()

    def answer_probe(self, flow: http.HTTPFlow) -> bool:
        """Answer a probe locally (True); any other request is left alone (False)."""
        req = flow.request
        kind = probe_kind(req.method, req.path, req.headers, self.path_prefix)
        if kind is None:
            return False
        if kind == "health":
            status, body = self.health.check()
            content = json.dumps(body).encode()
            ctype = "application/json"
        else:
            status, content, ctype = 200, b"ok\n", "text/plain; charset=utf-8"
        if req.method == "HEAD":
            content = b""
        flow.response = http.Response.make(status, content, {"content-type": ctype, "cache-control": "no-store"})
        flow.metadata["metrion_probe"] = kind
        return True

    def observe(self, row: dict[str, Any]) -> None:
        if self.observer is not None:
            self.observer.put(row)

    def observe_here(self, row: dict[str, Any]) -> None:
        if self.observer is not None:
            self.observer.observe_here(row)

    def observed(self, store: Any, inline: bool = False) -> ObservedStore:
        """The store, with every row put into it observed too: on the observer thread, or with `inline` on the
        thread that puts it (the accounting thread, already awake: no second thread to wake for each row)."""
        return ObservedStore(store, self, inline)

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
            self.observer = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


class ObservedStore:
    """A store whose `put` also observes the row: hands it to the observer thread (thread-safe: both only
    enqueue), or with `inline` observes it on the calling thread."""

    def __init__(self, store: Any, service: Service, inline: bool = False) -> None:
        self._store, self._service = store, service
        self._observe = service.observe_here if inline else service.observe

    def put(self, row: dict[str, Any]) -> None:
        self._store.put(row)
        self._observe(row)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
