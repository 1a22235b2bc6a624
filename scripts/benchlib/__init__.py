"""The benchmark behind `python3 scripts/bench.py`, one module per concern:

procs.py      the processes: fake upstream, the proxies under test, RSS and CPU readings from /proc
client.py     a minimal asyncio HTTP/1.1 keep-alive client and the request it sends
bodies.py     request bodies shaped like Claude Code's (system prompt, 30 tools, long history)
workloads.py  what is measured against one target: JSON, slow/fast streams, memory, real-size requests
offline.py    the SQLite writer alone, and the report over synthetic rows (scripts/bench_report.py)
profile.py    py-spy samples of a proxy under load -> where its event loop spends its time
results.py    targets, plans (full / quick), the per-round results and their ratios
rounds.py     the alternating rounds over every target
output.py     the tables: text for the terminal, BENCHMARKS.md
"""
