"""The report's layers: views return data, only the terminal builds tables; the calendar math is periods.py's."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from rich.table import Table

from metrion_addon import periods, report, store
from tests.test_report import ROWS


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("layers") / "metrion.db"
    s = store.Store(path)
    s.start()
    for r in ROWS:
        s.put(dict(r))
    s.close()
    return path


@pytest.mark.parametrize("view", [[], ["top"], ["errors"], ["chart"], ["--by", "day,account"]])
@pytest.mark.parametrize("fmt", ["--json", "--csv"])
def test_json_and_csv_build_no_table(
    db: Path, view: list[str], fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_tables(*_: Any, **__: Any) -> None:
        raise AssertionError("a rich table was built for machine-readable output")

    monkeypatch.setattr(Table, "__init__", no_tables)
    assert report.main([*view, fmt, "--db", str(db), "--utc"]) == 0
    assert capsys.readouterr().out


def test_views_are_data(db: Path) -> None:
    conn = report.open_db(db)
    try:
        for name in report.VIEWS:
            if name == "budgets":
                continue
            r = report.run_view(conn, name, report.Options(utc=True))
            assert r.view == name and all(set(row) <= set(r.fields) for row in r.rows)
    finally:
        conn.close()


def test_periods_across_a_dst_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start, end = periods.bounds(datetime(2026, 10, 25, 11, tzinfo=UTC), "day", berlin)
    assert end.timestamp() - start.timestamp() == 25 * 3600
    start, end = periods.bounds(datetime(2026, 12, 31, 23, 30, tzinfo=UTC), "month", berlin)
    assert (start.isoformat(), end.isoformat()) == ("2027-01-01T00:00:00+01:00", "2027-02-01T00:00:00+01:00")
    assert periods.floor(datetime(2026, 11, 29, 15, 42), "week") == datetime(2026, 11, 23)  # a Monday
    assert periods.add_months(datetime(2026, 1, 31, 9), -2) == datetime(2025, 11, 1, 9)
    assert periods.named("last-month", datetime(2026, 1, 15, 12)) == (datetime(2025, 12, 1), datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="fortnight"):
        periods.floor(datetime(2026, 1, 1), "fortnight")
