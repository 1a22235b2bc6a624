"""`metrion reprice` over PostgreSQL: the same rows in SQLite and PostgreSQL reprice to the same costs with the
same output, in batches inside one transaction, money as numeric."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from metrion_addon import reprice as reprice_mod
from metrion_addon.cli import main as cli_main
from metrion_addon.reprice import main
from tests.pgserver import PgServer, needs_pg
from tests.test_reprice_unit import TS, make_row, write_config

pytestmark = needs_pg()

DAY = 86400.0
COSTS = "SELECT id, model, cost_usd, cost_input_usd, cost_output_usd, price_source FROM requests ORDER BY id"


@pytest.fixture
def dbs(pg: PgServer, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    from metrion_addon.store import Store

    src = tmp_path / "m.db"
    store = Store(src)
    store.start()
    usage = '{"input_tokens":%d,"output_tokens":%d}'
    for i in range(12):  # more rows than a (shrunk) batch; prices that make float-looking money
        model = ["claude-opus-5-5", "claude-sonnet-5-5", "claude-mine-1", "claude-haiku-5-5"][i % 4]
        store.put(make_row(model, usage % (1000 * i + 7, 333 * i), TS + DAY * (i % 3)))
    store.put(make_row("claude-opus-5-5", None, TS))  # no usage: left alone
    store.close()
    assert cli_main(["db", "copy", str(src), pg.url, "--quiet"]) == 0
    yield src, pg.url
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS requests, _metrion_migrations")


def costs(db: Path | str) -> list[tuple]:
    if isinstance(db, str):
        with psycopg.connect(db) as conn:
            rows = conn.execute(COSTS).fetchall()
        return [tuple(float(v) if isinstance(v, Decimal) else v for v in r) for r in rows]
    with sqlite3.connect(db) as conn:
        return conn.execute(COSTS).fetchall()


@pytest.mark.parametrize("window", [[], ["--since", "2026-06-02", "--utc"], ["--until", "2026-06-02T12:00Z"]])
def test_reprice_over_postgresql_is_reprice_over_sqlite(
    dbs: tuple[Path, str],
    tmp_path: Path,
    window: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reprice_mod, "REPRICE_BATCH", 5)  # 12 rows with usage: three batches
    src, url = dbs
    cfg = write_config(tmp_path, src)
    before = costs(src)
    assert costs(url) == before
    outs = []
    for db in (str(src), url):
        assert main(["--config", str(cfg), "--db", db, "--dry-run", *window]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "dry run" in outs[0] and "override:" not in outs[0]
    assert costs(url) == before  # a dry run writes nothing
    outs = []
    for db in (str(src), url):
        assert main(["--config", str(cfg), "--db", db, *window]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    after = costs(src)
    assert after != before
    assert costs(url) == after
    with psycopg.connect(url) as conn:  # numeric, the float's shortest decimal (as the store writes), no binary tail
        money = conn.execute("SELECT cost_usd, cost_input_usd FROM requests WHERE cost_usd IS NOT NULL").fetchall()
    assert money and all(isinstance(v, Decimal) and v == Decimal(repr(float(v))) for r in money for v in r)


def test_reprice_reads_a_postgresql_database_from_the_config(dbs: tuple[Path, str], tmp_path: Path) -> None:
    src, url = dbs
    cfg = write_config(tmp_path, src)
    cfg.write_text(cfg.read_text().replace(f"database: {src}", f"database: {url}"))
    assert main(["--config", str(cfg)]) == 0
    assert {r[5] for r in costs(url) if r[1] == "claude-mine-1"} == {"override:claude-mine"}


def test_reprice_errors_over_postgresql_are_one_line_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", "postgresql://metrion:hunter2@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("metrion-reprice: postgresql://metrion:***@127.0.0.1:1/x: ") and "hunter2" not in err
    assert err.count("\n") == 1
