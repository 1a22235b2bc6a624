"""The `batches` table and the rows of batch results, kept off mitmproxy's event loop.

The event loop only enqueues (batches created or seen, each result line read, a download's end). One thread
owns a connection: it records batches with their creator, looks up whose a result is, keeps each result
exactly once (the custom_ids of a batch already stored are loaded once, then remembered; the database's
unique index on batch_id + custom_id backs this up across proxies), prices it and hands the row to
`deliver` (the request store's queue and the budgets).

In fleet mode (`shared`, pgbatches.py) the batches are also kept in PostgreSQL: a result read by any proxy of
the fleet is charged to the batch's creator, and the results recorded by any proxy are known.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metrion_addon.batch_budget import billable_count
from metrion_addon.batches import (
    BATCHES_PATH,
    BatchMeta,
    BatchResult,
    JsonlTap,
    batch_objects,
    parse_time,
    request_summary,
    result_row,
    rewrite_results_url,
)
from metrion_addon.pricing import Pricer
from metrion_addon.schema import iso_ms
from metrion_addon.store import connect

if TYPE_CHECKING:  # psycopg loads only in fleet mode
    from metrion_addon.pgbatches import SharedBatches

log = logging.getLogger(__name__)

_STOP = object()
CACHED_BATCHES = 256  # batches whose creator and stored custom_ids are kept in memory


class BatchRecorder:
    def __init__(
        self,
        path: Path,
        pricer: Pricer,
        deliver: Callable[[dict[str, Any]], None],
        on_seen: Callable[[list[dict[str, Any]]], None] | None = None,
        shared: SharedBatches | None = None,
    ) -> None:
        self.path = path
        self.pricer = pricer
        self.deliver = deliver
        self.on_seen = on_seen  # batch objects read by the poller (on this thread): budgets learn which ended
        self.shared = shared  # fleet mode: the batches table in PostgreSQL
        self.recorded = 0
        self.duplicates = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._meta: OrderedDict[str, BatchMeta] = OrderedDict()
        self._seen: OrderedDict[str, set[str]] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="metrion-batches", daemon=True)

    # -- event loop side: enqueue only ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def objects(
        self,
        method: str,
        path: str,
        body: bytes,
        request: bytes | None,
        who: tuple[str | None, ...],
        base: str,
        upstream: str,
    ) -> bytes | None:
        """A batch create/retrieve/list/cancel answer: the batches are kept (created) or updated (seen); the
        body with `results_url` pointed at `base` is returned when that changes it."""
        objs = batch_objects(body)
        if method == "POST" and path == BATCHES_PATH:
            self.created(objs, who, request, time.time(), upstream)
        elif objs:
            self.seen(objs)
        new = rewrite_results_url(body, base)
        return new if new != body else None

    def tap(
        self, batch_id: str, encoding: str | None, fetcher: tuple[str | None, ...], request_id: str | None
    ) -> JsonlTap:
        """The stream callable of a results download: each result line read is queued here."""
        return JsonlTap(encoding, lambda res: self.result(batch_id, res, fetcher, request_id))

    def created(
        self, objs: list[dict[str, Any]], who: tuple[str | None, ...], body: bytes | None, now: float, upstream: str
    ) -> None:
        self._queue.put(("created", objs, who, body, now, upstream))

    def seen(self, objs: list[dict[str, Any]]) -> None:
        self._queue.put(("seen", objs))

    def reserved(self, batch_id: str, usd: float, started: float, requests: int) -> None:
        """The batch's budget reservation (its worst case at creation), kept for restarts."""
        self._queue.put(("reserved", batch_id, usd, started, requests))

    def result(self, batch_id: str, res: BatchResult, fetcher: tuple[str | None, ...], request_id: str | None) -> None:
        self._queue.put(("result", batch_id, res, fetcher, request_id, time.time()))

    def fetch_ended(self, batch_id: str, complete: bool) -> None:
        self._queue.put(("fetched", batch_id, complete, time.time()))

    def close(self, timeout: float = 15.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Tests: until everything queued so far is handled."""
        done = threading.Event()
        self._queue.put(("call", done.set))
        done.wait(timeout)

    # -- thread side ----------------------------------------------------------------------------------

    def _run(self) -> None:
        conn = None
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                if conn is None:
                    conn = connect(self.path)
                getattr(self, "_on_" + item[0])(conn, *item[1:])
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("metrion: batch bookkeeping failed (%s)", item[0])
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()
        if self.shared is not None:
            self.shared.close()

    def _on_call(self, conn: Any, fn: Callable[[], None]) -> None:
        fn()

    def _on_created(
        self, conn: Any, objs: list[dict[str, Any]], who: tuple, body: bytes | None, now: float, upstream: str
    ) -> None:
        count, models = request_summary(body) if body else (None, [])
        account, user, mode = who
        records = [
            (o["id"], iso_ms(now), account, user, mode, count, json.dumps(models), *_status(o), upstream) for o in objs
        ]
        for record in records:
            conn.execute(
                "INSERT OR IGNORE INTO batches (id, ts, account, user, mode, request_count, models, "
                "processing_status, created_at, ended_at, upstream_results_url, upstream) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                record,
            )
            self._meta.pop(record[0], None)
        self._billable(conn, objs)
        if self.shared is not None:
            self.shared.created(records)

    def _on_reserved(self, conn: Any, batch_id: str, usd: float, started: float, requests: int) -> None:
        conn.execute(
            "UPDATE batches SET reserved_usd = ?, reserved_at = ?, request_count = coalesce(request_count, ?) "
            "WHERE id = ?",
            (usd, iso_ms(started), requests, batch_id),
        )

    def _billable(self, conn: Any, objs: list[dict[str, Any]]) -> None:
        for o in objs:
            n = billable_count(o)
            if n is not None:
                conn.execute("UPDATE batches SET billable_count = ? WHERE id = ?", (n, o["id"]))

    def _on_seen(self, conn: Any, objs: list[dict[str, Any]]) -> None:
        for o in objs:
            status, created, ended, url = _status(o)
            conn.execute(
                "UPDATE batches SET processing_status = ?, ended_at = coalesce(?, ended_at), "
                "upstream_results_url = coalesce(?, upstream_results_url) WHERE id = ?",
                (status, ended, url, o["id"]),
            )
            if self.shared is not None:
                self.shared.seen(o["id"], status, ended, url)
            self._meta.pop(o["id"], None)  # its end time may be known now
        self._billable(conn, objs)
        if self.on_seen is not None:
            self.on_seen(objs)

    def _on_result(
        self, conn: Any, batch_id: str, res: BatchResult, fetcher: tuple, request_id: str | None, now: float
    ) -> None:
        seen = self._stored(conn, batch_id)
        if res.custom_id in seen:
            self.duplicates += 1
            return
        seen.add(res.custom_id)
        row = result_row(res, self._creator(conn, batch_id, fetcher, now), self.pricer, request_id)
        self.recorded += 1
        self.deliver(row)

    def _on_fetched(self, conn: Any, batch_id: str, complete: bool, now: float) -> None:
        n = len(self._stored(conn, batch_id))
        conn.execute(
            "UPDATE batches SET results_recorded = ?, metered_at = CASE WHEN ? THEN ? ELSE metered_at END WHERE id = ?",
            (n, int(complete), iso_ms(now), batch_id),
        )
        if self.shared is not None:
            self.shared.fetched(batch_id, n, iso_ms(now) if complete else None)

    def _stored(self, conn: Any, batch_id: str) -> set[str]:
        """The custom_ids of this batch already recorded (from the database once, then kept here; in fleet mode
        also those any proxy has written to PostgreSQL)."""
        seen = self._seen.get(batch_id)
        if seen is None:
            rows = conn.execute("SELECT custom_id FROM requests WHERE batch_id = ?", (batch_id,))
            seen = self._seen[batch_id] = {r[0] for r in rows}
            if self.shared is not None:
                seen |= self.shared.stored(batch_id) or set()
            while len(self._seen) > CACHED_BATCHES:
                self._seen.popitem(last=False)
        self._seen.move_to_end(batch_id)
        return seen

    def _creator(self, conn: Any, batch_id: str, fetcher: tuple, now: float) -> BatchMeta:
        meta = self._meta.get(batch_id)
        if meta is None:
            row = conn.execute(
                "SELECT account, user, mode, ended_at, created_at FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            if row is None and self.shared is not None:  # created through another proxy of the fleet
                row = self.shared.creator(batch_id)
            if row is None:  # not created through this proxy: charged to whoever fetches its results
                account, user, mode = fetcher
                ts = now
            else:
                account, user, mode = row[0], row[1], row[2]
                ts = parse_time(row[3]) or parse_time(row[4]) or now
            meta = self._meta[batch_id] = BatchMeta(batch_id, account, user, mode, ts)
            while len(self._meta) > CACHED_BATCHES:
                self._meta.popitem(last=False)
        return meta


def _status(o: dict[str, Any]) -> tuple[Any, ...]:
    def s(key: str) -> str | None:
        v = o.get(key)
        return v[:300] if isinstance(v, str) else None

    return s("processing_status"), s("created_at"), s("ended_at"), s("results_url")
