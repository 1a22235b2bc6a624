"""`metrion db copy SRC DST`: move request history between SQLite files and PostgreSQL, either way.

Each side is a SQLite path or a `postgresql://` URL. The destination's schema is created or upgraded first.
Rows are read in id order, in chunks, and inserted with their `row_id`; a row whose `row_id` is already there
is skipped, so running the copy again (or after an interruption) copies only what is missing. Rows written
before `row_id` existed get one derived from their source position (a UUIDv5 of the source's id and time), the
same on every run, so they too are copied once. Money goes from REAL to numeric and back, times from the
stored text to `timestamptz` and back, without loss beyond REAL's own precision.

The `batches` table (Message Batches created through the proxy: their creators, for results read later) is
copied too; a batch the destination already has is kept as it is there.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from metrion_addon.pgstore import _insert, is_pg_url, pg_migrate, redacted
from metrion_addon.schema import iso_ms
from metrion_addon.store import _INSERT_SQL, _params, connect, migrate

CHUNK = 5000
_NAMESPACE = uuid.UUID("6d657472-696f-6e00-0000-000000000000")  # fixed: derived row ids are stable


def derived_row_id(row: dict[str, Any]) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{row['id']}|{row['ts']}|{row.get('request_id')}"))


def _from_pg(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, datetime):
            v = iso_ms(v.astimezone(UTC).timestamp())
        elif isinstance(v, bool):
            v = int(v)
        elif isinstance(v, Decimal):
            v = float(v)
        elif isinstance(v, uuid.UUID):
            v = str(v)
        out[k] = v
    return out


def read_rows(src: str, where: str = "", params: Sequence[Any] = ()) -> tuple[int, Iterator[list[dict[str, Any]]]]:
    """(row count, chunks of rows as the SQLite store holds them) from a SQLite file or PostgreSQL; `where`
    (PostgreSQL only: ` AND ...` with %s parameters) narrows the rows."""
    if is_pg_url(src):
        import psycopg
        from psycopg.rows import dict_row

        conn = psycopg.connect(src)
        total = conn.execute(f"SELECT count(*) FROM requests WHERE TRUE{where}", params).fetchone()[0]  # type: ignore[index]

        def pg_chunks() -> Iterator[list[dict[str, Any]]]:
            last = 0
            try:
                while True:
                    with conn.cursor(row_factory=dict_row) as cur:
                        rows = cur.execute(
                            f"SELECT * FROM requests WHERE id > %s{where} ORDER BY id LIMIT %s", (last, *params, CHUNK)
                        ).fetchall()
                    if not rows:
                        return
                    last = rows[-1]["id"]
                    yield [_from_pg(r) for r in rows]
            finally:
                conn.close()

        return total, pg_chunks()
    path = Path(src)
    if not path.is_file():
        raise SystemExit(f"metrion db copy: no database at {path}")
    sconn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    sconn.row_factory = sqlite3.Row
    total = sconn.execute("SELECT count(*) FROM requests").fetchone()[0]

    def sqlite_chunks() -> Iterator[list[dict[str, Any]]]:
        last = 0
        try:
            while True:
                rows = [
                    dict(r)
                    for r in sconn.execute("SELECT * FROM requests WHERE id > ? ORDER BY id LIMIT ?", (last, CHUNK))
                ]
                if not rows:
                    return
                last = rows[-1]["id"]
                for r in rows:
                    if not r.get("row_id"):
                        r["row_id"] = derived_row_id(r)
                yield rows
        finally:
            sconn.close()

    return total, sqlite_chunks()


BATCH_COLUMNS = (
    "id",
    "ts",
    "account",
    "user",
    "mode",
    "request_count",
    "models",
    "processing_status",
    "created_at",
    "ended_at",
    "upstream_results_url",
    "results_recorded",
    "metered_at",
    "upstream",
    "polls",
    "next_poll_at",
    "poll_failures",
    "reserved_usd",
    "reserved_at",
    "billable_count",
)


def read_batches(src: str) -> list[tuple[Any, ...]]:
    """Every row of the source's `batches` table (none when it has no such table)."""
    cols = ", ".join(f'"{c}"' for c in BATCH_COLUMNS)
    if is_pg_url(src):
        import psycopg

        with psycopg.connect(src) as conn:
            if conn.execute("SELECT to_regclass('batches')").fetchone() == (None,):
                return []
            return conn.execute(f"SELECT {cols} FROM batches ORDER BY id").fetchall()
    conn = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT {cols} FROM batches ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # a history from before batches were kept
        return []
    finally:
        conn.close()


class Writer:
    """Inserts chunks into the destination, skipping rows whose row_id it already has; counts the new ones."""

    def __init__(self, dst: str) -> None:
        self.dst = dst
        if is_pg_url(dst):
            import psycopg

            self.pg = psycopg.connect(dst)
            pg_migrate(self.pg)
            self.sqlite = None
        else:
            migrate(Path(dst))
            self.sqlite = connect(Path(dst))
            self.pg = None

    def write(self, rows: list[dict[str, Any]]) -> int:
        if self.pg is not None:
            return _insert(self.pg, rows)
        assert self.sqlite is not None
        before = self.sqlite.total_changes
        with self.sqlite:
            self.sqlite.executemany(
                _INSERT_SQL.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1), [_params(r) for r in rows]
            )
        return self.sqlite.total_changes - before

    def write_batches(self, batches: list[tuple[Any, ...]]) -> int:
        cols = ", ".join(f'"{c}"' for c in BATCH_COLUMNS)
        if self.pg is not None:
            marks = ", ".join(["%s"] * len(BATCH_COLUMNS))
            with self.pg.transaction(), self.pg.cursor() as cur:
                cur.executemany(f"INSERT INTO batches ({cols}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING", batches)
                return max(0, cur.rowcount)
        assert self.sqlite is not None
        before = self.sqlite.total_changes
        with self.sqlite:
            marks = ", ".join("?" * len(BATCH_COLUMNS))
            self.sqlite.executemany(f"INSERT OR IGNORE INTO batches ({cols}) VALUES ({marks})", batches)
        return self.sqlite.total_changes - before

    def close(self) -> None:
        for conn in (self.pg, self.sqlite):
            if conn is not None:
                conn.close()


def copy(src: str, dst: str, progress: bool = True) -> tuple[int, int, int]:
    """(rows read, rows new in the destination, batches new in the destination)."""
    from rich.progress import Progress

    total, chunks = read_rows(src)
    writer = Writer(dst)
    read = new = 0
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("copying", total=total)
            for rows in chunks:
                new += writer.write(rows)
                read += len(rows)
                bar.update(task, advance=len(rows))
        batches = writer.write_batches(read_batches(src))
    finally:
        writer.close()
    return read, new, batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="metrion db", description="Database tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cp = sub.add_parser("copy", help="copy request rows between SQLite and PostgreSQL (either way), idempotent")
    cp.add_argument("src", help="a SQLite file or a postgresql:// URL")
    cp.add_argument("dst", help="a SQLite file or a postgresql:// URL (created or upgraded)")
    cp.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        read, new, batches = copy(args.src, args.dst, progress=not args.quiet and sys.stderr.isatty())
    except Exception as e:  # a database error: one line, no traceback, no password
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        for side in (args.src, args.dst):
            msg = msg.replace(side, redacted(side))
        print(f"metrion db copy: {msg}", file=sys.stderr)
        return 1
    shown_dst = redacted(args.dst) if is_pg_url(args.dst) else args.dst
    print(f"metrion db copy: {read:,} rows read, {new:,} new in {shown_dst}, {read - new:,} already there", end="")
    print(f"; {batches:,} batch{'es' if batches != 1 else ''} new" if batches else "")
    return 0
