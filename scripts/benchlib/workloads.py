"""What is measured against one target (a port, and the proxy's pid for CPU and RSS; no pid for `direct`)."""

from __future__ import annotations

import asyncio
import time

from benchlib.client import Conn, build_request, loop_requests, pct, read_reply
from benchlib.procs import cpu_seconds, rss_kb

SLOW_EVENTS = 26  # see bench_upstream.SLOW_DELTAS: 3 + 20 deltas + 3
FAST_EVENTS = 2006
REAL_EVENTS = 206  # bench_upstream.REAL_DELTAS + 6: a real-size request's streamed answer


async def measure_loop(
    port: int, pid: int | None, raw: bytes, conc: int, warm: float, duration: float
) -> dict[str, float]:
    """`conc` connections sending `raw` back to back: latency, time to first byte, throughput, proxy CPU."""
    cpu0 = cpu_seconds(pid)
    samples, errors, t_start, t_stop = await loop_requests(port, raw, conc, warm, duration)
    cpu = cpu_seconds(pid) - cpu0
    timed = [x for x in samples if x[0] >= t_start]  # latency: the requests started inside the window
    lat = [(e - s) * 1000 for s, _, e, _ in timed]
    ttfb = [(f - s) * 1000 for s, f, _, _ in timed]
    return {
        "p50": pct(lat, 50),
        "p90": pct(lat, 90),
        "p99": pct(lat, 99),
        "ttfb_p50": pct(ttfb, 50),
        "rps": sum(1 for _, _, e, _ in samples if t_start <= e <= t_stop) / (t_stop - t_start),
        "n": len(timed),
        "errors": errors,
        # CPU of the proxy over the whole run, per request served in it
        "cpu_us": cpu * 1e6 / max(1, len(samples)),
    }


async def measure_json(port: int, pid: int | None, conc: int, warm: float, duration: float) -> dict[str, float]:
    """Small non-streaming requests."""
    return await measure_loop(port, pid, build_request("json", False), conc, warm, duration)


async def measure_real(
    port: int, pid: int | None, body: bytes, conc: int, warm: float, duration: float
) -> dict[str, float]:
    """Claude-Code-sized requests (`body`), each answered with a 206-event stream."""
    return await measure_loop(port, pid, build_request("real", True, body), conc, warm, duration)


async def measure_slow_stream(port: int, conc: int, per_conn: int) -> dict[str, float]:
    raw = build_request("slow", True)
    stagger = 1.25 / conc  # a slow stream lasts ~1.25 s: spread the starts over one stream's length
    ttfb: list[float] = []
    total: list[float] = []
    errors = 0

    async def worker(i: int) -> None:
        nonlocal errors
        c = Conn(port)
        try:
            # connect (and warm the connection) first, and stagger the starts, so that what is timed is the
            # stream itself, not connection set-up or the other streams' requests queued on the proxy's loop
            await c.request(build_request("json", False))
            await asyncio.sleep(i * stagger)
            for _ in range(per_conn):
                t0 = time.perf_counter()
                try:
                    r = await c.request(raw)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    continue
                t1 = time.perf_counter()
                if r.status != 200 or not r.nbytes:
                    errors += 1
                    continue
                ttfb.append((r.first_byte - t0) * 1000)
                total.append((t1 - t0) * 1000)
        finally:
            c.close()

    await asyncio.gather(*(worker(i) for i in range(conc)))
    return {
        "ttfb_p50": pct(ttfb, 50),
        "ttfb_p90": pct(ttfb, 90),
        "ttfb_max": max(ttfb, default=float("nan")),
        "total_p50": pct(total, 50),
        "total_min": min(total, default=float("nan")),
        "n": len(ttfb),
        "errors": errors,
    }


async def measure_fast_stream(port: int, pid: int | None, warm: float, duration: float) -> dict[str, float]:
    cpu0 = cpu_seconds(pid)
    samples, errors, t_start, _ = await loop_requests(port, build_request("fast", True), 1, warm, duration)
    cpu = cpu_seconds(pid) - cpu0
    per_stream_cpu = cpu / max(1, len(samples))
    samples = [x for x in samples if x[0] >= t_start]  # timed: the streams started inside the window
    times = [e - s for s, _, e, _ in samples]
    busy = sum(times)
    nbytes = sum(b for *_, b in samples)
    return {
        "events_per_s": len(samples) * FAST_EVENTS / busy if busy else float("nan"),
        "mb_per_s": nbytes / busy / 1e6 if busy else float("nan"),
        "stream_ms": pct([t * 1000 for t in times], 50),
        "n": len(samples),
        "errors": errors,
        "cpu_us_per_event": per_stream_cpu * 1e6 / FAST_EVENTS,
    }


async def measure_memory(port: int, pid: int, streams: int) -> dict[str, float]:
    """RSS of the proxy idle (warmed), then with `streams` streams open at once (each receiving an event per
    second)."""
    # warm the proxy's code paths first, so the difference is per-stream state, not lazy imports
    await loop_requests(port, build_request("json", False), 4, 0.0, 0.5)
    await measure_slow_stream(port, 4, 1)
    await asyncio.sleep(0.5)
    before = rss_kb(pid)
    raw = build_request("hold", True)
    started = 0
    all_open = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    def first() -> None:
        nonlocal started
        started += 1
        if started == streams:
            all_open.set()

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(raw)
        await read_reply(reader, first)

    tasks: list[asyncio.Task[None]] = []
    for i in range(0, streams, 50):  # open in batches: the listen backlog is finite
        tasks += [asyncio.create_task(one()) for _ in range(min(50, streams - i))]
        await asyncio.sleep(0.05)
    ok = True
    try:
        await asyncio.wait_for(all_open.wait(), 60)
    except TimeoutError:
        ok = False
    await asyncio.sleep(1.0)
    after = rss_kb(pid)
    for t in tasks:
        t.cancel()
    for w in writers:
        w.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(2.0)  # let the proxy see the disconnects and the upstream threads end
    return {
        "rss_before_mb": before / 1024,
        "rss_open_mb": after / 1024,
        "kb_per_stream": (after - before) / max(1, started),
        "open": started,
        "errors": 0 if ok else streams - started,
    }
