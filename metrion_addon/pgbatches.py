"""Fleet mode: the `batches` table shared through PostgreSQL, so any proxy charges a batch's results to its creator.

Behind a load balancer, a batch created through one proxy has its results downloaded through another (the
rewritten `results_url` names the load balancer: `public_url`). Each proxy keeps its own `batches` table in its
local spool for what is its own business (polling the batches it created, the budget they reserve); this mirror
in PostgreSQL is what the fleet shares:
- who created a batch, when, and its status (written when a proxy creates, retrieves or lists it), so a result
  read by any proxy is charged to the creator, at the batch's end time, as on a single proxy;
- which results are already recorded (the `requests` rows of the batch), so a proxy does not re-read them.

Only the batch thread (batch_recorder.py) calls this. A failure (server away) never stops local bookkeeping:
the creator records not yet written are kept (bounded) and written with the next call that succeeds; a lookup
that fails falls back to the local table, as before (results then go to whoever fetched them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0  # after a failure, lookups use the local table for this long (no connect timeout each time)
MAX_PENDING = 10_000  # creator records waiting for the server (each is a few hundred bytes)
COLUMNS = (
    "id, ts, account, \"user\", mode, request_count, models, processing_status, created_at, ended_at, "
    "upstream_results_url, upstream"
)


def create_batches_table(conn: psycopg.Connection[Any]) -> None:
    """PostgreSQL migration: the shared `batches` table (the SQLite one's columns; times as ISO text, as there).
    Idempotent: a database whose `requests` table was dropped and made again keeps its batches."""
    conn.execute(
        'CREATE TABLE IF NOT EXISTS batches (id text PRIMARY KEY, ts text NOT NULL, account text, "user" text, '
        "mode text, request_count bigint, models text, processing_status text, created_at text, ended_at text, "
        "upstream_results_url text, results_recorded bigint NOT NULL DEFAULT 0, metered_at text, upstream text, "
        "polls bigint NOT NULL DEFAULT 0, next_poll_at text, poll_failures bigint NOT NULL DEFAULT 0, "
        "reserved_usd double precision, reserved_at text, billable_count bigint)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS requests_batch_id ON requests (batch_id) WHERE batch_id IS NOT NULL")


class SharedBatches:
    def __init__(self, url: str, connect_timeout: float = 3.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._pending: list[tuple[Any, ...]] = []  # creator records the server has not taken yet
        self._failing = False
        self._retry_at = 0.0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writes ------------------------------------------------------------------------------------

    def created(self, records: Sequence[tuple[Any, ...]]) -> None:
        """Batches created through this proxy: (the COLUMNS values) each."""
        self._pending.extend(records)
        del self._pending[:-MAX_PENDING]
        self._run(self._flush)

    def seen(self, batch_id: str, status: str | None, ended: str | None, url: str | None) -> None:
        self._run(
            lambda c: c.execute(
                "UPDATE batches SET processing_status = coalesce(%s, processing_status), "
                "ended_at = coalesce(%s, ended_at), upstream_results_url = coalesce(%s, upstream_results_url) "
                "WHERE id = %s",
                (status, ended, url, batch_id),
            )
        )

    def fetched(self, batch_id: str, recorded: int, metered_at: str | None) -> None:
        self._run(
            lambda c: c.execute(
                "UPDATE batches SET results_recorded = greatest(results_recorded, %s), "
                "metered_at = coalesce(metered_at, %s) WHERE id = %s",
                (recorded, metered_at, batch_id),
            )
        )

    # -- reads (None: the server could not answer) -------------------------------------------------

    def creator(self, batch_id: str) -> tuple[Any, ...] | None:
        """(account, user, mode, ended_at, created_at) of a batch some proxy of the fleet created."""
        return self._run(
            lambda c: c.execute(
                'SELECT account, "user", mode, ended_at, created_at FROM batches WHERE id = %s', (batch_id,)
            ).fetchone()
        )

    def stored(self, batch_id: str) -> set[str] | None:
        """The custom_ids of this batch's results that are in the database (recorded by any proxy)."""
        rows = self._run(
            lambda c: c.execute(
                "SELECT custom_id FROM requests WHERE batch_id = %s AND custom_id IS NOT NULL", (batch_id,)
            ).fetchall()
        )
        return None if rows is None else {r[0] for r in rows}

    # -- the connection ----------------------------------------------------------------------------

    def _flush(self, conn: psycopg.Connection[Any]) -> None:
        if self._pending:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO batches ({COLUMNS}) VALUES ({', '.join(['%s'] * 12)}) ON CONFLICT (id) DO NOTHING",
                    self._pending,
                )
            self._pending.clear()

    def _run(self, op: Any) -> Any:
        if self._failing and time.monotonic() < self._retry_at:
            return None
        try:
            if self._conn is None:
                self._conn = psycopg.connect(self.url, connect_timeout=self.connect_timeout, autocommit=True)
            self._flush(self._conn)
            got = op(self._conn)
        except psycopg.Error as e:
            if not self._failing:  # once per outage; the URL is never logged
                name = type(e).__name__
                log.warning("metrion: the shared batches table is unavailable (%s); using the local one", name)
            self._failing = True
            self._retry_at = time.monotonic() + RETRY_SECONDS
            self.close()
            return None
        if self._failing:
            log.info("metrion: the shared batches table is reachable again")
            self._failing = False
        return got
