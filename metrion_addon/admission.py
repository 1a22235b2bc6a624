"""Budget admission for the addon: which requests budgets see, what they reserve, and the refusals. No mitmproxy.

The addon calls, per request: `at_headers` in `requestheaders` (before any byte goes upstream), `at_body` in the
`request` hook once the body is buffered, and `settle` when the row is priced (response, error, disconnect or
shutdown). Everything here runs on the event loop and is O(budgets that apply); the alert and in-flight file
threads only read snapshots.

Rules (docs/budgets.md):
- Free endpoints (`count_tokens`, `models`) are never refused by a budget: refusing them saves nothing.
- Any other request is refused (429) when a hard budget that applies is used up: spent + reserved >= limit.
- A Messages request reserves its worst-case cost (estimate.py) against every budget that applies, and is
  refused (429) when that does not fit a hard one. An unknown model is reserved at the most expensive known
  rates (`unknown_model_budget: max_rate`, the default) or refused (403, `refuse`).
- A body over `stream_large_bodies` goes upstream before it can be read: under a hard budget it reserves its
  Content-Length as prompt tokens at the most expensive rates plus MAX_OUTPUT_TOKENS of output, and is refused
  (413) when it has no Content-Length (nothing bounds it).
- A Message Batch create (`POST /v1/messages/batches`) reserves the whole batch's worst case at batch rates, and
  the batch keeps that reservation until its results are metered (batch_budget.py).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from metrion_addon import estimate as est
from metrion_addon.alerts import Alerter, AlertHook
from metrion_addon.batch_budget import BATCH_WINDOW, BatchReservations
from metrion_addon.budget import Budgets, Check, response_headers
from metrion_addon.budget_settings import BudgetSettings
from metrion_addon.inflight import InflightWriter
from metrion_addon.labels import LabelError, UserConflict, resolve_user
from metrion_addon.pricing import COUNT_TOKENS_PATH, Pricer, Rates
from metrion_addon.record import clean_label

log = logging.getLogger(__name__)

MESSAGES_PATH = "/v1/messages"
BATCHES_PATH = "/v1/messages/batches"


def is_batch_create(method: str, path: str) -> bool:
    return method == "POST" and path == BATCHES_PATH


def is_free(path: str) -> bool:
    """Endpoints Anthropic does not bill: budgets never refuse them."""
    return path == COUNT_TOKENS_PATH or path == "/v1/models" or path.startswith("/v1/models/")


def user_for(bound: str | None, header: str | None, on_conflict: str) -> tuple[str | None, Refusal | None]:
    """The request's user (labels.resolve_user), or the refusal: 403 for a header naming another user than the
    token's, 400 for a label that mixes scripts."""
    try:
        return resolve_user(bound, header, on_conflict), None
    except UserConflict as e:
        return bound, Refusal(403, "permission_error", f"{e}; remove the header", "user_conflict")
    except LabelError as e:
        return clean_label(header), Refusal(400, "invalid_request_error", f"x-metrion-user: {e}", "invalid_user")


@dataclass(frozen=True)
class Refusal:
    status: int
    error_type: str
    message: str
    record_as: str
    retry_after: str | None = None


class Gate:
    def __init__(
        self,
        settings: BudgetSettings,
        pricer: Pricer,
        clock: Callable[[], float],
        alerts: tuple[AlertHook, ...] = (),
    ) -> None:
        self.settings = settings
        self.pricer = pricer
        self.alerter = Alerter(alerts)
        self.budgets = Budgets(settings, clock=clock, on_alert=self.alerter.enqueue)
        self.inflight: InflightWriter | None = None
        self.batches = BatchReservations(self.budgets, self._changed)  # batches reserve until metered
        self._max: tuple[str, Rates] | None = None  # (UTC day, rates): prices change by date
        self.test_clock = False  # metrion_test_clock: request times follow the test clock (see shift)

    def start(
        self, database: Path, connect: Callable[[Path], sqlite3.Connection], fleet_url: str | None = None
    ) -> Gate:
        """Seed the current periods' spend from the database; with `fleet_url` (PostgreSQL), budgets are shared
        with the other proxies through leases instead (leases.py), and `database` is only the local spool."""
        if self.settings.any:
            if fleet_url:
                from metrion_addon.leases import LeaseBook  # psycopg: fleet mode only

                self.budgets.fleet = LeaseBook(fleet_url, self.budgets).start()
                if self.alerter.hooks:
                    from metrion_addon.fleet_alerts import AlertClaims

                    self.alerter.claims = AlertClaims(fleet_url)  # the fleet sends each alert once
            conn = connect(database)
            try:
                if not fleet_url:
                    self.budgets.seed(conn)  # a restart neither forgets nor double-counts this period's spend
                self.batches.seed(conn, self.budgets.clock())  # nor what unmetered batches still reserve
            finally:
                conn.close()
            self.inflight = InflightWriter(database, self.budgets).start()
        self.alerter.start()
        return self

    def close(self) -> None:
        if self.budgets.fleet is not None:
            self.budgets.fleet.close()  # after the requests in flight settled: unspent slices go back
            self.budgets.fleet = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.alerter.close()

    def shift(self) -> float:
        """Testing only: how far the test clock is from the real one (0 unless metrion_test_clock is set)."""
        return self.budgets.clock() - time.time() if self.test_clock else 0.0

    def max_rates(self, started: float) -> Rates:
        ts = datetime.fromtimestamp(started, UTC)
        day = ts.date().isoformat()
        if self._max is None or self._max[0] != day:
            self._max = (day, est.max_rates(self.pricer, ts))
        return self._max[1]

    # -- the three steps ---------------------------------------------------------------------------

    def at_headers(
        self,
        ticket: Hashable,
        account: str,
        user: str | None,
        path: str,
        started: float,
        streamed_body: bool = False,
        content_length: str | None = None,
        method: str = "",
    ) -> tuple[Refusal | None, dict[str, str]]:
        """Before any byte goes upstream: refused if a hard budget is used up; else the ticket is opened (its cost
        will count in the periods of `started`). A body that will not be buffered reserves here."""
        if is_free(path):
            return None, {}
        check = self.budgets.check(account, user, now=started)
        if check.blocked is not None:
            return self._refusal(check), {}
        batch = is_batch_create(method, path)
        self.budgets.open(ticket, account, user, started, started + BATCH_WINDOW if batch else None)
        if streamed_body and self.budgets.applies(account, user, hard_only=True):
            try:
                length = int(content_length or "")
            except ValueError:
                length = -1
            if length < 0:
                msg = (
                    "this request's body is streamed upstream before metrion can read it (over stream_large_bodies) "
                    "and has no Content-Length, so its cost has no bound; a hard budget applies, so it is refused"
                )
                return Refusal(413, "request_too_large", msg, "budget_unbounded"), {}
            top = self.max_rates(started)
            if batch:  # its requests are not known: as many as the body can hold
                self.batches.asked(ticket, 0)
                return self._reserve(ticket, account, user, started, est.unreadable_batch(length, top))
            return self._reserve(ticket, account, user, started, est.unreadable_body(length, top))
        return None, response_headers(check)

    def reads_body(self, method: str, path: str, account: str | None, user: str | None) -> bool:
        """Whether `at_body` reads the parsed body: a Messages request or a batch create under a hard budget.
        Elsewhere the addon reads the model alone: up to 2 MB of a Claude Code body is not built as Python
        objects on the event loop."""
        if account is None or (path != MESSAGES_PATH and not is_batch_create(method, path)):
            return False
        return self.budgets.applies(account, user, hard_only=True)

    def at_body(
        self,
        ticket: Hashable,
        account: str,
        user: str | None,
        path: str,
        started: float,
        size: int,
        body: object,
        method: str = "POST",
    ) -> tuple[Refusal | None, dict[str, str] | None]:
        """The body is buffered: a Messages request reserves its worst-case cost, a batch create its batch's.
        (None, None): nothing changed."""
        batch = is_batch_create(method, path)
        if not self.reads_body(method, path, account, user) or not self.budgets.open_ticket(ticket):
            return None, None
        unknown = self.max_rates(started) if self.settings.unknown_model == "max_rate" else None
        ts = datetime.fromtimestamp(started, UTC)
        if batch:
            got = est.batch_estimate(size, body, self.pricer, ts, unknown, self.max_rates(started))
            e = got[0] if got is not None else None
            if got is not None:
                self.batches.asked(ticket, got[1])
        else:
            e = est.estimate(size, body, self.pricer, ts, unknown)
        if e is None:
            model = body.get("model") if isinstance(body, dict) else None
            if batch:
                model = next((m for m in est.batch_models(body) if not self.pricer.knows(m, started)), None)
            msg = (
                f"model {str(model)[:100]!r} has no known price, and a hard budget applies: this metrion proxy "
                "refuses unpriced models under a hard budget (unknown_model_budget: refuse)"
            )
            return Refusal(403, "permission_error", msg, "unknown_model_blocked"), None
        return self._reserve(ticket, account, user, started, e)

    def settle(
        self, ticket: Hashable, account: str | None, user: str | None, cost: float | None, started: float
    ) -> float | None:
        """The row is priced: its cost replaces the reservation, in the periods of the request's start. A request
        without a price (unknown model, unreadable usage) counts as its reservation, the bound it was admitted
        under; that amount is returned, for the row's `budget_usd`, so a restart and the report count it too."""
        self.batches.call_ended(ticket)
        charged = None
        if cost is None and self.budgets.reserved_for(ticket) > 0:
            charged = cost = self.budgets.reserved_for(ticket)
        if not self.budgets.settle(ticket, cost):
            self.budgets.add(account, user, cost, now=started)
        elif self.inflight is not None:
            self.inflight.changed()
        return charged

    def settle_row(self, ticket: Hashable, row: dict[str, Any], started: float) -> None:
        """`settle` for a row about to be stored; never raises (the row is stored whatever happens here)."""
        try:
            charged = self.settle(ticket, row.get("account"), row.get("user"), row.get("cost_usd"), started)
            if charged is not None:
                row["budget_usd"] = charged  # unpriced: counted at its reservation, after a restart too
        except Exception:
            log.exception("metrion: failed to count a request toward its budgets")

    # -- Message Batches: the reservation outlives the create call (batch_budget.py) -------------------

    def batch_created(self, ticket: Hashable, obj: dict[str, Any]) -> float:
        """The create call's answer names the batch: its reservation becomes the batch's. Returns the amount."""
        return self.batches.created(ticket, obj)

    def batch_seen(self, objs: list[dict[str, Any]]) -> None:
        """Batch objects read (retrieve, list, poll): an ended batch reserves only its unread billable results."""
        self.batches.seen(objs)

    def batch_result(self, row: dict[str, Any], started: float | None) -> None:
        """A batch result's row: its cost counts in the periods of its `ts`, and it releases its share."""
        self.budgets.add(row.get("account"), row.get("user"), row.get("cost_usd"), started)
        self.batches.result(row)

    # -- helpers -----------------------------------------------------------------------------------

    def _changed(self) -> None:
        if self.inflight is not None:
            self.inflight.changed()

    def _reserve(
        self, ticket: Hashable, account: str, user: str | None, started: float, e: est.Estimate
    ) -> tuple[Refusal | None, dict[str, str]]:
        check = self.budgets.reserve(ticket, account, user, float(e.usd), started)
        if check.blocked is not None:
            return self._refusal(check), {}
        if self.inflight is not None:
            self.inflight.changed()
        return None, response_headers(check, reserved=self.budgets.reserved_for(ticket))

    def _refusal(self, check: Check) -> Refusal:
        assert check.blocked is not None
        b = check.blocked
        if self.budgets.fleet is not None and b.slice_only(check.asked):
            free = self.budgets.fleet.free((b.scope, b.limit.period, b.period_start))
            if self.budgets.fleet.failing:
                why, retry = "cannot be had while the fleet's budget database is unreachable", "5"
            elif free is None or free > 0:
                why, retry = "is getting this proxy's share of it from the fleet's database", "1"
            else:  # handed out: the other proxies hand back what they are not using (leases.py, fragment pooling)
                why, retry = (
                    "is held by other proxies of the fleet, which hand back what they are not using within seconds "
                    "(a stopped proxy's share: when its lease expires)",
                    "5",
                )
            asked = f"this request's worst-case cost of ${check.asked:,.4f}" if check.asked else "this request"
            msg = (
                f"metrion budget: {b.name} of ${b.limit.usd:,.2f} (spent fleet-wide about ${b.spent:,.4f}) cannot "
                f"cover {asked} on this proxy yet: the rest of it {why}; retry in {retry} s"
            )
            return Refusal(429, "rate_limit_error", msg, "budget_exceeded", retry)
        retry = str(self.budgets.retry_after(check.blocked))
        return Refusal(429, "rate_limit_error", check.blocked.message(check.asked), "budget_exceeded", retry)
