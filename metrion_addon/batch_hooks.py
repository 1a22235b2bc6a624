"""Message Batches wiring for the addon: the batch thread, the managed-mode poller, and the calls the addon's
hooks make. Kept out of addon.py so that it stays hooks only; all parsing is in batches.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any

from mitmproxy import http

from metrion_addon import batches
from metrion_addon.admission import Gate
from metrion_addon.batch_recorder import BatchRecorder
from metrion_addon.config import Config
from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending
from metrion_addon.store import connect

log = logging.getLogger(__name__)
CLIENT_PATH = "metrion_client_path"  # flow.metadata: the path as the client sent it (prefix included)


class BatchHooks:
    def __init__(self, config: Config, pricer: Pricer, store: Any, gate: Gate, poll_seconds: float) -> None:
        self.config, self.store, self.gate = config, store, gate  # store: SQLite or PostgreSQL, put() only
        self.loop: asyncio.AbstractEventLoop | None = None
        shared = None
        if config.database_url:  # fleet mode: batches are shared through PostgreSQL (psycopg is loaded already)
            from metrion_addon.pgbatches import SharedBatches

            shared = SharedBatches(config.database_url)
        self.recorder = BatchRecorder(config.database, pricer, self._row, self._seen, shared)
        self._keys = {a.name: a.anthropic_api_key for a in config.accounts if a.anthropic_api_key}
        self._poll_seconds = poll_seconds
        self.poller: Any = None  # batch_poller.BatchPoller, started once there is a batch for it to poll

    def start(self) -> None:
        self.recorder.start()
        if self._keys and self._poll_seconds > 0 and self._unmetered_managed_batches():
            self._start_poller()

    def _unmetered_managed_batches(self) -> bool:
        """Whether a batch created in managed mode before this start is still to be metered (then polling starts
        now; else at the first managed batch created)."""
        try:
            conn = connect(self.config.database)
            try:
                sql = "SELECT 1 FROM batches WHERE mode = 'managed' AND metered_at IS NULL LIMIT 1"
                return conn.execute(sql).fetchone() is not None
            finally:
                conn.close()
        except Exception:  # noqa: BLE001 - cannot tell: poll, as before this check existed
            return True

    def _start_poller(self) -> None:
        """The managed-mode poller (batch_poller.py, with urllib's HTTP stack) loads only when there is a managed
        account and a batch to poll: an idle proxy that never creates batches does not hold it."""
        if self.poller is not None or not self._keys or self._poll_seconds <= 0:
            return
        from metrion_addon.batch_poller import BatchPoller

        self.poller = BatchPoller(self.config.database, self.recorder, self._keys, self._poll_seconds)
        self.poller.start()

    def close(self) -> None:
        if self.poller is not None:
            self.poller.close()
        self.recorder.close()  # its last result rows go to the store before that closes

    def running(self) -> None:
        self.loop = asyncio.get_running_loop()

    # -- called from the addon's hooks (event loop) ---------------------------------------------------

    def results_tap(self, p: Pending, status: int, encoding: str | None) -> batches.JsonlTap | None:
        """A results download: each result line read becomes a row (on the batch thread), exactly once."""
        batch_id = batches.results_batch_id(p.method, p.path)
        if batch_id is None or not 200 <= status < 300:
            return None
        self.loop = self.loop or asyncio.get_running_loop()
        return self.recorder.tap(batch_id, encoding, (p.account, p.user, p.mode), p.request_id)

    def fetch_ended(self, p: Pending) -> None:
        if isinstance(p.tap, batches.JsonlTap):
            self.recorder.fetch_ended(batches.results_batch_id(p.method, p.path) or "", p.tap.complete)

    def response(self, flow: http.HTTPFlow, p: Pending) -> None:
        """Batch create/retrieve/list/cancel: keep the batch, and point `results_url` at this proxy."""
        resp, req, client = flow.response, flow.request, flow.client_conn
        if resp is None or not 200 <= resp.status_code < 300 or not batches.is_batch_object_call(p.method, p.path):
            return
        if resp.stream:
            return  # a body mitmproxy streamed (stream_large_bodies) cannot be rewritten
        try:
            raw = req.raw_content if "content-encoding" not in req.headers else None
            if self.config.public_url:  # behind a load balancer: the name clients use, not this socket
                base = self.config.public_url
            else:
                prefix = batches.used_prefix(flow.metadata.get(CLIENT_PATH, ""), self.config.path_prefix)
                base = batches.proxy_base(client.tls_established, client.sockname, prefix)
            who = (p.account, p.user, p.mode)
            upstream = f"{req.scheme}://{req.host}:{req.port}"
            body = resp.content or b""
            new = self.recorder.objects(p.method, p.path, body, raw, who, base, upstream)
            if p.method == "POST" and p.path == batches.BATCHES_PATH:
                self._created(p, body)
                if p.mode == "managed":
                    self._start_poller()  # a batch the proxy can poll with the account's key
            if new is not None:
                resp.content = new  # re-encoded as the upstream encoded it; content-length follows
        except Exception:
            log.exception("metrion: could not read or rewrite a batch object; forwarded as received")

    def _created(self, p: Pending, body: bytes) -> None:
        """A batch created under a hard budget keeps the create call's reservation until it is metered."""
        for obj in batches.batch_objects(body)[:1]:
            usd = self.gate.batch_created(id(p), obj)  # the ticket of the call, as the addon opened it
            if usd > 0:
                held = self.gate.batches.hold(obj["id"])
                self.recorder.reserved(obj["id"], usd, p.started, held.requests if held else 0)

    # -- the batch thread -----------------------------------------------------------------------------

    def _later(self, fn: Any, *args: Any) -> None:
        """Run `fn` on the event loop (from the batch thread)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed meanwhile (shutdown); the row is stored, budgets reload from it
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _seen(self, objs: list[dict[str, Any]]) -> None:
        self._later(self.gate.batch_seen, objs)

    def _row(self, row: dict[str, Any]) -> None:
        """A batch result's row (on the batch thread): to the store, and its cost to the budgets (on the loop)."""
        self.store.put(row)
        started = _epoch(row.get("ts"))  # counted in the periods of the row's ts, as the restart seed does
        self._later(self.gate.batch_result, row, started)


def _epoch(ts: Any) -> float | None:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if isinstance(ts, str) else None
    except ValueError:
        return None
