"""What is measured without a proxy: the SQLite writer alone, and the report over synthetic rows."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib.procs import ROOT

REPORT_SCRIPT = ROOT / "scripts" / "bench_report.py"
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


def measure_hooks(tmp: Path, n: int) -> dict[str, float]:
    """The addon's own hooks, called in-process with mitmproxy's test flows (no sockets, no other addons):
    median µs per request of each, for a small non-streaming request answered with JSON."""
    import statistics

    from mitmproxy.test import taddons, tflow, tutils

    from benchlib.procs import TOKEN
    from metrion_addon.addon import Metrion

    cfg = tmp / "hooks.yaml"
    cfg.write_text(f"database: {tmp / 'hooks.db'}\naccounts:\n  - name: bench\n    tokens: [{TOKEN}]\n"
                   "    anthropic_api_key: bench-fake-upstream-key\n")  # fmt: skip
    body = b'{"model":"claude-sonnet-5-5","max_tokens":256,"messages":[{"role":"user","content":"hi"}]}'
    answer = json.dumps({"id": "msg_1", "type": "message", "model": "claude-sonnet-5-5", "stop_reason": "end_turn",
                         "usage": {"input_tokens": 25, "output_tokens": 12}}).encode()  # fmt: skip
    hooks = ("requestheaders", "request", "responseheaders", "response")
    times: dict[str, list[float]] = {h: [] for h in hooks}
    addon = Metrion()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, metrion_config=str(cfg))
        headers = ((b"x-api-key", TOKEN.encode()), (b"content-type", b"application/json"))
        for _ in range(n):
            flow = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/v1/messages", content=body, headers=headers))
            for hook in hooks:
                if hook == "responseheaders":
                    flow.response = tutils.tresp(content=answer, headers=((b"content-type", b"application/json"),))
                t = time.perf_counter()
                getattr(addon, hook)(flow)
                times[hook].append(time.perf_counter() - t)
            time.sleep(0.0002)  # one request at a time, as at concurrency 1: the writer thread drains in between
        addon.done()
    return {h: statistics.median(v) * 1e6 for h, v in times.items()}
