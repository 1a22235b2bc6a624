"""`metrion-report`: read-only cost reports over the `requests` table, as rich tables, JSON or CSV.

Views: `summary` (default; with a cost chart), `--by DIMS`, `top`, `errors`, `chart`, `budgets`; `html` writes
them as one page (report_html.py). Every view is a function `(connection, Options) -> Report` registered in
`VIEWS`; the aggregation happens in SQL. Time periods (hour, day, week, month) are not computed per row: the
report builds the period boundaries in Python (local time, DST included) into a temp table and joins on the `ts`
index, which is faster than a per-row `strftime` and exact for any time zone. The database is opened with
`mode=ro`: the report never writes and never blocks the proxy (WAL). See docs/report.md for the fields and exit
codes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from rich import box

from metrion_addon.budget import Budgets, BudgetSettings
from metrion_addon.inflight import read_inflight
from metrion_addon.text import clean_text

if TYPE_CHECKING:
    from metrion_addon.config import Config
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected database error while querying
EXIT_USAGE = 2  # bad arguments, dates or config file
EXIT_NO_DB = 3  # database missing, unreadable, or not a metrion database
EXIT_OLD_SCHEMA = 4  # database written by an older metrion: start the proxy once to upgrade it
EXIT_EMPTY = 5  # no request recorded yet

PERIODS = ("hour", "day", "week", "month")
DIMENSIONS: dict[str, str] = {  # --by name -> column (time periods are joined, not computed per row)
    "model": "r.model",
    "user": "r.[user]",
    "account": "r.account",
    "client": "r.client",
    "session": "r.session_id",
    "batch": "r.batch_id",  # Message Batches results; (none) groups everything else
}
REQUIRED_COLUMNS = frozenset(  # what this report reads; a database without them is from an older schema
    ("ts", "account", "user", "model", "status", "error", "client", "session_id", "request_id", "latency_ms")
    + ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    + ("cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens", "web_search_requests")
    + ("cost_usd", "cost_input_usd", "cost_output_usd", "cost_cache_write_usd", "cost_cache_read_usd")
    + ("cost_tools_usd", "batch_id", "retry_count")
)
_MAX_TS = "\U0010ffff"  # sorts after any stored timestamp
_MONEY_DIGITS = 10  # float sums are rounded here, so JSON/CSV carry no float noise


class ReportError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- time ----------------------------------------------------------------------------------------


def to_utc(wall: datetime, utc: bool) -> datetime:
    """A naive wall-clock time (local, or UTC with --utc) -> aware UTC."""
    return wall.replace(tzinfo=UTC) if utc else wall.astimezone(UTC)


def to_wall(moment: datetime, utc: bool) -> datetime:
    """An aware time -> naive wall-clock time (local, or UTC with --utc)."""
    return moment.astimezone(UTC if utc else None).replace(tzinfo=None)


def iso_z(moment: datetime) -> str:
    """The stored timestamp format: UTC ISO 8601 with milliseconds and Z."""
    m = moment.astimezone(UTC)
    return m.strftime("%Y-%m-%dT%H:%M:%S.") + f"{m.microsecond // 1000:03d}Z"


def add_months(d: datetime, n: int) -> datetime:
    y, m = divmod(d.month - 1 + n, 12)
    return d.replace(year=d.year + y, month=m + 1, day=1)


def period_floor(wall: datetime, period: str) -> datetime:
    day = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    match period:
        case "hour":
            return wall.replace(minute=0, second=0, microsecond=0)
        case "day":
            return day
        case "week":
            return day - timedelta(days=day.weekday())  # weeks start on Monday
        case "month":
            return day.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def period_next(wall: datetime, period: str) -> datetime:
    match period:
        case "hour":
            return wall + timedelta(hours=1)
        case "day":
            return wall + timedelta(days=1)
        case "week":
            return wall + timedelta(days=7)
        case "month":
            return add_months(wall, 1)
    raise ValueError(f"unknown period {period!r}")


def period_label(wall: datetime, period: str) -> str:
    return wall.strftime({"hour": "%Y-%m-%d %H:00", "month": "%Y-%m"}.get(period, "%Y-%m-%d"))


def periods_between(first: datetime, last: datetime, period: str, utc: bool) -> list[tuple[str, str, str]]:
    """(label, lo, hi) for every period from the one holding `first` to the one holding `last`; lo/hi are
    stored-format UTC bounds, lo inclusive, hi exclusive."""
    out: list[tuple[str, str, str]] = []
    wall = period_floor(to_wall(first, utc), period)
    end = to_wall(last, utc)
    while wall <= end:
        nxt = period_next(wall, period)
        lo, hi = iso_z(to_utc(wall, utc)), iso_z(to_utc(nxt, utc))
        if hi > lo:  # a wall hour skipped by a DST change is empty
            out.append((period_label(wall, period), lo, hi))
        wall = nxt
    return out


_SPAN_RE = re.compile(r"^(\d+)\s*(m|min|h|d|w)$")
_SPAN_UNITS = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _named_period(name: str, wall_now: datetime) -> tuple[datetime, datetime] | None:
    today = period_floor(wall_now, "day")
    week = period_floor(wall_now, "week")
    month = period_floor(wall_now, "month")
    year = month.replace(month=1)
    return {
        "today": (today, today + timedelta(days=1)),
        "yesterday": (today - timedelta(days=1), today),
        "this-week": (week, week + timedelta(days=7)),
        "last-week": (week - timedelta(days=7), week),
        "this-month": (month, add_months(month, 1)),
        "last-month": (add_months(month, -1), month),
        "this-year": (year, year.replace(year=year.year + 1)),
    }.get(name)


def parse_when(text: str, *, end: bool, now: datetime, utc: bool) -> datetime:
    """A --since/--until value -> aware UTC time.

    Whole periods (a date, `today`, `this-month`...) give their start, or with `end` their end, so
    `--until 2026-11-30` includes that day. Spans (`24h`, `7d`, `30m`, `2w`) count back from now. Datetimes are
    points; without an offset they are local time (UTC with --utc).
    """
    t = text.strip().lower()
    if t == "now":
        return now
    if m := _SPAN_RE.match(t):
        return now - timedelta(**{_SPAN_UNITS[m.group(2)]: int(m.group(1))})
    if bounds := _named_period(t, to_wall(now, utc)):
        return to_utc(bounds[1] if end else bounds[0], utc)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t):
        day = datetime.fromisoformat(t)
        return to_utc(day + timedelta(days=1) if end else day, utc)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a date (2026-11-28), datetime (2026-11-28T14:00), span (24h, 7d) "
            "or period (today, yesterday, this-week, last-week, this-month, last-month, this-year)"
        ) from None
    return to_utc(moment, utc) if moment.tzinfo is None else moment.astimezone(UTC)


def show_time(ts: str | None, utc: bool) -> str:
    if not ts:
        return ""
    try:
        return to_wall(datetime.fromisoformat(ts), utc).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return ts


# --- formatting ----------------------------------------------------------------------------------


def fmt_usd(x: float | None) -> str:
    """Dollars with enough decimals that a small request never shows as $0.00."""
    if x is None:
        return "unpriced"
    a = abs(x)
    if a == 0:
        return "$0.00"
    if a < 0.0000005:
        return ("-" if x < 0 else "") + "<$0.000001"
    digits = 2 if a >= 1 else 4 if a >= 0.01 else 6
    return ("-" if x < 0 else "") + f"${a:,.{digits}f}"


def fmt_int(n: int | float | None) -> str:
    return "" if n is None else f"{n:,.0f}"


def fmt_pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.1f}%"


def fmt_ms(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f} ms"


_BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: float, top: float, width: int = 40) -> str:
    """A horizontal bar in eighths of a character; any positive value shows at least a sliver."""
    if top <= 0 or value <= 0:
        return ""
    eighths = max(1, round(value / top * width * 8))
    full, rest = divmod(eighths, 8)
    return "█" * full + (_BLOCKS[rest] if rest else "")


def _money(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, _MONEY_DIGITS) if k.endswith("_usd") and isinstance(v, float) else v for k, v in row.items()}


# --- queries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    accounts: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # prefixes

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": iso_z(self.since) if self.since else None,
            "until": iso_z(self.until) if self.until else None,
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


def where_sql(f: Filters) -> tuple[str, list[Any]]:
    parts: list[str] = []
    params: list[Any] = []
    if f.since:
        parts.append("r.ts >= ?")
        params.append(iso_z(f.since))
    if f.until:
        parts.append("r.ts < ?")
        params.append(iso_z(f.until))
    for column, values in (("r.account", f.accounts), ("r.[user]", f.users)):
        if values:
            parts.append(f"{column} IN ({', '.join('?' * len(values))})")
            params += values
    if f.models:
        parts.append("(" + " OR ".join("(r.model >= ? AND r.model < ?)" for _ in f.models) + ")")
        for prefix in f.models:
            params += [prefix, prefix + _MAX_TS]
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
_RETRIES = "COUNT(CASE WHEN r.retry_count > 0 THEN 1 END)"
CALL_MEASURES = {"calls": f"COUNT(*) - {_RETRIES}", "retried_calls": "COUNT(CASE WHEN r.retry_count = 1 THEN 1 END)"}
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


def _load_periods(conn: sqlite3.Connection, opts: Options, period: str) -> list[tuple[str, str, str]]:
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
            periods = [(first[:10], "", _MAX_TS)]
        periods[0] = (periods[0][0], "", periods[0][2])
        periods[-1] = (periods[-1][0], periods[-1][1], _MAX_TS)
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS metrion_periods (lo TEXT PRIMARY KEY, hi TEXT, label TEXT)")
    conn.execute("DELETE FROM metrion_periods")
    conn.executemany("INSERT INTO metrion_periods (label, lo, hi) VALUES (?, ?, ?)", periods)
    return periods


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
        _load_periods(conn, opts, times[0])
        source = "metrion_periods p JOIN requests r ON r.ts >= p.lo AND r.ts < p.hi"
    sql = f"SELECT {', '.join(select)} FROM {source}{where}"
    if group:
        sql += f" GROUP BY {', '.join(group)} ORDER BY {', '.join(group)}"
    cur = conn.execute(sql, params)
    names = [c[0] for c in cur.description]
    return [_money(dict(zip(names, row, strict=True))) for row in cur]


def sum_rows(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    return _money({n: sum((r[n] or 0 for r in rows), 0.0 if n.endswith("_usd") else 0) for n in names})


# --- views ---------------------------------------------------------------------------------------


@dataclass
class Report:
    view: str
    fields: list[str]  # CSV columns, in order; also the keys of every JSON row
    rows: list[dict[str, Any]]
    total: dict[str, Any] | None = None
    output: list[RenderableType] = field(default_factory=list)  # what the terminal shows


class LiteralTable(Table):
    """A table whose text cells are shown literally. Labels, models and clients come from requests (anyone who
    can reach the proxy chooses them): as plain `str` cells rich would read `[/]` or `[link=...]` as markup and
    print an ESC sequence raw. Every `str` cell becomes a `Text` with control characters removed."""

    def add_row(self, *renderables: RenderableType | None, **kw: Any) -> None:
        super().add_row(*(Text(display_text(r)) if isinstance(r, str) else r for r in renderables), **kw)


def display_text(value: str) -> str:
    """A database value as shown on a terminal: valid UTF-8, no control characters (escape sequences)."""
    return value if value.isprintable() else (clean_text(value, 10_000) or "")


def _table(title: str, columns: Sequence[str], numeric_from: int) -> Table:
    """Labels left, numbers right and never wrapped; light borders so wide reports still fit a terminal."""
    t = LiteralTable(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, title_style="bold")
    for i, c in enumerate(columns):
        if i >= numeric_from:
            t.add_column(c, justify="right", no_wrap=True)
        else:
            t.add_column(c)
    return t


def _unpriced_note(n: int, marked: bool = False) -> Text | None:
    if not n:
        return None
    return Text(
        f"⚠ {n:,} unpriced request{'s' if n != 1 else ''} (no known price for the model): their cost is not in "
        f"these totals{' (+? marks the rows they are in)' if marked else ''}. Add a pricing override to the config "
        "and run metrion-reprice.",
        style="yellow",
    )


def _unmetered_batches_note(conn: sqlite3.Connection) -> Text | None:
    """Batches created through the proxy whose results were never read (pass-through: nobody fetched them
    through the proxy yet; managed: not ended yet, or results gone)."""
    try:
        n = conn.execute("SELECT COUNT(*) FROM batches WHERE metered_at IS NULL AND results_recorded = 0").fetchone()[0]
    except sqlite3.Error:  # no batches table
        return None
    if not n:
        return None
    return Text(f"{n:,} batch(es) created but not metered yet: their results have not been read through the proxy.")


def _empty_note(rows: list[dict[str, Any]], what: str = "requests") -> Text | None:
    return None if rows else Text(f"No {what} match these filters.", style="dim")


def _scope(opts: Options) -> str:
    f = opts.filters
    bits = [f"{name} {show_time(iso_z(t), opts.utc)}" for name, t in (("since", f.since), ("until", f.until)) if t]
    for name, values in (("account", f.accounts), ("user", f.users), ("model", [m + "*" for m in f.models])):
        if values:
            bits.append(f"{name} {' | '.join(values)}")
    return " · ".join([*bits, "UTC" if opts.utc else f"local time ({datetime.now().astimezone().tzname()})"])


def _chart_table(rows: list[dict[str, Any]], period: str, of: int | None = None) -> Table:
    top = max((r["cost_usd"] for r in rows), default=0.0)
    shown = f" (the last {len(rows):,} of {of:,})" if of and of > len(rows) else ""
    t = _table(f"Cost per {period}{shown}", [period, "", "cost", "requests"], 2)
    t.columns[1].justify = "left"
    for r in rows:
        t.add_row(
            r["period"], Text(bar(r["cost_usd"], top), style="cyan"), fmt_usd(r["cost_usd"]), fmt_int(r["requests"])
        )
    t.add_section()
    t.add_row("Total", "", fmt_usd(sum(r["cost_usd"] for r in rows)), fmt_int(sum(r["requests"] for r in rows)))
    return t


def chart_rows(conn: sqlite3.Connection, opts: Options, period: str, measures: dict[str, str]) -> list[dict[str, Any]]:
    """Per-period rows, empty periods included (a gap in spending is information)."""
    got = {r[period]: r for r in aggregate(conn, opts, measures, [period])}
    labels = [label for label, _, _ in conn.execute("SELECT label, lo, hi FROM metrion_periods ORDER BY lo")]
    zero = dict.fromkeys(measures, 0) | {"cost_usd": 0.0}
    return [{"period": label} | {k: v for k, v in got.get(label, zero).items() if k != period} for label in labels]


SUMMARY_FIELDS = [
    "requests",
    "calls",
    "retried_calls",
    "errors",
    "unpriced_requests",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
    "cost_usd",
    "cost_input_usd",
    "cost_output_usd",
    "cost_cache_write_usd",
    "cost_cache_read_usd",
    "cost_tools_usd",
    "cache_hit_ratio",
    "cost_uncached_usd",
    "cache_saved_usd",
    "first_ts",
    "last_ts",
    "batch_results",
    "batch_cost_usd",
]
SUMMARY_CHART_PERIODS = 31  # the summary's chart shows the latest periods; the chart view shows them all


def view_summary(conn: sqlite3.Connection, opts: Options) -> Report:
    """Totals, by token kind, and what caching saved; the terminal also gets the cost chart (same query)."""
    periods = chart_rows(conn, opts, opts.period, SUMMARY_MEASURES)
    s = sum_rows(periods, list(SUMMARY_MEASURES))
    prompt = s["input_tokens"] + s["cache_creation_input_tokens"] + s["cache_read_input_tokens"]
    s["cache_hit_ratio"] = round(s["cache_read_input_tokens"] / prompt, 6) if prompt else None
    s["cache_saved_usd"] = round(
        s["cache_as_input_usd"] - s["cost_cache_read_usd"] - s["cost_cache_write_usd"], _MONEY_DIGITS
    )
    s["cost_uncached_usd"] = round(s["cost_usd"] + s["cache_saved_usd"], _MONEY_DIGITS)
    s["first_ts"], s["last_ts"] = time_span(conn, opts)
    summary = {k: s[k] for k in SUMMARY_FIELDS}

    cost = s["cost_usd"]
    kinds = _table(f"Costs · {_scope(opts)}", ["", "tokens", "cost", "share"], 1)
    for label, tokens, usd in (
        ("Input", fmt_int(s["input_tokens"]), s["cost_input_usd"]),
        ("Output", fmt_int(s["output_tokens"]), s["cost_output_usd"]),
        ("Cache write", fmt_int(s["cache_creation_input_tokens"]), s["cost_cache_write_usd"]),
        (
            "  of which 5m / 1h",
            f"{s['cache_creation_5m_input_tokens']:,} / {s['cache_creation_1h_input_tokens']:,}",
            None,
        ),
        ("Cache read", fmt_int(s["cache_read_input_tokens"]), s["cost_cache_read_usd"]),
        ("Web search", f"{s['web_search_requests']:,} searches", s["cost_tools_usd"]),
    ):
        share = fmt_pct(usd / cost) if usd is not None and cost else ""
        kinds.add_row(label, tokens, "" if usd is None else fmt_usd(usd), share)
    kinds.add_section()
    total_tokens = prompt + s["output_tokens"]
    kinds.add_row("Total", fmt_int(total_tokens), fmt_usd(cost), fmt_pct(1.0) if cost else "", style="bold")

    facts = _table("Requests and caching", ["", "value"], 1)
    if s["first_ts"]:
        facts.add_row("First request", show_time(s["first_ts"], opts.utc))
        facts.add_row("Last request", show_time(s["last_ts"], opts.utc))
    facts.add_row("Requests (attempts)", fmt_int(s["requests"]))
    facts.add_row("Calls (SDK retries not counted)", fmt_int(s["calls"]))
    facts.add_row("Retried calls", fmt_int(s["retried_calls"]))
    facts.add_row("Errors", fmt_int(s["errors"]))
    facts.add_row("Unpriced", Text(fmt_int(s["unpriced_requests"]), style="yellow" if s["unpriced_requests"] else ""))
    if s["batch_results"]:
        facts.add_row("Batch results", f"{fmt_int(s['batch_results'])} · {fmt_usd(s['batch_cost_usd'])}")
        facts.add_row("Interactive", fmt_usd(round(cost - s["batch_cost_usd"], _MONEY_DIGITS)))
    facts.add_row("Cache hit ratio", fmt_pct(s["cache_hit_ratio"]) or "n/a")
    facts.add_row("Cost without caching", fmt_usd(s["cost_uncached_usd"]))
    facts.add_row("Saved by caching", fmt_usd(s["cache_saved_usd"]))
    chart = periods[-(opts.limit or SUMMARY_CHART_PERIODS) :]
    out = [kinds, facts, _unpriced_note(s["unpriced_requests"]), _unmetered_batches_note(conn), _empty_note(periods)]
    if periods:
        out.append(_chart_table(chart, opts.period, of=len(periods)))
    return Report("summary", SUMMARY_FIELDS, [summary], None, [o for o in out if o is not None])


BY_MEASURES = [*MEASURES, "cost_share"]
TOKENS = ["input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"]
TOKEN_HEADERS = ["input", "output", "cache write", "cache read"]


def _cost_cell(row: dict[str, Any]) -> str:
    return fmt_usd(row["cost_usd"]) + (" +?" if row.get("unpriced_requests") else "")


def view_by(conn: sqlite3.Connection, opts: Options) -> Report:
    dims = list(opts.by)
    rows = aggregate(conn, opts, MEASURES, dims)
    total = sum_rows(rows, list(MEASURES))
    cost = total["cost_usd"]
    for r in rows:
        r["cost_share"] = round(r["cost_usd"] / cost, 6) if cost else 0.0
    total["cost_share"] = 1.0 if cost else 0.0
    times = [d for d in dims if d in PERIODS]
    rows.sort(key=lambda r: (*(r[d] for d in times), -r["cost_usd"], -r["requests"], *(str(r[d]) for d in dims)))
    shown = rows  # --limit: the latest N periods, or the N most expensive groups
    if opts.limit:
        shown = rows[-opts.limit :] if times else rows[: opts.limit]

    t = _table(
        f"Cost by {' + '.join(dims)} · {_scope(opts)}",
        [*dims, "requests", "errors", *TOKEN_HEADERS, "cost", "share"],
        len(dims),
    )
    for r in shown:
        t.add_row(
            *(str(r[d]) if r[d] is not None else "(none)" for d in dims),
            *(fmt_int(r[k]) for k in ["requests", "errors", *TOKENS]),
            _cost_cell(r),
            fmt_pct(r["cost_share"]),
        )
    t.add_section()
    t.add_row(
        "Total",
        *[""] * (len(dims) - 1),
        *(fmt_int(total[k]) for k in ["requests", "errors", *TOKENS]),
        _cost_cell(total),
        fmt_pct(total["cost_share"]),
        style="bold",
    )
    out = [t, _unpriced_note(total["unpriced_requests"], marked=True), _empty_note(rows)]
    return Report("by", [*dims, *BY_MEASURES], shown, total, [o for o in out if o is not None])


TOP_FIELDS = [
    "id",
    "ts",
    "account",
    "user",
    "model",
    "status",
    "error",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cost_usd",
    "latency_ms",
    "request_id",
    "batch_id",
]


def view_top(conn: sqlite3.Connection, opts: Options) -> Report:
    """The N most expensive priced requests (unpriced ones cannot be ranked; they are counted below)."""
    where, params = where_sql(opts.filters)
    cols = ", ".join(f"r.[{c}]" for c in TOP_FIELDS)
    priced = f"{where} AND r.cost_usd IS NOT NULL" if where else " WHERE r.cost_usd IS NOT NULL"
    cur = conn.execute(
        f"SELECT {cols} FROM requests r{priced} ORDER BY r.cost_usd DESC, r.id LIMIT ?", [*params, opts.limit or 10]
    )
    rows = [_money(dict(zip(TOP_FIELDS, row, strict=True))) for row in cur]
    unpriced = conn.execute(f"SELECT {MEASURES['unpriced_requests']} FROM requests r{where}", params).fetchone()[0]
    total = sum_rows(rows, [*TOKENS, "cost_usd"]) | {"requests": len(rows)}

    t = _table(
        f"Top {len(rows)} requests by cost · {_scope(opts)}",
        ["time", "account", "user", "model", *TOKEN_HEADERS, "cost", "latency"],
        4,
    )
    for r in rows:
        t.add_row(
            show_time(r["ts"], opts.utc),
            r["account"] or "",
            r["user"] or "",
            (r["model"] or "") + (" [batch]" if r["batch_id"] else ""),
            *(fmt_int(r[k]) for k in TOKENS),
            fmt_usd(r["cost_usd"]),
            fmt_ms(r["latency_ms"]),
        )
    t.add_section()
    t.add_row("Total", "", "", "", *(fmt_int(total[k]) for k in TOKENS), fmt_usd(total["cost_usd"]), "", style="bold")
    out = [t, _unpriced_note(unpriced), _empty_note(rows)]
    return Report("top", TOP_FIELDS, rows, total, [o for o in out if o is not None])


ERROR_MEASURES = {
    **{k: v for k, v in MEASURES.items() if k != "errors"},
    "calls": CALL_MEASURES["calls"],
    "retries": _RETRIES,  # attempts that were SDK retries of a call counted before
}


def view_errors(conn: sqlite3.Connection, opts: Options) -> Report:
    """Failed requests by error type and HTTP status, with the tokens and cost they still consumed."""
    where, params = where_sql(opts.filters)
    where = f"{where} AND r.error IS NOT NULL" if where else " WHERE r.error IS NOT NULL"
    select = ", ".join(f"{sql} AS [{name}]" for name, sql in ERROR_MEASURES.items())
    cur = conn.execute(
        f"SELECT r.error, r.status, r.batch_id IS NOT NULL AS batch, {select} FROM requests r{where} "
        "GROUP BY r.error, r.status, batch ORDER BY requests DESC, r.error, r.status",
        params,
    )
    names = [c[0] for c in cur.description]
    rows = [_money(dict(zip(names, row, strict=True))) for row in cur]
    total = sum_rows(rows, list(ERROR_MEASURES))
    t = _table(
        f"Errors · {_scope(opts)}",
        ["error", "status", "requests", "calls", "retries", *TOKEN_HEADERS, "cost"],
        1,
    )
    for r in rows:
        t.add_row(
            r["error"] + (" [batch]" if r["batch"] else ""),
            "" if r["status"] is None else str(r["status"]),
            *(fmt_int(r[k]) for k in ["requests", "calls", "retries", *TOKENS]),
            _cost_cell(r),
        )
    t.add_section()
    t.add_row(
        "Total",
        "",
        *(fmt_int(total[k]) for k in ["requests", "calls", "retries", *TOKENS]),
        _cost_cell(total),
        style="bold",
    )
    out = [t, _unpriced_note(total["unpriced_requests"], marked=True), _empty_note(rows, "errors")]
    return Report(
        "errors", ["error", "status", "batch", *ERROR_MEASURES], rows, total, [o for o in out if o is not None]
    )


CHART_MEASURES = {k: MEASURES[k] for k in ("requests", "unpriced_requests", "cost_usd")}


def view_chart(conn: sqlite3.Connection, opts: Options) -> Report:
    """Cost per period as a bar chart; empty periods shown. --limit N keeps the last N periods."""
    rows = chart_rows(conn, opts, opts.period, CHART_MEASURES)
    if opts.limit:
        rows = rows[-opts.limit :]
    total = sum_rows(rows, list(CHART_MEASURES))
    out = [_chart_table(rows, opts.period), _unpriced_note(total["unpriced_requests"]), _empty_note(rows)]
    return Report("chart", ["period", *CHART_MEASURES], rows, total, [o for o in out if o is not None])


BUDGET_FIELDS = [
    "account",
    "user",
    "period",
    "enforce",
    "limit_usd",
    "spent_usd",
    "reserved_usd",
    "remaining_usd",
    "exceeded",
    "period_start",
    "resets_at",
]


def view_budgets(conn: sqlite3.Connection, opts: Options) -> Report:
    """Each configured budget in its current period: limit, spent, remaining and when it resets."""
    if opts.budgets is None or not opts.budgets.any:
        raise ReportError("no budgets in the config (see budget: / user_budget: in config.example.yaml)", EXIT_USAGE)
    budgets = Budgets(opts.budgets)
    budgets.seed(conn)
    db = next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main" and r[2]), None)
    for key, usd in read_inflight(Path(db)) if db else ():  # what running proxies hold for requests in flight
        budgets.add_reserved(key, usd)
    rows = []
    for s in budgets.status():
        account, user, is_user = s.scope
        if opts.filters.accounts and account not in opts.filters.accounts:
            continue
        rows.append(
            {
                "account": account,
                "user": (user if user is not None else "(no label)") if is_user else None,
                "period": s.limit.period,
                "enforce": "hard" if s.limit.hard else "soft",
                "limit_usd": s.limit.usd,
                "spent_usd": round(s.spent, 9),
                "reserved_usd": round(s.reserved, 9),
                "remaining_usd": round(max(0.0, s.remaining), 9),
                "exceeded": s.exceeded,
                "period_start": s.period_start.isoformat(),
                "resets_at": s.resets_at.isoformat(),
            }
        )
    t = _table(
        f"Budgets · {opts.budgets.timezone} calendar periods",
        ["account", "user", "period", "enforce", "limit", "spent", "reserved", "remaining", "resets"],
        4,
    )
    for r in rows:
        t.add_row(
            r["account"],
            r["user"] or "(whole account)",
            r["period"],
            r["enforce"],
            fmt_usd(r["limit_usd"]),
            fmt_usd(r["spent_usd"]),
            fmt_usd(r["reserved_usd"]),
            Text(fmt_usd(r["remaining_usd"]), style="bold red" if r["exceeded"] else ""),
            r["resets_at"],
        )
    note = Text(
        "Users without a named budget appear once they have spent in the current period. Spent counts each request "
        "in the period it started; reserved is what running proxies on this host hold for requests in flight.",
        style="dim",
    )
    return Report("budgets", BUDGET_FIELDS, rows, None, [t, note])


View = Callable[[sqlite3.Connection, Options], Report]
# The positional VIEW argument. Add a view by adding an entry.
VIEWS: dict[str, View] = {
    "summary": view_summary,
    "top": view_top,
    "errors": view_errors,
    "chart": view_chart,
    "budgets": view_budgets,
}


def run_view(conn: sqlite3.Connection, view: str, opts: Options) -> Report:
    if opts.by and view == "summary":
        return view_by(conn, opts)
    return VIEWS[view](conn, opts)


# --- output --------------------------------------------------------------------------------------


def to_json(report: Report, opts: Options) -> str:
    doc = {
        "view": report.view,
        "by": list(opts.by),
        "filters": opts.filters.as_dict(),
        "timezone": "UTC" if opts.utc else "local",
        "rows": report.rows,
        "total": report.total,
    }
    return json.dumps(doc, indent=2)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (`=HYPERLINK(...)`, `@SUM`, `-2+3`) gets a leading `'`,
    as OWASP's CSV-injection advice says; numbers are written as numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=report.fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows({k: csv_cell(v) for k, v in row.items()} for row in report.rows)
    return buf.getvalue()


# --- the database --------------------------------------------------------------------------------


def open_db(path: Path) -> sqlite3.Connection:
    """Open read-only (never creates, never writes) and check the schema; ReportError with a one-line reason."""
    if not path.is_file():
        raise ReportError(
            f"no database at {path}: start metrion-proxy and send a request first, or pass --db PATH", EXIT_NO_DB
        )
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=10)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA mmap_size = 1073741824")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    except sqlite3.DatabaseError as e:
        raise ReportError(f"cannot read {path} as a SQLite database: {e}", EXIT_NO_DB) from None
    if "requests" not in tables:
        if "_metrion_migrations" in tables:
            raise ReportError(
                f"{path} has an older metrion schema: start metrion-proxy once to upgrade it", EXIT_OLD_SCHEMA
            )
        raise ReportError(f"{path} is not a metrion database (no 'requests' table)", EXIT_NO_DB)
    missing = sorted(REQUIRED_COLUMNS - columns)
    if missing:
        raise ReportError(
            f"{path} has an older metrion schema (missing {', '.join(missing)}): start metrion-proxy once to "
            "upgrade it",
            EXIT_OLD_SCHEMA,
        )
    return conn


def check_not_empty(conn: sqlite3.Connection, path: Path) -> None:
    if conn.execute("SELECT 1 FROM requests LIMIT 1").fetchone() is None:
        raise ReportError(f"no requests recorded yet in {path}: send a request through the proxy first", EXIT_EMPTY)


def read_config(config: str | None) -> Config | None:
    """The config (--config, or ./config.yaml if present), read without needing its ${SECRETS}; None if absent."""
    if config is None and not Path("config.yaml").is_file():
        return None
    from metrion_addon.config import ConfigError, load_config

    try:  # the report needs no secrets: ${VARS} need not be set to read `database`
        return load_config(config or "config.yaml", resolve_secrets=False)
    except ConfigError as e:
        raise ReportError(f"config error: {e}", EXIT_USAGE) from None


def resolve_db(db: str | None, config: Config | None) -> Path:
    """--db, else the config's `database`, else ./metrion.db."""
    if db and db.startswith(("postgresql://", "postgres://")) or (not db and config and config.database_url):
        raise ReportError(
            "the report reads SQLite databases only for now; a PostgreSQL store can be reported on once its "
            "rows are copied to a SQLite file",
            EXIT_USAGE,
        )
    if db:
        return Path(db).expanduser()
    return config.database if config is not None else Path("metrion.db")


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="metrion-report",
        description="Cost reports from the metrion database (read-only; safe while the proxy runs).",
        epilog="Exit codes: 0 ok, 1 database error, 2 usage/config error, 3 no/unreadable database, "
        "4 older schema, 5 no requests yet. See docs/report.md.",
    )
    ap.add_argument(
        "view", nargs="?", default="summary", choices=[*VIEWS, "html"], help="what to show (default: summary)"
    )
    ap.add_argument(
        "--by",
        action="append",
        default=[],
        help=f"group by one or more of {', '.join([*DIMENSIONS, *PERIODS])}, comma-separated (e.g. account,user)",
    )
    ap.add_argument("--since", help="from (inclusive): 2026-11-01, 2026-11-01T09:00, 24h, 7d, today, this-month...")
    ap.add_argument("--until", help="to (exclusive; a date or named period includes its whole span)")
    ap.add_argument("--account", action="append", default=[], help="only this account (repeatable)")
    ap.add_argument("--user", action="append", default=[], help="only this user (repeatable)")
    ap.add_argument("--model", action="append", default=[], help="only models starting with this (repeatable)")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    ap.add_argument("--db", help="database file (default: from the config, else metrion.db)")
    ap.add_argument("-c", "--config", help="config file to read `database` from (default: ./config.yaml if present)")
    ap.add_argument("--utc", action="store_true", help="show and interpret times in UTC instead of local time")
    ap.add_argument(
        "--limit",
        type=int,
        help="rows for top (default 10); the last N periods for chart, --by periods and the summary's chart "
        f"(default {SUMMARY_CHART_PERIODS}); the N most expensive groups for --by",
    )
    ap.add_argument("--period", choices=PERIODS, default="day", help="chart period (default: day)")
    ap.add_argument("-o", "--output", help="html: write the page to this file (default: stdout)")
    ap.add_argument("--stack", choices=["model", "account"], help="html: split the daily chart by (default: model)")
    ap.add_argument("--watch", action="store_true", help="live view, refreshed from the database")
    ap.add_argument("--interval", type=float, default=2.0, help="--watch refresh interval in seconds (default 2)")
    return ap


def options_from_args(args: argparse.Namespace, now: datetime | None = None) -> Options:
    now = now or datetime.now(UTC)
    by = tuple(d.strip() for item in args.by for d in item.split(",") if d.strip())
    unknown = [d for d in by if d not in DIMENSIONS and d not in PERIODS]
    if unknown:
        raise ReportError(
            f"--by: unknown {', '.join(unknown)} (choose from {', '.join([*DIMENSIONS, *PERIODS])})", EXIT_USAGE
        )
    if len([d for d in by if d in PERIODS]) > 1 or len(set(by)) != len(by):
        raise ReportError("--by: at most one time period, and no dimension twice", EXIT_USAGE)
    if by and args.view != "summary":
        raise ReportError(f"--by does not apply to the {args.view} view", EXIT_USAGE)
    if args.limit is not None and args.limit < 1:
        raise ReportError("--limit must be at least 1", EXIT_USAGE)
    if args.view == "html" and (args.json or args.csv or args.watch or args.limit or args.period != "day"):
        raise ReportError(
            "the html view writes a page of days: no --json, --csv, --watch, --limit or --period", EXIT_USAGE
        )
    if args.view != "html" and (args.output or args.stack):
        raise ReportError("--output and --stack apply to the html view only", EXIT_USAGE)
    if args.watch and (args.json or args.csv):
        raise ReportError("--watch shows a live table; it cannot be combined with --json or --csv", EXIT_USAGE)
    try:
        since = parse_when(args.since, end=False, now=now, utc=args.utc) if args.since else None
        until = parse_when(args.until, end=True, now=now, utc=args.utc) if args.until else None
    except ValueError as e:
        raise ReportError(str(e), EXIT_USAGE) from None
    filters = Filters(since, until, tuple(args.account), tuple(args.user), tuple(args.model))
    return Options(filters=filters, by=by, utc=args.utc, limit=args.limit, period=args.period)


def watch(path: Path, view: str, opts: Options, console: Console, interval: float) -> None:
    conn: sqlite3.Connection | None = None
    with Live(console=console, auto_refresh=False) as live:
        while True:
            try:
                conn = conn or open_db(path)
                check_not_empty(conn, path)
                body: RenderableType = Group(*run_view(conn, view, opts).output)
            except ReportError as e:
                body = Text(e.message, style="yellow")
            stamp = Text(f"{path} · updated {datetime.now():%H:%M:%S} · Ctrl-C to stop", style="dim")
            live.update(Group(body, stamp), refresh=True)
            time.sleep(interval)


def print_unsqueezed(console: Console, part: RenderableType) -> None:
    """Print a table at its natural width: wider than the terminal it wraps, but it is never squeezed into
    unreadable truncated columns."""
    width = console.width
    if isinstance(part, Table):
        console.width = max(width, console.measure(part, options=console.options.update_width(10_000)).maximum)
    try:
        console.print(part, crop=False)
    finally:
        console.width = width


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)
    try:
        opts = options_from_args(args)
        config = read_config(args.config)
        if args.view in ("budgets", "html"):
            opts = replace(opts, budgets=config.budgets if config is not None else None)
        path = resolve_db(args.db, config)
        if args.view == "html":  # one self-contained page: metrion_addon/report_html.py
            from metrion_addon.report_html import write_report

            conn = open_db(path)
            try:
                check_not_empty(conn, path)
            finally:
                conn.close()
            write_report(path, opts, args.stack or "model", args.output)
            return EXIT_OK
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=200)  # piped to a file or pager: no terminal width to fit
        if args.watch:
            with contextlib.suppress(KeyboardInterrupt):
                watch(path, args.view, opts, console, max(0.2, args.interval))
            return EXIT_OK
        conn = open_db(path)
        try:
            if args.view != "budgets":
                check_not_empty(conn, path)
            report = run_view(conn, args.view, opts)
        finally:
            conn.close()
    except ReportError as e:
        print(f"metrion-report: {e.message}", file=sys.stderr)
        return e.code
    except sqlite3.Error as e:
        print(f"metrion-report: database error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(to_json(report, opts) + "\n")
    elif args.csv:
        sys.stdout.write(to_csv(report))
    else:
        for part in report.output:
            print_unsqueezed(console, part)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
