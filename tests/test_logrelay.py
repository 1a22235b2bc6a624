"""logrelay: records logged off the event loop are printed on the loop's thread, in order, and none is lost."""

from __future__ import annotations

import asyncio
import logging
import threading

from metrion_addon import logrelay


class Capture(logging.Handler):
    """Stands for TermLog on the root logger: what was printed, and on which thread."""

    def __init__(self, want: int) -> None:
        super().__init__()
        self.seen: list[tuple[int, str]] = []
        self.want = want
        self.done = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((threading.get_ident(), record.getMessage()))
        if len(self.seen) == self.want:
            self.done.set()  # set on the loop's thread: the relay prints only there


def test_records_from_threads_are_printed_on_the_loop_in_order() -> None:
    async def main() -> tuple[Capture, int]:
        capture = Capture(want=1 + 2 * 500 + 1)
        root = logging.getLogger()
        root.addHandler(capture)
        relay = logrelay.install(asyncio.get_running_loop())
        try:
            logging.getLogger("metrion_addon.test").warning("from the loop")

            def burst(name: str) -> None:
                for i in range(500):
                    logging.getLogger("metrion.requests").warning("%s %d", name, i)

            threads = [threading.Thread(target=burst, args=(n,)) for n in ("a", "b")]
            for t in threads:
                t.start()
            for t in threads:
                await asyncio.to_thread(t.join)
            logging.getLogger("metrion.requests").warning("last, from the loop")
            await asyncio.wait_for(capture.done.wait(), 30)
        finally:
            logrelay.uninstall(relay)
            root.removeHandler(capture)
        return capture, threading.get_ident()

    capture, loop_thread = asyncio.run(main())
    assert {thread for thread, _ in capture.seen} == {loop_thread}
    messages = [m for _, m in capture.seen]
    assert messages[0] == "from the loop" and messages[-1] == "last, from the loop"
    for name in ("a", "b"):  # each thread's lines in the order it logged them
        assert [m for m in messages if m.startswith(name + " ")] == [f"{name} {i}" for i in range(500)]
    assert all(logging.getLogger(n).propagate and not logging.getLogger(n).handlers for n in logrelay.LOGGERS)


def test_uninstall_prints_what_waits() -> None:
    """The `done` hook uninstalls the relay after the accountant drained: lines queued for a loop that will not
    run them again are printed then, not dropped."""
    capture = Capture(want=3)
    root = logging.getLogger()
    root.addHandler(capture)
    loop = asyncio.new_event_loop()
    try:
        relay = logrelay.install(loop)
        requests = logging.getLogger("metrion.requests")
        t = threading.Thread(target=lambda: [requests.warning("w %d", i) for i in range(3)])
        t.start()
        t.join()
        assert capture.seen == []  # waiting for the loop, which is not running
        logrelay.uninstall(relay)
        assert [m for _, m in capture.seen] == ["w 0", "w 1", "w 2"]
    finally:
        loop.close()
        root.removeHandler(capture)
