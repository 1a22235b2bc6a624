"""A Report as JSON or CSV: its rows and total as data, no tables."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from metrion_addon.report.queries import Options
from metrion_addon.report.views import Report


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
