"""A fleet: three proxies writing to one PostgreSQL, 200 clients spread over them, 10,000 requests, and the
database restarted in the middle. Every request leaves exactly one row, and the token sums equal what the
upstream was asked to send."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import MANAGED_TOKEN, FakeProcess, Proxy, start_fake_process, start_proxy, stop_proxy
from tests.pgserver import PgServer, needs_pg

pytestmark = [pytest.mark.slow, needs_pg()]

PROXIES, CLIENTS, REQUESTS = 3, 200, 10_000


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeProcess]:
    f = start_fake_process()
    yield f
    f.stop()


def count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM requests WHERE \"user\" = 'fleet'").fetchone()[0]  # type: ignore[index]


def test_three_proxies_one_database_through_a_restart(
    pg: PgServer, upstream: FakeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proxies: list[Proxy] = []
    for i in range(PROXIES):
        (tmp_path / f"p{i}").mkdir()
        proxies.append(start_proxy(tmp_path / f"p{i}", upstream.url, extra_args=("--set", "flow_detail=0"), db=pg.url))  # type: ignore[arg-type]
    answered: list[int] = []
    restarted = asyncio.Event()

    async def client(k: int, limits: httpx.Limits) -> None:
        url = proxies[k % PROXIES].url + "/v1/messages"
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            for i in range(k, REQUESTS, CLIENTS):
                r = await c.post(
                    url,
                    json={"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": [], "stream": i % 2 == 0},
                    headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": "fleet", "x-fake-usage": f"{i},{i % 7}"},
                )
                assert r.status_code == 200
                answered.append(i)
                if len(answered) == REQUESTS // 2 and not restarted.is_set():
                    restarted.set()
                    await asyncio.to_thread(pg.restart)  # requests keep flowing on the other clients

    async def main() -> None:
        limits = httpx.Limits(max_connections=1)
        tasks = []
        for k in range(CLIENTS):  # ramp up: mitmproxy's listen backlog is 100
            tasks.append(asyncio.create_task(client(k, limits)))
            if k % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)

    t0 = time.monotonic()
    try:
        asyncio.run(main())
        deadline = time.monotonic() + 120
        while count(pg.url) < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for p in proxies:
            stop_proxy(p)
    elapsed = time.monotonic() - t0
    with psycopg.connect(pg.url) as conn:
        n, distinct, tin, tout = conn.execute(
            "SELECT count(*), count(DISTINCT request_id), sum(input_tokens), sum(output_tokens) FROM requests "
            "WHERE \"user\" = 'fleet'"
        ).fetchone()  # type: ignore[misc]
    spooled = sum("spooling request rows" in p.log.read_text(errors="replace") for p in proxies)
    with capsys.disabled():
        print(f"\nfleet: {REQUESTS} requests via {PROXIES} proxies in {elapsed:.1f}s; {spooled} proxies spooled")
    assert restarted.is_set() and len(answered) == REQUESTS
    assert (n, distinct) == (REQUESTS, REQUESTS)  # one row each: none lost, none doubled
    assert (tin, tout) == (sum(range(REQUESTS)), sum(i % 7 for i in range(REQUESTS)))
