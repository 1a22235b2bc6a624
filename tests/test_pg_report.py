"""`metrion report` over PostgreSQL runs as SQL on the server: the same rows in SQLite and PostgreSQL give the
same output in every view, format and filter, in several time zones (period boundaries, DST changes), with
hostile labels, NULL and unpriced costs, and money sums that drift in float."""

from __future__ import annotations

import functools
import json
import operator
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from metrion_addon.report import main as report_main
from metrion_addon.report.html import render
from metrion_addon.report.html_data import collect
from metrion_addon.report.queries import Filters, Options
from metrion_addon.schema import iso_ms
from metrion_addon.store import Store
from tests.pgserver import PgServer, needs_pg, start_pg
from tests.test_report import HAIKU, ROWS, SONNET, _row, _tokens

pytestmark = needs_pg()

NOW = datetime.now(UTC).replace(microsecond=0)
HOSTILE = ["'; DROP TABLE requests; --", "<script>x</script>", "None", "Zoë", "zed", "Ärger", "a", "B", '"q"',
           "%s ?", "[user]", "😀", "(none)", " "]  # fmt: skip
# Period boundaries: UTC midnight, New York's midnight before and after its DST change (2026-11-01 06:00Z),
# Berlin's change (2026-10-25 01:00Z), Kolkata's midnight (18:30Z), a Monday, a month's end.
EDGES = ["2026-10-25T00:59:59.999Z", "2026-10-25T01:00:00.000Z", "2026-10-31T23:59:59.999Z",
         "2026-11-01T00:00:00.000Z", "2026-11-01T03:59:59.999Z", "2026-11-01T04:00:00.000Z",
         "2026-11-01T05:59:59.999Z", "2026-11-01T06:00:00.000Z", "2026-11-02T04:59:59.999Z",
         "2026-11-02T05:00:00.000Z", "2026-11-08T23:59:59.999Z", "2026-11-09T00:00:00.000Z",
         "2026-11-30T18:29:59.999Z", "2026-11-30T18:30:00.000Z", "2026-11-30T23:59:59.999Z",
         "2026-12-01T00:00:00.000Z"]  # fmt: skip


def more_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, ts in enumerate(EDGES):
        label = HOSTILE[i % len(HOSTILE)]
        model = [SONNET, HAIKU, "claude-opus-5-5", "mystery-model"][i % 4]
        kw: dict[str, Any] = {"cost_input_usd": 0.1, "cost_output_usd": 0.2}  # 0.1 + 0.2 != 0.3 in float
        if model == "mystery-model":
            kw = {"price_source": "unknown"}  # unpriced: NULL costs
        rows.append(_row(ts, label if i % 3 else "alpha", label, model, **_tokens(100 + i, 10 * i), **kw))
    # money that drifts when summed in float: ten times 0.1 is 0.9999999999999999
    rows += [_row(f"2026-11-05T10:00:{i:02d}.000Z", "drift", "tenth", SONNET, cost_input_usd=0.1) for i in range(10)]
    rows += [
        # cache without uncached input: the saving's rate comes from the read or the write cost
        _row("2026-11-05T11:00:00.000Z", "beta", None, HAIKU, **_tokens(0, 10, cr=1000), cost_cache_read_usd=1e-4),
        _row("2026-11-05T11:00:01.000Z", "beta", None, HAIKU, **_tokens(0, 10, cw5=700, cw1=300),
             cost_cache_write_usd=0.001475),
        _row("2026-11-05T11:00:02.000Z", "beta", "Zoë", HAIKU, cache_creation_input_tokens=500,
             input_tokens=0, output_tokens=1, cost_cache_write_usd=0.000625),
        # errors: no status (unreachable), retries, batch results not billed
        _row("2026-11-06T09:00:00.000Z", "alpha", "ann", SONNET, status=None, error="upstream_unreachable",
             price_source="no_usage", retry_count=0),
        _row("2026-11-06T09:00:01.000Z", "alpha", "ann", SONNET, status=529, error="overloaded_error",
             price_source="no_usage", retry_count=1),
        _row("2026-11-06T09:00:02.000Z", "alpha", "ann", SONNET, status=529, error="overloaded_error",
             price_source="no_usage", retry_count=2),
        _row("2026-11-06T10:00:00.000Z", "alpha", "ann", SONNET, batch_id="msgbatch_1", custom_id="c1",
             batch_result="errored", error="batch_errored", price_source="not_billed:errored"),
        _row("2026-11-06T10:00:00.000Z", "alpha", "ann", SONNET, batch_id="msgbatch_1", custom_id="c2",
             batch_result="succeeded", **_tokens(1000, 100), cost_input_usd=0.0015, cost_output_usd=0.00075),
        # error types that sort differently byte-wise and by people's rules; a status NULL and not
        _row("2026-11-06T11:00:00.000Z", "beta", "cat", HAIKU, status=None, error="Zeta", price_source="no_usage"),
        _row("2026-11-06T11:00:01.000Z", "beta", "cat", HAIKU, status=500, error="Zeta", price_source="no_usage"),
        _row("2026-11-06T11:00:02.000Z", "beta", "cat", HAIKU, status=500, error="alpha", price_source="no_usage"),
        # this period, for the budgets view
        _row(iso_ms(NOW - timedelta(minutes=2)), "alpha", "ann", SONNET, **_tokens(10, 10), cost_input_usd=0.7),
        _row(iso_ms(NOW - timedelta(minutes=1)), "alpha", HOSTILE[0], SONNET, **_tokens(10, 10), cost_input_usd=0.3),
        _row(iso_ms(NOW - timedelta(minutes=1)), "beta", "cat", "mystery-model", price_source="unknown",
             budget_usd=0.25),
    ]  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def dbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The same rows in a SQLite file and in PostgreSQL (copied with `metrion db copy`)."""
    from metrion_addon.cli import main

    server: PgServer = start_pg()
    try:
        src = tmp_path_factory.mktemp("pgreport") / "m.db"
        s = Store(src)
        s.start()
        for r in [*ROWS, *more_rows()]:
            s.put(dict(r))
        s.close()
        url = icu_database(server.url)
        assert main(["db", "copy", str(src), url, "--quiet"]) == 0
        yield src, url
    finally:
        server.close()


def icu_database(url: str) -> str:
    """A database whose text sorts as people read it (ICU: `a` < `B` < `Zoë` < `zed`), not byte-wise as SQLite
    does, so that a query ordering or comparing text without COLLATE "C" gives different rows here."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE DATABASE metrion_icu TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C.UTF-8'"
        )
    icu = re.sub(r"/metrion$", "/metrion_icu", url)
    with psycopg.connect(icu) as conn:
        assert conn.execute("SELECT 'a' < 'B' AND 'B' > 'a'").fetchone() == (True,)
    return icu


FILTERS = [
    [],
    ["--since", "2026-11-01T12:00", "--until", "2026-11-03"],
    ["--since", "2026-11-01", "--until", "2026-11-30"],
    ["--account", "alpha", "--account", HOSTILE[0], "--user", "ann", "--user", HOSTILE[0]],
    ["--model", "claude-s", "--model", "claude-h", "--model", "myst"],
    ["--user", "Zoë", "--utc"],
    ["--account", "nobody"],  # matches nothing: an empty view, not an error, in both
]
VIEWS = [
    [],
    *(["--by", d] for d in ["model", "user", "account", "client", "session", "batch"]),
    *(["--by", p] for p in ["hour", "day", "week", "month"]),
    ["--by", "account,user"],
    ["--by", "model", "--by", "day"],
    ["--by", "user", "--by", "week", "--limit", "3"],
    ["--by", "model", "--limit", "2"],
    ["--period", "week"],
    ["top"],
    ["top", "--limit", "3"],
    ["errors"],
    *(["chart", "--period", p] for p in ["hour", "day", "week", "month"]),
    ["chart", "--limit", "5"],
]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = report_main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["UTC", "America/New_York", "Asia/Kolkata", "Europe/Berlin"])
def zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TZ", request.param)
    monkeypatch.setenv("COLUMNS", "200")
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("filters", FILTERS, ids=lambda a: " ".join(a) or "all")
def test_every_view_and_format_reads_the_same_from_postgresql(
    dbs: tuple[Path, str], zone: str, filters: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite_db, url = dbs
    nonempty = 0
    for view in VIEWS:
        for fmt in (["--json"], ["--csv"], []):
            args = [*view, *filters, *fmt]
            got = [run([*args, "--db", db], capsys) for db in (str(sqlite_db), url)]
            assert got[0] == got[1], args
            assert got[0][0] == 0 and got[0][1], args
            if fmt == ["--json"]:
                doc = json.loads(got[0][1])
                nonempty += bool(doc["rows"] and (doc["total"] is None or doc["total"].get("requests")))
    assert nonempty > 0 or filters == ["--account", "nobody"]


def test_the_sums_are_exact_where_float_drifts(dbs: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = dbs
    assert functools.reduce(operator.add, [0.1] * 10) != 1.0  # the drift the report must not show
    code, out, _ = run(["--by", "account", "--account", "drift", "--json", "--db", url], capsys)
    assert code == 0
    assert json.loads(out)["rows"][0]["cost_usd"] == 1.0
    code, out, _ = run(["top", "--limit", "1", "--account", "drift", "--json", "--db", url], capsys)
    assert json.loads(out)["rows"][0]["cost_usd"] == 0.1


def test_budgets_view_reads_the_same_from_postgresql(
    dbs: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite_db, url = dbs
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"database: {sqlite_db}\naccounts:\n  - name: alpha\n    tokens: [sk-metrion-aaaaaaaaaaaaaaaa]\n"
                   "    budget: {daily: 5, monthly: 100}\n    user_budget: {daily: 1}\n"
                   "  - name: beta\n    tokens: [sk-metrion-bbbbbbbbbbbbbbbb]\n    budget: {daily: 0.1}\n")  # fmt: skip
    for fmt in (["--json"], ["--csv"], []):
        got = [run(["budgets", "-c", str(cfg), "--db", db, *fmt], capsys) for db in (str(sqlite_db), url)]
        assert got[0] == got[1]
    doc = json.loads(run(["budgets", "-c", str(cfg), "--db", url, "--json"], capsys)[1])
    spent = {(r["account"], r["user"], r["period"]): r["spent_usd"] for r in doc["rows"]}
    assert (
        spent[("alpha", None, "daily")] >= 1.0 and spent[("beta", None, "daily")] >= 0.25
    )  # unpriced: its reservation


@pytest.mark.parametrize(
    "filters",
    [Filters(), Filters(accounts=("alpha", HOSTILE[0])), Filters(models=("claude-h",), users=("Zoë", "cat"))],
    ids=["all", "accounts", "models-users"],
)
@pytest.mark.parametrize("stack", ["model", "account"])
def test_html_page_is_the_same_from_postgresql(dbs: tuple[Path, str], zone: str, filters: Filters, stack: str) -> None:
    sqlite_db, url = dbs
    opts = Options(filters=filters, utc=zone == "UTC")
    pages = [render(collect(source, opts, stack, now=NOW)) for source in (sqlite_db, url)]
    assert pages[0] == pages[1]
    assert pages[0].count("data-day=") > 3


def test_postgresql_report_errors_are_one_line_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["--db", "postgresql://metrion:hunter2@127.0.0.1:1/x"], capsys)
    assert code == 3 and not out
    assert err.startswith("metrion-report: cannot read postgresql://metrion:***@127.0.0.1:1/x") and "hunter2" not in err
    assert err.count("\n") == 1


def test_an_empty_postgresql_store_is_exit_5(dbs: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = dbs
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS empty")
        conn.execute("CREATE TABLE IF NOT EXISTS empty.requests (LIKE public.requests)")
    code, _, err = run(["--db", f"{url}?options=-csearch_path%3Dempty"], capsys)
    assert code == 5 and "no requests recorded yet" in err


def test_watch_over_postgresql_sees_new_rows_at_each_refresh(
    dbs: tuple[Path, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from metrion_addon.report import cli as report_cli

    _, url = dbs
    refreshes = []

    def sleep(_: float) -> None:  # between refreshes: a proxy writes a row; after the second, Ctrl-C
        refreshes.append(1)
        if len(refreshes) == 2:
            raise KeyboardInterrupt
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO requests (row_id, ts, account, cost_usd) VALUES (gen_random_uuid(), now(), "
                         "'watcher', 0.5)")  # fmt: skip

    monkeypatch.setattr(report_cli.time, "sleep", sleep)
    monkeypatch.setenv("COLUMNS", "200")
    try:
        code, out, _ = run(["--watch", "--by", "account", "--account", "watcher", "--db", url, "--utc"], capsys)
        assert code == 0 and "watcher" in out and "$0.50" in out and "Ctrl-C to stop" in out
        assert "postgresql://metrion@" in out
    finally:
        with psycopg.connect(url) as conn:
            conn.execute("DELETE FROM requests WHERE account = 'watcher'")
