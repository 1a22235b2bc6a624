"""The report's SQL, for SQLite and PostgreSQL: filters and the one WHERE builder, the measures, and the
aggregation over period bounds.

Every query is written once, in SQLite's notation (`?` parameters, `[name]` quoting, `TOTAL(x)`), and runs
through a `Db`: the connection and its engine's dialect. Over PostgreSQL `Db.sql` rewrites the notation
(`%s`, `"name"`, exact `numeric` sums rounded to MONEY_DIGITS), text is ordered byte-wise (`COLLATE "C"`, as
SQLite's BINARY) with NULLs first (as SQLite), and values come back as SQLite's types (float money, int
counts, `ts` in the stored text format): every view's rows are the same from both engines.

Time periods (hour, day, week, month) are not computed per row from text: the bounds are built in Python (local
time, DST included), the same for both engines. SQLite joins a temp table of them on the `ts` index (faster
than a per-row `strftime` and exact for any time zone); PostgreSQL, whose report connection is read-only,
numbers each row's period with `width_bucket(ts, bounds)` against `timestamptz` bounds. Money sums are rounded
to MONEY_DIGITS, so JSON and CSV carry no float noise.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from metrion_addon.budget_settings import BudgetSettings
from metrion_addon.periods import PERIODS
from metrion_addon.report.when import MAX_TS, periods_between
from metrion_addon.schema import iso_ms

DIMENSIONS: dict[str, str] = {  # --by name -> column (time periods are joined, not computed per row)
    "model": "r.model",
    "user": "r.[user]",
    "account": "r.account",
    "client": "r.client",
    "session": "r.session_id",
    "batch": "r.batch_id",  # Message Batches results; (none) groups everything else
}
MONEY_DIGITS = 10  # float sums are rounded here, so JSON/CSV carry no float noise


def money(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, MONEY_DIGITS) if k.endswith("_usd") and isinstance(v, float) else v for k, v in row.items()}


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    accounts: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # prefixes

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": iso_ms(self.since) if self.since else None,
            "until": iso_ms(self.until) if self.until else None,
            "account": list(self.accounts),
            "user": list(self.users),
            "model": list(self.models),
        }


@dataclass(frozen=True)
class Options:
    filters: Filters = field(default_factory=Filters)
    by: tuple[str, ...] = ()
    utc: bool = False
    limit: int | None = None
    period: str = "day"
    budgets: BudgetSettings | None = None  # from the config; only the budgets view needs it


class Db:
    """A report connection (sqlite3 or psycopg) and its engine's SQL dialect."""

    def __init__(self, conn: Any, pg: bool = False) -> None:
        self.conn, self.pg = conn, pg

    def sql(self, text: str) -> str:
        """A query in SQLite's notation, as this engine reads it."""
        if not self.pg:
            return text
        text = re.sub(r"\[(\w+)\]", r'"\1"', text.replace("%", "%%")).replace("?", "%s")
        text = _INT_SUM.sub(r"\g<0>::bigint", text)  # SUM of bigint is numeric in PostgreSQL
        return _pg_totals(text)

    def order(self, column: str, text: bool = True) -> str:
        """`column` in an ORDER BY, sorted as SQLite sorts: text by bytes, NULLs first."""
        if not self.pg:
            return column
        collate = ' COLLATE "C"' if text else ""
        return f"{column}{collate} NULLS FIRST"

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(self.sql(sql), params)
        return [tuple(map(_value, r)) for r in cur] if self.pg else cur.fetchall()

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.rows(sql, params)[0][0]

    def dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """The rows of a query as dicts keyed by column name, money rounded."""
        cur = self.conn.execute(self.sql(sql), params)
        names = [c[0] for c in cur.description]
        rows = [tuple(map(_value, r)) for r in cur] if self.pg else cur
        return [money(dict(zip(names, row, strict=True))) for row in rows]

    def where(self, f: Filters, *extra: str) -> tuple[str, list[Any]]:
        return where_sql(f, *extra, pg=self.pg)


_INT_SUM = re.compile(r"COALESCE\(SUM\(r\.\w+\), 0\)")


def _pg_totals(text: str) -> str:
    """SQLite's `TOTAL(x)` (a float sum, 0.0 over no rows) -> the exact numeric sum, rounded to MONEY_DIGITS
    decimals, as float8 (the same value SQLite's rounded float sum has)."""
    out, i = [], 0
    while (start := text.find("TOTAL(", i)) >= 0:
        depth, j = 0, start + 5
        while True:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        out += [text[i:start], f"ROUND(COALESCE(SUM({text[start + 6 : j]}), 0), {MONEY_DIGITS})::float8"]
        i = j + 1
    return "".join(out) + text[i:]


def _value(v: Any) -> Any:
    """A PostgreSQL value as SQLite gives it: numeric -> float, timestamptz -> the stored text format."""
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, datetime):
        return iso_ms(v)
    return v


def where_sql(f: Filters, *extra: str, pg: bool = False) -> tuple[str, list[Any]]:
    """` WHERE ...` for the filters (on `requests r`) and any `extra` conditions after them (their `?`
    parameters come after the filters'); "" when there is nothing to filter. Model prefixes are byte ranges
    (SQLite's BINARY order; `COLLATE "C"` in PostgreSQL)."""
    parts: list[str] = []
    params: list[Any] = []
    if f.since:
        parts.append("r.ts >= ?")
        params.append(f.since if pg else iso_ms(f.since))
    if f.until:
        parts.append("r.ts < ?")
        params.append(f.until if pg else iso_ms(f.until))
    for column, values in (("r.account", f.accounts), ("r.[user]", f.users)):
        if values:
            parts.append(f"{column} IN ({', '.join('?' * len(values))})")
            params += values
    if f.models:
        model = 'r.model COLLATE "C"' if pg else "r.model"
        parts.append("(" + " OR ".join(f"({model} >= ? AND {model} < ?)" for _ in f.models) + ")")
        for prefix in f.models:
            params += [prefix, prefix + MAX_TS]
    parts += extra
    return (" WHERE " + " AND ".join(parts) if parts else ""), params


def _isum(column: str) -> str:
    return f"COALESCE(SUM(r.{column}), 0)"


# What caching saved = the cache tokens priced as plain input, minus what they did cost (reads save
# input - read rate; writes cost write - input rate extra, so it can be negative). The input rate of each row
# comes from its own stored costs, so overrides, long-context tiers, batch and geo multipliers all count:
# cost_input_usd / input_tokens. A row with no uncached input takes it from its cache-read cost (reads are 0.1x
# input), else its cache-write cost (5m writes 1.25x, 1h writes 2x). Two sums, not one CASE per row: the
# division alone is NULL (ignored) when input_tokens is 0, and the fallback only looks at those rows.
_CACHE_TOKENS = "(r.cache_read_input_tokens + r.cache_creation_input_tokens)"
_W5 = "COALESCE(r.cache_creation_5m_input_tokens, 0)"
_W1 = "COALESCE(r.cache_creation_1h_input_tokens, 0)"
_WRITE_WEIGHT = (
    f"CASE WHEN {_W5} + {_W1} > 0 THEN 1.25 * {_W5} + 2.0 * {_W1} ELSE 1.25 * r.cache_creation_input_tokens END"
)
_FALLBACK_RATE = (
    "CASE WHEN r.cache_read_input_tokens > 0 THEN r.cost_cache_read_usd * 10.0 / r.cache_read_input_tokens"
    f" WHEN r.cache_creation_input_tokens > 0 THEN r.cost_cache_write_usd / NULLIF({_WRITE_WEIGHT}, 0) END"
)
_CACHE_AS_INPUT = (  # NULLIF: a division by 0 is NULL in SQLite, an error in PostgreSQL
    f"TOTAL(r.cost_input_usd * {_CACHE_TOKENS} / NULLIF(r.input_tokens, 0))"
    f" + TOTAL(CASE WHEN r.input_tokens = 0 THEN ({_FALLBACK_RATE}) * {_CACHE_TOKENS} END)"
)

MEASURES: dict[str, str] = {
    "requests": "COUNT(*)",
    "errors": "COUNT(r.error)",
    "unpriced_requests": "COUNT(*) - COUNT(r.cost_usd)",
    "input_tokens": _isum("input_tokens"),
    "output_tokens": _isum("output_tokens"),
    "cache_creation_input_tokens": _isum("cache_creation_input_tokens"),
    "cache_read_input_tokens": _isum("cache_read_input_tokens"),
    "cost_usd": "TOTAL(r.cost_usd)",
}
# Attempts vs calls: every row is an attempt; an SDK retry (x-stainless-retry-count > 0) is another attempt of a
# call already counted, and each retried call has exactly one attempt with retry count 1.
RETRIES = "COUNT(CASE WHEN r.retry_count > 0 THEN 1 END)"
CALL_MEASURES = {"calls": f"COUNT(*) - {RETRIES}", "retried_calls": "COUNT(CASE WHEN r.retry_count = 1 THEN 1 END)"}
SUMMARY_MEASURES: dict[str, str] = {
    **MEASURES,
    **CALL_MEASURES,
    "cache_creation_5m_input_tokens": _isum("cache_creation_5m_input_tokens"),
    "cache_creation_1h_input_tokens": _isum("cache_creation_1h_input_tokens"),
    "web_search_requests": _isum("web_search_requests"),
    "cost_input_usd": "TOTAL(r.cost_input_usd)",
    "cost_output_usd": "TOTAL(r.cost_output_usd)",
    "cost_cache_write_usd": "TOTAL(r.cost_cache_write_usd)",
    "cost_cache_read_usd": "TOTAL(r.cost_cache_read_usd)",
    "cost_tools_usd": "TOTAL(r.cost_tools_usd)",
    "cache_as_input_usd": _CACHE_AS_INPUT,  # internal: what the cache tokens would have cost as plain input
    "batch_results": "COUNT(r.batch_id)",  # of the requests: Message Batches results (one row each)
    "batch_cost_usd": "TOTAL(CASE WHEN r.batch_id IS NOT NULL THEN r.cost_usd END)",
}


def time_span(db: Db, opts: Options) -> tuple[str | None, str | None]:
    """The first and last `ts` of the filtered rows (two queries: SQLite answers a lone MIN or MAX from the end
    of an index, but scans for both at once)."""
    where, params = db.where(opts.filters)
    first = db.value(f"SELECT MIN(r.ts) FROM requests r{where}", params)
    last = db.value(f"SELECT MAX(r.ts) FROM requests r{where}", params)
    return first, last


Period = tuple[str, str, str]  # label, lo (inclusive), hi (exclusive), in the stored `ts` format


def load_periods(db: Db, opts: Options, period: str) -> list[Period]:
    """The period bounds covering the filtered rows (in SQLite, also in a temp table to join); the outermost
    bounds are open-ended ("" and MAX_TS), so no row can fall outside every period."""
    first, last = time_span(db, opts)
    periods: list[Period] = []
    if first is not None:
        try:
            periods = periods_between(datetime.fromisoformat(first), datetime.fromisoformat(last), period, opts.utc)
        except ValueError:
            periods = []
        if not periods:  # unreadable timestamps: one catch-all period
            periods = [(first[:10], "", MAX_TS)]
        periods[0] = (periods[0][0], "", periods[0][2])
        periods[-1] = (periods[-1][0], periods[-1][1], MAX_TS)
    if not db.pg:
        conn = db.conn
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS metrion_periods (lo TEXT PRIMARY KEY, hi TEXT, label TEXT)")
        conn.execute("DELETE FROM metrion_periods")
        conn.executemany("INSERT INTO metrion_periods (label, lo, hi) VALUES (?, ?, ?)", periods)
    return periods


def _pg_bound(ts: str) -> str:
    return {"": "-infinity", MAX_TS: "infinity"}.get(ts, ts)


def pg_periods(periods: list[Period], where: str) -> tuple[str, list[Any]]:
    """PostgreSQL's source of rows numbered by period (`r.period_i`, 1-based): `width_bucket` over the lower
    bounds when the periods are contiguous (they are: each hi is the next lo), else a join on both bounds."""
    lows = [_pg_bound(lo) for _, lo, _ in periods]
    if all(periods[i][2] == periods[i + 1][1] for i in range(len(periods) - 1)):
        # Joined to the numbered periods rather than grouped by width_bucket() itself: the planner then expects
        # as many groups as periods (not one per row) and aggregates in a hash table instead of sorting all rows.
        sql = (
            "(SELECT p.i AS period_i, r.* FROM requests r JOIN unnest(?::timestamptz[]) WITH ORDINALITY p(lo, i)"
            f" ON p.i = width_bucket(r.ts, ?::timestamptz[]){where}) r"
        )
        return sql, [lows, lows]
    sql = (
        "(SELECT p.i AS period_i, r.* FROM unnest(?::timestamptz[], ?::timestamptz[]) WITH ORDINALITY p(lo, hi, i)"
        f" JOIN requests r ON r.ts >= p.lo AND r.ts < p.hi{where.replace(' WHERE ', ' AND ', 1)}) r"
    )
    return sql, [lows, [_pg_bound(hi) for _, _, hi in periods]]


def aggregate(
    db: Db, opts: Options, measures: dict[str, str], dims: Sequence[str] = (), columns: dict[str, str] = DIMENSIONS
) -> list[dict[str, Any]]:
    """One row per distinct combination of `dims` (at most one of them a period; the others keys of
    `columns`), with `measures`, ordered by `dims`."""
    return aggregate_periods(db, opts, measures, dims, columns)[0]


def aggregate_periods(
    db: Db, opts: Options, measures: dict[str, str], dims: Sequence[str] = (), columns: dict[str, str] = DIMENSIONS
) -> tuple[list[dict[str, Any]], list[Period]]:
    """`aggregate`, and the period bounds when `dims` has a period."""
    where, params = db.where(opts.filters)
    times = [d for d in dims if d in PERIODS]
    periods = load_periods(db, opts, times[0]) if times else []
    select = [f"{columns[d]} AS [{d}]" for d in dims if d not in PERIODS]
    group = [columns[d] for d in dims if d not in PERIODS]
    order = [db.order(columns[d]) for d in dims if d not in PERIODS]
    source = "requests r"
    if times:
        at = dims.index(times[0])
        if db.pg:
            source, bounds = pg_periods(periods, where)
            where, params = "", [*bounds, *params]
            label, key = "r.period_i", "r.period_i"
        else:
            source = "metrion_periods p JOIN requests r ON r.ts >= p.lo AND r.ts < p.hi"
            label, key = "p.label", "p.lo"
        select.insert(at, f"{label} AS [{times[0]}]")
        group.insert(at, key)
        order.insert(at, key)
    select += [f"{sql} AS [{name}]" for name, sql in measures.items()]
    sql = f"SELECT {', '.join(select)} FROM {source}{where}"
    if group:
        sql += f" GROUP BY {', '.join(group)} ORDER BY {', '.join(order)}"
    rows = db.dicts(sql, params)
    if times and db.pg:  # period numbers -> labels
        for r in rows:
            r[times[0]] = periods[r[times[0]] - 1][0]
    return rows, periods


def sum_rows(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    return money({n: sum((r[n] or 0 for r in rows), 0.0 if n.endswith("_usd") else 0) for n in names})


def chart_rows(db: Db, opts: Options, period: str, measures: dict[str, str]) -> list[dict[str, Any]]:
    """Per-period rows, empty periods included (a gap in spending is information)."""
    rows, periods = aggregate_periods(db, opts, measures, [period])
    got = {r[period]: r for r in rows}
    zero = dict.fromkeys(measures, 0) | {"cost_usd": 0.0}
    return [
        {"period": label} | {k: v for k, v in got.get(label, zero).items() if k != period} for label, _, _ in periods
    ]


def unmetered_batches(db: Db) -> int:
    """Batches created through the proxy whose results were never read (pass-through: nobody fetched them
    through the proxy yet; managed: not ended yet, or results gone). 0 without a batches table (PostgreSQL has
    none: a fleet's proxies keep batches in their own files)."""
    sql = "SELECT COUNT(*) FROM batches WHERE metered_at IS NULL AND results_recorded = 0"
    if db.pg:
        if db.value("SELECT to_regclass('batches') IS NULL"):
            return 0
        return int(db.value(sql))
    try:
        return db.value(sql)
    except sqlite3.Error:  # no batches table
        return 0
