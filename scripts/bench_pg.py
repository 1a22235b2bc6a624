"""PostgreSQL vs SQLite as the store: the writer, the report per view, and the proxy's latency.

    .venv/bin/python scripts/bench_pg.py [--rows 200000] [--report-rows 1000000] [--only writer,report,proxy]

Starts a throwaway PostgreSQL on loopback (tests/pgserver.py: Debian's PostgreSQL as the tests use it, with
fsync off) and measures, for each store:

- **writer**: rows per second from one proxy's writer thread (synthetic rows shaped like real ones put on the
  queue as fast as it can, timed until all are committed), and bytes per row (table + indexes);
- **report**: each main view of `metrion report` over `--report-rows` rows (scripts/bench_report.py's rows,
  written to SQLite by the store code and copied to PostgreSQL with `metrion db copy`, then ANALYZE): the best
  of 3 in-process runs of `--json` (the queries and the data; drawing a terminal table of thousands of rows
  takes longer than the queries) after a warm-up, wall clock (the PostgreSQL work is the server's, so the
  client's CPU says little); `html` writes the page;
- **proxy**: p50 latency of small non-streaming requests at concurrency 1 through a real `metrion proxy` in front
  of the benchmark's fake upstream (scripts/bench_upstream.py), one proxy on each store, in alternating rounds.

Not part of the test suite; prints tables (markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from metrion_addon.pgstore import PgStore  # noqa: E402
from metrion_addon.record import iso_ms  # noqa: E402
from metrion_addon.store import Store  # noqa: E402
from tests.netutil import free_port, stop_process, wait_port  # noqa: E402
from tests.pgserver import start_pg, unavailable_reason  # noqa: E402


def synthetic(i: int) -> dict[str, object]:
    return {
        "ts": iso_ms(1_795_000_000 + i / 100), "account": f"team-{i % 7}", "user": f"user-{i % 40}", "mode": "managed",
        "method": "POST", "path": "/v1/messages", "model": "claude-sonnet-5-5", "stream": i % 2, "status": 200,
        "request_id": f"req_{i:016d}", "message_id": f"msg_{i:016d}", "input_tokens": 1200 + i % 500,
        "output_tokens": 300, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5000,
        "cost_usd": 0.0123, "cost_input_usd": 0.0036, "cost_output_usd": 0.0045, "cost_cache_write_usd": 0.0,
        "cost_cache_read_usd": 0.0015, "cost_tools_usd": 0.0, "price_source": "genai-prices@0.0.40:claude-sonnet-5",
        "latency_ms": 1234.5, "ttft_ms": 345.6, "completed": 1, "stop_reason": "end_turn",
        "client": "claude-cli/2.1.197", "session_id": "5f0c6d1e-0000-4000-8000-000000000000",
        "usage_json": '{"input_tokens":1200,"output_tokens":300,"cache_read_input_tokens":5000}',
    }  # fmt: skip


def measure(store: Store | PgStore, rows: int) -> float:
    store.start()
    t0 = time.perf_counter()
    for i in range(rows):
        store.put(synthetic(i))
    store.close(timeout=600)
    return rows / (time.perf_counter() - t0)


def bench_writer(url: str, tmp: Path, rows: int) -> None:
    import psycopg

    sqlite_rate = measure(Store(tmp / "w.db", max_backlog=10**9), rows)
    pg_rate = measure(PgStore(url, tmp / "spool.db"), rows)
    with psycopg.connect(url) as conn:
        size = conn.execute("SELECT pg_total_relation_size('requests')").fetchone()[0]  # type: ignore[index]
        conn.execute("DROP TABLE requests, _metrion_migrations")
    sqlite_size = (tmp / "w.db").stat().st_size
    print(f"\n## writer ({rows:,} rows)\n\n| store | rows/s | bytes/row |\n|---|---:|---:|")
    print(f"| SQLite | {sqlite_rate:,.0f} | {sqlite_size / rows:,.0f} |")
    print(f"| PostgreSQL | {pg_rate:,.0f} | {size / rows:,.0f} |")


REPORT_VIEWS: dict[str, list[str]] = {
    "summary": ["summary"],
    "--by model": ["--by", "model"],
    "--by account,user": ["--by", "account,user"],
    "--by day": ["--by", "day"],
    "--by hour": ["--by", "hour"],
    "--by client": ["--by", "client"],
    "top": ["top"],
    "errors": ["errors"],
    "chart --period week": ["chart", "--period", "week"],
    "budgets": ["budgets", "-c", "{cfg}"],
    "--account team-1 --by user": ["--account", "team-1", "--by", "user"],
    "--model claude-opus --since 2026-11-01": ["--model", "claude-opus", "--since", "2026-11-01", "--utc"],
    "html": ["html", "-o", "{tmp}/report.html"],
}


def bench_report(url: str, tmp: Path, rows: int) -> None:
    import psycopg
    from bench_report import time_report, write_rows

    from metrion_addon.cli import main as cli_main

    db = tmp / "report.db"
    t = time.perf_counter()
    write_rows(db, rows)
    written = time.perf_counter() - t
    t = time.perf_counter()
    assert cli_main(["db", "copy", str(db), url, "--quiet"]) == 0
    copied = time.perf_counter() - t
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE requests")
    cfg = tmp / "budgets.yaml"
    cfg.write_text(f"database: {db}\naccounts:\n" + "".join(
        f"  - name: team-{i}\n    tokens: [sk-metrion-bench-{i:016d}]\n    budget: {{daily: 50, monthly: 1000}}\n"
        "    user_budget: {daily: 5}\n" for i in range(5)))  # fmt: skip
    print(f"\n## report ({rows:,} rows; written to SQLite in {written:.0f} s, copied to PostgreSQL in {copied:.0f} s)")
    print("\n`--json`, best of 3 runs after a warm-up, wall clock, seconds\n")
    print("| view | SQLite | PostgreSQL |\n|---|---:|---:|")
    for name, argv in REPORT_VIEWS.items():
        argv = [a.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp)) for a in argv]
        argv += [] if name == "html" else ["--json"]  # the queries and the data, not rich's table drawing
        times = [time_report([*argv, "--db", source])[0] for source in (str(db), url)]
        print(f"| `{name}` | {times[0]:.2f} | {times[1]:.2f} |", flush=True)


def start_proxy(tmp: Path, name: str, upstream: int, database: str) -> tuple[subprocess.Popen[bytes], int]:
    cfg = tmp / f"proxy-{name}.yaml"
    cfg.write_text(f"upstream: http://127.0.0.1:{upstream}\ndatabase: {database}\naccounts:\n  - name: bench\n"
                   "    tokens: [sk-metrion-bench-0000000000000000]\n    anthropic_api_key: bench-fake-upstream-key\n"
                   "    allow_passthrough: false\n")  # fmt: skip
    port = free_port()
    argv = [sys.executable, "-m", "metrion_addon.cli", "proxy", "-c", str(cfg), "--listen-port", str(port),
            "--", "--set", f"confdir={tmp / 'mitmproxy-conf'}"]  # fmt: skip
    with (tmp / f"proxy-{name}.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp)
    wait_port(port, proc)
    return proc, port


def bench_proxy(url: str, tmp: Path, seconds: float, rounds: int) -> None:
    from benchlib.client import build_request, loop_requests, pct

    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench_upstream.py"), "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    procs = [upstream]
    try:
        wait_port(upstream_port, upstream)
        proxies = {}
        for name, database in (("SQLite", str(tmp / "proxy.db")), ("PostgreSQL", url)):
            proc, port = start_proxy(tmp, name, upstream_port, database)
            procs.append(proc)
            proxies[name] = port
        raw = build_request("json", False)
        latencies: dict[str, list[float]] = {name: [] for name in proxies}
        errors = dict.fromkeys(proxies, 0)
        for rnd in range(rounds):  # alternate, so that neither always runs first on a machine others load
            for name in list(proxies)[rnd % 2 :] + list(proxies)[: rnd % 2]:
                samples, errs, t_start, t_stop = asyncio.run(loop_requests(proxies[name], raw, 1, 1.0, seconds))
                latencies[name] += [(end - start) * 1000 for start, _, end, _ in samples if t_start <= start < t_stop]
                errors[name] += errs
        print(f"\n## proxy latency (small non-streaming requests, c=1, {rounds} rounds of {seconds:.0f} s each)")
        print("\n| store | requests | p50 (ms) | p90 (ms) | p99 (ms) | errors |\n|---|---:|---:|---:|---:|---:|")
        for name, values in latencies.items():
            print(f"| {name} | {len(values):,} | {pct(values, 50):.2f} | {pct(values, 90):.2f} | "
                  f"{pct(values, 99):.2f} | {errors[name]} |")  # fmt: skip
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:  # the report part starts from an empty store
            conn.execute("DROP TABLE IF EXISTS requests, _metrion_migrations")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows for the writer (default 200,000)")
    ap.add_argument("--report-rows", type=int, default=1_000_000, help="rows for the report (default 1,000,000)")
    ap.add_argument("--only", default="writer,report,proxy", help="comma-separated parts (writer, report, proxy)")
    ap.add_argument("--seconds", type=float, default=10.0, help="proxy: seconds per round (default 10)")
    ap.add_argument("--rounds", type=int, default=4, help="proxy: rounds per store (default 4)")
    args = ap.parse_args()
    if reason := unavailable_reason():
        raise SystemExit(f"bench_pg: {reason}")
    parts = set(args.only.split(","))
    pg = start_pg()
    try:
        with tempfile.TemporaryDirectory(prefix="metrion-bench-pg-") as tmp:
            if "writer" in parts:
                bench_writer(pg.url, Path(tmp), args.rows)
            if "proxy" in parts:
                bench_proxy(pg.url, Path(tmp), args.seconds, args.rounds)
            if "report" in parts:
                bench_report(pg.url, Path(tmp), args.report_rows)
    finally:
        pg.close()


if __name__ == "__main__":
    main()
