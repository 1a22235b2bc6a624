"""The report over a PostgreSQL store: the rows a view reads, copied into a SQLite file first.

Every view then runs the very same queries as over SQLite, so its numbers, sorting and JSON are identical for the
same rows. The rows are narrowed in PostgreSQL by the time window and the account and user filters (the budgets
view, which needs only the current periods, reads the last 32 days), so a day, a week or a month of a fleet's
traffic reads in seconds; a report over all of a large history reads all of it (measured in docs/fleet.md).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from metrion_addon.report.db import EXIT_EMPTY, EXIT_NO_DB, ReportError
from metrion_addon.report.queries import Options


def pg_filter(opts: Options, view: str, now: datetime | None = None) -> tuple[str, list[Any]]:
    """` AND ...` (with %s parameters) selecting the rows `view` can read under `opts`."""
    f = opts.filters
    since = f.since
    if since is None and view == "budgets":
        since = (now or datetime.now(UTC)) - timedelta(days=32)  # every current day and month starts after it
    parts: list[str] = []
    params: list[Any] = []
    if since is not None:
        parts.append("ts >= %s")
        params.append(since)
    if f.until is not None:
        parts.append("ts < %s")
        params.append(f.until)
    for column, values in (("account", f.accounts), ('"user"', f.users)):
        if values:
            parts.append(f"{column} = ANY(%s)")
            params.append(list(values))
    return "".join(f" AND {p}" for p in parts), params


def snapshot(url: str, opts: Options, view: str, workdir: Path) -> Path:
    """Copy the rows `view` reads from PostgreSQL into a SQLite file in `workdir`; its path."""
    from metrion_addon.dbcopy import Writer, read_rows
    from metrion_addon.pgstore import redacted

    path = workdir / "metrion-report.db"
    where, params = pg_filter(opts, view)
    try:
        if view != "budgets" and _empty(url):
            raise ReportError(f"no requests recorded yet in {redacted(url)}: send a request first", EXIT_EMPTY)
        _, chunks = read_rows(url, where, params)
        writer = Writer(str(path))
        try:
            for rows in chunks:
                writer.write(rows)
        finally:
            writer.close()
    except ReportError:
        raise
    except Exception as e:  # one line, never the password
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ReportError(f"cannot read {redacted(url)}: {msg.replace(url, redacted(url))}", EXIT_NO_DB) from None
    return path


def _empty(url: str) -> bool:
    import psycopg

    with psycopg.connect(url) as conn:
        return bool(conn.execute("SELECT NOT EXISTS (SELECT 1 FROM requests)").fetchone()[0])  # type: ignore[index]
