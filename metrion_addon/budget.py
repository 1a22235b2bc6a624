"""Spend limits per account and per (account, user), over calendar days and months in a configured time zone.

Spend is kept in memory per (scope, period start), seeded from the database at start-up and increased as each
request's row is priced. A request is checked before it is forwarded, so requests already in flight when a
limit is crossed still complete: the overshoot is at most the cost of the requests in flight at that moment.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

log = logging.getLogger(__name__)

PERIODS = ("daily", "monthly")


@dataclass(frozen=True)
class Limit:
    period: str  # daily | monthly
    usd: float
    hard: bool = True


@dataclass(frozen=True)
class AccountBudgets:
    account: tuple[Limit, ...] = ()
    user_default: tuple[Limit, ...] = ()  # for every user (and for requests without a user label)
    users: dict[str, tuple[Limit, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetSettings:
    timezone: str = "UTC"
    block_unknown_models: bool = False
    accounts: dict[str, AccountBudgets] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return any(a.account or a.user_default or a.users for a in self.accounts.values())


Scope = tuple[str, str | None, bool]  # (account, user, is_user_scope)


@dataclass(frozen=True)
class BudgetState:
    scope: Scope
    limit: Limit
    spent: float
    period_start: datetime
    resets_at: datetime

    @property
    def remaining(self) -> float:
        return self.limit.usd - self.spent

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

    def message(self) -> str:
        return (
            f"metrion budget exceeded: {self.name} of ${self.limit.usd:,.2f} is used up "
            f"(spent ${self.spent:,.4f}); it resets at {self.resets_at.isoformat()}"
        )


@dataclass(frozen=True)
class Check:
    blocked: BudgetState | None
    warnings: tuple[BudgetState, ...]
    remaining: float | None  # of the tightest budget that applies; None when none applies


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


def response_headers(check: Check) -> dict[str, str]:
    """What every proxied response tells the client about its budgets."""
    headers: dict[str, str] = {}
    if check.remaining is not None:
        headers["x-metrion-budget-remaining-usd"] = f"{check.remaining:.6f}"
    if check.warnings:
        headers["x-metrion-budget-warning"] = "; ".join(
            f"{s.name} of ${s.limit.usd:,.2f} reached (soft limit)" for s in check.warnings
        )
    return headers


class Budgets:
    def __init__(self, settings: BudgetSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.tz = ZoneInfo(settings.timezone)
        self.clock = clock
        self._spent: dict[tuple[Scope, str, datetime], float] = {}
        self._warned: set[tuple[Scope, str, datetime]] = set()

    # -- periods -----------------------------------------------------------------------------------

    def period(self, period: str, now: float) -> tuple[datetime, datetime]:
        local = datetime.fromtimestamp(now, self.tz)
        if period == "daily":
            start = datetime(local.year, local.month, local.day, tzinfo=self.tz)
            end = start + timedelta(days=1)  # wall-clock arithmetic: right across DST changes
            end = datetime(end.year, end.month, end.day, tzinfo=self.tz)
        else:
            start = datetime(local.year, local.month, 1, tzinfo=self.tz)
            y, m = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
            end = datetime(y, m, 1, tzinfo=self.tz)
        return start, end

    # -- which budgets apply -----------------------------------------------------------------------

    def _limits(self, account: str, user: str | None) -> list[tuple[Scope, Limit]]:
        spec = self.settings.accounts.get(account)
        if spec is None:
            return []
        out: list[tuple[Scope, Limit]] = [((account, None, False), lim) for lim in spec.account]
        user_limits = spec.users.get(user, spec.user_default) if user is not None else spec.user_default
        out += [((account, user, True), lim) for lim in user_limits]
        return out

    def states(self, account: str, user: str | None, now: float | None = None) -> list[BudgetState]:
        now = self.clock() if now is None else now
        states = []
        for scope, lim in self._limits(account, user):
            start, end = self.period(lim.period, now)
            spent = self._spent.get((scope, lim.period, start), 0.0)
            states.append(BudgetState(scope, lim, spent, start, end))
        return states

    def check(self, account: str, user: str | None) -> Check:
        now = self.clock()
        states = self.states(account, user, now)
        if not states:
            return Check(None, (), None)
        hard = [s for s in states if s.limit.hard and s.exceeded]
        warnings = tuple(s for s in states if not s.limit.hard and s.exceeded)
        for s in warnings:
            key = (s.scope, s.limit.period, s.period_start)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("metrion: soft limit reached: %s", s.message())
        blocked = max(hard, key=lambda s: s.resets_at, default=None)  # passes only once all have reset
        return Check(blocked, warnings, max(0.0, min(s.remaining for s in states)))

    def retry_after(self, state: BudgetState) -> int:
        return max(1, math.ceil(state.resets_at.timestamp() - self.clock()))

    # -- spend -------------------------------------------------------------------------------------

    def add(self, account: str | None, user: str | None, cost: float | None, now: float | None = None) -> None:
        if not account or not cost:
            return
        now = self.clock() if now is None else now
        for scope, lim in self._limits(account, user):
            start, _ = self.period(lim.period, now)
            key = (scope, lim.period, start)
            self._spent[key] = self._spent.get(key, 0.0) + cost

    def seed(self, conn: sqlite3.Connection, now: float | None = None) -> None:
        """Load the current periods' spend from the database, so a restart neither forgets nor double-counts."""
        now = self.clock() if now is None else now
        for period in PERIODS:
            start, _ = self.period(period, now)
            since = start.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            rows = conn.execute(
                "SELECT account, user, SUM(cost_usd) FROM requests WHERE ts >= ? AND account IS NOT NULL "
                "AND cost_usd IS NOT NULL GROUP BY account, user",
                (since,),
            ).fetchall()
            for account, user, total in rows:
                for scope, lim in self._limits(account, user):
                    if lim.period == period:
                        key = (scope, period, start)
                        self._spent[key] = self._spent.get(key, 0.0) + (total or 0.0)

    def status(self, now: float | None = None) -> list[BudgetState]:
        """Every configured account and named-user budget in the current periods (for the report)."""
        now = self.clock() if now is None else now
        out: list[BudgetState] = []
        for account, spec in self.settings.accounts.items():
            out += [s for s in self.states(account, None, now) if not s.scope[2]]
            for user in spec.users:
                out += [s for s in self.states(account, user, now) if s.scope[2]]
            for (scope, period, start), spent in self._spent.items():
                if scope[0] == account and scope[2] and scope[1] not in spec.users and spec.user_default:
                    lim = next((x for x in spec.user_default if x.period == period), None)
                    if lim is not None and start == self.period(period, now)[0]:
                        out.append(BudgetState(scope, lim, spent, start, self.period(period, now)[1]))
        return out
