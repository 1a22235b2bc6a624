"""The benchmark's upstream: the project's fake Anthropic API in its own process, with the benchmark scenarios.

Run by scripts/bench.py (python scripts/bench_upstream.py --port N). It binds loopback only, registers the
scenarios the benchmark selects with `x-fake-scenario`, and clears the fake's per-request records every
second so a long run does not grow without bound.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import FakeUpstream, Scenario, run_until_interrupted  # noqa: E402

SLOW_DELTAS = 20  # slow stream: 26 events, 50 ms apart, ~1.25 s
FAST_DELTAS = 2000  # fast stream: 2,006 events, no delay
REAL_DELTAS = 200  # a real-size request's answer: 206 events, no delay
HOLD_DELTAS = 120  # held-open stream for the memory phase: 1 event/s for ~2 minutes (the client hangs up first)


def scenarios() -> dict[str, Scenario]:
    return {
        "json": Scenario(),
        "slow": Scenario(stream=True, event_delay=0.05, delta_count=SLOW_DELTAS, text="x" * SLOW_DELTAS),
        "fast": Scenario(stream=True, delta_count=FAST_DELTAS, text="y" * FAST_DELTAS),
        "real": Scenario(stream=True, delta_count=REAL_DELTAS, text="w" * REAL_DELTAS),
        "hold": Scenario(stream=True, event_delay=1.0, delta_count=HOLD_DELTAS, text="z" * HOLD_DELTAS),
    }


def _janitor(fake: FakeUpstream) -> None:
    while True:
        time.sleep(1.0)
        with fake._lock:
            fake.received.clear()
            fake.order.clear()
        fake.sent.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    fake = FakeUpstream(host="127.0.0.1", port=args.port)
    for name, sc in scenarios().items():
        fake.add(name, sc)
    fake.start()
    threading.Thread(target=_janitor, args=(fake,), daemon=True, name="janitor").start()
    run_until_interrupted(fake)


if __name__ == "__main__":
    main()
