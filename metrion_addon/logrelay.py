"""Whole log lines beside mitmdump's flow lines: records logged off the event loop are printed on it.

mitmdump's Dumper prints one line per flow from the event loop with `print()`, which is two writes (the text,
then the newline). TermLog prints each log record with `print()` on whichever thread logged it. The request log
line is logged on the accounting thread, so it could land between a flow line and its newline, leaving a JSON
line with a flow line glued to its end (`{...}127.0.0.1:49110: POST http://...`): seen in CI.

When a Dumper is loaded (the `mitmdump -s` path), `install()` relays the records of metrion's own loggers that
are logged off the loop to the loop, where they are printed in order, between flow lines and never inside one.
The loop is woken once per burst, not once per record (the accountant logs in 20 ms gathers). The lean
`metrion-proxy` loads no Dumper and TermLog's lock keeps its own lines whole: nothing is relayed there.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading

LOGGERS = ("metrion", "metrion_addon")  # the request log ("metrion.requests") and every module's logger


class LoopRelay(logging.Handler):
    """Passes each record to the root logger's handlers (TermLog) on the event loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.loop_thread = threading.get_ident()  # made on the loop, by the `running` hook
        self._pending: collections.deque[logging.LogRecord] = collections.deque()
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() == self.loop_thread:
            self.drain()  # anything still waiting goes first: lines keep their order
            logging.getLogger().handle(record)
            return
        self._pending.append(record)  # appended before the flag is read; drain() clears it before it pops
        if not self._scheduled:
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self.drain)
            except RuntimeError:  # the loop is closed: nothing else prints any more
                self._scheduled = False
                self.drain()

    def drain(self) -> None:
        self._scheduled = False
        root = logging.getLogger()
        while self._pending:
            root.handle(self._pending.popleft())


def install(loop: asyncio.AbstractEventLoop) -> LoopRelay:
    relay = LoopRelay(loop)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(relay)
        logger.propagate = False
    return relay


def uninstall(relay: LoopRelay) -> None:
    """Print what waits (on the loop's thread, from the `done` hook) and log directly again."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.removeHandler(relay)
        logger.propagate = True
    relay.drain()
