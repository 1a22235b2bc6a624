"""PostgreSQL as the store (fleet mode): the same `requests` rows, written off the event loop, never lost.

- **Schema.** The columns are schema.py's (`schema.COLUMNS`), as in SQLite, with PostgreSQL's native types where it has
  them: `timestamptz` for `ts`, `numeric` for money (exact sums), `boolean` for `stream` and `completed`,
  `uuid` for `row_id`. Versioned migrations are recorded in `_metrion_migrations` as in SQLite; a column that
  a later SQLite migration adds is added here by `sync_columns` (the type follows from `schema.COLUMNS`), so the
  two engines cannot drift apart.
- **Writer.** One thread, as for SQLite: `put()` only queues. A batch is one multi-row `INSERT ... ON CONFLICT
  (row_id) DO NOTHING`: every row carries a UUIDv7 made by the proxy, so a batch written twice counts once.
- **Spool.** When PostgreSQL cannot be reached or written, rows go to a local SQLite file (the SQLite store's
  schema, `spool` beside the config) in arrival order; while it holds rows, new rows go there too, so order is
  kept. Each turn of the writer tries to replay the oldest batch; spooled rows are deleted only after
  PostgreSQL has committed them (a crash in between replays them again, and `row_id` makes that harmless). At
  start-up a spool left by a previous run is replayed first. The log says once that it is spooling and once
  that it caught up, with counts.
"""

from __future__ import annotations

import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from metrion_addon.pgbatches import create_batches_table
from metrion_addon.schema import COLUMNS, INSERT_COLUMNS
from metrion_addon.store import connect, migrate, new_row_id

log = logging.getLogger(__name__)

PG_SCHEMES = ("postgresql://", "postgres://")
_STOP = object()
_BOOL_COLUMNS = frozenset({"stream", "completed"})
# Rows per COPY under load: one round trip and one transaction each (under light load, what arrived in the last
# flush interval). A server-side failure puts the whole batch in the spool, so nothing is lost either way.
PG_BATCH_SIZE = 1000


def is_pg_url(value: str) -> bool:
    return value.startswith(PG_SCHEMES)


def redacted(url: str) -> str:
    """The URL as it may be logged: any password replaced."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def pg_type(name: str, pytype: type) -> str:
    if name == "ts":
        return "timestamptz"
    if name == "row_id":
        return "uuid"
    if name in _BOOL_COLUMNS:
        return "boolean"
    if name.startswith("cost_"):
        return "numeric"
    return {int: "bigint", float: "double precision"}.get(pytype, "text")


def _q(name: str) -> str:
    return f'"{name}"'  # `user` is a reserved word in PostgreSQL


def _create_requests(conn: psycopg.Connection[Any]) -> None:
    cols = ", ".join(f"{_q(c)} {pg_type(c, t)}" for c, t in COLUMNS.items() if c not in ("id", "ts", "row_id"))
    conn.execute(
        "CREATE TABLE requests (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, row_id uuid NOT NULL UNIQUE, "
        f"ts timestamptz NOT NULL, {cols})"
    )
    for cols_ in (["ts"], ["account", "ts"], ["user", "ts"], ["model", "ts"]):
        conn.execute(f"CREATE INDEX ON requests ({', '.join(_q(c) for c in cols_)})")


def _create_budget_leases(conn: psycopg.Connection[Any]) -> None:
    from metrion_addon.leases import create_tables  # fleet budgets (leases.py)

    create_tables(conn)


def _create_budget_alerts(conn: psycopg.Connection[Any]) -> None:
    from metrion_addon.fleet_alerts import create_table  # an alert sent once by the fleet (fleet_alerts.py)

    create_table(conn)


def _budget_lease_wants(conn: psycopg.Connection[Any]) -> None:
    from metrion_addon.leases import add_wants  # fragment pooling (leases.py)

    add_wants(conn)


def _report_indexes(conn: psycopg.Connection[Any]) -> None:
    """What `metrion report` reads on the server: `top` walks the most expensive rows first (ORDER BY cost_usd
    DESC, id), and the `--model` prefix is a byte range (COLLATE "C", as SQLite compares). The other views are
    aggregates over the ts range, served by the `ts` and (account|user, ts) indexes."""
    conn.execute("CREATE INDEX IF NOT EXISTS requests_cost_top ON requests (cost_usd DESC, id)")
    conn.execute('CREATE INDEX IF NOT EXISTS requests_model_c ON requests ((model COLLATE "C"), ts)')


PG_MIGRATIONS: list[Callable[[psycopg.Connection[Any]], None]] = [
    _create_requests,
    create_batches_table,
    _create_budget_leases,
    _report_indexes,
    _create_budget_alerts,
    _budget_lease_wants,
]


def pg_migrate(conn: psycopg.Connection[Any]) -> None:
    """Create or upgrade the schema in one transaction; several proxies starting at once take turns."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7260417)")  # 'metrion' migrations, one at a time
        conn.execute("CREATE TABLE IF NOT EXISTS _metrion_migrations (name text PRIMARY KEY, applied_at timestamptz)")
        done = {r[0] for r in conn.execute("SELECT name FROM _metrion_migrations")}
        for m in PG_MIGRATIONS:
            if m.__name__ not in done:
                m(conn)
                conn.execute("INSERT INTO _metrion_migrations VALUES (%s, now())", (m.__name__,))
        sync_columns(conn)


def sync_columns(conn: psycopg.Connection[Any]) -> None:
    """Add every column `schema.COLUMNS` has and the table lacks (SQLite migrations add columns; so does this)."""
    have = {
        r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'requests'")
    }
    for name, pytype in COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE requests ADD COLUMN {_q(name)} {pg_type(name, pytype)}")


def _value(name: str, v: Any) -> Any:
    if v is None:
        return None
    if name == "ts":
        return datetime.fromisoformat(v) if isinstance(v, str) else v
    if name in _BOOL_COLUMNS:
        return bool(v)
    if name.startswith("cost_") and isinstance(v, float):
        return Decimal(repr(v))
    if isinstance(v, str):
        return v.replace("\x00", "")  # PostgreSQL text cannot hold NUL
    return v


def _insert(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> int:
    """COPY the rows into a temporary table, then one INSERT ... SELECT ... ON CONFLICT (row_id) DO NOTHING
    (COPY alone cannot skip duplicates); returns how many rows were new."""
    cols = ", ".join(_q(c) for c in INSERT_COLUMNS)
    with conn.transaction():
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS _metrion_in AS SELECT {cols} FROM requests WITH NO DATA")
        with conn.cursor() as cur:
            with cur.copy(f"COPY _metrion_in ({cols}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row([_value(c, r.get(c)) for c in INSERT_COLUMNS])
            cur.execute(f"INSERT INTO requests ({cols}) SELECT {cols} FROM _metrion_in ON CONFLICT (row_id) DO NOTHING")
            new = cur.rowcount
            cur.execute("TRUNCATE _metrion_in")
    return new


class PgStore:
    """The writer for PostgreSQL, with the same interface as `store.Store`."""

    def __init__(
        self,
        url: str,
        spool: Path,
        *,
        batch_size: int = PG_BATCH_SIZE,
        flush_interval: float = 0.05,
        retry_interval: float = 1.0,
        connect_timeout: float = 3.0,
        **_: Any,
    ) -> None:
        self.url, self.spool_path = url, spool
        self.batch_size, self.flush_interval, self.retry_interval = batch_size, flush_interval, retry_interval
        self.connect_timeout = connect_timeout
        self.written = 0  # rows committed to PostgreSQL (replayed ones included)
        self.dropped = 0  # never: rows that cannot go to PostgreSQL go to the spool
        self.spooled = 0  # rows in the spool now
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="metrion-pg-writer", daemon=True)
        self._closing = threading.Event()
        self._stop_seen = False
        self._pg: psycopg.Connection[Any] | None = None
        self._spool: sqlite3.Connection | None = None
        self._failing_since: float | None = None
        self._spooled_total = 0
        self._next_try = 0.0
        self._migrated = False

    @property
    def spooling(self) -> bool:
        return self.spooled > 0

    def start(self) -> None:
        migrate(self.spool_path)
        self._spool = connect(self.spool_path)
        self.spooled = self._spool.execute("SELECT count(*) FROM requests").fetchone()[0]
        if self.spooled:
            log.warning(
                "metrion: %d rows left in the spool %s by an earlier run: replaying", self.spooled, self.spool_path
            )
            self._failing_since = time.monotonic()
            self._spooled_total = self.spooled
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        row.setdefault("row_id", new_row_id())
        self._queue.put(row)

    def pending(self) -> int:
        return self._queue.qsize() + self.spooled

    def close(self, timeout: float = 15.0) -> None:
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)
        self._closing.set()
        self._thread.join(timeout)
        if self.spooled:
            log.warning(
                "metrion: %d rows stay in the spool %s; they are replayed at the next start",
                self.spooled,
                self.spool_path,
            )

    # -- thread side --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._take(timeout=self.retry_interval if self.spooled else self.flush_interval * 20)
            if batch:
                self._write(batch)
            if self.spooled and time.monotonic() >= self._next_try:
                self._replay()
            if self._stop_seen and self._queue.empty() and (not self.spooled or self._pg is None):
                break
            if batch and not self._stop_seen and self._queue.empty():
                self._closing.wait(self.flush_interval)  # light load: let rows gather into one INSERT
        for conn in (self._pg, self._spool):
            if conn is not None:
                conn.close()

    def _take(self, timeout: float) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        try:
            item = self._queue.get(timeout=0 if self._stop_seen else timeout)
        except queue.Empty:
            return batch
        while True:
            if item is _STOP:
                self._stop_seen = True
            else:
                batch.append(item)
            if len(batch) >= self.batch_size:
                return batch
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pg is None or self._pg.closed:
            self._pg = psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout)))
            if not self._migrated:
                pg_migrate(self._pg)
                self._migrated = True
        return self._pg

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if not self.spooled:
            try:
                _insert(self._connection(), batch)
                self.written += len(batch)
                return
            except (psycopg.Error, OSError) as e:
                self._lost_server(e)
        self._to_spool(batch)

    def _to_spool(self, batch: list[dict[str, Any]]) -> None:
        from metrion_addon.store import _INSERT_SQL, _params  # the SQLite store's own row encoding

        assert self._spool is not None
        with self._spool:
            self._spool.executemany(_INSERT_SQL, [_params(r) for r in batch])
        self.spooled += len(batch)
        self._spooled_total += len(batch)

    def _replay(self) -> None:
        assert self._spool is not None
        self._spool.row_factory = sqlite3.Row
        try:
            rows = [
                dict(r) for r in self._spool.execute("SELECT * FROM requests ORDER BY id LIMIT ?", (self.batch_size,))
            ]
        finally:
            self._spool.row_factory = None
        if not rows:
            self.spooled = 0
            return
        try:
            _insert(self._connection(), rows)
        except (psycopg.Error, OSError) as e:
            self._lost_server(e)
            return
        with self._spool:  # only after PostgreSQL committed them
            self._spool.execute("DELETE FROM requests WHERE id <= ?", (rows[-1]["id"],))
        self.written += len(rows)
        self.spooled -= len(rows)
        if self.spooled <= 0:
            self.spooled = 0
            self._caught_up()

    def _lost_server(self, e: Exception) -> None:
        self._next_try = time.monotonic() + self.retry_interval
        if self._pg is not None:
            try:
                self._pg.close()
            finally:
                self._pg = None
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "metrion: cannot write to PostgreSQL %s (%s): spooling request rows to %s until it is back",
                redacted(self.url),
                str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__,
                self.spool_path,
            )

    def _caught_up(self) -> None:
        since = self._failing_since
        self._failing_since = None
        log.warning(
            "metrion: PostgreSQL %s writable again%s: %d spooled rows replayed, spool empty",
            redacted(self.url),
            f" after {time.monotonic() - since:.0f}s" if since is not None else "",
            self._spooled_total,
        )
        self._spooled_total = 0
