"""Targets, plans and results: per-round figures per target, their medians and their ratios to bare mitmdump."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Goal:
    op: str  # "<=" or ">="
    limit: float
    unit: str = ""

    def check(self, value: float | None) -> bool | None:
        if value is None or value != value:
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}{self.unit}"


@dataclass(frozen=True)
class RatioTarget:
    """A ratio to bare mitmdump that each metrion path must reach (issue 12's table)."""

    label: str
    run: str  # Results.runs key
    key: str  # metric in that run
    lean: Goal
    full: Goal


def _p50(run: str, what: str) -> RatioTarget:
    return RatioTarget(f"{what}: p50 latency", run, "p50", Goal("<=", 0.90), Goal("<=", 1.05))


def _ttfb(run: str, what: str) -> RatioTarget:
    return RatioTarget(f"{what}: time to first byte p50", run, "ttfb_p50", Goal("<=", 0.95), Goal("<=", 1.02))


def _rps(run: str, what: str) -> RatioTarget:
    return RatioTarget(f"{what}: throughput", run, "rps", Goal(">=", 1.15), Goal(">=", 0.98))


REAL_SIZES = {"400k": 400_000, "2m": 2_000_000}
RATIO_TARGETS = [
    _p50("json_c1", "non-streaming c=1"),
    _ttfb("slow", "stream (events 50 ms apart)"),
    _rps("json_c64", "non-streaming c=64"),
    RatioTarget("fast stream: events/s", "fast", "events_per_s", Goal(">=", 1.05), Goal(">=", 0.97)),
    RatioTarget("idle RSS", "memory", "rss_before_mb", Goal("<=", 1.0), Goal("<=", 1.05)),
]
for _size in REAL_SIZES:
    RATIO_TARGETS += [
        _p50(f"real_{_size}_c1", f"real-size {_size.upper()}B c=1"),
        _ttfb(f"real_{_size}_c1", f"real-size {_size.upper()}B c=1"),
        _rps(f"real_{_size}_c16", f"real-size {_size.upper()}B c=16"),
    ]
RSS_PER_STREAM = Goal("<=", 50, " KB")
WRITER = Goal(">=", 20_000)
REPORT = Goal("<=", 1.0, " s")


@dataclass
class Plan:
    rounds: int
    json_warm: float
    json_seconds: float
    slow_conc: int
    slow_per_conn: int
    fast_warm: float
    fast_seconds: float
    real_rounds: int
    real_warm: float
    real_seconds: float
    mem_rounds: int
    mem_streams: int
    writer_rows: int
    writer_burst: int
    report_rows: int
    profile_seconds: float


FULL = Plan(5, 0.5, 3.0, 8, 2, 0.3, 2.0, 3, 1.0, 3.0, 2, 500, 200_000, 20_000, 1_000_000, 6.0)
QUICK = Plan(2, 0.3, 1.0, 4, 1, 0.2, 0.8, 1, 0.6, 1.5, 1, 500, 50_000, 10_000, 100_000, 3.0)
CONCURRENCY = (1, 16, 64)
REAL_CONCURRENCY = (1, 16)
PHASES = ("json", "slow", "fast", "real", "memory", "profile", "writer", "report")


@dataclass
class Results:
    # run -> target -> list of per-round metric dicts
    runs: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    writer: dict[str, float] = field(default_factory=dict)
    hooks: dict[str, float] = field(default_factory=dict)  # hook -> µs per request, in-process
    report: dict[str, float] | None = None
    report_note: str = ""
    profiles: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (load, target) -> analysis
    profile_note: str = ""
    load_note: str = ""

    def add(self, run: str, target: str, metrics: dict[str, float]) -> None:
        self.runs.setdefault(run, {}).setdefault(target, []).append(metrics)

    def median(self, run: str, target: str, key: str) -> float:
        vals = [m[key] for m in self.runs.get(run, {}).get(target, []) if m.get(key) == m.get(key)]
        return statistics.median(vals) if vals else float("nan")

    def ratio(self, run: str, key: str, target: str) -> float:
        """Median over rounds of target/bare (each round measures both, one after the other)."""
        per = self.runs.get(run, {})
        pairs = zip(per.get("bare", []), per.get(target, []), strict=False)
        vals = [t[key] / b[key] for b, t in pairs if b.get(key) and b[key] == b[key] and t.get(key) == t.get(key)]
        return statistics.median(vals) if vals else float("nan")

    def errors(self, run: str) -> int:
        return int(sum(m.get("errors", 0) for per in self.runs.get(run, {}).values() for m in per))
