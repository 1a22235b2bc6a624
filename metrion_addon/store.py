"""The SQLite file: schema and migrations, and the writer thread that owns the connection.

mitmproxy's hooks run on its event loop, so they only `put()` a finished row on a queue. One thread drains
the queue in batches, one transaction per batch, in WAL mode. If the database cannot be written (locked by
another process, disk full, read-only), rows wait in a bounded in-memory backlog and are retried; past the
bound the oldest are dropped and counted, and that is logged.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlite_utils

    from metrion_addon.config import Config
    from metrion_addon.pgstore import PgStore

from metrion_addon.schema import COLUMNS, INSERT_COLUMNS, names
from metrion_addon.text import clean_text, valid_utf8

log = logging.getLogger(__name__)

# The `requests` columns and their types are schema.py's. Migrations are history: each names the columns it
# added, with their types from the schema, and test_store_unit checks that a migrated table has exactly COLUMNS.
# Columns are only ever appended, so the first migration's are the schema's up to `usage_json`.
_V1_COLUMNS = tuple(COLUMNS)[: tuple(COLUMNS).index("usage_json") + 1]


def _typed(*columns: str) -> dict[str, type]:
    return {c: COLUMNS[c] for c in names(*columns)}


_INT64 = range(-(2**63), 2**63)


def _cell(value: Any) -> Any:
    """A value SQLite accepts. Garbage from upstream (a 40-digit token count, a list, a lone surrogate) must not
    poison a batch: every string is made valid UTF-8 here, whatever the edge did."""
    if value is None or isinstance(value, float | bytes):
        return value
    if isinstance(value, str):
        return value if value.isascii() else valid_utf8(value)
    if isinstance(value, int):
        return value if value in _INT64 else None
    return valid_utf8(str(value))


def _salvaged(row: dict[str, Any]) -> tuple[Any, ...]:
    """A row the database refused, with every value it could object to replaced: text is cleaned of controls
    and capped, numbers outside SQLite's range dropped. What is left is what can be known for certain."""
    out = []
    for c in INSERT_COLUMNS:
        v = row.get(c)
        if isinstance(v, str) or not isinstance(v, int | float | type(None)):
            v = clean_text(str(v), 2000) if v is not None else None
        elif isinstance(v, int) and v not in _INT64:
            v = None
        out.append(v)
    return tuple(out)


def _params(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(_cell(row.get(c)) for c in INSERT_COLUMNS)


def _row_error(e: Exception) -> bool:
    """True when the failure is this row's values (a lone surrogate, a type SQLite cannot bind, a constraint),
    False when it is the database (locked, full, read-only, I/O error): only that makes it 'unwritable'."""
    if isinstance(e, sqlite3.OperationalError):
        return False
    if isinstance(e, sqlite3.DatabaseError):
        return isinstance(e, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.DataError)
    return isinstance(e, ValueError | TypeError | OverflowError | sqlite3.InterfaceError)


# OR IGNORE: a row already stored (same row_id; or a batch result with the same batch_id + custom_id) is not
# stored twice, even when two proxies read the same results file. `ts` is always set, so no other constraint
# can be skipped this way.
_INSERT_SQL = "INSERT OR IGNORE INTO requests ({}) VALUES ({})".format(
    ", ".join(f"[{c}]" for c in INSERT_COLUMNS), ", ".join("?" * len(INSERT_COLUMNS))
)


def _insert(conn: sqlite3.Connection, params: tuple[Any, ...]) -> bool:
    """Insert one row; False if the row's values were refused (a database failure raises)."""
    try:
        conn.execute(_INSERT_SQL, params)
    except Exception as e:
        if not _row_error(e):
            raise
        return False
    return True


# --- migrations: small functions, applied in order, recorded by name ---------------------------------


def _m001_requests(db: sqlite_utils.Database) -> None:
    db["requests"].create(_typed(*_V1_COLUMNS), pk="id", not_null={"ts"})  # type: ignore[union-attr]
    for cols in (["ts"], ["account", "ts"], ["user", "ts"], ["model", "ts"]):
        db["requests"].create_index(cols)  # type: ignore[union-attr]


def _m002_response_model(db: sqlite_utils.Database) -> None:
    db["requests"].add_column("response_model", str)  # type: ignore[union-attr]


def _m003_row_id(db: sqlite_utils.Database) -> None:
    db["requests"].add_column("row_id", str)  # type: ignore[union-attr]
    db.execute("CREATE UNIQUE INDEX idx_requests_row_id ON requests (row_id)")  # NULL for older rows


def _m004_batches(db: sqlite_utils.Database) -> None:
    """Message Batches: result rows name their batch and custom_id (unique together: exactly once), and the
    batches created through the proxy are kept, with their creator, for the results to be charged to."""
    for col in ("batch_id", "custom_id", "batch_result"):
        db["requests"].add_column(col, str)  # type: ignore[union-attr]
    db.execute(
        "CREATE UNIQUE INDEX idx_requests_batch_result ON requests (batch_id, custom_id) WHERE batch_id IS NOT NULL"
    )
    db.execute(
        "CREATE TABLE batches (id TEXT PRIMARY KEY, ts TEXT NOT NULL, account TEXT, user TEXT, mode TEXT, "
        "request_count INTEGER, models TEXT, processing_status TEXT, created_at TEXT, ended_at TEXT, "
        "upstream_results_url TEXT, results_recorded INTEGER NOT NULL DEFAULT 0, metered_at TEXT, "
        "upstream TEXT, polls INTEGER NOT NULL DEFAULT 0, next_poll_at TEXT, poll_failures INTEGER NOT NULL DEFAULT 0)"
    )


def _m005_attempts(db: sqlite_utils.Database) -> None:
    """Attempts vs calls (the SDK's retry count, the client's request key) and count_tokens' counted number."""
    for name, kind in _typed("retry_count", "request_key", "counted_tokens").items():
        db["requests"].add_column(name, kind)  # type: ignore[union-attr]


def _m006_budget_usd(db: sqlite_utils.Database) -> None:
    db["requests"].add_column("budget_usd", float)  # type: ignore[union-attr]


def _m007_batch_reservations(db: sqlite_utils.Database) -> None:
    """A batch created under a hard budget: the worst case it reserved and when (the create call's start), and
    its succeeded count once it has ended. With its result rows, that is what it still reserves after a restart
    (batch_budget.py)."""
    db["batches"].add_column("reserved_usd", float)  # type: ignore[union-attr]
    db["batches"].add_column("reserved_at", str)  # type: ignore[union-attr]
    db["batches"].add_column("billable_count", int)  # type: ignore[union-attr]


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _m001_requests,
    _m002_response_model,
    _m003_row_id,
    _m004_batches,
    _m005_attempts,
    _m006_budget_usd,
    _m007_batch_reservations,
]


def new_row_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits; sorts by creation time.

    The random bits come from `random` (seeded from the OS at start, reseeded in a forked child), not from
    `os.urandom`: this runs on the event loop for every request, and os.urandom's system call lets go of the
    GIL, which the writer and observer threads then hold for up to a switch interval (measured: ~200 µs per
    request). A row id has to be unique, not unguessable: the proxy makes it, no client can choose one.
    """
    value = (int(time.time() * 1000) << 80) | random.getrandbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return str(uuid.UUID(int=value))


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def migrate(path: Path) -> None:
    """Create or upgrade the schema. Runs at start-up, before the proxy serves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS _metrion_migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
            done = {r[0] for r in conn.execute("SELECT name FROM _metrion_migrations")}
            if pending := [m for m in MIGRATIONS if m.__name__ not in done]:
                # imported only to migrate: with it come click, pluggy and dateutil, 4 MB a running proxy
                # whose database is up to date does not need
                import sqlite_utils

                db = sqlite_utils.Database(conn)
            for m in pending:
                m(db)
                conn.execute(
                    "INSERT INTO _metrion_migrations VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))", (m.__name__,)
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


# --- the writer --------------------------------------------------------------------------------------

_STOP = object()
# Rows per transaction at most. Under light load the writer commits what arrived in the last flush interval
# (50 ms); under heavy load it commits batches back to back. So a killed process loses the rows of the last
# 50 ms, or one batch plus whatever is queued behind it: at the loads we test, well under this many.
BATCH_SIZE = 100


class Store:
    """Owns the writes. `put()` is cheap and never blocks; `close()` flushes what is pending."""

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int = BATCH_SIZE,
        max_backlog: int = 100_000,
        flush_interval: float = 0.05,
        on_written: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.path = path
        self.batch_size = batch_size
        self.max_backlog = max_backlog
        self.flush_interval = flush_interval
        self.on_written = on_written
        self.written = 0
        self.dropped = 0
        self.salvaged = 0  # rows stored with values the database refused replaced (see _write_each)
        self.rejected = 0  # rows that could not be stored at all, even cleaned
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._backlog: deque[dict[str, Any]] = deque()
        self._thread = threading.Thread(target=self._run, name="metrion-writer", daemon=True)
        self._failing_since: float | None = None
        self.busy_since: float | None = None  # monotonic start of the write in progress (health: a stuck write)
        self._stop_seen = False
        self._closing = threading.Event()  # cuts the writer's pause short at shutdown

    def start(self) -> None:
        migrate(self.path)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        row.setdefault("row_id", new_row_id())
        self._queue.put(row)

    def pending(self) -> int:
        return self._queue.qsize() + len(self._backlog)

    @property
    def failing(self) -> bool:
        """The last write failed (the database is locked, full, read-only...) and has not succeeded since."""
        return self._failing_since is not None

    def close(self, timeout: float = 15.0) -> None:
        """Stop the writer after it has written everything it can within `timeout` seconds."""
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)
        self._closing.set()
        self._thread.join(timeout)
        left = self.pending()
        if left:
            log.error("metrion: %d request rows could not be written to %s before shutdown", left, self.path)

    # -- thread side --------------------------------------------------------------------------------

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        stopping = False
        while True:
            self._drain(block=not self._backlog and not stopping)
            stopping = stopping or self._stop_seen
            if self._backlog and not stopping and self._failing_since is None and len(self._backlog) < self.batch_size:
                # Light load: the rows that arrive within one flush interval of the first share its transaction,
                # instead of each paying for a commit. Waiting here, before the write, rather than after it: rows
                # come in bursts (the accounting thread hands over what gathered in its pause), and a writer woken by
                # a burst's first row wrote it alone, then the rest, several commits per burst (measured at c=1: 3.4
                # pwrite calls per request). A row still waits at most one flush interval, as before.
                self._closing.wait(self.flush_interval)
                self._drain(block=False)
                stopping = stopping or self._stop_seen
            if self._backlog:
                self.busy_since = time.monotonic()
                try:
                    if conn is None:
                        conn = connect(self.path)
                    self._write(conn)
                except Exception as e:  # noqa: BLE001 - the writer thread must outlive any one failure
                    self.busy_since = None
                    self._failed(e)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                        conn = None
                    if stopping and self._failing_since and time.monotonic() - self._failing_since > 5:
                        break
                    time.sleep(0.2 if not stopping else 0.05)
                    continue
                self.busy_since = None
            if stopping and not self._backlog and self._queue.empty():
                break
        if conn is not None:
            conn.close()

    def _drain(self, block: bool) -> None:
        """Move queued rows to the backlog, waiting briefly for the first one when idle.

        While the database is writable, one batch at a time: the rest waits in the queue. While writes are
        failing, everything, kept within the bound (the oldest rows beyond it are dropped and counted).
        """
        try:
            item = self._queue.get(timeout=self.flush_interval * 20) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        failing = self._failing_since is not None
        while True:
            if item is _STOP:
                self._stop_seen = True
            else:
                self._backlog.append(item)
            if failing:
                self._trim()
            elif len(self._backlog) >= self.batch_size:
                return
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _trim(self) -> None:
        while len(self._backlog) > self.max_backlog:
            self._backlog.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.error("metrion: database unwritable and backlog full: %d request rows dropped so far", self.dropped)

    def _write(self, conn: sqlite3.Connection) -> None:
        waiting = len(self._backlog)
        while self._backlog:
            batch = [self._backlog[i] for i in range(min(self.batch_size, len(self._backlog)))]
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("SAVEPOINT batch")
                try:
                    conn.executemany(_INSERT_SQL, [_params(r) for r in batch])
                except Exception as e:
                    if not _row_error(e):
                        raise
                    conn.execute("ROLLBACK TO batch")  # one row is bad, not the database: write the rest
                    self._write_each(conn, batch)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            for _ in batch:
                self._backlog.popleft()
            self.written += len(batch)
            if self._failing_since is not None:
                log.warning(
                    "metrion: %s writable again after %.0fs: %d waiting request rows written, %d dropped in total",
                    self.path,
                    time.monotonic() - self._failing_since,
                    waiting,
                    self.dropped,
                )
                self._failing_since = None
            if self.on_written is not None:
                try:
                    self.on_written(batch)
                except Exception:  # noqa: BLE001
                    log.exception("metrion: on_written callback failed")

    def _write_each(self, conn: sqlite3.Connection, batch: list[dict[str, Any]]) -> None:
        """Row by row: a row the database refuses is stored with its bad values replaced, else dropped; either
        way counted and logged, and the rows around it are written."""
        for row in batch:
            if _insert(conn, _params(row)):
                continue
            if _insert(conn, _salvaged(row)):
                self.salvaged += 1
                log.warning(
                    "metrion: a request row had values the database refused; stored cleaned (%d so far)", self.salvaged
                )
            else:
                self.rejected += 1
                log.error("metrion: a request row could not be stored even cleaned; dropped (%d so far)", self.rejected)

    def _failed(self, e: Exception) -> None:
        self._trim()
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "metrion: cannot write to %s (%s); keeping up to %d rows in memory and retrying",
                self.path,
                e,
                self.max_backlog,
            )


def open_store(config: Config, **kw: Any) -> Store | PgStore:
    """The writer for the config's database: SQLite, or PostgreSQL (with a SQLite spool) for a URL."""
    if config.database_url:
        from metrion_addon.pgstore import PgStore

        return PgStore(config.database_url, config.database, **kw)
    return Store(config.database, **kw)


def store_name(config: Config) -> str:
    """Where rows go, as it may be printed (no password)."""
    if config.database_url:
        from metrion_addon.pgstore import redacted

        return f"{redacted(config.database_url)} (spool {config.database})"
    return str(config.database)
