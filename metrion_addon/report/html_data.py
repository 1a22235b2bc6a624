"""The numbers behind `metrion-report html` (rendered by html.py): everything the page shows, read-only.

Totals, errors and budgets come from the terminal report's own views (`view_summary`, `view_errors`,
`view_budgets`). The per-day, per-account/user, per-model and per-price-source figures come from one pass over
the same filtered rows with the same day bounds (`queries.load_periods`): one GROUP BY per day, because sorting
each day's rows is much cheaper than one sort of all of them (1M rows: ~1.2 s of CPU instead of ~2 s). The
top requests are re-read only from the groups whose MAX(cost) can hold them. The days are split over two
read-only connections while a third runs the terminal views; SQLite releases the GIL while it works. Over
PostgreSQL the server does the work: one query groups every day at once, and the top requests are `top`'s query.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from metrion_addon.report.db import connect
from metrion_addon.report.queries import DIMENSIONS, MONEY_DIGITS, Db, Options, aggregate_periods, load_periods, money
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


_KEYS = "r.account, r.[user], r.model, r.price_source"
_GROUP_SQL = (
    f"SELECT {_KEYS}, COUNT(*), COUNT(r.error), COUNT(*) - COUNT(r.cost_usd), TOTAL(r.cost_usd), MAX(r.cost_usd)"
    " FROM requests r{where} GROUP BY " + _KEYS
)
GroupRow = tuple[Any, ...]  # account, user, model, price_source, requests, errors, unpriced, cost, max cost
Day = tuple[str, str, str, list[GroupRow]]  # label, lo, hi, groups


def day_groups(db: Db, opts: Options, part: int, parts: int) -> list[Day]:
    """Every `parts`-th day from the `part`-th, with its groups by account, user, model and price source. The
    day bounds are the terminal report's (`load_periods`), so the days add up to its totals."""
    periods = load_periods(db, opts, "day")
    where, params = db.where(opts.filters, "r.ts >= ? AND r.ts < ?")
    sql = _GROUP_SQL.format(where=where)
    days = [(day, lo, hi, db.rows(sql, [*params, lo, hi])) for day, lo, hi in periods[part::parts]]
    return [(day, lo, hi, [(*g[:7], _num(g[7]), g[8]) for g in groups]) for day, lo, hi, groups in days]  # money()


_GROUP_MEASURES = {"n": "COUNT(*)", "errors": "COUNT(r.error)", "unpriced": "COUNT(*) - COUNT(r.cost_usd)",
                   "cost_usd": "TOTAL(r.cost_usd)", "top": "MAX(r.cost_usd)"}  # fmt: skip
_GROUP_KEYS = ["account", "user", "model", "price_source"]


def all_day_groups(db: Db, opts: Options) -> list[Day]:
    """`day_groups` of every day in one query (PostgreSQL: the server groups; one round trip)."""
    columns = DIMENSIONS | {"price_source": "r.price_source"}
    rows, periods = aggregate_periods(db, opts, _GROUP_MEASURES, ["day", *_GROUP_KEYS], columns)
    by_day: dict[str, list[GroupRow]] = defaultdict(list)
    for r in rows:
        by_day[r["day"]].append(tuple(r[k] for k in [*_GROUP_KEYS, *_GROUP_MEASURES]))
    return [(day, lo, hi, by_day.get(day, [])) for day, lo, hi in periods]


def roll_up(days: list[Day], stack: str) -> dict[str, Any]:
    """The day groups summed per account, (account, user), model, price source and stacked series; flat dicts
    in the loop (tens of thousands of groups), Group objects after."""
    people: dict[tuple[Any, Any], list[Any]] = {}
    kinds: dict[tuple[Any, Any], list[Any]] = {}
    people_daily: dict[tuple[Any, Any, str], float] = defaultdict(float)
    series_daily: dict[tuple[str, str], float] = defaultdict(float)
    series_unpriced: dict[str, int] = defaultdict(int)
    maxima: list[tuple[float, str, str, tuple[Any, ...]]] = []
    for day, lo, hi, rows in days:
        for account, user, model, source, n, errors, unpriced, cost, top in rows:
            for key, acc in (((account, user), people), ((model, source), kinds)):
                t = acc.get(key)
                if t is None:
                    acc[key] = [n, errors, unpriced, cost]
                else:
                    t[0] += n
                    t[1] += errors
                    t[2] += unpriced
                    t[3] += cost
            people_daily[(account, user, day)] += cost
            key = model if stack == "model" else account
            key = f"(no {stack})" if key is None else key
            series_daily[(key, day)] += cost
            series_unpriced[key] += unpriced
            if top is not None:
                maxima.append((top, lo, hi, (account, user, model, source)))
    out: dict[str, Any] = {k: defaultdict(Group) for k in ("accounts", "people", "models", "sources", "series")}
    for (account, user), t in people.items():
        out["people"][(account, user)].add_totals(*t)
        out["accounts"][account].add_totals(*t)
    for (account, user, day), cost in people_daily.items():
        out["people"][(account, user)].daily[day] += cost
        out["accounts"][account].daily[day] += cost
    out["source_models"] = defaultdict(set)
    for (model, source), t in kinds.items():
        out["models"][model].add_totals(*t)
        out["sources"][source].add_totals(*t)
        out["source_models"][source].add(str(model))
    for (key, day), cost in series_daily.items():
        out["series"][key].add_totals(0, 0, 0, cost)
        out["series"][key].daily[day] += cost
    for key, unpriced in series_unpriced.items():
        out["series"][key].unpriced += unpriced
    out["days"] = [day for _, day in sorted((lo, day) for day, lo, _, _ in days)]
    out["maxima"] = maxima
    return out


def top_requests(db: Db, opts: Options, maxima: list[tuple[float, str, str, tuple[Any, ...]]]) -> list[dict[str, Any]]:
    """The TOP_N most expensive priced requests, ordered as `metrion-report top` orders them (cost desc, id).

    At least TOP_N rows cost >= T, the TOP_N-th largest group maximum, so every top row is in a group whose
    maximum is >= T: only those groups (one day, one account/user/model/source each) are read again."""
    maxima.sort(key=lambda m: m[0], reverse=True)
    threshold = maxima[min(TOP_N, len(maxima)) - 1][0] if maxima else None
    candidates = [m for m in maxima if threshold is not None and m[0] >= threshold]
    rows: list[tuple[Any, ...]] = []
    if db.pg or len(candidates) > _MAX_CANDIDATE_GROUPS:  # PostgreSQL: top's query, with its index
        where, params = db.where(opts.filters, "r.cost_usd IS NOT NULL")
        rows = db.rows(TOP_SQL.format(where=where), [*params, TOP_N])
    else:
        cond = "r.ts >= ? AND r.ts < ? AND r.account IS ? AND r.[user] IS ? AND r.model IS ? AND r.price_source IS ?"
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

    def views(db: Db) -> tuple[Report, Report, Report | None]:
        summary = view_summary(db, opts)
        errors = view_errors(db, opts)
        return summary, errors, view_budgets(db, opts) if with_budgets else None

    if isinstance(source, str):
        day_parts: list[Callable[[Db], list[Day]]] = [lambda db: all_day_groups(db, opts)]
    else:
        day_parts = [lambda db, i=i: day_groups(db, opts, i, 2) for i in range(2)]
    with ThreadPoolExecutor(max_workers=1 + len(day_parts)) as pool:
        first = pool.submit(_with_db, source, views)
        parts_ = [pool.submit(_with_db, source, work) for work in day_parts]
        days = [d for h in parts_ for d in h.result()]
        summary, errors, budgets = first.result()
    parts = roll_up(days, stack)
    top = _with_db(source, lambda c: top_requests(c, opts, parts.pop("maxima")))
    return Page(opts, stack, summary.rows[0], top=top, errors=errors, budgets=budgets,
                generated=now or datetime.now(), **parts)  # fmt: skip
