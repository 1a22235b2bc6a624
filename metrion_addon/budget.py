"""Spend limits per account and per (account, user), over calendar days and months in a configured time zone.

Spend is kept in memory per (scope, period start), seeded from the database at start-up and increased as each
request's row is priced. A request counts in the periods of its **start time**, live and after a restart (the
row's `ts` is its start time, and that is what the seed reads).

Hard limits hold under a burst by reservation: a request is admitted only if, for every hard budget that applies,
spent + reserved (by requests in flight) + its own worst-case cost (see estimate.py) fits the limit. When its row
is priced, the reservation is replaced by the real cost (on an error or a disconnect: by what was billed). So a
hard limit is exceeded by at most the estimation error: the amount by which real costs exceeded their estimates.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from metrion_addon import periods
from metrion_addon.budget_settings import PERIODS, BudgetSettings, Limit
from metrion_addon.labels import LabelError, label_key
from metrion_addon.schema import iso_ms

if TYPE_CHECKING:  # psycopg loads only in fleet mode
    from metrion_addon.leases import LeaseBook

log = logging.getLogger(__name__)

_CALENDAR = {"daily": "day", "monthly": "month"}  # budget period -> periods.py period
ALERT_EVENTS = ("soft", "hard_80", "hard")
_EPS = 1e-12  # float noise: a reservation that fits to the last bit fits
# Spend per account and user in [since, until), in the report's SQL notation (`?`, `[user]`), {cost} the column.
SEED_SQL = (
    "SELECT account, [user], SUM({cost}) FROM requests WHERE ts >= ? AND ts < ? AND account IS NOT NULL "
    "AND {cost} IS NOT NULL GROUP BY account, [user]"
)
RETAIN_DAYS = 3  # past periods kept in memory (a request still in flight settles into the period it started in)


Scope = tuple[str, str | None, bool]  # (account, user, is_user_scope)
Key = tuple[Scope, str, datetime]  # (scope, period, period start)


@dataclass(frozen=True)
class BudgetState:
    scope: Scope
    limit: Limit
    spent: float
    period_start: datetime
    resets_at: datetime
    reserved: float = 0.0  # by requests in flight (on this proxy)
    own: float = 0.0  # fleet mode: this proxy's own spend (`spent` is the fleet's, as last read)
    allowance: float | None = None  # fleet mode, hard limit: the slice this proxy holds (leases.py)

    @property
    def remaining(self) -> float:
        return self.limit.usd - self.spent - self.reserved

    def over(self, amount: float) -> bool:
        """Whether a hard limit refuses a request of worst case `amount` (0: whether it is used up). In fleet
        mode the proxy's slice is the limit it admits against: the slices never add up to more than the limit."""
        if self.allowance is None:
            local = False
        elif amount > 0:
            local = self.own + self.reserved + amount > self.allowance + _EPS
        else:
            local = self.own + self.reserved >= self.allowance
        return local or self.over_limit(amount)

    def over_limit(self, amount: float) -> bool:
        if amount > 0:
            return self.spent + self.reserved + amount > self.limit.usd + _EPS
        return self.spent + self.reserved >= self.limit.usd

    def slice_only(self, amount: float) -> bool:
        """Fleet mode: refused by this proxy's slice while the fleet's budget, as last read, has room."""
        return self.allowance is not None and not self.over_limit(amount)

    @property
    def exceeded(self) -> bool:
        return self.spent >= self.limit.usd

    @property
    def name(self) -> str:
        account, user, is_user = self.scope
        who = f"account {account!r}" + (
            f" user {user!r}" if is_user and user else " (no user label)" if is_user else ""
        )
        return f"{who} {self.limit.period} budget"

    def message(self, asked: float = 0.0) -> str:
        if self.exceeded or asked <= 0:
            return (
                f"metrion budget exceeded: {self.name} of ${self.limit.usd:,.2f} is used up "
                f"(spent ${self.spent:,.4f}, reserved by requests in flight ${self.reserved:,.4f}); "
                f"it resets at {self.resets_at.isoformat()}"
            )
        return (
            f"metrion budget exceeded: {self.name} of ${self.limit.usd:,.2f} cannot cover this request's "
            f"worst-case cost of ${asked:,.4f} (spent ${self.spent:,.4f}, reserved by requests in flight "
            f"${self.reserved:,.4f}); lower max_tokens, or wait until it resets at {self.resets_at.isoformat()}"
        )


@dataclass(frozen=True)
class Check:
    blocked: BudgetState | None
    warnings: tuple[BudgetState, ...]
    remaining: float | None  # of the tightest budget that applies; None when none applies
    asked: float = 0.0  # the reservation that did not fit (0: the budget is used up)


@dataclass
class Ticket:
    """A request admitted under budgets: where its cost goes (the periods of its start) and what it reserved."""

    keys: tuple[Key, ...]
    amount: float = 0.0
    until: float | None = None  # a batch: its cost may also land in the periods of this time (see `open`)


def file_clock(path: str) -> Callable[[], float]:
    """For tests: the time is read from a file (epoch seconds) when it exists, else the real clock."""
    if not path:
        return time.time

    def clock() -> float:
        try:
            with open(path) as f:
                return float(f.read())
        except (OSError, ValueError):
            return time.time()

    return clock


def response_headers(check: Check, reserved: float | None = None) -> dict[str, str]:
    """What every proxied response tells the client about its budgets."""
    headers: dict[str, str] = {}
    if check.remaining is not None:
        headers["x-metrion-budget-remaining-usd"] = f"{check.remaining:.6f}"
    if reserved is not None:
        headers["x-metrion-budget-reserved-usd"] = f"{reserved:.6f}"
    if check.warnings:
        headers["x-metrion-budget-warning"] = "; ".join(
            f"{s.name} of ${s.limit.usd:,.2f} reached (soft limit)" for s in check.warnings
        )
    return headers


def db_label_key(user: str | None) -> str | None:
    """A user column value as a budget key (rows written before labels were normalised included)."""
    try:
        return label_key(user)
    except LabelError:
        return user


class Budgets:
    def __init__(
        self,
        settings: BudgetSettings,
        clock: Callable[[], float] = time.time,
        on_alert: Callable[[str, BudgetState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.tz = ZoneInfo(settings.timezone)
        self.clock = clock
        self.on_alert = on_alert
        self._spent: dict[Key, float] = {}
        self._reserved: dict[Key, float] = {}
        self._tickets: dict[Hashable, Ticket] = {}
        self._warned: set[Key] = set()
        self._alerted: set[tuple[Key, str]] = set()
        self._pruned_on: datetime | None = None
        self.fleet: LeaseBook | None = None  # fleet mode: spend is shared through PostgreSQL leases
        # The event loop mutates; the in-flight file writer and lease threads read. In fleet mode a reservation's
        # check and its booking happen under it, so the lease thread can lower a slice between two, never inside.
        self.lock = threading.RLock()

    # -- periods -----------------------------------------------------------------------------------

    def period(self, period: str, now: float) -> tuple[datetime, datetime]:
        """(start, end) of the calendar day or month holding `now`, in the budgets' time zone."""
        return periods.bounds(datetime.fromtimestamp(now, UTC), _CALENDAR[period], self.tz)

    # -- which budgets apply -----------------------------------------------------------------------

    def _limits(self, account: str, user: str | None) -> list[tuple[Scope, Limit]]:
        spec = self.settings.accounts.get(account)
        if spec is None:
            return []
        out: list[tuple[Scope, Limit]] = [((account, None, False), lim) for lim in spec.account]
        user_limits = spec.users.get(user, spec.user_default) if user is not None else spec.user_default
        out += [((account, user, True), lim) for lim in user_limits]
        return out

    def applies(self, account: str, user: str | None, hard_only: bool = False) -> bool:
        return any(lim.hard or not hard_only for _, lim in self._limits(account, user))

    def limit_of(self, key: Key) -> Limit | None:
        scope, period, _ = key
        return next((lim for s, lim in self._limits(scope[0], scope[1]) if s == scope and lim.period == period), None)

    def known_keys(self, now: float) -> list[Key]:
        """The current periods of every budget known without traffic: accounts', named users', no label's."""
        out: list[Key] = []
        for account, spec in self.settings.accounts.items():
            for user in (None, *spec.users):
                for scope, lim in self._limits(account, user):
                    if user is None or scope[2]:
                        out.append((scope, lim.period, self.period(lim.period, now)[0]))
        return list(dict.fromkeys(out))

    def _state(self, scope: Scope, lim: Limit, start: datetime, end: datetime) -> BudgetState:
        key = (scope, lim.period, start)
        own, reserved = self._spent.get(key, 0.0), self._reserved.get(key, 0.0)
        if self.fleet is None:
            return BudgetState(scope, lim, own, start, end, reserved)
        allowance = self.fleet.slice(key) if lim.hard else None
        return BudgetState(scope, lim, own + self.fleet.others(key), start, end, reserved, own, allowance)

    def states(self, account: str, user: str | None, now: float | None = None) -> list[BudgetState]:
        now = self.clock() if now is None else now
        states = []
        for scope, lim in self._limits(account, user):
            start, end = self.period(lim.period, now)
            states.append(self._state(scope, lim, start, end))
        return states

    def check(
        self, account: str, user: str | None, amount: float = 0.0, now: float | None = None, alert: bool = True
    ) -> Check:
        """Whether a request of worst-case cost `amount` fits every hard budget (amount 0: whether any is used
        up, counting what requests in flight have reserved). A refusal is the `hard` alert (when `alert`)."""
        now = self.clock() if now is None else now
        states = self.states(account, user, now)
        if not states:
            return Check(None, (), None)
        hard = [s for s in states if s.limit.hard and s.over(amount)]
        if self.fleet is not None:
            for s in hard:
                if s.slice_only(amount):  # the lease thread asks the fleet for more (this request is refused meanwhile)
                    need = s.own + s.reserved + amount - (s.allowance or 0.0)
                    self.fleet.want((s.scope, s.limit.period, s.period_start), max(need, 0.0), amount)
        warnings = tuple(s for s in states if not s.limit.hard and s.exceeded)
        for s in warnings:
            key = (s.scope, s.limit.period, s.period_start)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("metrion: soft limit reached: %s", s.message())
        for s in hard if alert else ():
            if not s.slice_only(amount):
                self._alert("hard", s)  # a request refused by a hard limit
        blocked = max(hard, key=lambda s: s.resets_at, default=None)  # passes only once all have reset
        asked = amount if blocked is not None and not blocked.exceeded else 0.0
        return Check(blocked, warnings, max(0.0, min(s.remaining for s in states)), asked)

    def retry_after(self, state: BudgetState) -> int:
        return max(1, math.ceil(state.resets_at.timestamp() - self.clock()))

    # -- reservations ------------------------------------------------------------------------------

    def open(
        self, ticket: Hashable, account: str, user: str | None, started: float, until: float | None = None
    ) -> None:
        """Start tracking a request admitted at `started` (its cost will count in those periods). With `until`
        (a batch, whose results count at its end, at the latest `until`), its reservation is held, and must fit,
        in the periods of `until` too."""
        keys = tuple(
            dict.fromkeys(
                (scope, lim.period, self.period(lim.period, t)[0])
                for t in (started, until if until is not None else started)
                for scope, lim in self._limits(account, user)
            )
        )
        if keys:
            self._tickets[ticket] = Ticket(keys, until=until)
            self._prune(started)

    def reserve(self, ticket: Hashable, account: str, user: str | None, amount: float, started: float) -> Check:
        """Reserve `amount` for an open ticket if it fits every hard budget; the Check says whether it did."""
        if self.fleet is None:
            return self._reserve(ticket, account, user, amount, started)
        with self.lock:
            return self._reserve(ticket, account, user, amount, started)

    def _reserve(self, ticket: Hashable, account: str, user: str | None, amount: float, started: float) -> Check:
        check = self.check(account, user, amount, now=started)
        t = self._tickets.get(ticket)
        if check.blocked is None and t is not None and t.until is not None:
            later = self.check(account, user, amount, now=t.until)
            if later.blocked is not None:
                return later
        if check.blocked is None and t is not None and amount > 0:
            with self.lock:
                t.amount += amount
                for key in t.keys:
                    self._reserved[key] = self._reserved.get(key, 0.0) + amount
            after = self.check(account, user, now=started, alert=False)  # remaining counts this reservation
            # Admitted. A reservation that fills a limit (or a fleet slice) exactly makes it "used up" for the
            # next request, not for this one: refusing here would leave the reservation held by a request that
            # was never forwarded.
            check = Check(None, after.warnings, after.remaining)
        return check

    def settle(self, ticket: Hashable, cost: float | None) -> bool:
        """Replace a ticket's reservation by the request's real cost. False when the ticket is unknown."""
        t = self._tickets.pop(ticket, None)
        if t is None:
            return False
        with self.lock:
            for key in t.keys:
                left = self._reserved.get(key, 0.0) - t.amount
                if left > _EPS:
                    self._reserved[key] = left
                else:
                    self._reserved.pop(key, None)
                if cost:
                    self._spent[key] = self._spent.get(key, 0.0) + cost
        if cost:
            self._after_spend(t.keys)
        return True

    def rekey(self, old: Hashable, new: Hashable) -> float:
        """Move an open ticket (its periods and reservation) to another key: a batch's create call hands its
        reservation to the batch, which outlives the call. Returns the amount moved (0: no such ticket)."""
        t = self._tickets.pop(old, None)
        if t is None:
            return 0.0
        self._tickets[new] = t
        return t.amount

    def hold(
        self, ticket: Hashable, account: str, user: str | None, started: float, amount: float, until: float | None
    ) -> None:
        """Reserve `amount` for a new ticket without a check: what was admitted before a restart."""
        self.open(ticket, account, user, started, until)
        self.set_reserved(ticket, amount)

    def set_reserved(self, ticket: Hashable, amount: float) -> None:
        """Change an open ticket's reservation to `amount`; at 0 the ticket is closed (its spend is counted
        separately, with `add`)."""
        t = self._tickets.get(ticket)
        if t is None:
            return
        amount = max(0.0, amount)
        delta = amount - t.amount
        with self.lock:
            t.amount = amount
            for key in t.keys:
                left = self._reserved.get(key, 0.0) + delta
                if left > _EPS:
                    self._reserved[key] = left
                else:
                    self._reserved.pop(key, None)
        if amount <= _EPS:
            del self._tickets[ticket]

    def _prune(self, now: float) -> None:
        """Forget periods that ended over RETAIN_DAYS ago (once a day): memory stays bounded as days pass."""
        day = self.period("daily", now)[0]
        if day == self._pruned_on:
            return
        self._pruned_on = day
        cutoff = day - timedelta(days=RETAIN_DAYS)

        def old(key: Key) -> bool:
            return key not in self._reserved and self.period(key[1], key[2].timestamp())[1] < cutoff

        with self.lock:
            for key in [k for k in self._spent if old(k)]:
                del self._spent[key]
        self._warned = {k for k in self._warned if not old(k)}
        self._alerted = {m for m in self._alerted if not old(m[0])}

    def open_ticket(self, ticket: Hashable) -> bool:
        return ticket in self._tickets

    def reserved_for(self, ticket: Hashable) -> float:
        t = self._tickets.get(ticket)
        return t.amount if t is not None else 0.0

    def reservations(self) -> list[tuple[Key, float]]:
        """In-flight reservations per budget period (thread-safe snapshot)."""
        with self.lock:
            return [(k, v) for k, v in self._reserved.items() if v > _EPS]

    # -- spend -------------------------------------------------------------------------------------

    def add(self, account: str | None, user: str | None, cost: float | None, now: float | None = None) -> None:
        """Count `cost` in the periods of `now` (the request's start time) without a ticket."""
        if not account or not cost:
            return
        now = self.clock() if now is None else now
        keys = []
        with self.lock:
            for scope, lim in self._limits(account, user):
                start, _ = self.period(lim.period, now)
                key = (scope, lim.period, start)
                self._spent[key] = self._spent.get(key, 0.0) + cost
                keys.append(key)
        self._after_spend(tuple(keys))

    def _after_spend(self, keys: tuple[Key, ...]) -> None:
        if self.on_alert is None:
            return
        for key in keys:
            scope, period, start = key
            lim = self.limit_of(key)
            if lim is None:
                continue
            end = self.period(period, start.timestamp())[1]
            state = self._state(scope, lim, start, end)
            spent = state.spent
            if not lim.hard and spent >= lim.usd:
                self._alert("soft", state)
            if lim.hard and spent >= 0.8 * lim.usd:
                self._alert("hard_80", state)
            if lim.hard and spent >= lim.usd:
                self._alert("hard", state)

    def _alert(self, event: str, state: BudgetState) -> None:
        mark = ((state.scope, state.limit.period, state.period_start), event)
        if self.on_alert is None or mark in self._alerted:
            return
        self._alerted.add(mark)  # once per budget, threshold and period
        try:
            self.on_alert(event, state)
        except Exception:
            log.exception("metrion: could not queue a budget alert")

    def seed(self, conn: sqlite3.Connection, now: float | None = None) -> None:
        """Load the current periods' spend from the database, so a restart neither forgets nor double-counts.

        Rows are counted by their `ts`, the request's start time: the same periods the live counter used."""
        has_budget_usd = any(r[1] == "budget_usd" for r in conn.execute("PRAGMA table_info(requests)"))
        cost = "COALESCE(cost_usd, budget_usd)" if has_budget_usd else "cost_usd"  # unpriced: its reservation
        self.seed_from(
            lambda since, until, c: conn.execute(SEED_SQL.format(cost=c), (iso_ms(since), iso_ms(until))).fetchall(),
            now,
            cost,
        )

    def seed_from(
        self,
        spend: Callable[[datetime, datetime, str], Iterable[tuple[Any, ...]]],
        now: float | None = None,
        cost: str = "COALESCE(cost_usd, budget_usd)",
    ) -> None:
        """`seed` from any database: `spend(since, until, cost)` runs SEED_SQL (cost: the column expression) and
        returns its (account, user, spend) rows."""
        now = self.clock() if now is None else now
        for period in PERIODS:
            start, end = self.period(period, now)
            for account, user, total in spend(start, end, cost):
                for scope, lim in self._limits(account, db_label_key(user)):
                    if lim.period == period:
                        key = (scope, period, start)
                        self._spent[key] = self._spent.get(key, 0.0) + float(total or 0.0)
        for key, spent in self._spent.items():  # thresholds already crossed before a restart: alerted then
            scope, period, start = key
            for s, lim in self._limits(scope[0], scope[1]):
                if s == scope and lim.period == period:
                    for event, at in (("soft", 1.0), ("hard_80", 0.8), ("hard", 1.0)):
                        if (event == "soft") != lim.hard and spent >= at * lim.usd:
                            self._alerted.add((key, event))

    def status(self, now: float | None = None) -> list[BudgetState]:
        """Every configured account and named-user budget in the current periods (for the report)."""
        now = self.clock() if now is None else now
        out: list[BudgetState] = []
        for account, spec in self.settings.accounts.items():
            out += [s for s in self.states(account, None, now) if not s.scope[2]]
            for user in spec.users:
                out += [s for s in self.states(account, user, now) if s.scope[2]]
            seen = {(s.scope, s.limit.period) for s in out}
            for scope, period, start in list(self._spent) + list(self._reserved):
                if scope[0] != account or not scope[2] or scope[1] in spec.users or (scope, period) in seen:
                    continue
                lim = next((x for x in spec.user_default if x.period == period), None)
                if lim is not None and start == self.period(period, now)[0]:
                    seen.add((scope, period))
                    out.append(self._state(scope, lim, start, self.period(period, now)[1]))
        return out

    def add_reserved(self, key: Key, usd: float) -> None:
        """For the report: a reservation another process (the proxy) holds."""
        self._reserved[key] = self._reserved.get(key, 0.0) + usd
