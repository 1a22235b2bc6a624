"""Accounting off the event loop: a finished request's facts -> its row, on a thread of its own.

The response and error hooks hand over what they know (the request's `Pending`, which the loop no longer
touches, the status, times, and the raw JSON answer) and return. This thread reads the answer's usage, prices it,
builds the row and hands it to the store, and observes it (metrics, the request log line: runtime.py hands it an
inline-observed store, so that is done here too, not on a fourth thread woken for every row). One queue, in
hand-over order: a row built on the loop (a request under a budget, whose real cost must replace its reservation
before the client sees the end of the answer) goes through the same queue as a finished row, so rows reach the
store in the order requests ended.

Woken once per `gather` interval under load, not once per request. After a batch the thread waits that long
before it looks at the queue again, so that jobs handed over meanwhile go on a queue nobody waits on (no system
call, no thread woken) and are taken together. Each wake-up of a thread costs the process ~50 µs of CPU and hands
the GIL over twice, and at c=1 it comes exactly when the event loop has the client's next request to read. When
the queue is empty the thread waits on it, so the first job after a pause is taken at once. The store's writer
gathers rows the same way: a row reaches the database at most `gather` + the store's flush interval after its
request ended. Measured at c=1 (lean proxy, small requests; this, the observer's work done here and mitmproxy's
add_log relay removed, proxy.py): the proxy's CPU per request went from 1.13x bare mitmdump's to 0.83x in that
measurement; full benchmark runs since put it at 0.93-1.05x, their run-to-run spread (BENCHMARKS.md).

Every request still leaves exactly one row: a job that fails to account is stored with what is certain, and
`close()` drains the queue before the store closes.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from metrion_addon import record
from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, finish, identity
from metrion_addon.schema import RequestRow
from metrion_addon.sse import incremental_decoder

log = logging.getLogger(__name__)
_STOP = object()
# How long the thread lets jobs gather after a batch (see the module's docstring).
GATHER_S = 0.02


@dataclass(frozen=True)
class Finished:
    """A request that has ended, as the hook saw it. `body` is the raw (content-encoded) JSON answer when it was
    buffered and not read yet; `encoding` its content-encoding."""

    p: Pending
    status: int | None
    request_id: str | None
    headers_at: float | None
    ended_at: float
    error: str | None = None
    error_message: str | None = None
    body: bytes | None = None
    encoding: str | None = None


def decode(raw: bytes, encoding: str | None) -> bytes:
    """A buffered body, content-decoded (gzip, deflate, br, zstd); ValueError when it cannot be. Not mitmproxy's
    `.content`: its decoder keeps a module-level cache that is not safe to share with the event loop's thread."""
    if not encoding:
        return raw
    decoder = incremental_decoder(encoding)
    if decoder is None:
        raise ValueError(f"unsupported content-encoding {encoding!r}")
    try:
        return decoder(raw) + decoder(b"")
    except Exception as e:  # zlib.error, brotli.error, zstd's: the body is not what its header says
        raise ValueError(f"undecodable {encoding!r} body: {e}") from None


def account(job: Finished, pricer: Pricer) -> RequestRow:
    """The row for a finished request. Never raises: a bug in accounting keeps what is certain."""
    p = job.p
    try:
        if job.body is not None:
            try:
                body: bytes | None = decode(job.body, job.encoding)
            except ValueError:  # undecodable content-encoding: forwarded as is, not readable
                body = None
                p.facts.parse_errors += 1
            if body:
                p.facts.from_json_body(body)
                p.counted_tokens = record.counted_tokens(p.path, job.status or 0, body)
        return finish(
            p,
            pricer=pricer,
            status=job.status,
            request_id=job.request_id,
            headers_at=job.headers_at,
            ended_at=job.ended_at,
            error=job.error,
            error_message=job.error_message,
        )
    except Exception:  # never lose the row over a bug in accounting: keep what is certain
        log.exception("metrion: failed to account a request; recording it without usage")
        row: RequestRow = {
            **identity(p, p.model),
            "status": job.status,
            "completed": 0,
            "error": "metrion_internal_error",
        }
        return row


class Accountant:
    """Owns the accounting thread. `submit()` never blocks; `close()` accounts for everything submitted."""

    def __init__(self, pricer: Pricer, store: Any, gather: float = GATHER_S) -> None:
        self.pricer = pricer
        self.store = store  # put() only: the store, observed (metrics and the request log see every row)
        self.gather = gather
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="metrion-accountant", daemon=True)
        self._closed = False
        self._closing = threading.Event()  # cuts the gathering pause short at shutdown

    def start(self) -> Accountant:
        self._thread.start()
        return self

    def submit(self, job: Finished | dict[str, Any]) -> None:
        """A finished request, or a row already built: stored in the order handed over."""
        if self._closed:  # after close (a hook late at shutdown): account here rather than lose the row
            self._handle(job)
            return
        self._queue.put(job)

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 15.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._closing.set()
            self._thread.join(timeout)
        while True:  # whatever the thread left (it died, or did not finish in time): here, not lost
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                self._handle(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()  # idle: the first job wakes the thread at once
            while job is not _STOP:
                self._handle(job)
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
            if job is _STOP:
                return
            self._closing.wait(self.gather)  # under load: let the next jobs gather (see the module's docstring)

    def _handle(self, job: Finished | dict[str, Any]) -> None:
        try:
            row = account(job, self.pricer) if isinstance(job, Finished) else job
            self.store.put(row)
        except Exception:  # noqa: BLE001 - one bad row never stops the others
            log.exception("metrion: could not hand a request row to the store")
