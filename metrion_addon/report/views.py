"""The views: each a function `(connection, Options) -> Report` that returns data (rows, totals), registered in
`VIEWS`. Nothing here builds a table: the terminal renders a Report (terminal.py), JSON and CSV write its rows
(output.py), the html page reads several (html_data.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrion_addon.budget import SEED_SQL, Budgets
from metrion_addon.inflight import read_inflight
from metrion_addon.periods import PERIODS
from metrion_addon.report.db import EXIT_USAGE, ReportError
from metrion_addon.report.queries import (
    CALL_MEASURES,
    MEASURES,
    MONEY_DIGITS,
    RETRIES,
    SUMMARY_MEASURES,
    Db,
    Options,
    aggregate,
    chart_rows,
    sum_rows,
    time_span,
    unmetered_batches,
)


@dataclass
class Report:
    view: str
    fields: list[str]  # CSV columns, in order; also the keys of every JSON row
    rows: list[dict[str, Any]]
    total: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what only the terminal shows (the summary's chart...)


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


def view_summary(db: Db, opts: Options) -> Report:
    """Totals, by token kind, and what caching saved; the per-period rows (same query) go to the terminal's
    cost chart."""
    periods = chart_rows(db, opts, opts.period, SUMMARY_MEASURES)
    s = sum_rows(periods, list(SUMMARY_MEASURES))
    prompt = s["input_tokens"] + s["cache_creation_input_tokens"] + s["cache_read_input_tokens"]
    s["cache_hit_ratio"] = round(s["cache_read_input_tokens"] / prompt, 6) if prompt else None
    s["cache_saved_usd"] = round(
        s["cache_as_input_usd"] - s["cost_cache_read_usd"] - s["cost_cache_write_usd"], MONEY_DIGITS
    )
    s["cost_uncached_usd"] = round(s["cost_usd"] + s["cache_saved_usd"], MONEY_DIGITS)
    s["first_ts"], s["last_ts"] = time_span(db, opts)
    summary = {k: s[k] for k in SUMMARY_FIELDS}
    extra = {"periods": periods, "unmetered_batches": unmetered_batches(db)}
    return Report("summary", SUMMARY_FIELDS, [summary], None, extra)


BY_MEASURES = [*MEASURES, "cost_share"]
TOKENS = ["input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"]


def view_by(db: Db, opts: Options) -> Report:
    """One row per group of `--by` dimensions (a time period among them: per period, oldest first)."""
    dims = list(opts.by)
    rows = aggregate(db, opts, MEASURES, dims)
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
    return Report("by", [*dims, *BY_MEASURES], shown, total)


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
TOP_SQL = "SELECT {cols} FROM requests r{where} ORDER BY r.cost_usd DESC, r.id LIMIT ?".format(
    cols=", ".join(f"r.[{c}]" for c in TOP_FIELDS), where="{where}"
)


def view_top(db: Db, opts: Options) -> Report:
    """The N most expensive priced requests (unpriced ones cannot be ranked; they are counted apart)."""
    where, params = db.where(opts.filters, "r.cost_usd IS NOT NULL")
    rows = db.dicts(TOP_SQL.format(where=where), [*params, opts.limit or 10])
    where, params = db.where(opts.filters)
    unpriced = db.value(f"SELECT {MEASURES['unpriced_requests']} FROM requests r{where}", params)
    total = sum_rows(rows, [*TOKENS, "cost_usd"]) | {"requests": len(rows)}
    return Report("top", TOP_FIELDS, rows, total, {"unpriced": unpriced})


ERROR_MEASURES = {
    **{k: v for k, v in MEASURES.items() if k != "errors"},
    "calls": CALL_MEASURES["calls"],
    "retries": RETRIES,  # attempts that were SDK retries of a call counted before
}


def view_errors(db: Db, opts: Options) -> Report:
    """Failed requests by error type and HTTP status, with the tokens and cost they still consumed."""
    where, params = db.where(opts.filters, "r.error IS NOT NULL")
    select = ", ".join(f"{sql} AS [{name}]" for name, sql in ERROR_MEASURES.items())
    batch = "CASE WHEN r.batch_id IS NOT NULL THEN 1 ELSE 0 END"
    rows = db.dicts(
        f"SELECT r.error, r.status, {batch} AS batch, {select} FROM requests r{where} GROUP BY r.error, r.status,"
        f" {batch} ORDER BY requests DESC, {db.order('r.error')}, {db.order('r.status', text=False)}",
        params,
    )
    total = sum_rows(rows, list(ERROR_MEASURES))
    return Report("errors", ["error", "status", "batch", *ERROR_MEASURES], rows, total)


CHART_MEASURES = {k: MEASURES[k] for k in ("requests", "unpriced_requests", "cost_usd")}


def view_chart(db: Db, opts: Options) -> Report:
    """Cost per period; empty periods included. --limit N keeps the last N periods."""
    rows = chart_rows(db, opts, opts.period, CHART_MEASURES)
    if opts.limit:
        rows = rows[-opts.limit :]
    total = sum_rows(rows, list(CHART_MEASURES))
    return Report("chart", ["period", *CHART_MEASURES], rows, total)


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


def view_budgets(db: Db, opts: Options) -> Report:
    """Each configured budget in its current period: limit, spent, remaining and when it resets."""
    if opts.budgets is None or not opts.budgets.any:
        raise ReportError("no budgets in the config (see budget: / user_budget: in config.example.yaml)", EXIT_USAGE)
    budgets = Budgets(opts.budgets)
    if db.pg:  # a fleet's proxies keep no in-flight file beside PostgreSQL
        cost = "COALESCE(cost_usd, budget_usd::numeric)"  # exact sums
        budgets.seed_from(lambda since, until, _: db.rows(SEED_SQL.format(cost=cost), [since, until]))
    else:
        budgets.seed(db.conn)
        path = next((r[2] for r in db.conn.execute("PRAGMA database_list") if r[1] == "main" and r[2]), None)
        for key, usd in read_inflight(Path(path)) if path else ():  # what running proxies hold in flight
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
    return Report("budgets", BUDGET_FIELDS, rows)


View = Callable[[Db, Options], Report]
# The positional VIEW argument. Add a view by adding an entry here and a renderer in terminal.py.
VIEWS: dict[str, View] = {
    "summary": view_summary,
    "top": view_top,
    "errors": view_errors,
    "chart": view_chart,
    "budgets": view_budgets,
}


def run_view(conn: sqlite3.Connection | Db, view: str, opts: Options) -> Report:
    db = conn if isinstance(conn, Db) else Db(conn)
    if opts.by and view == "summary":
        return view_by(db, opts)
    return VIEWS[view](db, opts)
