"""Load and durability through real processes: mitmdump with the addon, the fake upstream in its own process,
and asyncio httpx clients in the test process.

Sizes fit a 2-core CI runner. METRION_LOAD=large runs the bigger variant (1,000 clients, 100,000 requests).
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from metrion_addon.store import BATCH_SIZE
from tests.conftest import (
    MANAGED_TOKEN,
    FakeProcess,
    Proxy,
    proc_fds,
    proc_rss_mb,
    start_fake_process,
    start_proxy,
    stop_proxy,
)

pytestmark = pytest.mark.slow
LARGE = os.environ.get("METRION_LOAD") == "large"
CLIENTS = 1000 if LARGE else 200
TOTAL = 100_000 if LARGE else 10_000
RAMP = 0.02 if LARGE else 0.005  # seconds between new client connections
MODEL = "claude-sonnet-5-5"


@dataclass
class Done:
    """Requests whose response the client read completely: request-id -> (input, output) tokens sent."""

    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    stop: bool = False  # set to make the clients stop taking new requests


async def _one(client: httpx.AsyncClient, url: str, i: int, done: Done) -> None:
    tin, tout = 1 + i % 997, 1 + (i * 7) % 503
    stream = i % 2 == 0
    headers = {"x-api-key": MANAGED_TOKEN, "x-fake-usage": f"{tin},{tout}", "x-metrion-user": f"u{i % 17}"}
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": f"q{i}"}], "stream": stream}
    async with client.stream("POST", url + "/v1/messages", json=body, headers=headers) as r:
        data = b"".join([c async for c in r.aiter_raw()])
    ok = r.status_code == 200 and (b"event: message_stop" in data if stream else b'"usage"' in data)
    if not ok:
        raise AssertionError(f"request {i}: {r.status_code} {data[:200]!r}")
    rid = r.headers["request-id"]
    done.tokens[rid] = (tin, tout)
    done.finished_at[rid] = time.monotonic()


async def drive(url: str, clients: int, total: int, done: Done, tolerate_errors: bool = False) -> None:
    """`clients` concurrent connections send `total` requests between them, half streamed."""
    counter = iter(range(total))

    async def worker(k: int) -> None:
        # Connections ramp up: mitmproxy listens with asyncio's default backlog of 100, and a burst of more
        # simultaneous connects than that overflows it (the kernel falls back to SYN cookies; some get reset).
        await asyncio.sleep(k * RAMP)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            for i in counter:
                if done.stop:
                    return
                try:
                    await _one(client, url, i, done)
                except Exception:
                    if not tolerate_errors:
                        raise
                    done.failures += 1

    await asyncio.gather(*(worker(k) for k in range(clients)))


def run_load(url: str, clients: int, total: int) -> tuple[Done, float]:
    done = Done()
    t0 = time.monotonic()
    asyncio.run(drive(url, clients, total, done))
    return done, time.monotonic() - t0


def db_rows(db: Path) -> list[tuple[str, int, int]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT request_id, input_tokens, output_tokens FROM requests").fetchall()
    finally:
        conn.close()


def settle(proxy: Proxy, n: int, timeout: float = 30) -> None:
    proxy.wait_rows("1", n=n, timeout=timeout)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeProcess]:
    f = start_fake_process()
    yield f
    f.stop()


@pytest.fixture
def load_proxy(upstream: FakeProcess, tmp_path: Path) -> Iterator[Proxy]:
    p = start_proxy(tmp_path, upstream.url, extra_args=("--set", "flow_detail=0"))
    yield p
    stop_proxy(p)


def test_concurrent_load_one_row_each_and_no_leaks(load_proxy: Proxy, capsys: pytest.CaptureFixture[str]) -> None:
    warm, _ = run_load(load_proxy.url, CLIENTS, CLIENTS * 2)  # connections, buffers and caches at working size
    settle(load_proxy, len(warm.tokens))
    time.sleep(1)
    fds0, rss0 = proc_fds(load_proxy.proc.pid), proc_rss_mb(load_proxy.proc.pid)

    done, elapsed = run_load(load_proxy.url, CLIENTS, TOTAL)
    assert len(done.tokens) == TOTAL
    settle(load_proxy, TOTAL + len(warm.tokens))
    time.sleep(1)
    fds1, rss1 = proc_fds(load_proxy.proc.pid), proc_rss_mb(load_proxy.proc.pid)

    rows = db_rows(load_proxy.db)
    by_id: dict[str, tuple[int, int]] = {}
    for rid, tin, tout in rows:
        assert rid not in by_id, f"two rows for {rid}"
        by_id[rid] = (tin, tout)
    assert len(rows) == TOTAL + len(warm.tokens)
    sent = {**warm.tokens, **done.tokens}
    assert by_id == sent  # every request exactly once, with exactly the tokens the upstream sent
    assert sum(t[0] for t in by_id.values()) == sum(t[0] for t in sent.values())

    with capsys.disabled():
        print(
            f"\nload: {TOTAL} requests, {CLIENTS} clients in {elapsed:.1f}s ({TOTAL / elapsed:.0f}/s); "
            f"fds {fds0}->{fds1}, rss {rss0:.0f}->{rss1:.0f} MiB"
        )
    assert fds1 <= fds0 + 5, f"file descriptors grew from {fds0} to {fds1}"
    assert rss1 - rss0 < 25, f"memory grew from {rss0:.0f} to {rss1:.0f} MiB"


def in_background(url: str, clients: int, done: Done) -> threading.Thread:
    t = threading.Thread(target=lambda: asyncio.run(drive(url, clients, 10**9, done, tolerate_errors=True)))
    t.start()
    return t


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


# The most rows a SIGKILL may cost: those in the writer's open transaction (Store.batch_size) or queued behind it.
# The writer commits as soon as rows arrive (no timer), so in practice it is the requests that finished during
# the last commit: a handful at most.
SIGKILL_MAX_LOST = BATCH_SIZE


def hold_request_in_flight(proxy: Proxy) -> socket.socket:
    """A request whose headers the proxy has accepted (it answered `100 Continue`) and whose body never comes:
    it is in flight until the proxy stops, whatever the timing of the load around it."""
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    s.sendall(
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\nexpect: 100-continue\r\n"
        b"content-length: 100\r\n\r\n" % MANAGED_TOKEN.encode()
    )
    assert s.recv(100).startswith(b"HTTP/1.1 100")
    return s


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_signal_during_load(
    upstream: FakeProcess, tmp_path: Path, sig: signal.Signals, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = start_proxy(tmp_path, upstream.url, extra_args=("--set", "flow_detail=0"))
    done = Done()
    clients = in_background(proxy.url, CLIENTS, done)
    held: socket.socket | None = None
    try:
        deadline = time.monotonic() + 60
        while len(done.tokens) < 2000 and time.monotonic() < deadline:
            time.sleep(0.05)
        blocker = None
        if sig == signal.SIGTERM:  # another writer holds the DB: rows pile up in the proxy's queue
            blocker = sqlite3.connect(proxy.db, timeout=30)
            blocker.execute("BEGIN IMMEDIATE")
            time.sleep(1)
        completed = done.tokens.copy()  # answered completely before the signal
        held = hold_request_in_flight(proxy)  # at least one request is surely in flight at the signal
        t0 = time.monotonic()
        proxy.proc.send_signal(sig)
        if blocker is not None:
            time.sleep(4)  # longer than mitmproxy takes to shut down
            blocker.rollback()  # released after the signal: shutdown must wait for it and flush the queue
            blocker.close()
        proxy.proc.wait(30)
        exit_s = time.monotonic() - t0
    finally:
        done.stop = True
        clients.join(60)
        stop_proxy(proxy)
        if held is not None:
            held.close()
    assert len(completed) >= 2000
    assert integrity(proxy.db) == "ok"
    rows = db_rows(proxy.db)
    ids = [r[0] for r in rows if r[0] is not None]
    assert len(ids) == len(set(ids)), "a request recorded twice"
    in_db = {r[0]: (r[1], r[2]) for r in rows}
    lost = [rid for rid in completed if rid not in in_db]
    assert all(in_db[rid] == t for rid, t in completed.items() if rid in in_db)
    with capsys.disabled():
        print(
            f"\n{sig.name}: {len(completed)} completed before the signal, {len(rows)} rows, {len(lost)} lost, "
            f"exit after {exit_s:.1f}s"
        )
    if sig == signal.SIGTERM:
        assert lost == []
        assert any(r[1] is None for r in rows)  # requests cut off in flight are recorded too (proxy_shutdown)
        log = proxy.log.read_text()
        assert "could not be written" not in log
    else:
        assert len(lost) <= SIGKILL_MAX_LOST


def test_two_proxies_one_database(upstream: FakeProcess, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_proxy(tmp_path / "a", upstream.url, extra_args=("--set", "flow_detail=0"), db=db)
    b = start_proxy(tmp_path / "b", upstream.url, extra_args=("--set", "flow_detail=0"), db=db)
    n = TOTAL // 4
    try:
        done_a, done_b = Done(), Done()

        async def both() -> None:
            await asyncio.gather(drive(a.url, CLIENTS // 2, n, done_a), drive(b.url, CLIENTS // 2, n, done_b))

        asyncio.run(both())
        a.wait_rows("1", n=2 * n, timeout=60)
    finally:
        stop_proxy(a)
        stop_proxy(b)
    rows = {r[0]: (r[1], r[2]) for r in db_rows(db)}
    assert rows == {**done_a.tokens, **done_b.tokens} and len(rows) == 2 * n
    for p in (a, b):
        assert "locked" not in p.log.read_text() or "writable again" in p.log.read_text()
    assert integrity(db) == "ok"


def test_disk_full_keeps_proxying_and_writes_later(upstream: FakeProcess, tmp_path: Path) -> None:
    """RLIMIT_FSIZE=1 on the proxy process makes every file write fail like a full disk (EFBIG -> SQLITE_FULL)."""
    fifo = tmp_path / "mitmdump.log"  # a pipe, so the limit does not also stop mitmdump's own log output
    os.mkfifo(fifo)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(x.decode("utf-8", "replace") for x in fifo.open("rb")))
    reader.start()
    backlog = 40
    proxy = start_proxy(
        tmp_path, upstream.url, extra_args=("--set", "flow_detail=0", "--set", f"metrion_max_backlog={backlog}")
    )
    pid = proxy.proc.pid
    ok = Done()
    try:
        asyncio.run(drive(proxy.url, 5, 10, ok))
        proxy.wait_rows("1", n=10)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))
        during = Done()
        asyncio.run(drive(proxy.url, 5, backlog + 25, during))  # 25 more than the backlog holds
        assert len(during.tokens) == backlog + 25  # every request proxied while nothing could be written
        time.sleep(1)
        assert len(proxy.rows()) == 10
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
        proxy.wait_rows("1", n=10 + backlog)
        time.sleep(0.5)
        rows = {r[0] for r in db_rows(proxy.db)}
    finally:
        stop_proxy(proxy)
        reader.join(10)
    order = sorted(during.tokens, key=during.finished_at.__getitem__)
    assert len(rows) == 10 + backlog and set(ok.tokens) <= rows <= set(ok.tokens) | set(order)
    # The bounded queue dropped the oldest and wrote the newest (5 clients: the order may differ at the edge).
    assert not rows & set(order[:20]) and set(order[-35:]) <= rows
    log = "".join(lines)
    assert log.count("cannot write to") == 1, log  # said once, clearly, not once per retry
    assert f"cannot write to {proxy.db} (" in log  # names the file and the reason
    assert "1 request rows dropped so far" in log and "10 request rows dropped so far" in log
    assert f"{backlog} waiting request rows written, 25 dropped in total" in log


def test_store_bounded_backlog_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer alone: while connecting fails, rows wait in a bounded queue; the oldest beyond it are dropped."""
    import metrion_addon.store as store_module

    real_connect = store_module.connect
    failing = threading.Event()
    failing.set()

    def connect(path: Path) -> sqlite3.Connection:
        if failing.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real_connect(path)

    s = store_module.Store(tmp_path / "m.db", max_backlog=10)
    s.start()  # creates the schema
    monkeypatch.setattr(store_module, "connect", connect)
    with caplog.at_level("WARNING", logger="metrion_addon.store"):
        for i in range(25):
            s.put({"ts": f"t{i:02d}", "request_id": f"r{i:02d}"})
        deadline = time.monotonic() + 10
        while s.dropped < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (s.dropped, s.pending(), s.written) == (15, 10, 0)
        failing.clear()
        s.close()
    assert s.written == 10
    got = [r[0] for r in sqlite3.connect(tmp_path / "m.db").execute("SELECT request_id FROM requests ORDER BY id")]
    assert got == [f"r{i:02d}" for i in range(15, 25)]  # the newest ten, in order
    text = caplog.text
    assert text.count("cannot write to") == 1 and "10 request rows dropped so far" in text
    assert "10 waiting request rows written, 15 dropped in total" in text


def test_store_survives_rows_sqlite_cannot_bind(tmp_path: Path) -> None:
    """A value SQLite cannot store (an int beyond 64 bits, a list) must not kill the writer or its batch."""
    from metrion_addon.store import Store

    s = Store(tmp_path / "m.db")
    s.start()
    s.put({"ts": "t1", "request_id": "odd", "input_tokens": 10**30, "output_tokens": [1], "model": {"x": 1}})
    s.put({"ts": "t2", "request_id": "next", "input_tokens": 5})
    s.close()
    got = sqlite3.connect(tmp_path / "m.db").execute(
        "SELECT request_id, input_tokens, output_tokens, model FROM requests"
    )
    assert sorted(got) == [("next", 5, None, None), ("odd", None, "[1]", "{'x': 1}")]
