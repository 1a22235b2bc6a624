"""Managed mode: the proxy meters the batches it created itself, whether or not the client ever downloads the
results through it.

A background thread looks at the `batches` table (so it survives restarts): every batch created in managed
mode and not yet metered is polled upstream with its account's stored key, never more often than once per
`interval` seconds (default 60) per batch, backing off as it stays in progress (up to 30 min) or as polls fail
(up to 1 h). Once the batch has ended, its results are downloaded and read line by line, like a client's
download through the proxy, into the same exactly-once bookkeeping: a client fetching them too counts nothing
twice. Results that are gone (404: archived, or deleted) stop the polling; the batch stays listed as not
metered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from metrion_addon.batch_recorder import BatchRecorder
from metrion_addon.batches import parse_time
from metrion_addon.schema import iso_ms
from metrion_addon.store import connect

log = logging.getLogger(__name__)

API_VERSION = "2023-06-01"
MAX_WAIT = 1800.0  # in progress: at most this long between polls
MAX_FAILURE_WAIT = 3600.0
TIMEOUT = 60.0
READ_SIZE = 64 * 1024
GONE = "results_unavailable"
_OPENER = urllib.request.build_opener(
    urllib.request.ProxyHandler({})
)  # straight to the upstream, no env proxy  # processing_status once the results cannot be fetched any more


class BatchPoller:
    def __init__(self, path: Path, recorder: BatchRecorder, keys: dict[str, str], interval: float = 60.0) -> None:
        self.path = path
        self.recorder = recorder
        self._keys = keys  # account name -> its Anthropic key (managed accounts only); never logged or stored
        self.interval = max(1.0, float(interval))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrion-batch-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(TIMEOUT)

    def _run(self) -> None:
        tick = min(15.0, self.interval / 4)
        while not self._stop.wait(tick):
            try:
                self.poll_due(time.time())
            except Exception:  # noqa: BLE001 - the poller must outlive any one failure
                log.exception("metrion: batch polling failed; retrying later")

    def poll_due(self, now: float) -> None:
        conn = connect(self.path)
        try:
            rows = conn.execute(
                "SELECT id, account, upstream, ts, next_poll_at, polls, poll_failures FROM batches "
                "WHERE mode = 'managed' AND metered_at IS NULL AND upstream IS NOT NULL "
                "AND coalesce(processing_status, '') != ?",
                (GONE,),
            ).fetchall()
            for bid, account, upstream, ts, next_at, polls, failures in rows:
                due = parse_time(next_at) if next_at else (parse_time(ts) or now) + self.interval
                key = self._keys.get(account)
                if key is None or due > now or self._stop.is_set():
                    continue
                update = self._poll(bid, account, upstream, key, polls, failures, now)
                conn.execute(
                    "UPDATE batches SET polls = ?, poll_failures = ?, next_poll_at = ?, "
                    "processing_status = coalesce(?, processing_status) WHERE id = ?",
                    (*update, bid),
                )
        finally:
            conn.close()

    def _poll(
        self, bid: str, account: str, upstream: str, key: str, polls: int, failures: int, now: float
    ) -> tuple[int, int, str, str | None]:
        """(polls, failures, next poll, status to set)."""
        base = f"{upstream}/v1/messages/batches/{bid}"
        try:
            with self._get(base, key) as resp:
                obj = json.loads(resp.read(16 * 1024 * 1024))
            self.recorder.seen([obj])
            if obj.get("processing_status") != "ended":
                wait = min(MAX_WAIT, self.interval * 2 ** min(polls, 5))
                return polls + 1, 0, iso_ms(now + wait), None
            self._results(bid, account, base + "/results", key)
            return polls + 1, 0, iso_ms(now + self.interval), None  # metered_at set: not polled again
        except urllib.error.HTTPError as e:
            if e.code == 404:
                log.warning("metrion: batch %s: results no longer available upstream; not metered", bid)
                return polls + 1, failures, iso_ms(now), GONE
            err: Exception = e
        except Exception as e:  # noqa: BLE001 - network, JSON: back off and retry
            err = e
        wait = min(MAX_FAILURE_WAIT, self.interval * 2 ** min(failures + 1, 6))
        log.warning("metrion: polling batch %s failed (%s); next try in %.0fs", bid, type(err).__name__, wait)
        return polls + 1, failures + 1, iso_ms(now + wait), None

    def _results(self, bid: str, account: str, url: str, key: str) -> None:
        complete = False
        with self._get(url, key) as resp:
            request_id = resp.headers.get("request-id")
            tap = self.recorder.tap(bid, resp.headers.get("content-encoding"), (account, None, "managed"), request_id)
            while chunk := resp.read(READ_SIZE):
                tap(chunk)
                if self._stop.is_set():  # shutting down: what was read counts, the next start completes it
                    break
            else:
                tap(b"")
                complete = tap.complete and tap.failed is None
        self.recorder.fetch_ended(bid, complete)

    @staticmethod
    def _get(url: str, key: str) -> Any:
        headers = {
            "x-api-key": key,
            "anthropic-version": API_VERSION,
            "accept-encoding": "gzip",
            "user-agent": "metrion-batch-poller",
        }
        return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
