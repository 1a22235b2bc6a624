"""Budget alerts to webhooks, from a background thread that never delays a request (stdlib urllib only).

`alerts: [{url: https://..., on: [soft, hard_80, hard]}]` in the config. Budgets decide *when* (once per budget,
threshold and period: budget.Budgets._alert); this module only delivers: the event loop calls `enqueue`, which
never blocks (a full queue drops the alert with a log line), and a daemon thread POSTs the JSON to every hook that
wants the event, retrying a few times with a growing pause. Failures are logged, never raised. In fleet mode the
thread first claims the alert in PostgreSQL (`claims`, fleet_alerts.py), so the fleet sends it once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from metrion_addon.budget import ALERT_EVENTS, BudgetState

log = logging.getLogger(__name__)

QUEUE_MAX = 1000


@dataclass(frozen=True)
class AlertHook:
    url: str
    on: frozenset[str] = frozenset(ALERT_EVENTS)


def payload(event: str, state: BudgetState) -> dict[str, Any]:
    account, user, is_user = state.scope
    return {
        "event": event,  # soft | hard_80 | hard
        "budget": state.name,
        "account": account,
        "user": user if is_user else None,
        "period": state.limit.period,
        "enforce": "hard" if state.limit.hard else "soft",
        "spent": round(state.spent, 9),
        "reserved": round(state.reserved, 9),
        "limit": state.limit.usd,
        "period_start": state.period_start.isoformat(),
        "resets_at": state.resets_at.isoformat(),
    }


class Alerter:
    def __init__(
        self, hooks: tuple[AlertHook, ...], attempts: int = 4, backoff: float = 0.5, timeout: float = 5.0
    ) -> None:
        self.hooks = hooks
        self.attempts, self.backoff, self.timeout = attempts, backoff, timeout
        self._queue: queue.Queue[tuple[tuple[str, ...], dict[str, Any]] | None] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.claims: Any = None  # fleet mode: fleet_alerts.AlertClaims, asked on the alert thread before sending

    def start(self) -> Alerter:
        if self.hooks and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metrion-alerts", daemon=True)
            self._thread.start()
        return self

    def enqueue(self, event: str, state: BudgetState) -> None:
        """Called on the event loop: never blocks."""
        if self._thread is None:
            return
        urls = tuple(hook.url for hook in self.hooks if event in hook.on)
        if urls:
            try:
                self._queue.put_nowait((urls, payload(event, state)))
            except queue.Full:
                log.error("metrion: alert queue full; dropped a %s alert for %s", event, state.name)

    def close(self, timeout: float = 2.0) -> None:
        """Stop after what is queued has been tried (waiting at most `timeout` seconds)."""
        if self._thread is None:
            return
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)
        self._thread = None
        if self.claims is not None:
            self.claims.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            urls, body = item
            if self.claims is not None and not self.claims.claim(body):
                continue  # another proxy of the fleet sent it
            for url in urls:
                self.deliver(url, body)

    def deliver(self, url: str, body: dict[str, Any]) -> bool:
        import urllib.error  # on the alert thread, at the first alert: a proxy without alerts never loads it
        import urllib.request

        data = json.dumps(body).encode()
        for attempt in range(1, self.attempts + 1):
            req = urllib.request.Request(
                url, data=data, method="POST", headers={"content-type": "application/json", "user-agent": "metrion"}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                return True
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code}"
            except Exception as e:  # unreachable, timeout, bad URL: logged, never raised
                problem = f"{e.__class__.__name__}: {e}"
            log.warning(
                "metrion: budget alert %s for %s to %s failed (attempt %d/%d): %s",
                body.get("event"), body.get("budget"), _safe_url(url), attempt, self.attempts, problem,
            )  # fmt: skip
            if attempt < self.attempts and not self._stop.wait(self.backoff * 2 ** (attempt - 1)):
                continue
            if self._stop.is_set():
                break
        log.error("metrion: budget alert %s for %s was not delivered", body.get("event"), body.get("budget"))
        return False


def _safe_url(url: str) -> str:
    """The URL without its query (a webhook token often sits there)."""
    return url.partition("?")[0]


def parse_alerts(ctx: Any, node: Any) -> tuple[AlertHook, ...]:
    """`alerts:` of the config (ctx and node are config.py's validation context and YAML node)."""
    hooks = []
    for i, a_node in enumerate(ctx.sequence(node, "alerts")):
        where = f"alerts[{i}]"
        a = ctx.mapping(a_node, where, ("url", "on"))
        if "url" not in a:
            raise ctx.fail(f"{where}.url", a_node, "required")
        url = ctx.string(a["url"], f"{where}.url")
        if not url.startswith(("http://", "https://")):
            raise ctx.fail(f"{where}.url", a["url"], "must be an http:// or https:// URL")
        on = frozenset(ALERT_EVENTS)
        if "on" in a:
            events = [ctx.string(e, f"{where}.on") for e in ctx.sequence(a["on"], f"{where}.on")]
            bad = [e for e in events if e not in ALERT_EVENTS]
            if bad or not events:
                raise ctx.fail(f"{where}.on", a["on"], f"must list some of {', '.join(ALERT_EVENTS)}")
            on = frozenset(events)
        hooks.append(AlertHook(url, on))
    return tuple(hooks)
