"""How much metering costs, and how fast the lean `metrion-proxy` is, measured against a bare mitmdump.

    python3 scripts/bench.py            # full run, ~11 minutes, writes BENCHMARKS.md
    python3 scripts/bench.py --quick    # ~3 minute smoke run, prints only (unless --output)

It starts, on loopback only, the project's fake upstream (scripts/bench_upstream.py, its own process) and
three proxies in front of it: a bare mitmdump (no addon), `metrion-proxy` (the lean master) and
`metrion-proxy --full` (mitmdump -s the shim), and drives them, and the upstream directly (the floor), from
this process with an asyncio HTTP/1.1 client on keep-alive connections. Every measurement runs against every
target once per round, in an order that rotates with the round, so machine noise hits all of them; the tables
show the median over rounds and the median of the per-round ratios to bare mitmdump. It also times the SQLite
writer alone and the report (scripts/bench_report.py), and, if py-spy is installed (the `bench` extra),
samples the proxies under load. Not part of the test suite. The parts live in scripts/benchlib/.

From a fresh clone, if the running Python lacks the project, the script sets up .venv (scripts/_venv.sh) and
re-runs itself there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.offline import measure_hooks, measure_report, measure_writer  # noqa: E402
from benchlib.output import load_average, machine, print_tables, write_markdown  # noqa: E402
from benchlib.procs import ROOT, Cluster  # noqa: E402
from benchlib.results import FULL, PHASES, QUICK, Plan, Results  # noqa: E402
from benchlib.rounds import run_all, say  # noqa: E402


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


def method(plan: Plan, errors: dict[str, int]) -> str:
    return f"""Method: the fake upstream (`scripts/bench_upstream.py`) and three proxies in front of it run as separate
processes on loopback: a bare `mitmdump --mode reverse:... --set connection_strategy=lazy --set flow_detail=0
--set stream_large_bodies=1` (the streaming floor: with its defaults it buffers every response), `metrion-proxy`
(the lean master) and `metrion-proxy --full` (mitmdump -s the shim), both as users run them. "direct" is the
client talking to the fake upstream with no proxy. The load comes from one more process (asyncio, HTTP/1.1
keep-alive). Each measurement runs against every target once per round, the order rotating with the round;
{plan.rounds} rounds (real-size: {plan.real_rounds}; memory: {plan.mem_rounds}, fresh proxies each round).
Absolute figures are medians over rounds, ratios are medians of the per-round ratios to bare mitmdump.
Non-streaming: {plan.json_seconds:g} s per concurrency per target per round after {plan.json_warm:g} s warm-up.
Slow stream: 26 events 50 ms apart, {plan.slow_conc} concurrent x {plan.slow_per_conn} per round. Fast stream:
2,006 events back to back, one stream at a time for {plan.fast_seconds:g} s. Real-size: Claude-Code-shaped request
bodies (`scripts/benchlib/bodies.py`: system prompt, 30 tools with JSON schemas, long history; `model` first) of
400 KB and 2 MB, each answered with a 206-event stream, {plan.real_seconds:g} s per concurrency per target per
round. "Proxy CPU" is user+system time of the proxy process (from /proc) per request (or event) served. Errors
(non-200 or broken responses) per measurement: {json.dumps(errors)}."""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a ~3 minute smoke run (fewer rounds, short windows)")
    ap.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the markdown (default: BENCHMARKS.md for a full run, none for --quick)",
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles of the proxies")
    ap.add_argument("--no-report", action="store_true", help="skip timing the report over synthetic rows")
    ap.add_argument("--rounds", type=int, default=None, help="override the number of alternating rounds")
    ap.add_argument("--bare-buffered", action="store_true",
                    help="run the bare mitmdump with its defaults (buffers every response, SSE too) instead of "
                    "--set stream_large_bodies=1")  # fmt: skip
    ap.add_argument("--only", default=",".join(PHASES),
                    help=f"comma-separated phases to run (default: all of {','.join(PHASES)})")  # fmt: skip
    ap.add_argument("--load-note", default="", help="a sentence on the machine's load, written into the markdown")
    args = ap.parse_args()
    bootstrap()
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
    load_before = load_average()
    t_begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="metrion-bench-") as tmpdir:
        tmp = Path(tmpdir)
        cluster: Cluster | None = None
        try:
            say(f"metrion-bench: {'quick' if args.quick else 'full'} run; machine: {machine()}")
            cluster = Cluster(tmp, args.bare_buffered)
            say("ports: " + ", ".join(f"{n} :{s.port}" for n, s in cluster.targets.items()))
            asyncio.run(run_all(cluster, plan, res, phases, tmp))
            cluster.close()
            cluster = None
            if "writer" in phases:
                say(f"SQLite writer alone: {plan.writer_rows:,} rows sustained, then a burst of {plan.writer_burst:,}")
                res.writer = measure_writer(tmp, plan.writer_rows, plan.writer_burst)
                say("the addon's hooks in-process (mitmproxy's test flows), 3,000 requests")
                res.hooks = measure_hooks(tmp, 3000)
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
                say(cluster.dump_dead())
            raise
        finally:
            if cluster is not None:
                cluster.close()
    elapsed = time.monotonic() - t_begin
    res.load_note = (f"Load average (1, 5, 15 min) at the start: {load_before}; at the end: {load_average()}. "
                     + args.load_note).strip()  # fmt: skip
    print_tables(res, say)
    if output is not None:
        errors = {name: res.errors(name) for name in res.runs}
        command = "python3 scripts/bench.py" + (" --quick" if args.quick else "")
        write_markdown(output, res, method(plan, errors), command, elapsed)
        say(f"\nwrote {output} ({elapsed:.0f} s)")
    else:
        say(f"\n({elapsed:.0f} s; quick run: no file written, pass --output to write one)")


if __name__ == "__main__":
    main()
