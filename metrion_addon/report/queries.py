"""The report's SQL: filters and the one WHERE builder, the measures, and the aggregation over period bounds.

Time periods (hour, day, week, month) are not computed per row: the bounds are built in Python (local time, DST
included) into a temp table joined on the `ts` index, which is faster than a per-row `strftime` and exact for
any time zone. Money sums are rounded to MONEY_DIGITS, so JSON and CSV carry no float noise.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from metrion_addon.budget import BudgetSettings
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


def where_sql(f: Filters, *extra: str) -> tuple[str, list[Any]]:
    """` WHERE ...` for the filters (on `requests r`) and any `extra` conditions after them (their `?`
    parameters come after the filters'); "" when there is nothing to filter."""
    parts: list[str] = []
    params: list[Any] = []
    if f.since:
        parts.append("r.ts >= ?")
        params.append(iso_ms(f.since))
    if f.until:
        parts.append("r.ts < ?")
        params.append(iso_ms(f.until))
    for column, values in (("r.account", f.accounts), ("r.[user]", f.users)):
        if values:
            parts.append(f"{column} IN ({', '.join('?' * len(values))})")
            params += values
    if f.models:
        parts.append("(" + " OR ".join("(r.model >= ? AND r.model < ?)" for _ in f.models) + ")")
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
    f" WHEN r.cache_creation_input_tokens > 0 THEN r.cost_cache_write_usd / ({_WRITE_WEIGHT}) END"
)
_CACHE_AS_INPUT = (
    f"TOTAL(r.cost_input_usd * {_CACHE_TOKENS} / r.input_tokens)"
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


def time_span(conn: sqlite3.Connection, opts: Options) -> tuple[str | None, str | None]:
    """The first and last `ts` of the filtered rows (two queries: SQLite answers a lone MIN or MAX from the end
    of an index, but scans for both at once)."""
    where, params = where_sql(opts.filters)
    first = conn.execute(f"SELECT MIN(r.ts) FROM requests r{where}", params).fetchone()[0]
    last = conn.execute(f"SELECT MAX(r.ts) FROM requests r{where}", params).fetchone()[0]
    return first, last


def load_periods(conn: sqlite3.Connection, opts: Options, period: str) -> list[tuple[str, str, str]]:
    """Fill the temp table of period bounds covering the filtered rows; the outermost bounds are open-ended
    so no row can fall outside every period."""
    first, last = time_span(conn, opts)
    periods: list[tuple[str, str, str]] = []
    if first is not None:
        try:
            periods = periods_between(datetime.fromisoformat(first), datetime.fromisoformat(last), period, opts.utc)
        except ValueError:
            periods = []
        if not periods:  # unreadable timestamps: one catch-all period
            periods = [(first[:10], "", MAX_TS)]
        periods[0] = (periods[0][0], "", periods[0][2])
        periods[-1] = (periods[-1][0], periods[-1][1], MAX_TS)
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS metrion_periods (lo TEXT PRIMARY KEY, hi TEXT, label TEXT)")
    conn.execute("DELETE FROM metrion_periods")
    conn.executemany("INSERT INTO metrion_periods (label, lo, hi) VALUES (?, ?, ?)", periods)
    return periods


def fetch_dicts(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    """The rows of a query as dicts keyed by column name, money rounded."""
    cur = conn.execute(sql, params)
    names = [c[0] for c in cur.description]
    return [money(dict(zip(names, row, strict=True))) for row in cur]


def aggregate(
    conn: sqlite3.Connection, opts: Options, measures: dict[str, str], dims: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per distinct combination of `dims` (at most one of them a period), with `measures`."""
    where, params = where_sql(opts.filters)
    times = [d for d in dims if d in PERIODS]
    select = [f"p.label AS [{d}]" if d in PERIODS else f"{DIMENSIONS[d]} AS [{d}]" for d in dims]
    select += [f"{sql} AS [{name}]" for name, sql in measures.items()]
    group = ["p.lo" if d in PERIODS else DIMENSIONS[d] for d in dims]
    source = "requests r"
    if times:
        load_periods(conn, opts, times[0])
        source = "metrion_periods p JOIN requests r ON r.ts >= p.lo AND r.ts < p.hi"
    sql = f"SELECT {', '.join(select)} FROM {source}{where}"
    if group:
        sql += f" GROUP BY {', '.join(group)} ORDER BY {', '.join(group)}"
    return fetch_dicts(conn, sql, params)


def sum_rows(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    return money({n: sum((r[n] or 0 for r in rows), 0.0 if n.endswith("_usd") else 0) for n in names})


def chart_rows(conn: sqlite3.Connection, opts: Options, period: str, measures: dict[str, str]) -> list[dict[str, Any]]:
    """Per-period rows, empty periods included (a gap in spending is information)."""
    got = {r[period]: r for r in aggregate(conn, opts, measures, [period])}
    labels = [label for label, _, _ in conn.execute("SELECT label, lo, hi FROM metrion_periods ORDER BY lo")]
    zero = dict.fromkeys(measures, 0) | {"cost_usd": 0.0}
    return [{"period": label} | {k: v for k, v in got.get(label, zero).items() if k != period} for label in labels]


def unmetered_batches(conn: sqlite3.Connection) -> int:
    """Batches created through the proxy whose results were never read (pass-through: nobody fetched them
    through the proxy yet; managed: not ended yet, or results gone). 0 without a batches table."""
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM batches WHERE metered_at IS NULL AND results_recorded = 0"
        ).fetchone()[0]
    except sqlite3.Error:  # no batches table
        return 0
