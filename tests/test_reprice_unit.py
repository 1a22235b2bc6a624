"""metrion-reprice: recompute stored rows' costs from usage_json, model, ts and path, in one transaction."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, finish
from metrion_addon.reprice import main, reprice
from metrion_addon.store import INSERT_COLUMNS, Store, migrate

TS = datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp()
DAY = 86400.0


def make_row(model: str, usage: str | None, started: float, path: str = "/v1/messages") -> dict:
    p = Pending(started=started, method="POST", path=path, model=model)
    if usage is not None:
        p.facts.from_json_body(b'{"type":"message","model":"%s","usage":%s}' % (model.encode(), usage.encode()))
    return finish(p, pricer=Pricer(), status=200, request_id=None, headers_at=None, ended_at=started + 1)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "m.db"
    migrate(path)
    rows = [
        make_row("claude-opus-5-5", '{"input_tokens":1000000,"output_tokens":0}', TS),  # $4
        make_row("claude-opus-5-5", '{"input_tokens":1000000,"output_tokens":0}', TS + DAY),  # $4
        make_row("claude-sonnet-5-5", '{"input_tokens":0,"output_tokens":1000000}', TS),  # $10
        make_row("claude-mine-1", '{"input_tokens":1000000,"output_tokens":0}', TS),  # unknown
        make_row("claude-opus-5-5", None, TS),  # no usage: left alone
    ]
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            f"INSERT INTO requests ({', '.join(INSERT_COLUMNS)}) VALUES ({', '.join('?' * len(INSERT_COLUMNS))})",
            [tuple(r.get(c) for c in INSERT_COLUMNS) for r in rows],
        )
    conn.close()
    return path


def costs(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT model, cost_usd, cost_input_usd, price_source FROM requests ORDER BY id").fetchall()
    finally:
        conn.close()


def write_config(tmp_path: Path, db: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""
database: {db}
accounts:
  - name: a
    tokens: [sk-metrion-aaaaaaaaaaaa]
    anthropic_api_key: ${{SOME_SECRET_NOT_SET_HERE}}
pricing:
  overrides:
    - {{prefix: claude-opus-5, input: 1, output: 1}}
    - {{prefix: claude-mine, input: 2, output: 3}}
"""
    )
    return cfg


def test_reprice_applies_overrides_in_one_go(tmp_path: Path, db: Path, capsys: pytest.CaptureFixture) -> None:
    before = costs(db)
    assert before[0][1:] == (4.0, 4.0, before[0][3]) and before[3][1:] == (None, None, "unknown")
    cfg = write_config(tmp_path, db)  # its account secret is unset: reprice never needs it

    assert main(["--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "claude-mine-1" in out and "-6.000000" in out  # opus 8 -> 2
    assert costs(db) == before

    assert main(["--config", str(cfg), "--db", str(db)]) == 0
    after = costs(db)
    assert after[0] == ("claude-opus-5-5", 1.0, 1.0, "override:claude-opus-5")
    assert after[1] == ("claude-opus-5-5", 1.0, 1.0, "override:claude-opus-5")
    assert after[2] == before[2]  # sonnet: no override, bundled price unchanged
    assert after[3] == ("claude-mine-1", 2.0, 2.0, "override:claude-mine")
    assert after[4] == before[4]  # no usage_json: nothing to reprice from


def test_reprice_window_and_back(tmp_path: Path, db: Path) -> None:
    cfg = write_config(tmp_path, db)
    assert main(["--config", str(cfg), "--since", "2026-06-02", "--utc"]) == 0
    after = costs(db)
    assert after[0][1] == 4.0 and after[1][1] == 1.0  # only the second opus row is in the window
    assert main(["--db", str(db), "--until", "2026-06-03T00:00:00Z"]) == 0  # no overrides: bundled prices again
    assert costs(db)[1][1] == 4.0


def test_reprice_errors(tmp_path: Path) -> None:
    assert main(["--db", str(tmp_path / "missing.db")]) == 2
    with pytest.raises(SystemExit):
        main([])
    assert main(["--db", str(tmp_path / "missing.db"), "--since", "not-a-date"]) == 2


def test_reprice_window_reads_like_the_report(tmp_path: Path, db: Path) -> None:
    """--until DATE includes that whole day, in local time unless --utc, exactly as metrion-report shows it
    (reprice used to read it as UTC midnight, exclusive: the day the report showed was missed)."""
    cfg = write_config(tmp_path, db)
    assert [c[1] for c in costs(db)[:2]] == [4.0, 4.0]  # opus on 1 June 12:00 and on 2 June 12:00
    assert main(["--config", str(cfg), "--until", "2026-06-01", "--utc"]) == 0
    assert [c[1] for c in costs(db)[:2]] == [1.0, 4.0]  # all of 1 June repriced by the override, not 2 June


def test_reprice_uses_the_billed_response_model(tmp_path: Path) -> None:
    """A row whose request named an alias and whose response named the dated model reprices at the latter."""
    db = tmp_path / "m.db"
    store = Store(db)
    store.start()
    usage = '{"input_tokens":1000000,"output_tokens":0}'
    base = {"ts": "2026-11-28T10:00:00.000Z", "path": "/v1/messages", "usage_json": usage, "cost_usd": 0.0}
    store.put({**base, "model": "my-alias", "response_model": "claude-haiku-4-5-20251001"})
    store.put({**base, "model": "claude-haiku-4-5", "response_model": None})  # rows from before the column
    store.close()
    reprice(db, Pricer())
    with sqlite3.connect(db) as conn:
        costs = [r[0] for r in conn.execute("SELECT cost_usd FROM requests ORDER BY id")]
    assert costs == [1.0, 1.0]  # $1 per MTok input for Haiku 4.5, from the response model / the model
