"""The numbers behind `metrion-report html` (rendered by html.py): everything the page shows, read-only.

Totals, errors and budgets come from the terminal report's own views (`view_summary`, `view_errors`,
`view_budgets`). The per-day, per-account/user, per-model and per-price-source figures come from the same
filtered rows with the same day bounds (`queries.load_periods`), grouped in SQL by day and (account, user) and by
day and (model, price source): a few thousand groups, not the (day, account, user, model, source) cross product
(≈76,000 for 1M bench rows), which took PostgreSQL ≈1.8 s to hash and Python to add up. SQLite groups one day
at a time (its rows are in the `ts` index; one sort per day is cheaper than one of all rows), the days split
over two read-only connections while a third runs the terminal views (SQLite releases the GIL while it works);
PostgreSQL groups every day in one scan (GROUPING SETS) while another connection runs the views. The top
requests are re-read only from the (day, account, user) groups whose MAX(cost) can hold them (over
PostgreSQL: `top`'s query)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from metrion_addon.report.db import connect
from metrion_addon.report.queries import MONEY_DIGITS, Db, Options, load_periods, money, pg_periods
from metrion_addon.report.views import TOP_FIELDS, TOP_SQL, Report, view_budgets, view_errors, view_summary

TOP_N = 20
_MAX_CANDIDATE_GROUPS = 200  # beyond this (ties, mostly $0 rows) one plain scan finds the top requests faster


def _num(x: float | None) -> float | None:
    return None if x is None else round(x, MONEY_DIGITS)


@dataclass
class Group:
    requests: int = 0
    errors: int = 0
    unpriced: int = 0
    cost: float = 0.0
    daily: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add_totals(self, requests: int, errors: int, unpriced: int, cost: float) -> None:
        self.requests += requests
        self.errors += errors
        self.unpriced += unpriced
        self.cost += cost


@dataclass
class Page:
    opts: Options
    stack: str
    summary: dict[str, Any]
    days: list[str]
    series: dict[str, Group]  # stack key (model or account) -> per-day cost
    accounts: dict[str | None, Group]
    people: dict[tuple[str | None, str | None], Group]
    models: dict[str | None, Group]
    sources: dict[str | None, Group]
    source_models: dict[str | None, set[str]]
    top: list[dict[str, Any]]
    errors: Report
    budgets: Report | None
    generated: datetime


# The page draws two roll-ups of each day: per (account, user) and per (model, price source). They are grouped
# in SQL (a few thousand groups over 1M rows), not as the (day, account, user, model, source) cross product.
_MEASURES = "COUNT(*), COUNT(r.error), COUNT(*) - COUNT(r.cost_usd), TOTAL(r.cost_usd), MAX(r.cost_usd)"
_PEOPLE, _KINDS = "r.account, r.[user]", "r.model, r.price_source"
_SETS_SQL = (  # SQLite: one day's two roll-ups; the first column says which
    f"SELECT 0, {_PEOPLE}, {_MEASURES} FROM requests r{{where}} GROUP BY {_PEOPLE}"
    f" UNION ALL SELECT 1, {_KINDS}, {_MEASURES} FROM requests r{{where}} GROUP BY {_KINDS}"
)
GroupRow = tuple[Any, ...]  # two keys, requests, errors, unpriced, cost, max cost
Day = tuple[str, str, str, list[GroupRow], list[GroupRow]]  # label, lo, hi, (account, user) and (model, source)


def _day(day: str, lo: str, hi: str, rows: list[tuple[Any, ...]]) -> Day:
    sets: tuple[list[GroupRow], list[GroupRow]] = ([], [])
    for which, *keys, n, errors, unpriced, cost, top in rows:
        sets[which].append((*keys, n, errors, unpriced, _num(cost), top))  # money(); exact sums on PostgreSQL
    return day, lo, hi, *sets


def day_groups(db: Db, opts: Options, part: int, parts: int) -> list[Day]:
    """Every `parts`-th day from the `part`-th, with its groups by account and user and by model and price
    source. The day bounds are the terminal report's (`load_periods`), so the days add up to its totals."""
    periods = load_periods(db, opts, "day")
    where, params = db.where(opts.filters, "r.ts >= ? AND r.ts < ?")
    sql = _SETS_SQL.format(where=where)
    return [_day(day, lo, hi, db.rows(sql, [*params, lo, hi] * 2)) for day, lo, hi in periods[part::parts]]


def all_day_groups(db: Db, opts: Options) -> list[Day]:
    """`day_groups` of every day in one query (PostgreSQL: both roll-ups in one scan, as GROUPING SETS)."""
    periods = load_periods(db, opts, "day")
    if not periods:
        return []
    where, params = db.where(opts.filters)
    source, bounds = pg_periods(periods, where)
    sql = (  # one scan hashing both roll-ups: 0.9-1.1 s over 1M rows, a UNION ALL in parallel workers 1.3-1.4 s
        f"SELECT GROUPING(r.account), r.period_i, CASE WHEN GROUPING(r.account) = 0 THEN r.account ELSE r.model END,"
        f" CASE WHEN GROUPING(r.account) = 0 THEN r.[user] ELSE r.price_source END, {_MEASURES} FROM {source}"
        f" GROUP BY GROUPING SETS ((r.period_i, {_PEOPLE}), (r.period_i, {_KINDS}))"
    )
    by_day: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
    for which, i, *rest in db.rows(sql, [*bounds, *params]):
        by_day[i].append((which, *rest))
    return [_day(day, lo, hi, by_day.get(i, [])) for i, (day, lo, hi) in enumerate(periods, 1)]


def roll_up(days: list[Day], stack: str) -> dict[str, Any]:
    """The day groups summed per account, (account, user), model, price source and stacked series."""
    out: dict[str, Any] = {k: defaultdict(Group) for k in ("accounts", "people", "models", "sources", "series")}
    out["source_models"] = defaultdict(set)
    maxima: list[tuple[float, str, str, tuple[Any, ...]]] = []
    for day, lo, hi, people, kinds in days:
        for account, user, n, errors, unpriced, cost, top in people:
            for g in (out["people"][(account, user)], out["accounts"][account]):
                g.add_totals(n, errors, unpriced, cost)
                g.daily[day] += cost
            if top is not None:
                maxima.append((top, lo, hi, (account, user)))
        for model, source, n, errors, unpriced, cost, _ in kinds:
            out["models"][model].add_totals(n, errors, unpriced, cost)
            out["sources"][source].add_totals(n, errors, unpriced, cost)
            out["source_models"][source].add(str(model))
        for key, *_, unpriced, cost, _ in people if stack == "account" else kinds:
            g = out["series"][f"(no {stack})" if key is None else key]
            g.add_totals(0, 0, unpriced, cost)
            g.daily[day] += cost
    out["days"] = [day for _, day in sorted((lo, day) for day, lo, *_ in days)]
    out["maxima"] = maxima
    return out


def top_requests(db: Db, opts: Options, maxima: list[tuple[float, str, str, tuple[Any, ...]]]) -> list[dict[str, Any]]:
    """The TOP_N most expensive priced requests, ordered as `metrion-report top` orders them (cost desc, id).

    At least TOP_N rows cost >= T, the TOP_N-th largest group maximum, so every top row is in a group whose
    maximum is >= T: only those groups (one day, one account and user each) are read again."""
    maxima.sort(key=lambda m: m[0], reverse=True)
    threshold = maxima[min(TOP_N, len(maxima)) - 1][0] if maxima else None
    candidates = [m for m in maxima if threshold is not None and m[0] >= threshold]
    rows: list[tuple[Any, ...]] = []
    if db.pg or len(candidates) > _MAX_CANDIDATE_GROUPS:  # PostgreSQL: top's query, with its index
        where, params = db.where(opts.filters, "r.cost_usd IS NOT NULL")
        rows = db.rows(TOP_SQL.format(where=where), [*params, TOP_N])
    else:
        cond = "r.ts >= ? AND r.ts < ? AND r.account IS ? AND r.[user] IS ?"
        where, params = db.where(opts.filters, cond + " AND r.cost_usd >= ?")
        sql = TOP_SQL.format(where=where)
        for _, lo, hi, keys in candidates:
            rows += db.rows(sql, [*params, lo, hi, *keys, threshold, TOP_N])
        cost, rid = TOP_FIELDS.index("cost_usd"), TOP_FIELDS.index("id")
        rows = sorted(rows, key=lambda r: (-r[cost], r[rid]))[:TOP_N]
    return [money(dict(zip(TOP_FIELDS, r, strict=True))) for r in rows]


def _with_db(source: Path | str, work: Callable[[Db], Any]) -> Any:
    db = connect(source)
    try:
        return work(db)
    finally:
        db.conn.close()


def collect(source: Path | str, opts: Options, stack: str, now: datetime | None = None) -> Page:
    """All the page's numbers, from a SQLite file (Path) or PostgreSQL (URL). Read-only connections work at once
    (SQLite releases the GIL; PostgreSQL works in its own processes): the terminal views on one, the day groups
    on the others (SQLite: odd and even days on two; PostgreSQL: every day in one query, on one); then the
    roll-up and the top requests."""
    opts = replace(opts, period="day", limit=None)
    with_budgets = opts.budgets is not None and opts.budgets.any

    def views(db: Db) -> tuple[Report, Report | None]:
        return view_errors(db, opts), view_budgets(db, opts) if with_budgets else None

    if isinstance(source, str):
        day_parts: list[Callable[[Db], list[Day]]] = [lambda db: all_day_groups(db, opts)]
    else:
        day_parts = [lambda db, i=i: day_groups(db, opts, i, 2) for i in range(2)]
    with ThreadPoolExecutor(max_workers=2 + len(day_parts)) as pool:
        first = pool.submit(_with_db, source, lambda db: view_summary(db, opts))
        second = pool.submit(_with_db, source, views)
        parts_ = [pool.submit(_with_db, source, work) for work in day_parts]
        days = [d for h in parts_ for d in h.result()]
        summary, (errors, budgets) = first.result(), second.result()
    parts = roll_up(days, stack)
    top = _with_db(source, lambda c: top_requests(c, opts, parts.pop("maxima")))
    return Page(opts, stack, summary.rows[0], top=top, errors=errors, budgets=budgets,
                generated=now or datetime.now(), **parts)  # fmt: skip
