"""`metrion report` / `metrion-report`: the arguments, and the run from them to the terminal, JSON, CSV or html."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from metrion_addon.periods import PERIODS
from metrion_addon.report.db import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    ReportError,
    check_not_empty,
    connect,
    db_errors,
    read_config,
    resolve_db,
)
from metrion_addon.report.output import to_csv, to_json
from metrion_addon.report.queries import DIMENSIONS, Db, Filters, Options
from metrion_addon.report.terminal import SUMMARY_CHART_PERIODS, print_unsqueezed, render
from metrion_addon.report.views import VIEWS, run_view
from metrion_addon.report.when import parse_when


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


def watch(source: Path | str, view: str, opts: Options, console: Console, interval: float) -> None:
    db: Db | None = None
    shown = source if isinstance(source, Path) else _redacted(source)
    with Live(console=console, auto_refresh=False) as live:
        while True:
            try:
                db = db or connect(source)
                check_not_empty(db, source)
                body: RenderableType = Group(*render(run_view(db, view, opts), opts))
                if db.pg:
                    db.conn.rollback()  # the next refresh reads a new snapshot
            except ReportError as e:
                body = Text(e.message, style="yellow")
            stamp = Text(f"{shown} · updated {datetime.now():%H:%M:%S} · Ctrl-C to stop", style="dim")
            live.update(Group(body, stamp), refresh=True)
            time.sleep(interval)


def _redacted(url: str) -> str:
    from metrion_addon.pgstore import redacted

    return redacted(url)


def _one_line(e: Exception, source: Path | str) -> str:
    """A database error in one line; never a PostgreSQL password."""
    text = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
    return text.replace(source, _redacted(source)) if isinstance(source, str) else text


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)
    source: Path | str = Path()
    try:
        opts = options_from_args(args)
        config = read_config(args.config)
        if args.view in ("budgets", "html"):
            opts = replace(opts, budgets=config.budgets if config is not None else None)
        source = resolve_db(args.db, config)  # a Path (SQLite) or a PostgreSQL URL
        if args.view == "html":  # one self-contained page: metrion_addon/report/html.py
            from metrion_addon.report.html import write_report

            db = connect(source)
            try:
                check_not_empty(db, source)
            finally:
                db.conn.close()
            write_report(source, opts, args.stack or "model", args.output)
            return EXIT_OK
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=200)  # piped to a file or pager: no terminal width to fit
        if args.watch:
            with contextlib.suppress(KeyboardInterrupt):
                watch(source, args.view, opts, console, max(0.2, args.interval))
            return EXIT_OK
        db = connect(source)
        try:
            if args.view != "budgets":
                check_not_empty(db, source)
            report = run_view(db, args.view, opts)
        finally:
            db.conn.close()
    except ReportError as e:
        print(f"metrion-report: {e.message}", file=sys.stderr)
        return e.code
    except db_errors() as e:
        print(f"metrion-report: database error: {_one_line(e, source)}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(to_json(report, opts) + "\n")
    elif args.csv:
        sys.stdout.write(to_csv(report))
    else:
        for part in render(report, opts):
            print_unsqueezed(console, part)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
