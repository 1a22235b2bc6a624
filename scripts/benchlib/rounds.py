"""The rounds: every measurement runs against every target once per round, in an order that rotates with the
round, so that machine noise (other processes on two shared cores) falls on all of them alike."""

from __future__ import annotations

from pathlib import Path

from benchlib.bodies import claude_code_body
from benchlib.client import build_request, loop_requests
from benchlib.procs import PROXIES, Cluster
from benchlib.profile import profile_under, pyspy_bin
from benchlib.results import CONCURRENCY, REAL_CONCURRENCY, REAL_SIZES, Plan, Results
from benchlib.workloads import (
    measure_fast_stream,
    measure_json,
    measure_memory,
    measure_real,
    measure_slow_stream,
)

PROFILED = ("bare", "lean", "full")


def say(msg: str) -> None:
    print(msg, flush=True)


async def run_all(cluster: Cluster, plan: Plan, res: Results, phases: set[str], tmp: Path) -> None:
    bodies = {size: claude_code_body(n) for size, n in REAL_SIZES.items()}
    for s in cluster.targets.values():  # warm-up: every target, every path
        await loop_requests(s.port, build_request("json", False), 8, 0.0, 0.5)
        await loop_requests(s.port, build_request("fast", True), 1, 0.0, 0.3)
        await loop_requests(s.port, build_request("real", True, bodies["400k"]), 2, 0.0, 0.3)

    for rnd in range(plan.rounds if phases & {"json", "slow", "fast"} else 0):
        say(f"round {rnd + 1}/{plan.rounds}")
        for conc in CONCURRENCY if "json" in phases else ():
            for s in cluster.order(rnd):
                m = await measure_json(s.port, s.pid, conc, plan.json_warm, plan.json_seconds)
                res.add(f"json_c{conc}", s.name, m)
                say(f"  json c={conc:<3} {s.name:<6} p50 {m['p50']:7.2f} ms  p99 {m['p99']:7.2f} ms  "
                    f"{m['rps']:7.0f} rps  {m['cpu_us']:5.0f} µs CPU/req")  # fmt: skip
        for s in cluster.order(rnd) if "slow" in phases else ():
            m = await measure_slow_stream(s.port, plan.slow_conc, plan.slow_per_conn)
            res.add("slow", s.name, m)
            say(f"  slow stream  {s.name:<6} ttfb {m['ttfb_p50']:6.2f} ms  total {m['total_p50']:7.1f} ms")
        for s in cluster.order(rnd) if "fast" in phases else ():
            m = await measure_fast_stream(s.port, s.pid, plan.fast_warm, plan.fast_seconds)
            res.add("fast", s.name, m)
            say(f"  fast stream  {s.name:<6} {m['events_per_s']:8.0f} events/s  {m['stream_ms']:6.1f} ms/stream")

    for rnd in range(plan.real_rounds if "real" in phases else 0):
        say(f"real-size round {rnd + 1}/{plan.real_rounds}")
        for size, body in bodies.items():
            for conc in REAL_CONCURRENCY:
                for s in cluster.order(rnd):
                    m = await measure_real(s.port, s.pid, body, conc, plan.real_warm, plan.real_seconds)
                    res.add(f"real_{size}_c{conc}", s.name, m)
                    say(f"  real {size:<4} c={conc:<2} {s.name:<6} p50 {m['p50']:7.2f} ms  ttfb "
                        f"{m['ttfb_p50']:6.2f} ms  {m['rps']:6.1f} rps  {m['cpu_us']:6.0f} µs CPU/req")  # fmt: skip

    for rnd in range(plan.mem_rounds if "memory" in phases else 0):
        say(f"memory round {rnd + 1}/{plan.mem_rounds}: fresh proxies, {plan.mem_streams} open streams each")
        cluster.restart_proxies()
        for s in cluster.order(rnd, PROXIES):
            assert s.pid is not None
            m = await measure_memory(s.port, s.pid, plan.mem_streams)
            res.add("memory", s.name, m)
            say(f"  {s.name:<6} RSS {m['rss_before_mb']:.1f} -> {m['rss_open_mb']:.1f} MB, "
                f"{m['kb_per_stream']:.1f} KB/stream ({m['open']:.0f} open)")  # fmt: skip

    if "profile" in phases:
        await profile_all(cluster, plan, res, tmp, bodies["2m"])


async def profile_all(cluster: Cluster, plan: Plan, res: Results, tmp: Path, big: bytes) -> None:
    if pyspy_bin() is None:
        res.profile_note = "py-spy not installed (pip install -e '.[bench]'): no profile"
        say(res.profile_note)
        return
    loads = {
        "json": (build_request("json", False), 16),
        "fast": (build_request("fast", True), 1),
        "real_2m": (build_request("real", True, big), 1),
    }
    for load, (raw, conc) in loads.items():
        for name in PROFILED:
            s = cluster.targets[name]
            assert s.pid is not None
            say(f"profiling {name} under the {load} load ({plan.profile_seconds:.0f} s, py-spy)")
            try:
                out = tmp / f"profile-{load}-{name}.txt"
                res.profiles[(load, name)] = await profile_under(s.pid, s.port, raw, conc, plan.profile_seconds, out)
            except Exception as e:  # noqa: BLE001 - a profile is a bonus; the numbers stand without it
                res.profile_note = f"profiling failed: {e}"
                say(res.profile_note)
                return
