"""A Message Batch's budget reservation, from its creation until its results are metered. No mitmproxy.

At `POST /v1/messages/batches` under a hard budget, the create call reserves the whole batch's worst case
(estimate.batch_estimate) like a Messages request reserves its own. When the upstream answers with a batch, that
reservation is handed from the call to the batch (ticket `("batch", id)`, in the periods of the call's start) and
lives as long as results are still to be metered:

    reserved = max(0, min(R - S, unread * R / n))

R: the batch's worst case; n: its requests; S: the cost of its result rows recorded so far; unread: its results
not recorded yet (n - recorded), or, once the batch has ended, its `succeeded` results not recorded yet (the
others are not billed). So each result read releases an n-th of the reservation (a billed one has its real
cost counted instead, in the periods of the row's `ts`, as before), the batch never holds more than R of a
budget (reserved + S <= R while its results cost no more than its worst case), and the reservation is gone when
every billable result is recorded, or at once when the batch ends with nothing billable (all canceled, expired
or errored).

The batch's R and the time of its creation are stored in the `batches` table (`reserved_usd`, `reserved_at`),
its succeeded count when it ends (`billable_count`); recorded results are rows: so a restart recomputes the same
reservation (`seed`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from metrion_addon.budget import Budgets, db_label_key
from metrion_addon.estimate import MAX_BATCH_REQUESTS
from metrion_addon.record import iso_ms

log = logging.getLogger(__name__)

SEED_DAYS = 32  # a batch created longer ago than this is in no current budget period
# A batch ends at most 24 hours after its creation (then its unfinished requests expire); an hour more for the
# end to be stamped. Its result rows count at its end, so its reservation is held in the periods of its creation
# and of creation + BATCH_WINDOW (the same periods, unless it was created less than 25 hours before a day or
# month ends).
BATCH_WINDOW = 25 * 3600.0


def ticket_of(batch_id: str) -> tuple[str, str]:
    return ("batch", batch_id)


@dataclass
class BatchHold:
    worst: float  # R
    requests: int  # n
    recorded: int = 0
    recorded_billed: int = 0  # of which succeeded
    spent: float = 0.0  # S
    billable: int | None = None  # succeeded results, once the batch has ended

    def left(self) -> float:
        if self.requests <= 0:
            return 0.0
        unread = self.requests - self.recorded if self.billable is None else self.billable - self.recorded_billed
        return max(0.0, min(self.worst - self.spent, max(0, unread) * self.worst / self.requests))


def request_count(obj: dict[str, Any]) -> int:
    counts = obj.get("request_counts")
    if not isinstance(counts, dict):
        return 0
    return sum(v for v in counts.values() if isinstance(v, int) and not isinstance(v, bool) and v > 0)


def billable_count(obj: dict[str, Any]) -> int | None:
    """The succeeded results of an ended batch object (None while it runs, or when it does not say)."""
    counts = obj.get("request_counts")
    if obj.get("processing_status") != "ended" or not isinstance(counts, dict):
        return None
    n = counts.get("succeeded")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


class BatchReservations:
    """Runs on the event loop (the batch thread hands results and batch objects over with call_soon_threadsafe)."""

    def __init__(self, budgets: Budgets, changed: Callable[[], None]) -> None:
        self.budgets = budgets
        self.changed = changed  # the in-flight file: a reservation changed
        self._sizes: dict[Hashable, int] = {}  # create call ticket -> its number of requests
        self._holds: dict[str, BatchHold] = {}

    def asked(self, ticket: Hashable, requests: int) -> None:
        """A create call reserved the worst case of a batch of `requests` requests."""
        self._sizes[ticket] = requests

    def call_ended(self, ticket: Hashable) -> None:
        self._sizes.pop(ticket, None)

    def created(self, ticket: Hashable, obj: dict[str, Any]) -> float:
        """The upstream created the batch: the call's reservation becomes the batch's. Returns it (0: none)."""
        requests = self._sizes.pop(ticket, None)
        batch_id = obj.get("id")
        if requests is None or not isinstance(batch_id, str):
            return 0.0
        if requests <= 0:  # a body the proxy could not read: the batch object says how many
            requests = request_count(obj) or MAX_BATCH_REQUESTS
        worst = self.budgets.rekey(ticket, ticket_of(batch_id))
        if worst <= 0:
            return 0.0
        self._holds[batch_id] = BatchHold(worst, requests)
        self.seen([obj])  # a batch may answer its creation already ended
        return worst

    def seen(self, objs: list[dict[str, Any]]) -> None:
        for o in objs:
            hold = self._holds.get(o.get("id"))  # type: ignore[arg-type]
            n = billable_count(o)
            if hold is not None and n is not None:
                hold.billable = n
                self._update(o["id"], hold)

    def result(self, row: dict[str, Any]) -> None:
        batch_id = row.get("batch_id")
        hold = self._holds.get(batch_id) if isinstance(batch_id, str) else None
        if hold is None:
            return
        hold.recorded += 1
        hold.recorded_billed += row.get("batch_result") == "succeeded"
        hold.spent += row.get("cost_usd") or 0.0
        self._update(batch_id, hold)  # type: ignore[arg-type]

    def hold(self, batch_id: str) -> BatchHold | None:
        return self._holds.get(batch_id)

    def reserved(self, batch_id: str) -> float:
        hold = self._holds.get(batch_id)
        return hold.left() if hold is not None else 0.0

    def _update(self, batch_id: str, hold: BatchHold) -> None:
        left = hold.left()
        self.budgets.set_reserved(ticket_of(batch_id), left)
        if left <= 0:
            del self._holds[batch_id]
        self.changed()

    def seed(self, conn: sqlite3.Connection, now: float) -> int:
        """After a restart: the reservations of batches whose billable results are not all recorded yet."""
        cols = {r[1] for r in conn.execute("PRAGMA table_info(batches)")}
        if "reserved_usd" not in cols:
            return 0
        since = iso_ms(now - SEED_DAYS * 86400)
        rows = conn.execute(
            "SELECT b.id, b.account, b.user, b.reserved_usd, b.reserved_at, b.request_count, b.billable_count, "
            "count(r.id), coalesce(sum(r.batch_result = 'succeeded'), 0), coalesce(sum(r.cost_usd), 0) "
            "FROM batches b LEFT JOIN requests r ON r.batch_id = b.id "
            "WHERE b.reserved_usd > 0 AND b.reserved_at >= ? AND b.account IS NOT NULL GROUP BY b.id",
            (since,),
        ).fetchall()
        held = 0
        for bid, account, user, worst, at, n, billable, recorded, billed, spent in rows:
            hold = BatchHold(worst, n or 0, recorded, billed, spent, billable)
            started = _epoch(at)
            if started is None or hold.left() <= 0:
                continue
            self._holds[bid] = hold
            until = started + BATCH_WINDOW
            self.budgets.hold(ticket_of(bid), account, db_label_key(user), started, hold.left(), until)
            held += 1
        if held:
            log.info("metrion: %d batch(es) still reserve budget until their results are metered", held)
        return held


def _epoch(ts: Any) -> float | None:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if isinstance(ts, str) else None
    except ValueError:
        return None
