"""Batch results with PostgreSQL as the store: two proxies (each with its own local spool) read the same results
file, and every result is in the database once (its row_id is derived from batch id + custom_id)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Proxy, start_proxy, stop_proxy
from tests.fake_upstream import FakeUpstream
from tests.pgserver import PgServer, needs_pg
from tests.test_e2e_batches import FOUR, batch_cost, req, results, sdk

pytestmark = needs_pg()


@pytest.fixture
def proxies(pg: PgServer, fake: FakeUpstream, tmp_path: Path) -> Iterator[tuple[Proxy, Proxy]]:
    """Two proxies on the database, each with its own spool, that do not poll (the tests fetch the results)."""
    no_poll = ("--set", "metrion_batch_poll_seconds=0")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_proxy(tmp_path / "a", fake.url, db=pg.url, extra_args=no_poll)  # type: ignore[arg-type]
    try:
        b = start_proxy(tmp_path / "b", fake.url, db=pg.url, extra_args=no_poll)  # type: ignore[arg-type]
    except Exception:
        stop_proxy(a)
        raise
    yield a, b
    stop_proxy(a)
    stop_proxy(b)


def count(url: str, batch_id: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('requests')").fetchone() == (None,):
            return []  # the proxy creates its table with its first write
        return conn.execute(
            'SELECT custom_id, "user", cost_usd FROM requests WHERE batch_id = %s ORDER BY custom_id', (batch_id,)
        ).fetchall()


def wait_rows(url: str, batch_id: str, n: int) -> list[tuple]:
    import time

    deadline = time.monotonic() + 30
    while len(got := count(url, batch_id)) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} rows"
        time.sleep(0.05)
    return got


def test_two_proxies_on_postgresql_count_each_result_once(pg: PgServer, proxies: tuple[Proxy, Proxy]) -> None:
    a, b = proxies
    ca = sdk(a, "pg-creator")
    batch = ca.messages.batches.create(requests=[req("ok-pg", 700, 70), *FOUR[1:]])  # type: ignore[arg-type]
    ca.messages.batches.retrieve(batch.id)
    results(ca, batch.id)
    got = wait_rows(pg.url, batch.id, 4)
    assert got[-1][0] == "ok-pg" and got[-1][1] == "pg-creator"
    assert float(got[-1][2]) == pytest.approx(batch_cost(700, 70), abs=1e-12)  # numeric in PostgreSQL
    cb = sdk(b, "pg-other")
    assert len(results(cb, batch.id)) == 4  # the other proxy reads the same file
    sentinel = cb.messages.batches.create(requests=[req("s")])  # type: ignore[list-item]
    cb.messages.batches.retrieve(sentinel.id)
    results(cb, sentinel.id)
    wait_rows(pg.url, sentinel.id, 1)  # b's rows are written in order: its copies of the batch are in too
    assert count(pg.url, batch.id) == got


def test_results_read_through_another_proxy_are_charged_to_the_creator(
    pg: PgServer, proxies: tuple[Proxy, Proxy]
) -> None:
    """Behind a load balancer the results download reaches any proxy: the batches table shared in PostgreSQL
    names the creator, so the rows are charged to them, at the batch's end time, exactly as on one proxy."""
    a, b = proxies
    ca = sdk(a, "lb-maker")
    batch = ca.messages.batches.create(requests=[req("lb-1", 500, 50), req("lb-2", 40, 4)])  # type: ignore[list-item]
    ended = ca.messages.batches.retrieve(batch.id).ended_at
    assert ended is not None
    cb = sdk(b, "lb-fetcher")
    assert len(results(cb, batch.id)) == 2  # only proxy b reads the results
    got = wait_rows(pg.url, batch.id, 2)
    assert [(r[0], r[1]) for r in got] == [("lb-1", "lb-maker"), ("lb-2", "lb-maker")]
    assert float(got[0][2]) == pytest.approx(batch_cost(500, 50), abs=1e-12)
    with psycopg.connect(pg.url) as conn:
        ts = {r[0] for r in conn.execute("SELECT ts FROM requests WHERE batch_id = %s", (batch.id,))}
        shared = conn.execute(
            'SELECT "user", mode, processing_status, results_recorded, metered_at IS NOT NULL FROM batches '
            "WHERE id = %s",
            (batch.id,),
        ).fetchone()
    assert ts == {ended}  # the batch's end time, known from proxy a's retrieve
    assert shared == ("lb-maker", "managed", "ended", 2, True)
    results(ca, batch.id)  # the creator's proxy reads them too: nothing counted twice
    sentinel = ca.messages.batches.create(requests=[req("s2")])  # type: ignore[list-item]
    ca.messages.batches.retrieve(sentinel.id)
    results(ca, sentinel.id)
    wait_rows(pg.url, sentinel.id, 1)
    assert count(pg.url, batch.id) == got


def test_shared_batches_keep_creators_through_an_outage(pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch created while PostgreSQL is away is written to the shared table once it is back; meanwhile the
    lookups answer None (the caller uses its local table) instead of raising."""
    from metrion_addon import pgbatches
    from metrion_addon.pgstore import pg_migrate

    monkeypatch.setattr(pgbatches, "RETRY_SECONDS", 0.0)
    with psycopg.connect(pg.url) as conn:
        pg_migrate(conn)
    shared = pgbatches.SharedBatches(pg.url, connect_timeout=1)
    record = ("msgbatch_outage", "2026-12-02T00:00:00.000Z", "acme", "ann", "managed", 1, "[]", *[None] * 4, "u")
    pg.stop_server()
    try:
        shared.created([record])
        assert shared.creator("msgbatch_outage") is None
        assert shared.stored("msgbatch_outage") is None
    finally:
        pg.start_server()
    assert shared.creator("msgbatch_outage") == ("acme", "ann", "managed", None, None)
    assert shared.stored("msgbatch_outage") == set()
    shared.close()
