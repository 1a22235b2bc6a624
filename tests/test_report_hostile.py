"""metrion-report with hostile values in the database: labels, models and clients are chosen by whoever sends a
request, so every view shows them literally (no rich markup, no terminal escapes) and CSV cells cannot run as
spreadsheet formulas. The rows are inserted with plain SQL, as an older proxy (or anyone with the file) could."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metrion_addon import report
from metrion_addon.record import iso_ms
from metrion_addon.store import migrate

HOSTILE_USERS = ["[/]", "[bold red]x[/bold red]", "[link=http://evil.example]click[/link]", ":smile:"]
ESC_MODEL = "claude-\x1b[31mred\x1b[0m-\x1b]8;;http://evil.example\x07x"
FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)"]


@pytest.fixture(scope="module")
def hostile_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    db = tmp / "metrion.db"
    migrate(db)
    now = iso_ms(datetime.now(UTC).timestamp() - 5)
    rows = [(u, "[/]", 0.01, None) for u in HOSTILE_USERS]
    rows += [("esc-user", ESC_MODEL, 0.02, "[/]"), *((f, "claude-x", 0.03, "http_500") for f in FORMULAS)]
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO requests (ts, account, user, model, cost_usd, error, status, client, input_tokens) "
            "VALUES (?, 'acme', ?, ?, ?, ?, 200, ?, 10)",
            [(now, u, m, c, e, u) for u, m, c, e in rows],
        )
    conn.close()
    cfg = tmp / "config.yaml"
    cfg.write_text(
        f"database: {db}\naccounts:\n  - name: acme\n    tokens: [sk-metrion-aaaaaaaaaaaaaaaa]\n"
        "    user_budget: {daily: 100}\n"
    )
    return db, cfg


VIEWS = [[], ["--by", "user"], ["--by", "model"], ["--by", "client"], ["top"], ["errors"], ["chart"]]


@pytest.mark.parametrize("args", VIEWS, ids=lambda a: " ".join(a) or "summary")
def test_terminal_views_show_values_literally(
    hostile_db: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # a real terminal: styles and links would be emitted as escapes
    monkeypatch.setenv("COLUMNS", "300")
    db, _ = hostile_db
    code = report.main([*args, "--db", str(db), "--utc"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "\x1b[31mred" not in out and "\x1b]8;" not in out  # the data's escapes never reach the terminal
    if args in (["--by", "user"], ["top"]):
        for u in HOSTILE_USERS:
            assert u in out
    if args == ["--by", "model"]:
        assert "[/]" in out and "claude-[31mred[0m-]8;;http://evil.examplex" in out


def test_budgets_view_shows_hostile_users_literally(
    hostile_db: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    _, cfg = hostile_db
    code = report.main(["budgets", "-c", str(cfg), "--utc"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[bold red]x[/bold red]" in out and "[/]" in out


def test_csv_cells_cannot_be_formulas(hostile_db: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    db, _ = hostile_db
    assert report.main(["--by", "user", "--db", str(db), "--csv"]) == 0
    cells = [row["user"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    for f in FORMULAS:
        assert f not in cells and "'" + f in cells
    assert report.main(["--by", "user", "--db", str(db), "--json"]) == 0  # JSON keeps the values exact
    users = [r["user"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert set(FORMULAS) <= set(users)


def test_csv_keeps_numbers_numbers(hostile_db: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert report.csv_cell(-2.5) == -2.5 and report.csv_cell(-3) == -3
    assert report.csv_cell("-2+3") == "'-2+3" and report.csv_cell("alice") == "alice"
