"""PostgreSQL as the store, against a real server started for these tests: native types, exactly-once writes,
the local spool while the server is away (also across a proxy restart), and the proxy end to end through a
server restart under load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from metrion_addon.config import ConfigError, load_config
from metrion_addon.pgstore import PgStore, redacted
from metrion_addon.record import iso_ms
from tests.conftest import MANAGED_TOKEN, FakeProcess, start_fake_process, start_proxy, stop_proxy
from tests.pgserver import PgServer, needs_pg

pytestmark = needs_pg()

TS0 = 1_795_000_000.0


@pytest.fixture
def url(pg: PgServer) -> Iterator[str]:
    yield pg.url
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS requests, batches, _metrion_migrations")


def rows(url: str, sql: str = "SELECT * FROM requests ORDER BY id") -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(sql).fetchall()


def row(i: int, **kw: Any) -> dict[str, Any]:
    return {"ts": iso_ms(TS0 + i), "account": "acme", "user": "alice", "model": "claude-x", "stream": 1,
            "completed": 1, "input_tokens": i, "cost_usd": 0.1, "cost_input_usd": 0.1, **kw}  # fmt: skip


def test_rows_have_native_types_and_exact_money(url: str, tmp_path: Path) -> None:
    s = PgStore(url, tmp_path / "spool.db")
    s.start()
    for i in range(250):
        s.put(row(i))
    s.close()
    got = rows(url)
    assert len(got) == 250 and s.written == 250 and s.spooled == 0
    first = got[0]
    assert first["ts"] == datetime.fromtimestamp(TS0, UTC) and first["stream"] is True
    assert first["user"] == "alice" and len(str(first["row_id"])) == 36
    (total,) = rows(url, "SELECT sum(cost_usd) AS t FROM requests")
    assert total["t"] == Decimal("25.0")  # numeric: 250 x 0.1 sums exactly, unlike REAL


def test_a_replayed_row_counts_once(url: str, tmp_path: Path) -> None:
    batch = [row(i, row_id=f"01900000-0000-7000-8000-{i:012d}") for i in range(10)]
    for _ in range(2):  # the same rows twice: a replay after a crash between commit and spool delete
        s = PgStore(url, tmp_path / "spool.db")
        s.start()
        for r in batch:
            s.put(dict(r))
        s.close()
    assert len(rows(url)) == 10


def test_spool_while_the_server_is_down_then_replay_in_order(
    pg: PgServer, url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s = PgStore(url, tmp_path / "spool.db", retry_interval=0.2)
    s.start()
    for i in range(50):
        s.put(row(i))
    wait_for(lambda: s.written == 50)
    pg.stop_server()
    try:
        for i in range(50, 350):
            s.put(row(i))
        wait_for(lambda: s.spooled == 300)  # nothing waits in memory: every row is on disk
        assert s.spooling
    finally:
        pg.start_server()
    wait_for(lambda: s.spooled == 0)
    s.close()
    got = rows(url)
    assert [r["input_tokens"] for r in got] == list(range(350))  # all of them, once each, in order
    messages = [r.getMessage() for r in caplog.records if r.name == "metrion_addon.pgstore"]
    assert sum("spooling request rows" in m for m in messages) == 1
    assert sum("writable again" in m and "300 spooled rows replayed" in m for m in messages) == 1
    assert not any("metrion@" in m and ":***@" not in m and "password" in m for m in messages)


def test_spooled_rows_survive_a_restart_of_the_proxy(pg: PgServer, url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    first = PgStore(url, spool)
    first.start()
    first.put(row(0))
    wait_for(lambda: first.written == 1)
    pg.stop_server()
    try:
        for i in range(1, 40):
            first.put(row(i))
        first.close()  # the proxy stops while the server is away: the rows stay in the spool
        assert first.spooled == 39
    finally:
        pg.start_server()
    second = PgStore(url, spool)
    second.start()  # the next start replays them
    wait_for(lambda: second.spooled == 0)
    second.close()
    assert [r["input_tokens"] for r in rows(url)] == list(range(40))


def wait_for(cond: Any, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --- config ---------------------------------------------------------------------------------------------


def test_database_url_password_from_env_never_printed(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "database: postgresql://metrion:${PGPW}@127.0.0.1:5999/metrion\n"
        "accounts: [{name: a, tokens: [sk-metrion-aaaaaaaaaaaa], anthropic_api_key: k}]\n"
    )
    config = load_config(cfg, env={"PGPW": "s3cr/et"})
    assert config.database_url == "postgresql://metrion:s3cr%2Fet@127.0.0.1:5999/metrion"
    assert config.database == tmp_path / "metrion-spool.db"
    assert "s3cr" not in redacted(config.database_url)
    with pytest.raises(ConfigError, match="PGPW"):
        load_config(cfg, env={})


def test_budgets_with_postgresql_are_fleet_budgets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "database: postgresql://metrion@127.0.0.1:5999/metrion\n"
        "accounts: [{name: a, tokens: [sk-metrion-aaaaaaaaaaaa], anthropic_api_key: k, budget: {daily: 5}}]\n"
    )
    config = load_config(cfg)  # no longer refused: the budget is shared by the fleet through leases
    assert config.database_url and config.budgets.any


# --- end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeProcess]:
    f = start_fake_process()
    yield f
    f.stop()


def test_proxy_through_a_database_restart_loses_and_duplicates_nothing(
    pg: PgServer, url: str, upstream: FakeProcess, tmp_path: Path
) -> None:
    """Requests keep being answered while PostgreSQL restarts (pg_ctl restart -m fast); every request leaves
    exactly one row in PostgreSQL once it is back."""
    p = start_proxy(tmp_path, upstream.url, db=url)  # type: ignore[arg-type]  # the config's database: the URL
    n, answered = 600, []
    try:

        async def client(k: int) -> None:
            async with httpx.AsyncClient(timeout=30) as c:
                for i in range(k, n, 20):
                    r = await c.post(
                        p.url + "/v1/messages",
                        json={"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": []},
                        headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": "pg-load", "x-fake-usage": f"{i},1"},
                    )
                    assert r.status_code == 200
                    answered.append(i)
                    if len(answered) == n // 3:
                        await asyncio.to_thread(pg.restart)

        async def main() -> None:
            await asyncio.gather(*(client(k) for k in range(20)))

        asyncio.run(main())
        wait_for(lambda: len(rows(url, "SELECT id FROM requests WHERE \"user\" = 'pg-load'")) >= n, timeout=60)
    finally:
        stop_proxy(p)
    got = rows(url, "SELECT input_tokens FROM requests WHERE \"user\" = 'pg-load'")
    assert sorted(r["input_tokens"] for r in got) == list(range(n))  # 0 lost, 0 duplicated


# --- metrion db copy --------------------------------------------------------------------------------------


def test_db_copy_sqlite_to_postgresql_and_back_is_idempotent(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    from metrion_addon.cli import main
    from metrion_addon.store import Store

    src = tmp_path / "old.db"
    s = Store(src)
    s.start()
    for i in range(120):
        s.put(row(i, stream=i % 2, cost_usd=0.1 * i))
    s.close()
    with sqlite3.connect(src) as conn:  # rows from before row_id existed
        conn.execute("UPDATE requests SET row_id = NULL WHERE id <= 20")
        conn.execute(  # a batch created through the proxy: its creator goes along
            "INSERT INTO batches (id, ts, account, user, mode, request_count, reserved_usd) "
            "VALUES ('msgbatch_copy', '2026-12-01T10:00:00.000Z', 'acme', 'ann', 'managed', 3, 0.25)"
        )
    conn.close()

    assert main(["db", "copy", str(src), url, "--quiet"]) == 0
    assert "120 rows read, 120 new" in capsys.readouterr().out
    assert main(["db", "copy", str(src), url, "--quiet"]) == 0  # again: nothing new, nothing doubled
    out = capsys.readouterr().out
    assert "120 rows read, 0 new" in out and "batches" not in out
    assert len(rows(url)) == 120
    got = rows(url, "SELECT id, account, \"user\", request_count, reserved_usd FROM batches")
    assert got == [{"id": "msgbatch_copy", "account": "acme", "user": "ann", "request_count": 3, "reserved_usd": 0.25}]

    back = tmp_path / "back.db"
    assert main(["db", "copy", url, str(back), "--quiet"]) == 0
    assert "120 rows read, 120 new" in capsys.readouterr().out
    with sqlite3.connect(back) as conn:
        assert conn.execute("SELECT id, user, ts FROM batches").fetchall() == [
            ("msgbatch_copy", "ann", "2026-12-01T10:00:00.000Z")
        ]
    conn.close()
    cols = "ts, account, user, stream, input_tokens, round(cost_usd, 9)"
    with sqlite3.connect(src) as a, sqlite3.connect(back) as b:
        assert (
            a.execute(f"SELECT {cols} FROM requests ORDER BY id").fetchall()
            == b.execute(f"SELECT {cols} FROM requests ORDER BY id").fetchall()
        )
    a.close()
    b.close()


def test_db_copy_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metrion_addon.cli import main

    with pytest.raises(SystemExit):
        main(["db", "copy", str(tmp_path / "missing.db"), str(tmp_path / "x.db")])
    assert main(["db", "copy", "postgresql://metrion:hunter2@127.0.0.1:1/x", str(tmp_path / "x.db")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("metrion db copy: ") and "hunter2" not in err
