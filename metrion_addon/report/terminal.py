"""A Report as the terminal shows it: rich tables and notes, built only here (never for --json or --csv)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from metrion_addon.report.fmt import bar, fmt_int, fmt_ms, fmt_pct, fmt_usd, scope
from metrion_addon.report.queries import MONEY_DIGITS, Options
from metrion_addon.report.views import TOKENS, Report
from metrion_addon.report.when import show_time
from metrion_addon.text import clean_text

SUMMARY_CHART_PERIODS = 31  # the summary's chart shows the latest periods; the chart view shows them all
TOKEN_HEADERS = ["input", "output", "cache write", "cache read"]


class LiteralTable(Table):
    """A table whose text cells are shown literally. Labels, models and clients come from requests (anyone who
    can reach the proxy chooses them): as plain `str` cells rich would read `[/]` or `[link=...]` as markup and
    print an ESC sequence raw. Every `str` cell becomes a `Text` with control characters removed."""

    def add_row(self, *renderables: RenderableType | None, **kw: Any) -> None:
        super().add_row(*(Text(display_text(r)) if isinstance(r, str) else r for r in renderables), **kw)


def display_text(value: str) -> str:
    """A database value as shown on a terminal: valid UTF-8, no control characters (escape sequences)."""
    return value if value.isprintable() else (clean_text(value, 10_000) or "")


def table(title: str, columns: Sequence[str], numeric_from: int) -> Table:
    """Labels left, numbers right and never wrapped; light borders so wide reports still fit a terminal."""
    t = LiteralTable(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, title_style="bold")
    for i, c in enumerate(columns):
        if i >= numeric_from:
            t.add_column(c, justify="right", no_wrap=True)
        else:
            t.add_column(c)
    return t


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


# --- notes under the tables ----------------------------------------------------------------------


def _unpriced_note(n: int, marked: bool = False) -> Text | None:
    if not n:
        return None
    return Text(
        f"⚠ {n:,} unpriced request{'s' if n != 1 else ''} (no known price for the model): their cost is not in "
        f"these totals{' (+? marks the rows they are in)' if marked else ''}. Add a pricing override to the config "
        "and run metrion-reprice.",
        style="yellow",
    )


def _unmetered_batches_note(n: int) -> Text | None:
    if not n:
        return None
    return Text(f"{n:,} batch(es) created but not metered yet: their results have not been read through the proxy.")


def _empty_note(rows: list[dict[str, Any]], what: str = "requests") -> Text | None:
    return None if rows else Text(f"No {what} match these filters.", style="dim")


def _cost_cell(row: dict[str, Any]) -> str:
    return fmt_usd(row["cost_usd"]) + (" +?" if row.get("unpriced_requests") else "")


def _chart_table(rows: list[dict[str, Any]], period: str, of: int | None = None) -> Table:
    top = max((r["cost_usd"] for r in rows), default=0.0)
    shown = f" (the last {len(rows):,} of {of:,})" if of and of > len(rows) else ""
    t = table(f"Cost per {period}{shown}", [period, "", "cost", "requests"], 2)
    t.columns[1].justify = "left"
    for r in rows:
        t.add_row(
            r["period"], Text(bar(r["cost_usd"], top), style="cyan"), fmt_usd(r["cost_usd"]), fmt_int(r["requests"])
        )
    t.add_section()
    t.add_row("Total", "", fmt_usd(sum(r["cost_usd"] for r in rows)), fmt_int(sum(r["requests"] for r in rows)))
    return t


# --- one renderer per view -----------------------------------------------------------------------

Parts = list[RenderableType | None]


def _summary(report: Report, opts: Options) -> Parts:
    s = report.rows[0]
    periods = report.extra["periods"]
    cost = s["cost_usd"]
    kinds = table(f"Costs · {scope(opts)}", ["", "tokens", "cost", "share"], 1)
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
    prompt = s["input_tokens"] + s["cache_creation_input_tokens"] + s["cache_read_input_tokens"]
    total_tokens = prompt + s["output_tokens"]
    kinds.add_row("Total", fmt_int(total_tokens), fmt_usd(cost), fmt_pct(1.0) if cost else "", style="bold")

    facts = table("Requests and caching", ["", "value"], 1)
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
        facts.add_row("Interactive", fmt_usd(round(cost - s["batch_cost_usd"], MONEY_DIGITS)))
    facts.add_row("Cache hit ratio", fmt_pct(s["cache_hit_ratio"]) or "n/a")
    facts.add_row("Cost without caching", fmt_usd(s["cost_uncached_usd"]))
    facts.add_row("Saved by caching", fmt_usd(s["cache_saved_usd"]))
    chart = periods[-(opts.limit or SUMMARY_CHART_PERIODS) :]
    out = [
        kinds,
        facts,
        _unpriced_note(s["unpriced_requests"]),
        _unmetered_batches_note(report.extra["unmetered_batches"]),
        _empty_note(periods),
    ]
    if periods:
        out.append(_chart_table(chart, opts.period, of=len(periods)))
    return out


def _by(report: Report, opts: Options) -> Parts:
    dims, total = list(opts.by), report.total or {}
    t = table(
        f"Cost by {' + '.join(dims)} · {scope(opts)}",
        [*dims, "requests", "errors", *TOKEN_HEADERS, "cost", "share"],
        len(dims),
    )
    for r in report.rows:
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
    return [t, _unpriced_note(total["unpriced_requests"], marked=True), _empty_note(report.rows)]


def _top(report: Report, opts: Options) -> Parts:
    rows, total = report.rows, report.total or {}
    t = table(
        f"Top {len(rows)} requests by cost · {scope(opts)}",
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
    return [t, _unpriced_note(report.extra["unpriced"]), _empty_note(rows)]


def _errors(report: Report, opts: Options) -> Parts:
    rows, total = report.rows, report.total or {}
    t = table(f"Errors · {scope(opts)}", ["error", "status", "requests", "calls", "retries", *TOKEN_HEADERS, "cost"], 1)
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
    return [t, _unpriced_note(total["unpriced_requests"], marked=True), _empty_note(rows, "errors")]


def _chart(report: Report, opts: Options) -> Parts:
    unpriced = (report.total or {})["unpriced_requests"]
    return [_chart_table(report.rows, opts.period), _unpriced_note(unpriced), _empty_note(report.rows)]


def _budgets(report: Report, opts: Options) -> Parts:
    timezone = opts.budgets.timezone if opts.budgets is not None else "UTC"
    t = table(
        f"Budgets · {timezone} calendar periods",
        ["account", "user", "period", "enforce", "limit", "spent", "reserved", "remaining", "resets"],
        4,
    )
    for r in report.rows:
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
    return [t, note]


RENDERERS: dict[str, Callable[[Report, Options], Parts]] = {
    "summary": _summary,
    "by": _by,
    "top": _top,
    "errors": _errors,
    "chart": _chart,
    "budgets": _budgets,
}


def render(report: Report, opts: Options) -> list[RenderableType]:
    """What the terminal shows for a report, in order."""
    return [part for part in RENDERERS[report.view](report, opts) if part is not None]
