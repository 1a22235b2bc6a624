"""`metrion report`: read-only cost reports over the `requests` table, as rich tables, JSON, CSV or one html page.

A view is data first and rendering second:

    when.py      --since/--until values, wall clock <-> UTC, period bounds (calendar math: ../periods.py)
    queries.py   Filters and Options, the one WHERE builder, the measures, aggregation over period bounds
    views.py     one function per view: (connection, Options) -> Report (rows, total); VIEWS registers them
    terminal.py  a Report as rich tables and notes (built only for the terminal)
    output.py    a Report as JSON or CSV
    fmt.py       numbers and times as shown
    html_data.py, html.py   the html page: its numbers, then its markup
    db.py        the database opened read-only and checked; exit codes and ReportError
    cli.py       the arguments and `main`

The database is opened with `mode=ro`: the report never writes and never blocks the proxy (WAL). See
docs/report.md for the fields and exit codes. The names below are the package's public interface.
"""

from metrion_addon.report.cli import build_parser, main, options_from_args
from metrion_addon.report.db import (
    EXIT_EMPTY,
    EXIT_ERROR,
    EXIT_NO_DB,
    EXIT_OK,
    EXIT_OLD_SCHEMA,
    EXIT_USAGE,
    REQUIRED_COLUMNS,
    ReportError,
    open_db,
)
from metrion_addon.report.fmt import bar, fmt_int, fmt_ms, fmt_pct, fmt_usd
from metrion_addon.report.output import csv_cell, to_csv, to_json
from metrion_addon.report.queries import DIMENSIONS, Filters, Options, where_sql
from metrion_addon.report.terminal import LiteralTable, print_unsqueezed, render, table
from metrion_addon.report.views import (
    BY_MEASURES,
    SUMMARY_FIELDS,
    TOP_FIELDS,
    VIEWS,
    Report,
    run_view,
    view_budgets,
    view_errors,
    view_summary,
)
from metrion_addon.report.when import parse_when, periods_between, show_time
from metrion_addon.schema import iso_ms as iso_z  # the name the report's callers have used

__all__ = [
    "BY_MEASURES",
    "DIMENSIONS",
    "EXIT_EMPTY",
    "EXIT_ERROR",
    "EXIT_NO_DB",
    "EXIT_OK",
    "EXIT_OLD_SCHEMA",
    "EXIT_USAGE",
    "REQUIRED_COLUMNS",
    "SUMMARY_FIELDS",
    "TOP_FIELDS",
    "VIEWS",
    "Filters",
    "LiteralTable",
    "Options",
    "Report",
    "ReportError",
    "bar",
    "build_parser",
    "csv_cell",
    "fmt_int",
    "fmt_ms",
    "fmt_pct",
    "fmt_usd",
    "iso_z",
    "main",
    "open_db",
    "options_from_args",
    "parse_when",
    "periods_between",
    "print_unsqueezed",
    "render",
    "run_view",
    "show_time",
    "table",
    "to_csv",
    "to_json",
    "view_budgets",
    "view_errors",
    "view_summary",
    "where_sql",
]
