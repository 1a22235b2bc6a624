"""The writer into PostgreSQL vs SQLite: rows per second from one proxy's writer thread, and bytes per row.

    .venv/bin/python scripts/bench_pg.py [--rows 200000]

Starts a throwaway PostgreSQL on loopback (tests/pgserver.py: Debian's PostgreSQL, as the tests use it), puts
synthetic rows shaped like real ones on each store's queue as fast as it can, and times until the writer has
committed them all. Not part of the test suite; prints a small table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metrion_addon.pgstore import PgStore  # noqa: E402
from metrion_addon.record import iso_ms  # noqa: E402
from metrion_addon.store import Store  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    if reason := unavailable_reason():
        raise SystemExit(f"bench_pg: {reason}")
    pg = start_pg()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite_rate = measure(Store(Path(tmp) / "m.db", max_backlog=10**9), args.rows)
            pg_rate = measure(PgStore(pg.url, Path(tmp) / "spool.db"), args.rows)
            import psycopg

            with psycopg.connect(pg.url) as conn:
                size = conn.execute("SELECT pg_total_relation_size('requests')").fetchone()[0]  # type: ignore[index]
            sqlite_size = (Path(tmp) / "m.db").stat().st_size
            report_s = {db: time_report(db) for db in (str(Path(tmp) / "m.db"), pg.url)}
    finally:
        pg.close()
    print(f"{'store':<12}{'rows/s':>12}{'bytes/row':>12}{'report (s)':>12}")
    sqlite_report, pg_report = report_s.values()
    print(f"{'SQLite':<12}{sqlite_rate:>12,.0f}{sqlite_size / args.rows:>12,.0f}{sqlite_report:>12.2f}")
    print(f"{'PostgreSQL':<12}{pg_rate:>12,.0f}{size / args.rows:>12,.0f}{pg_report:>12.2f}")
    print("report: `metrion report --json` (summary) over all rows; over PostgreSQL it copies them to SQLite first")


def time_report(db: str) -> float:
    import contextlib
    import io

    from metrion_addon.report import main as report_main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert report_main(["--db", db, "--json", "--utc"]) == 0
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
