"""How much the metering addon costs, measured against a bare mitmdump in the same reverse mode.

    python3 scripts/bench.py            # full run, ~5 minutes, writes BENCHMARKS.md
    python3 scripts/bench.py --quick    # ~1 minute smoke run, prints only (unless --output)

It starts, on loopback only, the project's fake upstream (scripts/bench_upstream.py, its own process), a bare
mitmdump (no addon) and mitmdump with the addon, both in front of that same upstream, and drives them from
this process with an asyncio HTTP/1.1 client on keep-alive connections. Every measurement alternates between
the two proxies round by round (bare first, then addon first, ...) so machine noise hits both; the table shows
the median over rounds and the median of the per-round addon/bare ratios. It also times the SQLite writer
alone and the report (scripts/bench_report.py, when present), and, if py-spy is installed (the `bench` extra),
samples the addon proxy under load and lists the hot spots in metrion_addon. Not part of the test suite.

From a fresh clone, if the running Python lacks the project, the script sets up .venv (scripts/_venv.sh) and
re-runs itself there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "metrion_addon" / "mitm_script.py"
UPSTREAM_SCRIPT = ROOT / "scripts" / "bench_upstream.py"
REPORT_SCRIPT = ROOT / "scripts" / "bench_report.py"
TOKEN = "sk-metrion-bench-0000000000000000"
sys.path.insert(0, str(ROOT))
from tests.netutil import free_port, stop_process, wait_port  # noqa: E402  (shared with the tests)

NOTES_MARKER = "<!-- notes: everything below this line is hand-written and kept when the script rewrites the file -->"

SLOW_EVENTS = 26  # see bench_upstream.SLOW_DELTAS: 3 + 20 deltas + 3
FAST_EVENTS = 2006

# --- targets ----------------------------------------------------------------------------------------------


@dataclass
class Target:
    label: str
    op: str  # "<=" or ">="
    limit: float
    unit: str = ""

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}{self.unit}"


TARGETS = {
    "p50_ratio": Target("p50 latency addon/bare (each concurrency)", "<=", 1.05),
    "ttfb_ratio": Target("time to first byte addon/bare", "<=", 1.02),
    "rps_ratio_64": Target("throughput addon/bare at concurrency 64", ">=", 0.95),
    "writer": Target("SQLite writer rows/s", ">=", 20_000),
    "rss": Target("addon RSS per open stream", "<=", 50, " KB"),
    "report": Target("report time per view", "<=", 1.0, " s"),
}


# --- processes ----------------------------------------------------------------------------------------------


def mitmdump_bin() -> str:
    here = Path(sys.executable).parent / "mitmdump"
    if here.exists():
        return str(here)
    found = shutil.which("mitmdump")
    if not found:
        raise SystemExit("mitmdump not found: install the project (pip install -e .)")
    return found


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


class Cluster:
    """The fake upstream and the two proxies. Every process started here is stopped by close()."""

    def __init__(self, tmp: Path, bare_buffered: bool = False) -> None:
        self.tmp = tmp
        self.bare_buffered = bare_buffered
        self.servers: list[Server] = []
        self.upstream = self._spawn("upstream", [sys.executable, str(UPSTREAM_SCRIPT), "--port", "{port}"])
        self.bare = self._proxy("bare")
        self.addon = self._proxy("addon")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Server:
        port = free_port()
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [a.replace("{port}", str(port)) for a in argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            )
        server = Server(name, port, proc, log)
        self.servers.append(server)
        try:
            wait_port(port, proc)
        except Exception:
            raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
        return server

    def _proxy(self, name: str) -> Server:
        argv = [
            mitmdump_bin(),
            "--mode",
            f"reverse:http://127.0.0.1:{self.upstream.port}@127.0.0.1:{{port}}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            f"confdir={self.tmp / 'mitmproxy-conf'}",
            "--set",
            "flow_detail=0",
        ]
        if name == "addon":
            cfg = self.tmp / "metrion.yaml"
            cfg.write_text(
                f"upstream: http://127.0.0.1:{self.upstream.port}\n"
                f"database: {self.tmp / 'metrion.db'}\n"
                "accounts:\n"
                "  - name: bench\n"
                f"    tokens: [{TOKEN}]\n"
                "    anthropic_api_key: bench-fake-upstream-key\n"
                "    allow_passthrough: false\n"
            )
            argv[1:1] = ["-s", str(SHIM)]
            argv += ["--set", f"metrion_config={cfg}"]
        elif not self.bare_buffered:
            # Without this a bare mitmdump buffers every response, SSE included, until the end: no baseline for
            # streaming. With it every body is relayed as it arrives (the addon streams SSE itself).
            argv += ["--set", "stream_large_bodies=1"]
        return self._spawn(name, argv)

    def restart_proxies(self) -> None:
        for s in (self.bare, self.addon):
            s.stop()
            self.servers.remove(s)
        self.bare = self._proxy("bare")
        self.addon = self._proxy("addon")

    def proxies(self, rnd: int) -> list[Server]:
        """Both proxies, the order alternating with the round so neither always goes first."""
        return [self.bare, self.addon] if rnd % 2 == 0 else [self.addon, self.bare]

    def close(self) -> None:
        for s in reversed(self.servers):
            with contextlib.suppress(Exception):
                s.stop()
        self.servers.clear()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS: it has exited")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except OSError:
        return float("nan")


# --- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------------------


def build_request(scenario: str, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": "claude-sonnet-5-5",
            "max_tokens": 256,
            "stream": stream,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        },
        separators=(",", ":"),
    ).encode()
    head = (
        "POST /v1/messages HTTP/1.1\r\n"
        "host: 127.0.0.1\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-api-key: {TOKEN}\r\n"
        "anthropic-version: 2023-06-01\r\n"
        "user-agent: metrion-bench/1\r\n"
        f"x-fake-scenario: {scenario}\r\n"
        "\r\n"
    )
    return head.encode() + body


@dataclass
class Reply:
    status: int
    first_byte: float  # perf_counter when the first body byte arrived
    nbytes: int
    keep_alive: bool


async def read_reply(reader: asyncio.StreamReader, on_first: Callable[[], None] | None = None) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            keep = False
    first = 0.0
    n = 0
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            await reader.readexactly(size + 2)
            if not n:
                first = time.perf_counter()
                if on_first is not None:
                    on_first()
            n += size
    elif length is not None:
        if length:
            await reader.readexactly(length)
        first = time.perf_counter()
        n = length
    else:
        n = len(await reader.read())
        first = time.perf_counter()
        keep = False
    return Reply(status, first, n, keep)


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes, on_first: Callable[[], None] | None = None) -> Reply:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        assert self.reader is not None
        self.writer.write(raw)
        try:
            reply = await read_reply(self.reader, on_first)
        except BaseException:
            self.close()
            raise
        if not reply.keep_alive:
            self.close()
        return reply

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- measurements against one proxy ------------------------------------------------------------------------


async def loop_requests(
    port: int, raw: bytes, conc: int, warm: float, duration: float
) -> tuple[list[tuple[float, float, float, int]], int, float, float]:
    """`conc` keep-alive connections each sending `raw` back to back.

    Returns the samples (start, first byte, end, bytes) of requests started inside the measured window, the
    error count, and the window's bounds.
    """
    conns = [Conn(port) for _ in range(conc)]
    samples: list[tuple[float, float, float, int]] = []
    errors = 0
    t_start = time.perf_counter() + warm
    t_stop = t_start + duration

    async def worker(c: Conn) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= t_stop:
                return
            try:
                r = await c.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if r.status != 200:
                errors += 1
            elif t0 >= t_start:
                samples.append((t0, r.first_byte, t1, r.nbytes))

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return samples, errors, t_start, t_stop


async def measure_json(port: int, pid: int, conc: int, warm: float, duration: float) -> dict[str, float]:
    cpu0 = cpu_seconds(pid)
    samples, errors, t_start, t_stop = await loop_requests(port, build_request("json", False), conc, warm, duration)
    cpu = cpu_seconds(pid) - cpu0
    lat = [(e - s) * 1000 for s, _, e, _ in samples]
    done_in_window = sum(1 for _, _, e, _ in samples if e <= t_stop)
    total = len(samples) + 0  # all measured requests; the warm-up ones are not counted below
    return {
        "p50": pct(lat, 50),
        "p90": pct(lat, 90),
        "p99": pct(lat, 99),
        "rps": done_in_window / (t_stop - t_start),
        "n": total,
        "errors": errors,
        # CPU of the proxy over warm-up + window, per request in the window (the warm-up share is small)
        "cpu_us": cpu * 1e6 / max(1, total) * duration / (duration + warm),
    }


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


async def measure_fast_stream(port: int, pid: int, warm: float, duration: float) -> dict[str, float]:
    cpu0 = cpu_seconds(pid)
    samples, errors, t_start, t_stop = await loop_requests(port, build_request("fast", True), 1, warm, duration)
    cpu = cpu_seconds(pid) - cpu0
    times = [e - s for s, _, e, _ in samples]
    busy = sum(times)
    nbytes = sum(b for *_, b in samples)
    return {
        "events_per_s": len(samples) * FAST_EVENTS / busy if busy else float("nan"),
        "mb_per_s": nbytes / busy / 1e6 if busy else float("nan"),
        "stream_ms": pct([t * 1000 for t in times], 50),
        "n": len(samples),
        "errors": errors,
        "cpu_us_per_event": cpu * 1e6 / max(1, len(samples)) / FAST_EVENTS * duration / (duration + warm),
    }


async def measure_memory(port: int, pid: int, streams: int) -> dict[str, float]:
    """RSS of the proxy with `streams` streams open at once (each receiving an event per second)."""
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


# --- the SQLite writer alone ---------------------------------------------------------------------------------


_EPOCH = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)


def synthetic_row(i: int) -> dict[str, Any]:
    return {
        # rows reach the writer in time order, as the proxy's do (one per ms here)
        "ts": (_EPOCH + dt.timedelta(milliseconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "account": f"team-{i % 7}",
        "user": f"user-{i % 31}",
        "mode": "managed",
        "method": "POST",
        "path": "/v1/messages",
        "model": "claude-sonnet-5-5",
        "stream": i % 2,
        "status": 200,
        "request_id": f"req_bench_{i:010d}",
        "message_id": f"msg_bench_{i:010d}",
        "input_tokens": 1200 + i % 500,
        "output_tokens": 300 + i % 200,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 5000,
        "cache_creation_5m_input_tokens": 0,
        "cache_creation_1h_input_tokens": 0,
        "web_search_requests": 0,
        "web_fetch_requests": 0,
        "service_tier": "standard",
        "cost_usd": 0.0123,
        "cost_input_usd": 0.0036,
        "cost_output_usd": 0.0045,
        "cost_cache_write_usd": 0.0,
        "cost_cache_read_usd": 0.0015,
        "cost_tools_usd": 0.0,
        "price_source": "genai-prices@0.0.40:claude-sonnet-5-5",
        "latency_ms": 812.5,
        "ttft_ms": 95.25,
        "completed": 1,
        "stop_reason": "end_turn",
        "client": "claude-cli/2.1.0 (external, cli)",
        "session_id": "0b5e6c1e-8f7e-4c1b-9a51-2d0f0f5c9e11",
        "usage_json": '{"input_tokens":1200,"cache_read_input_tokens":5000,"output_tokens":300}',
    }


def measure_writer(tmp: Path, rows: int, burst: int) -> dict[str, float]:
    from metrion_addon.store import Store

    out: dict[str, float] = {}
    data = [synthetic_row(i) for i in range(max(rows, burst))]

    # sustained: a producer that keeps the queue at most ~20,000 deep (the Store drops the oldest rows past its
    # max_backlog of 100,000 even when the database is writable), timed until the last row is committed
    store = Store(tmp / "writer-sustained.db")
    store.start()
    put_s = 0.0
    t0 = time.perf_counter()
    deadline = t0 + 120
    for i in range(0, rows, 5000):
        while store.pending() > 15_000 and time.perf_counter() < deadline:
            time.sleep(0.001)
        tp = time.perf_counter()
        for r in data[i : i + 5000]:
            store.put(r)
        put_s += time.perf_counter() - tp
    while store.written + store.dropped < rows and time.perf_counter() < deadline:
        time.sleep(0.002)
    out["rows_per_s"] = store.written / (time.perf_counter() - t0)
    out["put_us"] = put_s / rows * 1e6
    out["dropped"] = store.dropped
    store.close()

    # burst: `burst` rows at once (a wave of requests ending together); queue depth sampled every ms
    store = Store(tmp / "writer-burst.db")
    store.start()
    peak = 0
    stop = threading.Event()

    def sampler() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, store.pending())
            time.sleep(0.001)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    for r in data[:burst]:
        store.put(r)
    deadline = t0 + 60
    while store.written + store.dropped < burst and time.perf_counter() < deadline:
        time.sleep(0.001)
    out["burst_drain_ms"] = (time.perf_counter() - t0) * 1000
    stop.set()
    th.join()
    out["burst_peak_depth"] = peak
    out["burst_rows"] = burst
    store.close()

    from bench_metrics import measure as measure_metrics  # scripts/bench_metrics.py (issue 14)

    m = measure_metrics()
    out.update(metrics_loop_ns=m["loop_ns"], metrics_busy_ns=m["busy_ns"], metrics_thread_us=m["metrics_us"])
    return out


# --- the report (another developer's scripts/bench_report.py) ---------------------------------------------


def measure_report(rows: int, timeout: float) -> tuple[dict[str, float] | None, str]:
    if not REPORT_SCRIPT.exists():
        return None, "scripts/bench_report.py is not in this checkout: report timings skipped"
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from bench_report import run; "
        "print('@@BENCH@@' + json.dumps(run(int(sys.argv[2]))))"
    )
    try:
        p = subprocess.run(
            [sys.executable, "-c", code, str(REPORT_SCRIPT.parent), str(rows)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, f"scripts/bench_report.py did not finish within {timeout:.0f} s: skipped"
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("@@BENCH@@"):
            return {k: float(v) for k, v in json.loads(line[9:]).items()}, ""
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return None, "scripts/bench_report.py failed: " + " | ".join(tail)


def report_views(res: dict[str, float]) -> dict[str, float]:
    """The per-view timings among bench_report's figures (keys naming summary / by day), else all of them."""
    views = {k: v for k, v in res.items() if re.search(r"summary|day", k, re.I)}
    return views or res


# --- profiling the addon proxy with py-spy ------------------------------------------------------------------


def pyspy_bin() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


async def profile_addon(pid: int, port: int, load: str, seconds: float, out: Path) -> dict[str, Any]:
    spy = pyspy_bin()
    assert spy is not None
    proc = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "250",
        "--format",
        "raw",
        "--nonblocking",
        "--threads",
        "-o",
        str(out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    await asyncio.sleep(0.5)
    if load == "json":
        await loop_requests(port, build_request("json", False), 16, 0.0, seconds + 0.5)
    else:
        await loop_requests(port, build_request("fast", True), 1, 0.0, seconds + 0.5)
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
    return analyse_stacks(out.read_text())


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def analyse_stacks(raw: str) -> dict[str, Any]:
    """Collapsed stacks (py-spy --threads --format raw) -> shares of the event loop's samples.

    mitmproxy runs every hook and every stream callable on its event loop (the main thread), so that thread's
    samples are the ones that cost latency and throughput. The writer thread is reported on its own.
    """
    threads: Counter[str] = Counter()
    loop_total = 0
    loop_ours = 0
    per_func: Counter[str] = Counter()
    per_leaf_area: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] if frames[0].startswith("thread (") else "?"
        threads[thread] += n
        if thread != "MainThread":
            continue
        loop_total += n
        seen: set[str] = set()
        for frame in frames[1:]:
            m = _FRAME.match(frame)
            if m and "metrion_addon" in m["file"]:
                seen.add(f"{Path(m['file']).stem}.{m['func']}")
        if seen:
            loop_ours += n
            for f in seen:
                per_func[f] += n
        leaf = _FRAME.match(frames[-1])
        per_leaf_area[_area(leaf["file"] if leaf else "?")] += n
    total = sum(threads.values())
    return {
        "samples": total,
        "loop_samples": loop_total,
        "threads": [(t, 100 * n / total) for t, n in threads.most_common()] if total else [],
        "ours_pct": 100 * loop_ours / loop_total if loop_total else 0.0,
        "funcs": [(f, 100 * n / loop_total) for f, n in per_func.most_common(12)] if loop_total else [],
        "areas": [(a, 100 * n / loop_total) for a, n in per_leaf_area.most_common(8)] if loop_total else [],
    }


def _area(file: str) -> str:
    """A leaf frame's file -> the library it belongs to."""
    if "metrion_addon" in file:
        return "metrion_addon"
    for lib in ("mitmproxy", "genai_prices", "asyncio", "sqlite_utils", "h11", "h2", "pydantic", "logging"):
        if f"/{lib}/" in file or file.startswith(f"{lib}/"):
            return lib
    if "python3" in file:
        return "stdlib (other)"
    return Path(file).name or "?"


# --- running it all -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int
    json_warm: float
    json_seconds: float
    slow_conc: int
    slow_per_conn: int
    fast_warm: float
    fast_seconds: float
    mem_rounds: int
    mem_streams: int
    writer_rows: int
    writer_burst: int
    report_rows: int
    profile_seconds: float


FULL = Plan(5, 0.5, 3.0, 8, 2, 0.3, 2.0, 2, 500, 200_000, 20_000, 1_000_000, 8.0)
QUICK = Plan(2, 0.3, 1.0, 4, 1, 0.2, 0.8, 1, 500, 50_000, 10_000, 100_000, 3.0)
CONCURRENCY = (1, 16, 64)
PHASES = ("json", "slow", "fast", "memory", "profile", "writer", "report")


@dataclass
class Results:
    # name -> mode -> list of per-round metric dicts
    runs: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    writer: dict[str, float] = field(default_factory=dict)
    report: dict[str, float] | None = None
    report_note: str = ""
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_note: str = ""

    def add(self, name: str, mode: str, metrics: dict[str, float]) -> None:
        self.runs.setdefault(name, {}).setdefault(mode, []).append(metrics)

    def median(self, name: str, mode: str, key: str) -> float:
        vals = [m[key] for m in self.runs.get(name, {}).get(mode, []) if m[key] == m[key]]
        return statistics.median(vals) if vals else float("nan")

    def ratio(self, name: str, key: str) -> float:
        """Median over rounds of addon/bare (each round's pair measured back to back)."""
        pairs = zip(self.runs[name]["bare"], self.runs[name]["addon"], strict=False)
        vals = [a[key] / b[key] for b, a in pairs if b[key] and b[key] == b[key] and a[key] == a[key]]
        return statistics.median(vals) if vals else float("nan")

    def errors(self, name: str) -> int:
        return int(sum(m.get("errors", 0) for mode in self.runs.get(name, {}).values() for m in mode))


def say(msg: str) -> None:
    print(msg, flush=True)


async def run_proxies(cluster: Cluster, plan: Plan, res: Results, phases: set[str], tmp: Path) -> None:
    # warm-up: both proxies, every path
    for s in (cluster.bare, cluster.addon):
        await loop_requests(s.port, build_request("json", False), 8, 0.0, 0.5)
        await loop_requests(s.port, build_request("fast", True), 1, 0.0, 0.3)

    for rnd in range(plan.rounds if phases & {"json", "slow", "fast"} else 0):
        say(f"round {rnd + 1}/{plan.rounds}")
        for conc in CONCURRENCY if "json" in phases else ():
            for s in cluster.proxies(rnd):
                m = await measure_json(s.port, s.pid, conc, plan.json_warm, plan.json_seconds)
                res.add(f"json_c{conc}", s.name, m)
                say(
                    f"  json c={conc:<3} {s.name:<5} p50 {m['p50']:7.2f} ms  p99 {m['p99']:7.2f} ms  "
                    f"{m['rps']:7.0f} rps  {m['cpu_us']:5.0f} µs CPU/req"
                )
        for s in cluster.proxies(rnd) if "slow" in phases else ():
            m = await measure_slow_stream(s.port, plan.slow_conc, plan.slow_per_conn)
            res.add("slow", s.name, m)
            say(f"  slow stream  {s.name:<5} ttfb {m['ttfb_p50']:6.2f} ms  total {m['total_p50']:7.1f} ms")
        for s in cluster.proxies(rnd) if "fast" in phases else ():
            m = await measure_fast_stream(s.port, s.pid, plan.fast_warm, plan.fast_seconds)
            res.add("fast", s.name, m)
            say(f"  fast stream  {s.name:<5} {m['events_per_s']:8.0f} events/s  {m['stream_ms']:6.1f} ms/stream")

    for rnd in range(plan.mem_rounds if "memory" in phases else 0):
        say(f"memory round {rnd + 1}/{plan.mem_rounds}: fresh proxies, {plan.mem_streams} open streams each")
        cluster.restart_proxies()
        for s in cluster.proxies(rnd):
            m = await measure_memory(s.port, s.pid, plan.mem_streams)
            res.add("memory", s.name, m)
            say(
                f"  {s.name:<5} RSS {m['rss_before_mb']:.1f} -> {m['rss_open_mb']:.1f} MB, "
                f"{m['kb_per_stream']:.1f} KB/stream ({m['open']:.0f} open)"
            )

    if "profile" in phases:
        if pyspy_bin() is None:
            res.profile_note = "py-spy not installed (pip install -e '.[bench]'): no profile"
            say(res.profile_note)
            return
        for load in ("json", "fast"):
            say(f"profiling the addon proxy under the {load} load ({plan.profile_seconds:.0f} s, py-spy)")
            try:
                res.profiles[load] = await profile_addon(
                    cluster.addon.pid, cluster.addon.port, load, plan.profile_seconds, tmp / f"profile-{load}.txt"
                )
            except Exception as e:  # noqa: BLE001 - a profile is a bonus; the numbers stand without it
                res.profile_note = f"profiling failed: {e}"
                say(res.profile_note)
                return


# --- output -------------------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None or v != v:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[ok]


def build_table(res: Results) -> tuple[list[list[str]], list[tuple[str, str, str, str]]]:
    """The results table rows and the target verdicts (label, target, value, verdict)."""
    rows: list[list[str]] = []
    checks: list[tuple[str, str, str, str]] = []

    def side(name: str, key: str, label: str, unit: str, target: Target | None = None, d: int = 2) -> float:
        b, a, r = res.median(name, "bare", key), res.median(name, "addon", key), res.ratio(name, key)
        rows.append([label, f"{fmt(b, d)} {unit}".strip(), f"{fmt(a, d)} {unit}".strip(), fmt(r, 3), str(target or "")])
        return r

    p50_ratios = []
    for conc in CONCURRENCY:
        n = f"json_c{conc}"
        if n not in res.runs:
            continue
        p50_ratios.append((conc, side(n, "p50", f"non-streaming c={conc}: p50 latency", "ms", TARGETS["p50_ratio"])))
        side(n, "p90", f"non-streaming c={conc}: p90 latency", "ms")
        side(n, "p99", f"non-streaming c={conc}: p99 latency", "ms")
        r = side(n, "rps", f"non-streaming c={conc}: requests/s", "", TARGETS["rps_ratio_64"] if conc == 64 else None)
        side(n, "cpu_us", f"non-streaming c={conc}: proxy CPU per request", "µs", d=0)
        if conc == 64:
            t = TARGETS["rps_ratio_64"]
            checks.append((t.label, str(t), fmt(r, 3), verdict(t.check(r))))
    for conc, r in p50_ratios:
        t = TARGETS["p50_ratio"]
        checks.insert(
            len(checks) - 1 if checks else 0, (f"{t.label}: c={conc}", str(t), fmt(r, 3), verdict(t.check(r)))
        )
    if "slow" in res.runs:
        r = side("slow", "ttfb_p50", "stream, events 50 ms apart: time to first byte p50", "ms", TARGETS["ttfb_ratio"])
        side("slow", "ttfb_p90", "stream, events 50 ms apart: time to first byte p90", "ms")
        side("slow", "total_p50", "stream, events 50 ms apart: total time p50", "ms", d=1)
        t = TARGETS["ttfb_ratio"]
        checks.append((t.label, str(t), fmt(r, 3), verdict(t.check(r))))
    if "fast" in res.runs:
        side("fast", "events_per_s", "fast 2,006-event stream: events/s", "")
        side("fast", "mb_per_s", "fast 2,006-event stream: MB/s", "")
        side("fast", "stream_ms", "fast 2,006-event stream: time per stream p50", "ms", d=1)
        side("fast", "cpu_us_per_event", "fast stream: proxy CPU per event", "µs", d=1)
    if "memory" in res.runs:
        side("memory", "rss_before_mb", "memory: proxy RSS idle (fresh, warmed)", "MB", d=1)
        side("memory", "rss_open_mb", "memory: proxy RSS with 500 open streams", "MB", d=1)
        side("memory", "kb_per_stream", "memory: RSS per open stream", "KB", TARGETS["rss"], d=1)
        t = TARGETS["rss"]
        a = res.median("memory", "addon", "kb_per_stream")
        b = res.median("memory", "bare", "kb_per_stream")
        checks.append(
            (t.label, str(t), f"{fmt(a, 1)} KB (bare {fmt(b, 1)} KB, ours {fmt(a - b, 1)} KB)", verdict(t.check(a)))
        )
    if res.writer:
        w = res.writer
        rows.append(["SQLite writer alone: rows/s sustained", "", fmt(w["rows_per_s"], 0), "", str(TARGETS["writer"])])
        rows.append(["SQLite writer: put() cost per row", "", f"{fmt(w['put_us'])} µs", "", ""])
        if "metrics_loop_ns" in w:
            loop = f"{fmt(w['metrics_loop_ns'], 0)} ns ({fmt(w['metrics_busy_ns'], 0)} ns with the observer busy)"
            rows.append(["metrics + request log: event-loop cost per request", "", loop, "", "< 1 µs"])
            thread = f"{fmt(w['metrics_thread_us'], 1)} µs"
            rows.append(["metrics: observer-thread CPU per request", "", thread, "", ""])
        rows.append(["SQLite writer: rows dropped (sustained run)", "", fmt(w["dropped"], 0), "", "0"])
        rows.append(
            [
                f"SQLite writer: burst of {w['burst_rows']:,.0f} rows, peak queue depth",
                "",
                fmt(w["burst_peak_depth"], 0),
                "",
                "",
            ]
        )
        rows.append(
            [
                f"SQLite writer: burst of {w['burst_rows']:,.0f} rows, drained in",
                "",
                f"{fmt(w['burst_drain_ms'], 0)} ms",
                "",
                "",
            ]
        )
        t = TARGETS["writer"]
        checks.append((t.label, str(t), fmt(w["rows_per_s"], 0), verdict(t.check(w["rows_per_s"]))))
    t = TARGETS["report"]
    if res.report is not None:
        for k, v in res.report.items():
            shown = f"{v:.3f} s" if k.endswith("_s") else fmt(v, 1)
            rows.append([f"report: {k}", "", shown, "", str(t) if k in report_views(res.report) else ""])
        for k, v in report_views(res.report).items():
            checks.append((f"{t.label}: {k}", str(t), f"{v:.3f} s", verdict(t.check(v))))
    else:
        rows.append(["report: summary and --by day", "", "skipped", "", str(t)])
        checks.append((t.label, str(t), "not measured", f"n/a ({res.report_note})"))
    return rows, checks


def render_md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def render_text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GB RAM"
    versions = []
    for pkg in ("mitmproxy", "genai-prices", "sqlite-utils"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
    import sqlite3

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}; {', '.join(versions)}"
    )


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "metrion_addon"], cwd=ROOT, capture_output=True, text=True
        )
        return rev.stdout.strip() + (" (metrion_addon/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def render_profiles(res: Results) -> str:
    if not res.profiles:
        return res.profile_note or "Not profiled (run without --no-profile, with py-spy installed)."
    parts = []
    titles = {"json": "non-streaming, concurrency 16", "fast": "fast 2,006-event stream, concurrency 1"}
    for load, p in res.profiles.items():
        threads = ", ".join(f"{t} {v:.0f}%" for t, v in p["threads"])
        parts.append(
            f"**Addon proxy under the {titles[load]} load**: {p['samples']} py-spy samples (idle excluded) by "
            f"thread: {threads}. On the event loop (MainThread, where every hook runs), "
            f"{p['ours_pct']:.1f}% of the samples are inside metrion_addon code (inclusive).\n"
        )
        parts.append(
            render_md_table(
                ["metrion_addon function, event loop (inclusive)", "% of loop samples"],
                [[f"`{f}`", f"{v:.1f}"] for f, v in p["funcs"]],
            )
        )
        parts.append("")
        parts.append(
            render_md_table(
                ["event loop: library of the leaf frame (self time)", "% of loop samples"],
                [[a, f"{v:.1f}"] for a, v in p["areas"]],
            )
        )
        parts.append("")
    return "\n".join(parts)


def write_markdown(path: Path, res: Results, plan: Plan, args: argparse.Namespace, elapsed: float) -> None:
    header = ["measurement", "bare mitmdump", "mitmdump + addon", "addon/bare", "target"]
    rows, checks = build_table(res)
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER) :]
    if not notes:
        notes = NOTES_MARKER + "\n\n## Analysis\n\n(none yet)\n"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    errors = {name: res.errors(name) for name in res.runs}
    text = f"""# Benchmarks

Generated by `python3 scripts/bench.py{" --quick" if args.quick else ""}` on {now}, commit {git_rev()},
in {elapsed:.0f} s.

Machine: {machine()}.

Method: the fake upstream (`scripts/bench_upstream.py`), a bare `mitmdump` and
`mitmdump -s metrion_addon/mitm_script.py` (both `--mode reverse:... --set connection_strategy=lazy
--set flow_detail=0`) run as separate processes on loopback; the load comes from a fourth process (asyncio,
HTTP/1.1 keep-alive). Each measurement alternates between the two proxies, {plan.rounds} rounds (memory:
{plan.mem_rounds}, fresh proxies each round); absolute figures are medians over rounds, addon/bare is the median
of the per-round ratios. Non-streaming: {plan.json_seconds:g} s per concurrency per proxy per round after
{plan.json_warm:g} s warm-up. Slow stream: 26 events 50 ms apart, {plan.slow_conc} concurrent x
{plan.slow_per_conn} per round.
Fast stream: 2,006 events sent back to back, one at a time for {plan.fast_seconds:g} s. "Proxy CPU" is user+system time
of the proxy process (from /proc) divided by the requests (or events) it served. Errors (non-200 or broken responses)
per measurement: {json.dumps(errors)}.

## Results

{render_md_table(header, rows)}

## Targets

{render_md_table(["target", "goal", "measured", "verdict"], [list(c) for c in checks])}

## Profile of the addon proxy (py-spy)

{render_profiles(res)}

{notes}"""
    path.write_text(text)


# --- main -----------------------------------------------------------------------------------------------------


def bootstrap() -> None:
    """From a fresh clone: without the project importable here, set up .venv and re-run there."""
    try:
        import mitmproxy  # noqa: F401

        import metrion_addon.store  # noqa: F401
    except ImportError:
        venv_py = ROOT / ".venv" / "bin" / "python"
        if Path(sys.executable).resolve() == venv_py.resolve() and venv_py.exists():
            raise SystemExit("the project is not importable even in .venv: pip install -e '.[bench]'") from None
        say("metrion-bench: the project is not installed for this Python; setting up .venv (scripts/_venv.sh)")
        subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/_venv.sh" && ensure_venv'], check=True)
        # py-spy is optional (profiling); a failure to get it is not fatal
        subprocess.run([str(venv_py), "-m", "pip", "install", "--quiet", "py-spy"], check=False)
        os.execv(str(venv_py), [str(venv_py), str(Path(__file__).resolve()), *sys.argv[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (2 rounds, short windows)")
    ap.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the markdown (default: BENCHMARKS.md for a full run, none for --quick)",
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of the addon proxy")
    ap.add_argument("--no-report", action="store_true", help="skip timing the report over synthetic rows")
    ap.add_argument("--rounds", type=int, default=None, help="override the number of alternating rounds")
    ap.add_argument(
        "--bare-buffered",
        action="store_true",
        help="run the bare mitmdump with its defaults (buffers every response, SSE too) instead of "
        "--set stream_large_bodies=1",
    )
    ap.add_argument(
        "--only",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})",
    )
    args = ap.parse_args()
    bootstrap()
    sys.path.insert(0, str(ROOT))
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan.rounds = args.rounds
    phases = {p.strip() for p in args.only.split(",") if p.strip()}
    if unknown := phases - set(PHASES):
        raise SystemExit(f"unknown phase(s) for --only: {', '.join(sorted(unknown))}")
    if args.no_profile:
        phases.discard("profile")
    if args.no_report:
        phases.discard("report")
    output = args.output if args.output is not None else (None if args.quick else ROOT / "BENCHMARKS.md")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 500 streams: ~1,000 sockets in a proxy
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    res = Results()
    t_begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="metrion-bench-") as tmpdir:
        tmp = Path(tmpdir)
        cluster: Cluster | None = None
        try:
            say(f"metrion-bench: {'quick' if args.quick else 'full'} run; machine: {machine()}")
            cluster = Cluster(tmp, args.bare_buffered)
            say(f"upstream :{cluster.upstream.port}, bare mitmdump :{cluster.bare.port}, addon :{cluster.addon.port}")
            asyncio.run(run_proxies(cluster, plan, res, phases, tmp))
            cluster.close()
            cluster = None
            if "writer" in phases:
                say(f"SQLite writer alone: {plan.writer_rows:,} rows sustained, then a burst of {plan.writer_burst:,}")
                res.writer = measure_writer(tmp, plan.writer_rows, plan.writer_burst)
            if "report" not in phases:
                res.report_note = "skipped (--no-report / --only)"
            else:
                say(f"report: summary and --by day over {plan.report_rows:,} synthetic rows (scripts/bench_report.py)")
                res.report, res.report_note = measure_report(plan.report_rows, timeout=600)
                if res.report_note:
                    say(res.report_note)
                elif plan.report_rows != 1_000_000:
                    res.report_note = f"over {plan.report_rows:,} rows (--quick), not 1,000,000"
        except KeyboardInterrupt:
            say("interrupted: stopping every process started")
            raise SystemExit(130) from None
        except Exception:
            if cluster is not None:
                for srv in cluster.servers:
                    if srv.proc.poll() is not None:
                        say(f"{srv.name} exited with {srv.proc.returncode}; its log ends:")
                        say(srv.log.read_text(errors="replace")[-4000:])
            raise
        finally:
            if cluster is not None:
                cluster.close()
    elapsed = time.monotonic() - t_begin
    header = ["measurement", "bare", "addon", "addon/bare", "target"]
    rows, checks = build_table(res)
    say("\n" + render_text_table(header, rows))
    say("\n" + render_text_table(["target", "goal", "measured", "verdict"], [list(c) for c in checks]))
    for load, p in res.profiles.items():
        say(
            f"\nprofile ({load}): threads {p['threads']}; {p['ours_pct']:.1f}% of event-loop samples in "
            "metrion_addon; top: " + ", ".join(f"{f} {v:.1f}%" for f, v in p["funcs"][:6])
        )
    if output is not None:
        write_markdown(output, res, plan, args, elapsed)
        say(f"\nwrote {output} ({elapsed:.0f} s)")
    else:
        say(f"\n({elapsed:.0f} s; quick run: no file written, pass --output to write one)")


if __name__ == "__main__":
    main()
