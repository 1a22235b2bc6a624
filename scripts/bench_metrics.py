"""What the metrics and request logs cost per request (issue 14).

The event loop pays one `SimpleQueue.put` per finished request (`ops.Service.observe`); everything else runs
on the observer thread. This measures both sides on a typical row:

    .venv/bin/python scripts/bench_metrics.py [--n 200000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metrion_addon.metrics import Labels, Metrics  # noqa: E402
from metrion_addon.ops import Observer, Service, request_line  # noqa: E402

ROW = {
    "ts": "2026-12-01T10:00:00.000Z",
    "account": "acme",
    "user": "alice",
    "mode": "managed",
    "method": "POST",
    "path": "/v1/messages",
    "model": "claude-sonnet-5-5",
    "stream": 1,
    "status": 200,
    "request_id": "req_0123456789",
    "input_tokens": 1234,
    "output_tokens": 567,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 4000,
    "cost_usd": 0.0123,
    "latency_ms": 812.5,
    "ttft_ms": 301.2,
    "completed": 1,
    "error": None,
    "retry_count": 0,
}


def per_call_ns(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn(ROW)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def measure(n: int = 200_000) -> dict[str, float]:
    """ns per request on the event loop (alone, and with the observer busy), µs per row on the observer."""
    logging.getLogger("metrion.requests").disabled = True  # the log line's formatting is measured separately
    try:
        # Event loop side: the call addon.py makes per request, with the observer thread not consuming.
        service = Service()
        service.observer = Observer(None, None, "off", 0)  # not started: the queue only grows
        loop_ns = per_call_ns(service.observe, n)

        # The same call while the observer thread updates the metrics (the GIL is shared: the realistic case).
        metrics = Metrics(Labels(["acme"], ["alice"], lambda m: True))
        service.observer = Observer(metrics, None, "off", 0).start()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            service.observe(ROW)
        busy_ns = (time.perf_counter_ns() - t0) / n
        service.close()

        # Observer thread side, per row.
        metrics_us = per_call_ns(metrics.observe, n // 4) / 1000
        line_us = per_call_ns(request_line, n // 4) / 1000
    finally:
        logging.getLogger("metrion.requests").disabled = False
    return {"loop_ns": loop_ns, "busy_ns": busy_ns, "metrics_us": metrics_us, "line_us": line_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    m = measure(ap.parse_args().n)
    print(f"event loop, per request: {m['loop_ns']:.0f} ns (SimpleQueue.put via ops.Service.observe)")
    print(f"event loop, per request, observer thread busy with metrics: {m['busy_ns']:.0f} ns")
    print(f"observer thread, per request: metrics {m['metrics_us']:.1f} us, text log line {m['line_us']:.1f} us")


if __name__ == "__main__":
    main()
