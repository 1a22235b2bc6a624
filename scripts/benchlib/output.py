"""The tables: the results side by side (direct, bare, lean, full), the targets with a verdict each, the
profiles; as text for the terminal and as BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchlib.offline import report_views
from benchlib.procs import ROOT, TARGETS, TITLES
from benchlib.results import RATIO_TARGETS, REAL_CONCURRENCY, REAL_SIZES, REPORT, RSS_PER_STREAM, WRITER, Results

NOTES_MARKER = "<!-- notes: everything below this line is hand-written and kept when the script rewrites the file -->"

# run -> [(metric, label, unit, digits)]
METRICS: dict[str, list[tuple[str, str, str, int]]] = {
    **{
        f"json_c{c}": [
            ("p50", f"non-streaming c={c}: p50 latency", "ms", 2),
            ("p90", f"non-streaming c={c}: p90 latency", "ms", 2),
            ("p99", f"non-streaming c={c}: p99 latency", "ms", 2),
            ("rps", f"non-streaming c={c}: requests/s", "", 0),
            ("cpu_us", f"non-streaming c={c}: proxy CPU per request", "µs", 0),
        ]
        for c in (1, 16, 64)
    },
    "slow": [
        ("ttfb_p50", "stream, events 50 ms apart: time to first byte p50", "ms", 2),
        ("ttfb_p90", "stream, events 50 ms apart: time to first byte p90", "ms", 2),
        ("total_p50", "stream, events 50 ms apart: total time p50", "ms", 1),
    ],
    "fast": [
        ("events_per_s", "fast 2,006-event stream: events/s", "", 0),
        ("mb_per_s", "fast 2,006-event stream: MB/s", "", 2),
        ("stream_ms", "fast 2,006-event stream: time per stream p50", "ms", 1),
        ("cpu_us_per_event", "fast stream: proxy CPU per event", "µs", 1),
    ],
    **{
        f"real_{s}_c{c}": [
            ("p50", f"real-size {s.upper()}B c={c}: p50 latency", "ms", 2),
            ("ttfb_p50", f"real-size {s.upper()}B c={c}: time to first byte p50", "ms", 2),
            ("rps", f"real-size {s.upper()}B c={c}: requests/s", "", 1),
            ("cpu_us", f"real-size {s.upper()}B c={c}: proxy CPU per request", "µs", 0),
        ]
        for s in REAL_SIZES
        for c in REAL_CONCURRENCY
    },
    "memory": [
        ("rss_before_mb", "memory: proxy RSS idle (fresh, warmed)", "MB", 1),
        ("rss_open_mb", "memory: proxy RSS with 500 open streams", "MB", 1),
        ("kb_per_stream", "memory: RSS per open stream", "KB", 1),
    ],
}


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None or v != v:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[ok]


RESULT_HEADER = ["measurement", *(TITLES[t] for t in TARGETS), "lean/bare", "full/bare"]
TARGET_HEADER = ["target (ratio to bare mitmdump)", "lean: goal", "lean", "verdict", "full: goal", "full", "verdict"]
OTHER_HEADER = ["other target", "goal", "measured", "verdict"]


def results_rows(res: Results) -> list[list[str]]:
    rows = []
    for run, metrics in METRICS.items():
        if run not in res.runs:
            continue
        for key, label, unit, d in metrics:
            cells = [f"{fmt(res.median(run, t, key), d)} {unit}".strip() for t in TARGETS]
            rows.append([label, *cells, fmt(res.ratio(run, key, "lean"), 3), fmt(res.ratio(run, key, "full"), 3)])
    return rows


def target_rows(res: Results) -> list[list[str]]:
    rows = []
    for t in RATIO_TARGETS:
        if t.run not in res.runs:
            continue
        lean, full = res.ratio(t.run, t.key, "lean"), res.ratio(t.run, t.key, "full")
        rows.append([t.label, str(t.lean), fmt(lean, 3), verdict(t.lean.check(lean)),
                     str(t.full), fmt(full, 3), verdict(t.full.check(full))])  # fmt: skip
    return rows


def other_rows(res: Results) -> tuple[list[list[str]], list[list[str]]]:
    """Single-valued measurements (writer, report) and the other targets with their verdicts."""
    rows: list[list[str]] = []
    checks: list[list[str]] = []
    if "memory" in res.runs:
        bare = res.median("memory", "bare", "kb_per_stream")
        for t in ("lean", "full"):
            v = res.median("memory", t, "kb_per_stream")
            checks.append([f"RSS per open stream, {t}", str(RSS_PER_STREAM),
                           f"{fmt(v, 1)} KB (bare {fmt(bare, 1)} KB)", verdict(RSS_PER_STREAM.check(v))])  # fmt: skip
    if w := res.writer:
        rows += [
            ["SQLite writer alone: rows/s sustained", fmt(w["rows_per_s"], 0)],
            ["SQLite writer: put() cost per row", f"{fmt(w['put_us'])} µs"],
            *(
                [
                    [
                        "metrics + request log: event-loop cost per request (goal < 1 µs)",
                        f"{fmt(w['metrics_loop_ns'], 0)} ns ({fmt(w['metrics_busy_ns'], 0)} ns with the observer busy)",
                    ],
                    ["metrics: observer-thread CPU per request", f"{fmt(w['metrics_thread_us'], 1)} µs"],
                ]  # fmt: skip
                if "metrics_loop_ns" in w
                else []
            ),
            ["SQLite writer: rows dropped (sustained run)", fmt(w["dropped"], 0)],
            [f"SQLite writer: burst of {w['burst_rows']:,.0f} rows, peak queue depth", fmt(w["burst_peak_depth"], 0)],
            [f"SQLite writer: burst of {w['burst_rows']:,.0f} rows, drained in", f"{fmt(w['burst_drain_ms'], 0)} ms"],
        ]
        rps = w["rows_per_s"]
        checks.append(["SQLite writer rows/s", str(WRITER), fmt(rps, 0), verdict(WRITER.check(rps))])
    if h := res.hooks:
        each = ", ".join(f"{k} {v:.0f}" for k, v in h.items())
        rows.append([f"addon hooks in-process, µs per request (median): {each}", f"{sum(h.values()):.0f} µs in all"])
    if res.report is not None:
        rows += [[f"report: {k}", f"{v:.3f} s" if k.endswith("_s") else fmt(v, 1)] for k, v in res.report.items()]
        for k, v in report_views(res.report).items():
            checks.append([f"report time per view: {k}", str(REPORT), f"{v:.3f} s", verdict(REPORT.check(v))])
    else:
        checks.append(["report time per view", str(REPORT), "not measured", f"n/a ({res.report_note})"])
    return rows, checks


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header: list[str], rows: list[list[str]]) -> str:
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


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "metrion_addon"], cwd=ROOT, capture_output=True, text=True
        )
        return rev.stdout.strip() + (" (metrion_addon/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


PROFILE_TITLES = {
    "json": "small non-streaming requests, concurrency 16",
    "fast": "fast 2,006-event stream, concurrency 1",
    "real_2m": "real-size 2 MB requests with a 206-event stream, concurrency 1",
}


def render_profiles(res: Results) -> str:
    if not res.profiles:
        return res.profile_note or "Not profiled (run without --no-profile, with py-spy installed)."
    parts = []
    for load, title in PROFILE_TITLES.items():
        got = {t: p for (ld, t), p in res.profiles.items() if ld == load}
        if not got:
            continue
        parts.append(f"### Under {title}\n")
        for t, p in got.items():
            threads = ", ".join(f"{n} {v:.0f}%" for n, v in p["threads"])
            shares = (f"{p['ours_pct']:.1f}% inside metrion_addon, {p['dispatch_pct']:.1f}% in mitmproxy's hook "
                      "dispatch and its other addons (inclusive)")  # fmt: skip
            parts.append(f"- {TITLES[t]}: {p['samples']} samples (idle excluded); threads: {threads}; "
                         f"of the event loop's samples {shares}")  # fmt: skip
        parts.append("")
        parts.append(_side_by_side("event loop, self time by library", got, "areas"))
        parts.append(_side_by_side("event loop, hottest functions (self time)", got, "leaves"))
        ours = {t: p for t, p in got.items() if p["funcs"]}
        if ours:
            parts.append(_side_by_side("metrion_addon functions on the event loop (inclusive)", ours, "funcs"))
    return "\n".join(parts)


def _side_by_side(title: str, got: dict[str, dict[str, Any]], key: str) -> str:
    cols = list(got)
    n = max(len(got[t][key]) for t in cols)
    rows = []
    for i in range(n):
        row = []
        for t in cols:
            items = got[t][key]
            row.append(f"`{items[i][0]}` {items[i][1]:.1f}%" if i < len(items) else "")
        rows.append(row)
    return md_table([f"{title}: {TITLES[t]}" if j == 0 else TITLES[t] for j, t in enumerate(cols)], rows) + "\n"


def write_markdown(path: Path, res: Results, method: str, command: str, elapsed: float) -> None:
    import datetime as dt

    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER) :]
    if not notes:
        notes = NOTES_MARKER + "\n\n## Analysis\n\n(none yet)\n"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    others, other_checks = other_rows(res)
    text = f"""# Benchmarks

Generated by `{command}` on {now}, commit {git_rev()}, in {elapsed:.0f} s.

Machine: {machine()}. {res.load_note}

{method}

## Targets (issue 12): ratios to bare mitmdump

{md_table(TARGET_HEADER, target_rows(res))}

{md_table(OTHER_HEADER, other_checks)}

## Results

{md_table(RESULT_HEADER, results_rows(res))}

{md_table(["measurement", "value"], others) if others else ""}

## Profiles (py-spy)

{render_profiles(res)}

{notes}"""
    path.write_text(text)


def print_tables(res: Results, say: Any) -> None:
    say("\n" + text_table(RESULT_HEADER, results_rows(res)))
    say("\n" + text_table(TARGET_HEADER, target_rows(res)))
    others, checks = other_rows(res)
    if others:
        say("\n" + text_table(["measurement", "value"], others))
    say("\n" + text_table(OTHER_HEADER, checks))
    for (load, t), p in res.profiles.items():
        say(f"\nprofile {load}/{t}: loop samples {p['ours_pct']:.1f}% in metrion_addon, {p['dispatch_pct']:.1f}% in "
            "hook dispatch; hottest: "
            + ", ".join(f"{f} {v:.1f}%" for f, v in p["leaves"][:5]))  # fmt: skip
