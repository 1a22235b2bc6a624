"""The report's database: opened read-only and checked, or a ReportError with a one-line reason and the exit
code it means (see docs/report.md). The report never writes and never blocks the proxy (WAL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from metrion_addon.schema import MONEY_COLUMNS, names

if TYPE_CHECKING:
    from metrion_addon.config import Config
    from metrion_addon.report.queries import Db

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected database error while querying
EXIT_USAGE = 2  # bad arguments, dates or config file
EXIT_NO_DB = 3  # database missing, unreadable, or not a metrion database
EXIT_OLD_SCHEMA = 4  # database written by an older metrion: start the proxy once to upgrade it
EXIT_EMPTY = 5  # no request recorded yet

REQUIRED_COLUMNS = frozenset(  # what this report reads; a database without them is from an older schema
    names(
        *("ts", "account", "user", "model", "status", "error", "client", "session_id", "request_id", "latency_ms"),
        *("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
        *("cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens", "web_search_requests"),
        *MONEY_COLUMNS,
        *("batch_id", "retry_count"),
    )
)


class ReportError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


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


def open_pg(url: str) -> Any:
    """A read-only PostgreSQL connection (one REPEATABLE READ transaction: every query of a view sees the same
    rows), its schema checked; ReportError with a one-line reason that never holds the password."""
    import psycopg

    from metrion_addon.pgstore import redacted

    try:
        # jit off: compiling a report's expressions took longer than running them (1.3 s of 1.9 s on 1M rows);
        # work_mem: a report's group-by fits in memory instead of spilling its sorts to disk.
        conn = psycopg.connect(url, connect_timeout=10, autocommit=True)
        conn.execute("SET jit = off")
        conn.execute("SET work_mem = '64MB'")
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        columns = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'requests' "
                "AND table_schema = current_schema()"
            )
        }
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ReportError(f"cannot read {redacted(url)}: {msg.replace(url, redacted(url))}", EXIT_NO_DB) from None
    if not columns:
        conn.close()
        raise ReportError(f"{redacted(url)} is not a metrion database (no 'requests' table)", EXIT_NO_DB)
    missing = sorted(REQUIRED_COLUMNS - columns)
    if missing:
        conn.close()
        raise ReportError(
            f"{redacted(url)} has an older metrion schema (missing {', '.join(missing)}): start metrion-proxy once "
            "to upgrade it",
            EXIT_OLD_SCHEMA,
        )
    return conn


def connect(source: Path | str) -> Db:
    """The report's connection to a SQLite file (Path) or a PostgreSQL URL (str)."""
    from metrion_addon.report.queries import Db

    return Db(open_pg(source), pg=True) if isinstance(source, str) else Db(open_db(source))


def db_errors() -> tuple[type[Exception], ...]:
    """The exceptions a query can raise (psycopg's only once it is loaded: SQLite reports never load it)."""
    import sys

    pg = sys.modules.get("psycopg")
    return (sqlite3.Error, pg.Error) if pg is not None else (sqlite3.Error,)


def check_not_empty(conn: sqlite3.Connection | Db, path: Path | str) -> None:
    from metrion_addon.report.queries import Db

    db = conn if isinstance(conn, Db) else Db(conn)
    if not db.rows("SELECT 1 FROM requests LIMIT 1"):
        if db.pg:
            from metrion_addon.pgstore import redacted

            path = redacted(str(path))
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


def resolve_db(db: str | None, config: Config | None) -> Path | str:
    """--db, else the config's database (a PostgreSQL URL in fleet mode), else ./metrion.db."""
    if db:
        return db if db.startswith(("postgresql://", "postgres://")) else Path(db).expanduser()
    if config is not None:
        return config.database_url or config.database
    return Path("metrion.db")
