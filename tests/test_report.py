"""metrion-report: exact numbers for every view on a fixture database written by the project's store code."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import pytest

from metrion_addon import report, store
from metrion_addon.report import cli as report_cli
from tests.conftest import MANAGED_TOKEN, start_proxy, stop_proxy
from tests.fake_upstream import FakeUpstream, Scenario

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SONNET, HAIKU = "claude-sonnet-5-5", "claude-haiku-5-5"


def _row(ts: str, account: str, user: str | None, model: str, **kw: Any) -> dict[str, Any]:
    """A row as the proxy writes it; costs are given per part and summed (sonnet $3/$15, haiku $1/$5 per MTok,
    cache writes 1.25x (5m) or 2x (1h) input, reads 0.1x input)."""
    row: dict[str, Any] = {"ts": ts, "account": account, "user": user, "model": model, "status": 200}
    row |= {"method": "POST", "path": "/v1/messages", "client": "claude-cli/2.1.3", "session_id": "s1"}
    row |= {"latency_ms": 1000.0, "request_id": f"req_{ts}"}
    row |= kw
    parts = [f"cost_{k}_usd" for k in ("input", "output", "cache_write", "cache_read", "tools")]
    if row.get("price_source") == "unknown":
        return row
    for p in parts:
        row.setdefault(p, 0.0)
    row["cost_usd"] = sum(row[p] for p in parts)
    row.setdefault("price_source", "override:test")
    return row


def _tokens(inp: int, out: int, cw5: int = 0, cw1: int = 0, cr: int = 0) -> dict[str, int]:
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cache_creation_input_tokens": cw5 + cw1,
        "cache_creation_5m_input_tokens": cw5,
        "cache_creation_1h_input_tokens": cw1,
        "cache_read_input_tokens": cr,
        "web_search_requests": 0,
    }


ROWS = [
    # R1 plain request
    _row(
        "2026-11-01T10:00:00.000Z",
        "alpha",
        "ann",
        SONNET,
        **_tokens(1000, 2000),
        cost_input_usd=0.003,
        cost_output_usd=0.03,
        latency_ms=1200.0,
    ),  # fmt: skip
    # R2 writes the cache (5m): costs 0.0075 more than plain input would have
    _row(
        "2026-11-01T23:30:00.000Z",
        "alpha",
        "ann",
        SONNET,
        **_tokens(10, 500, cw5=10000),
        cost_input_usd=0.00003,
        cost_output_usd=0.0075,
        cost_cache_write_usd=0.0375,
    ),  # fmt: skip
    # R3 reads it: saves 100000 * (3 - 0.3) / 1e6 = 0.27
    _row(
        "2026-11-02T08:15:00.000Z",
        "alpha",
        "bob",
        SONNET,
        **_tokens(20, 1000, cr=100000),
        client="python-sdk",
        session_id="s2",
        cost_input_usd=0.00006,
        cost_output_usd=0.015,
        cost_cache_read_usd=0.03,
    ),  # fmt: skip
    # R4 haiku, 1h write and a read: saves 0.003 - 0.0002 - 0.002 = 0.0008
    _row(
        "2026-11-02T12:00:00.000Z",
        "beta",
        "cat",
        HAIKU,
        **_tokens(500, 100, cw1=1000, cr=2000),
        cost_input_usd=0.0005,
        cost_output_usd=0.0005,
        cost_cache_write_usd=0.002,
        cost_cache_read_usd=0.0002,
    ),  # fmt: skip
    # R5 unpriced model: tokens known, cost unknown
    _row("2026-11-03T00:00:00.000Z", "beta", "cat", "mystery-model", **_tokens(100, 100), price_source="unknown"),
    # R6 upstream overloaded: no usage, nothing billed
    _row(
        "2026-11-03T09:00:00.000Z", "beta", None, HAIKU, status=529, error="overloaded_error", price_source="no_usage"
    ),
    # R7 client went away mid-stream, partial usage billed
    _row(
        "2026-11-03T10:00:00.000Z",
        "alpha",
        "ann",
        SONNET,
        **_tokens(100, 50),
        error="client_disconnect",
        cost_input_usd=0.0003,
        cost_output_usd=0.00075,
    ),  # fmt: skip
    # R8 count_tokens: free
    _row(
        "2026-11-03T11:00:00.000Z",
        "alpha",
        "bob",
        SONNET,
        path="/v1/messages/count_tokens",
        price_source="free:count_tokens",
    ),  # fmt: skip
    # R9 two web searches ($10 per 1000)
    _row(
        "2026-11-04T12:00:00.000Z",
        "alpha",
        "ann",
        SONNET,
        **(_tokens(100, 100) | {"web_search_requests": 2}),
        cost_input_usd=0.0003,
        cost_output_usd=0.0015,
        cost_tools_usd=0.02,
    ),  # fmt: skip
    # R10 no uncached input: the input rate comes from the read rate (0.1x): saves 0.003 - 0.0003 = 0.0027
    _row(
        "2026-11-04T12:00:00.500Z",
        "beta",
        "cat",
        SONNET,
        **_tokens(0, 10, cr=1000),
        cost_output_usd=0.00015,
        cost_cache_read_usd=0.0003,
    ),  # fmt: skip
    # R11 no input, only writes (5m + 1h): rate from the write cost: "saves" 0.006 - 0.00975 = -0.00375
    _row(
        "2026-11-06T13:00:00.000Z",
        "beta",
        "dan",
        SONNET,
        **_tokens(0, 10, cw5=1000, cw1=1000),
        cost_output_usd=0.00015,
        cost_cache_write_usd=0.00975,
    ),  # fmt: skip
]
TOTAL_COST = 0.15949


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "metrion.db"
    s = store.Store(path)
    s.start()
    for r in ROWS:
        s.put(r)
    s.close()
    assert s.written == len(ROWS)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = report.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys: pytest.CaptureFixture[str], db: Path, *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, *argv, "--db", str(db), "--utc", "--json")
    assert code == 0, err
    return json.loads(out)


# --- views: exact numbers ------------------------------------------------------------------------


def test_summary_numbers(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    doc = as_json(capsys, db)
    assert doc["view"] == "summary" and doc["total"] is None
    assert doc["rows"] == [
        {
            "requests": 11,
            "calls": 11,  # no retries in this data
            "retried_calls": 0,
            "errors": 2,
            "unpriced_requests": 1,
            "input_tokens": 1830,
            "output_tokens": 3870,
            "cache_creation_input_tokens": 13000,
            "cache_creation_5m_input_tokens": 11000,
            "cache_creation_1h_input_tokens": 2000,
            "cache_read_input_tokens": 103000,
            "web_search_requests": 2,
            "cost_usd": TOTAL_COST,
            "cost_input_usd": 0.00419,
            "cost_output_usd": 0.05555,
            "cost_cache_write_usd": 0.04925,
            "cost_cache_read_usd": 0.0305,
            "cost_tools_usd": 0.02,
            "cache_hit_ratio": round(103000 / (1830 + 13000 + 103000), 6),
            "cost_uncached_usd": 0.42174,
            "cache_saved_usd": 0.26225,  # -0.0075 + 0.27 + 0.0008 + 0.0027 - 0.00375
            "first_ts": "2026-11-01T10:00:00.000Z",
            "last_ts": "2026-11-06T13:00:00.000Z",
            "batch_results": 0,
            "batch_cost_usd": 0.0,
        }
    ]


def test_summary_terminal_shows_tables_chart_and_unpriced_flag(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    code, out, _ = run(capsys, "--db", str(db), "--utc")
    assert code == 0
    assert "$0.1595" in out  # total cost, with decimals enough to be seen
    assert "$0.2622" in out and "$0.4217" in out  # saved, and cost without caching
    assert "103,000" in out and "87.4%" in out  # cache read tokens, cache hit ratio
    assert "1 unpriced request" in out
    assert "Cost per day" in out and "2026-11-05" in out  # the chart, with the empty day shown
    assert "█" in out
    code, out, _ = run(capsys, "--db", str(db), "--utc", "--limit", "2")
    assert "Cost per day (the last 2 of 6)" in out and "2026-11-04" not in out


def test_by_day_utc(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    doc = as_json(capsys, db, "--by", "day")
    keys = ("day", "requests", "errors", "unpriced_requests", "input_tokens", "output_tokens")
    keys += ("cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd")
    got = [tuple(r[k] for k in keys) for r in doc["rows"]]
    assert got == [
        ("2026-11-01", 2, 0, 0, 1010, 2500, 10000, 0, 0.07803),
        ("2026-11-02", 2, 0, 0, 520, 1100, 1000, 102000, 0.04826),
        ("2026-11-03", 4, 2, 1, 200, 150, 0, 0, 0.00105),
        ("2026-11-04", 2, 0, 0, 100, 110, 0, 1000, 0.02225),
        ("2026-11-06", 1, 0, 0, 0, 10, 2000, 0, 0.0099),
    ]
    assert [r["cost_share"] for r in doc["rows"]] == [
        round(c / TOTAL_COST, 6) for c in (0.07803, 0.04826, 0.00105, 0.02225, 0.0099)
    ]
    assert doc["total"] == {
        "requests": 11,
        "errors": 2,
        "unpriced_requests": 1,
        "input_tokens": 1830,
        "output_tokens": 3870,
        "cache_creation_input_tokens": 13000,
        "cache_read_input_tokens": 103000,
        "cost_usd": TOTAL_COST,
        "cost_share": 1.0,
    }


def test_by_day_in_local_time(capsys: pytest.CaptureFixture[str], db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # EST (UTC-5) after 2026-11-01 06:00Z
    time.tzset()
    try:
        code, out, _ = run(capsys, "--by", "day", "--db", str(db), "--json")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert code == 0
    rows = json.loads(out)["rows"]
    # R5 (2026-11-03T00:00Z) is the evening of Nov 2 in New York.
    assert [(r["day"], r["requests"]) for r in rows] == [
        ("2026-11-01", 2),
        ("2026-11-02", 3),
        ("2026-11-03", 3),
        ("2026-11-04", 2),
        ("2026-11-06", 1),
    ]


def test_by_account_and_user(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    doc = as_json(capsys, db, "--by", "account,user")
    got = [
        (r["account"], r["user"], r["requests"], r["errors"], r["unpriced_requests"], r["cost_usd"])
        for r in doc["rows"]
    ]
    assert got == [
        ("alpha", "ann", 4, 1, 0, 0.10088),
        ("alpha", "bob", 2, 0, 0, 0.04506),
        ("beta", "dan", 1, 0, 0, 0.0099),
        ("beta", "cat", 3, 0, 1, 0.00365),
        ("beta", None, 1, 1, 0, 0.0),
    ]
    assert doc["by"] == ["account", "user"]
    assert doc["total"]["cost_usd"] == TOTAL_COST


@pytest.mark.parametrize(
    ("dim", "expected"),
    [
        ("account", [("alpha", 6, 0.14594), ("beta", 5, 0.01355)]),
        ("model", [(SONNET, 8, 0.15629), (HAIKU, 2, 0.0032), ("mystery-model", 1, 0.0)]),
        ("client", [("claude-cli/2.1.3", 10, 0.11443), ("python-sdk", 1, 0.04506)]),
        ("session", [("s1", 10, 0.11443), ("s2", 1, 0.04506)]),
        ("month", [("2026-11", 11, TOTAL_COST)]),
        ("week", [("2026-10-26", 2, 0.07803), ("2026-11-02", 9, 0.08146)]),  # weeks start on Monday
    ],
)
def test_by_each_dimension(
    capsys: pytest.CaptureFixture[str], db: Path, dim: str, expected: list[tuple[Any, ...]]
) -> None:
    rows = as_json(capsys, db, "--by", dim)["rows"]
    assert [(r[dim], r["requests"], r["cost_usd"]) for r in rows] == expected


def test_by_hour(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    rows = as_json(capsys, db, "--by", "hour")["rows"]
    assert [(r["hour"], r["requests"]) for r in rows][-3:] == [
        ("2026-11-03 11:00", 1),
        ("2026-11-04 12:00", 2),
        ("2026-11-06 13:00", 1),
    ]
    assert len(rows) == 10


def test_top(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    doc = as_json(capsys, db, "top", "--limit", "3")
    assert [(r["ts"], r["account"], r["user"], r["model"], r["cost_usd"]) for r in doc["rows"]] == [
        ("2026-11-02T08:15:00.000Z", "alpha", "bob", SONNET, 0.04506),
        ("2026-11-01T23:30:00.000Z", "alpha", "ann", SONNET, 0.04503),
        ("2026-11-01T10:00:00.000Z", "alpha", "ann", SONNET, 0.033),
    ]
    assert doc["rows"][2]["latency_ms"] == 1200.0 and doc["rows"][0]["cache_read_input_tokens"] == 100000
    assert doc["total"] == {
        "input_tokens": 1030,
        "output_tokens": 3500,
        "cache_creation_input_tokens": 10000,
        "cache_read_input_tokens": 100000,
        "cost_usd": 0.12309,
        "requests": 3,
    }
    assert len(as_json(capsys, db, "top")["rows"]) == 10  # default 10; the unpriced one is never ranked


def test_errors(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    doc = as_json(capsys, db, "errors")
    assert doc["rows"] == [
        {
            "error": "client_disconnect",
            "status": 200,
            "batch": 0,
            "requests": 1,
            "unpriced_requests": 0,
            "input_tokens": 100,
            "output_tokens": 50,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cost_usd": 0.00105,
            "calls": 1,
            "retries": 0,
        },
        {
            "error": "overloaded_error",
            "status": 529,
            "batch": 0,
            "requests": 1,
            "unpriced_requests": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cost_usd": 0.0,
            "calls": 1,
            "retries": 0,
        },
    ]
    assert doc["total"]["requests"] == 2 and doc["total"]["cost_usd"] == 0.00105


def test_chart_includes_empty_periods(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    doc = as_json(capsys, db, "chart")
    assert [(r["period"], r["requests"], r["cost_usd"]) for r in doc["rows"]] == [
        ("2026-11-01", 2, 0.07803),
        ("2026-11-02", 2, 0.04826),
        ("2026-11-03", 4, 0.00105),
        ("2026-11-04", 2, 0.02225),
        ("2026-11-05", 0, 0.0),
        ("2026-11-06", 1, 0.0099),
    ]
    assert [r["period"] for r in as_json(capsys, db, "chart", "--limit", "2")["rows"]] == ["2026-11-05", "2026-11-06"]
    code, out, _ = run(capsys, "chart", "--db", str(db), "--utc")
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("2026-")}
    assert lines["2026-11-01"].count("█") == 40  # the biggest day gets the full bar
    assert lines["2026-11-02"].count("█") == 24  # 0.04826 / 0.07803 * 40 = 24.7
    assert "█" not in lines["2026-11-05"]


def test_csv_output(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    code, out, _ = run(capsys, "--by", "model", "--db", str(db), "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["model", *report.BY_MEASURES]
    assert [(r["model"], r["requests"], r["cost_usd"], r["unpriced_requests"]) for r in rows] == [
        (SONNET, "8", "0.15629", "0"),
        (HAIKU, "2", "0.0032", "0"),
        ("mystery-model", "1", "0.0", "1"),
    ]
    code, out, _ = run(capsys, "--db", str(db), "--csv")
    (summary,) = list(csv.DictReader(io.StringIO(out)))
    assert list(summary) == report.SUMMARY_FIELDS
    assert summary["cost_usd"] == "0.15949" and summary["cache_saved_usd"] == "0.26225"
    for view, fields in (
        ("top", report.TOP_FIELDS),
        ("chart", ["period", "requests", "unpriced_requests", "cost_usd"]),
    ):
        code, out, _ = run(capsys, view, "--db", str(db), "--csv")
        assert out.splitlines()[0] == ",".join(fields)


# --- filters at their boundaries -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "requests"),
    [
        (["--since", "2026-11-01T23:30:00Z"], 10),  # since is inclusive
        (["--since", "2026-11-01T23:30:00.001Z"], 9),
        (["--until", "2026-11-04T12:00:00.500Z"], 9),  # until is exclusive
        (["--until", "2026-11-04T12:00:00.501Z"], 10),
        (["--since", "2026-11-02", "--until", "2026-11-03"], 6),  # a date as --until includes that day
        (["--since", "2026-11-03T00:00", "--until", "2026-11-03T00:00:00.001"], 1),  # naive = --utc here
        (["--since", "2026-11-03T01:00+01:00", "--until", "2026-11-03"], 4),  # explicit offset
        (["--account", "beta"], 5),
        (["--account", "beta", "--account", "alpha"], 11),
        (["--user", "ann"], 4),
        (["--model", "claude-h"], 2),
        (["--model", "claude-sonnet"], 8),
        (["--model", "mystery"], 1),
        (["--model", "claude-sonnet-5-5x"], 0),
        (["--account", "alpha", "--user", "bob", "--since", "2026-11-03"], 1),
    ],
)
def test_filters(capsys: pytest.CaptureFixture[str], db: Path, args: list[str], requests: int) -> None:
    assert as_json(capsys, db, *args)["rows"][0]["requests"] == requests
    assert sum(r["requests"] for r in as_json(capsys, db, "--by", "day", *args)["rows"]) == requests


def test_filters_echoed_in_json(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    doc = as_json(capsys, db, "--since", "2026-11-02", "--until", "2026-11-02", "--model", "claude")
    assert doc["filters"] == {
        "since": "2026-11-02T00:00:00.000Z",
        "until": "2026-11-03T00:00:00.000Z",
        "account": [],
        "user": [],
        "model": ["claude"],
    }
    assert doc["timezone"] == "UTC"


def test_no_match_is_not_an_error(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    assert as_json(capsys, db, "--account", "nobody")["rows"][0]["cost_usd"] == 0.0
    assert as_json(capsys, db, "--by", "day", "--account", "nobody")["rows"] == []
    code, out, _ = run(capsys, "top", "--account", "nobody", "--db", str(db))
    assert code == 0 and "No requests match these filters." in out


NOW = datetime(2026, 11, 28, 13, 0, tzinfo=UTC)  # a Saturday


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("24h", False, "2026-11-27T13:00:00.000Z"),
        ("7d", True, "2026-11-21T13:00:00.000Z"),  # spans are points, the same for --until
        ("30m", False, "2026-11-28T12:30:00.000Z"),
        ("2w", False, "2026-11-14T13:00:00.000Z"),
        ("now", True, "2026-11-28T13:00:00.000Z"),
        ("today", False, "2026-11-28T00:00:00.000Z"),
        ("today", True, "2026-11-29T00:00:00.000Z"),
        ("yesterday", False, "2026-11-27T00:00:00.000Z"),
        ("this-week", False, "2026-11-23T00:00:00.000Z"),
        ("last-week", True, "2026-11-23T00:00:00.000Z"),
        ("this-month", False, "2026-11-01T00:00:00.000Z"),
        ("this-month", True, "2026-12-01T00:00:00.000Z"),
        ("last-month", False, "2026-10-01T00:00:00.000Z"),
        ("this-year", False, "2026-01-01T00:00:00.000Z"),
        ("2026-11-03", False, "2026-11-03T00:00:00.000Z"),
        ("2026-11-03", True, "2026-11-04T00:00:00.000Z"),
        ("2026-11-03T04:05:06.789", True, "2026-11-03T04:05:06.789Z"),
        ("2026-11-03 04:05", False, "2026-11-03T04:05:00.000Z"),
    ],
)
def test_parse_when_utc(text: str, end: bool, expected: str) -> None:
    assert report.iso_z(report.parse_when(text, end=end, now=NOW, utc=True)) == expected


def test_parse_when_local_and_bad(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert report.iso_z(report.parse_when("today", end=False, now=NOW, utc=False)) == "2026-11-28T05:00:00.000Z"
        assert (
            report.iso_z(report.parse_when("2026-07-01", end=False, now=NOW, utc=False)) == "2026-07-01T04:00:00.000Z"
        )
        # Hourly periods across the end of DST stay contiguous.
        periods = report.periods_between(
            datetime(2026, 11, 1, 3, tzinfo=UTC), datetime(2026, 11, 1, 9, tzinfo=UTC), "hour", utc=False
        )
        assert all(a[2] == b[1] for a, b in zip(periods, periods[1:], strict=False))
        assert periods[0][1] == "2026-11-01T03:00:00.000Z" and periods[-1][2] == "2026-11-01T10:00:00.000Z"
        assert ("2026-11-01 01:00", "2026-11-01T05:00:00.000Z", "2026-11-01T07:00:00.000Z") in periods  # 2 hours
        spring = report.periods_between(
            datetime(2026, 3, 8, 6, tzinfo=UTC), datetime(2026, 3, 8, 7, tzinfo=UTC), "hour", utc=False
        )
        assert [p[0] for p in spring] == ["2026-03-08 01:00", "2026-03-08 03:00"]  # 02:00 does not exist
        assert spring[0][2] == spring[1][1] == "2026-03-08T07:00:00.000Z"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    with pytest.raises(ValueError, match="cannot read 'last-tuesday'"):
        report.parse_when("last-tuesday", end=False, now=NOW, utc=True)


# --- formatting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "unpriced"),
        (0.0, "$0.00"),
        (0.000045, "$0.000045"),
        (0.0000001, "<$0.000001"),
        (0.04506, "$0.0451"),
        (1234.5678, "$1,234.57"),
        (-0.0075, "-$0.007500"),
    ],
)
def test_fmt_usd(value: float | None, text: str) -> None:
    assert report.fmt_usd(value) == text


def test_bar() -> None:
    assert report.bar(1, 1, width=4) == "████"
    assert report.bar(0.5, 1, width=4) == "██"
    assert report.bar(0.0001, 1, width=4) == "▏"  # tiny but not zero: still visible
    assert report.bar(0, 1) == "" and report.bar(1, 0) == ""


# --- the database: read-only, missing, empty, old --------------------------------------------------


def test_missing_db(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "--db", str(tmp_path / "nope.db"))
    assert code == report.EXIT_NO_DB == 3 and out == ""
    assert err.count("\n") == 1 and "no database at" in err and "nope.db" in err
    assert not (tmp_path / "nope.db").exists()  # never created


def test_empty_db(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store.migrate(tmp_path / "m.db")
    code, out, err = run(capsys, "--db", str(tmp_path / "m.db"), "--json")
    assert code == report.EXIT_EMPTY == 5 and out == ""
    assert err.count("\n") == 1 and "no requests recorded yet" in err


def test_old_schema_and_foreign_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as c:
        c.execute("CREATE TABLE _metrion_migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
        c.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts TEXT, account TEXT, cost_usd REAL)")
    c.close()
    code, _, err = run(capsys, "--db", str(old))
    assert code == report.EXIT_OLD_SCHEMA == 4
    assert err.count("\n") == 1 and "older metrion schema" in err and "cost_tools_usd" in err

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE things (x)")
    c.close()
    code, _, err = run(capsys, "--db", str(other))
    assert code == 3 and "not a metrion database" in err

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    code, _, err = run(capsys, "--db", str(junk))
    assert code == 3 and "cannot read" in err and err.count("\n") == 1


def test_reads_while_the_proxy_writes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "live.db"
    s = store.Store(path)
    s.start()
    s.put(ROWS[0])
    s.close()
    writer = store.connect(path)
    writer.execute("BEGIN IMMEDIATE")  # the proxy mid-batch, holding the write lock
    writer.execute("INSERT INTO requests (ts, cost_usd) VALUES ('2026-11-05T00:00:00.000Z', 1.0)")
    rows = as_json(capsys, path)["rows"]
    assert rows[0]["requests"] == 1  # the uncommitted row is not seen, and the report did not wait
    writer.execute("COMMIT")  # and the report never blocked the writer
    assert as_json(capsys, path)["rows"][0]["requests"] == 2
    writer.close()


def test_report_does_not_write(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    before = db.read_bytes()
    for view in ("summary", "top", "errors", "chart"):
        assert run(capsys, view, "--db", str(db))[0] == 0
    assert run(capsys, "--by", "account,day", "--db", str(db))[0] == 0
    assert db.read_bytes() == before


# --- arguments and config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "planet"], "unknown planet"),
        (["--by", "day,week"], "at most one time period"),
        (["top", "--by", "model"], "does not apply"),
        (["--since", "someday"], "cannot read 'someday'"),
        (["--limit", "0"], "at least 1"),
        (["--watch", "--json"], "cannot be combined"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], db: Path, args: list[str], message: str) -> None:
    code, out, err = run(capsys, *args, "--db", str(db))
    assert code == report.EXIT_USAGE == 2 and out == "" and message in err


def test_argparse_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["budgetz"]) == 2
    assert report.main(["--json", "--csv"]) == 2
    capsys.readouterr()


def test_db_from_config(
    capsys: pytest.CaptureFixture[str], db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "costs.db").write_bytes(db.read_bytes())
    config = tmp_path / "config.yaml"
    config.write_text(
        "database: data/costs.db\n"
        "accounts:\n"
        "  - name: alpha\n"
        f"    tokens: ['sha256:{'ab' * 32}']\n"
        "    anthropic_api_key: ${METRION_REPORT_TEST_UNSET}\n"  # the report needs no secrets
    )
    monkeypatch.delenv("METRION_REPORT_TEST_UNSET", raising=False)
    code, out, err = run(capsys, "--config", str(config), "--json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["requests"] == 11
    monkeypatch.chdir(tmp_path)  # ./config.yaml is used when present
    code, out, err = run(capsys, "--json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["requests"] == 11
    code, _, err = run(capsys, "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config error" in err
    monkeypatch.chdir(tmp_path / "data")  # no config here: ./metrion.db
    code, _, err = run(capsys)
    assert code == 3 and "metrion.db" in err


def test_watch_renders_then_stops_on_ctrl_c(
    capsys: pytest.CaptureFixture[str], db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report_cli.time, "sleep", stop)
    code, out, _ = run(capsys, "--watch", "--by", "account", "--db", str(db), "--utc")
    assert code == 0 and "Cost by account" in out and "$0.1459" in out and "Ctrl-C to stop" in out


def test_views_registry() -> None:
    assert list(report.VIEWS) == ["summary", "top", "errors", "chart", "budgets"]
    assert "budgets" not in report.DIMENSIONS


# --- the installed command and the script --------------------------------------------------------


def test_console_command_and_script(db: Path) -> None:
    cmd = subprocess.run(
        [str(BIN / "metrion-report"), "--by", "day", "--db", str(db), "--utc", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cmd.returncode == 0, cmd.stderr
    assert json.loads(cmd.stdout)["total"]["cost_usd"] == TOTAL_COST
    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), "--db", str(db), "--utc"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "120", "PATH": ""},
    )
    assert script.returncode == 0, script.stderr
    assert "$0.1595" in script.stdout and "Cost per day" in script.stdout
    missing = subprocess.run(
        [str(BIN / "metrion-report"), "--db", str(db.parent / "absent.db")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 3 and missing.stdout == "" and "no database at" in missing.stderr


# --- end to end: requests through a real proxy, then the command a newcomer runs ----------------------


def test_newcomer_flow_through_the_proxy(fake: FakeUpstream, tmp_path: Path) -> None:
    """A few requests through mitmdump with the addon, then `metrion-report` in the config's directory."""
    usage = {"input_tokens": 1200, "output_tokens": 300, "cache_creation_input_tokens": 0}
    fake.add("report-e2e", Scenario(usage=usage | {"cache_read_input_tokens": 50_000}, text="ok"))
    proxy = start_proxy(tmp_path, fake.url)
    try:
        for user in ("alice", "bob", "alice"):
            c = anthropic.Anthropic(
                base_url=proxy.url,
                api_key=MANAGED_TOKEN,
                max_retries=0,
                default_headers={"x-metrion-user": user, "x-fake-scenario": "report-e2e"},
            )
            c.messages.create(model=SONNET, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        rows = proxy.wait_rows("1", n=3)
    finally:
        stop_proxy(proxy)
    cost = round(sum(r["cost_usd"] for r in rows), 10)
    assert cost > 0 and all(r["price_source"] != "unknown" for r in rows)

    env = {"PATH": "", "COLUMNS": "120", "HOME": str(tmp_path)}  # no METRION_TEST_REAL_KEY: not needed to read
    cmd = [str(BIN / "metrion-report")]
    shown = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert report.fmt_usd(cost) in shown.stdout and "Cost per day" in shown.stdout and "█" in shown.stdout
    by_user = subprocess.run(
        [*cmd, "--by", "user", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    doc = json.loads(by_user.stdout)
    assert [(r["user"], r["requests"]) for r in doc["rows"]] == [("alice", 2), ("bob", 1)]
    assert doc["total"]["cost_usd"] == cost and doc["total"]["cache_read_input_tokens"] == 150_000
