"""Fleet budgets' lease book against a real PostgreSQL: grants from concurrent connections never add up to more
than the limit, expired leases are reclaimed, slices are given back, the first period row is seeded from the
rows already recorded; and Budgets admitting against a proxy's slice (no database call per request)."""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from metrion_addon.budget import Budgets
from metrion_addon.budget_settings import AccountBudgets, BudgetSettings, Limit
from metrion_addon.leases import LeaseBook, ensure, reclaim, scope_text, sync
from tests.pgserver import PgServer, needs_pg

pytestmark = needs_pg()
PG_MIGRATED = True  # the `pg` fixture (conftest.py) starts the server with metrion's tables made

DAY = datetime(2026, 12, 1, tzinfo=UTC)
END = datetime(2026, 12, 2, tzinfo=UTC)


def key(account: str, user: str | None = None, is_user: bool = False) -> Any:
    return ((account, user, is_user), "daily", DAY)


def period_row(url: str, k: Any) -> tuple[float, float, float]:
    with psycopg.connect(url) as conn:
        r = conn.execute(
            "SELECT granted, seed, (SELECT COALESCE(SUM(granted), 0) FROM budget_leases l WHERE l.scope = p.scope "
            "AND l.period = p.period AND l.period_start = p.period_start) FROM budget_periods p "
            "WHERE scope = %s AND period = %s AND period_start = %s",
            (scope_text(k[0]), k[1], k[2]),
        ).fetchone()
    assert r is not None
    return float(r[0]), float(r[1]), float(r[2])


def test_concurrent_grants_never_exceed_the_limit(pg: PgServer) -> None:
    k, limit = key("concurrent"), 1.0
    with psycopg.connect(pg.url, autocommit=True) as conn:
        ensure(conn, k, limit, END)
    got: dict[str, float] = {}
    barrier = threading.Barrier(8)

    def proxy(i: int) -> None:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            barrier.wait()
            used = 0.0
            while True:
                s = sync(conn, f"p{i}", k, limit, used, want=0.037 + i * 0.011)
                got[f"p{i}"] = s.granted
                used = s.granted  # spends all of it, then asks again
                if s.got == 0:
                    return

    threads = [threading.Thread(target=proxy, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    granted, seed, leases = period_row(pg.url, k)
    assert sum(got.values()) == pytest.approx(limit, abs=1e-9)  # all of it handed out, not a cent more
    assert granted == pytest.approx(seed + leases) and granted <= limit + 1e-9


def test_expired_leases_are_reclaimed_and_a_returned_slice_is_free_again(pg: PgServer) -> None:
    k, limit = key("reclaim"), 0.5
    with psycopg.connect(pg.url, autocommit=True) as conn:
        ensure(conn, k, limit, END)
        dead = sync(conn, "dead", k, limit, used=0.0, want=0.3, ttl=-1)  # a lease that has already expired
        assert dead.granted == pytest.approx(0.3)
        sync(conn, "dead", k, limit, used=0.1, ttl=-1)  # it reported $0.10 used before dying
        live = sync(conn, "live", k, limit, used=0.0, want=1.0)
        assert live.granted == pytest.approx(0.2)  # what was left
        assert reclaim(conn) == pytest.approx(0.2)  # the dead lease's unspent part; the live one is untouched
        assert period_row(pg.url, k)[0] == pytest.approx(0.3)
        again = sync(conn, "live", k, limit, used=0.2, want=1.0)
        assert again.granted == pytest.approx(0.4) and again.consumed == pytest.approx(0.3)
        back = sync(conn, "live", k, limit, used=0.25, give_back=math.inf)  # a clean stop returns the rest
        assert back.granted == pytest.approx(0.25)
        assert period_row(pg.url, k) == pytest.approx((0.35, 0.0, 0.35))
        assert reclaim(conn) == 0.0  # nothing expired is left unspent


def test_spend_beyond_a_reclaimed_slice_is_counted(pg: PgServer) -> None:
    """A proxy that lost the database while its lease was reclaimed reports what it really used: the fleet's
    total grows by the difference, so the others see it."""
    k, limit = key("comeback"), 1.0
    with psycopg.connect(pg.url, autocommit=True) as conn:
        ensure(conn, k, limit, END)
        sync(conn, "away", k, limit, used=0.0, want=0.5, ttl=-1)
        sync(conn, "away", k, limit, used=0.2, ttl=-1)
        reclaim(conn)  # gives back 0.3
        s = sync(conn, "away", k, limit, used=0.35)
        assert s.granted == pytest.approx(0.35) and s.total == pytest.approx(0.35)
        other = sync(conn, "other", k, limit, used=0.0, want=5.0)
        assert other.granted == pytest.approx(0.65)


def test_the_period_row_is_seeded_from_recorded_rows(pg: PgServer) -> None:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        cols = 'row_id, ts, account, "user", cost_usd, budget_usd'
        for i, (ts, account, user, cost, budget) in enumerate(
            [
                (DAY.replace(hour=1), "seeded", "bob", Decimal("0.10"), None),
                (DAY.replace(hour=2), "seeded", None, None, 0.05),  # unpriced: counted at its reservation
                (DAY.replace(hour=3), "seeded", "carol", Decimal("0.20"), None),
                (datetime(2026, 11, 30, 23, tzinfo=UTC), "seeded", "bob", Decimal("9"), None),  # the day before
                (DAY.replace(hour=4), "other", "bob", Decimal("9"), None),
            ]
        ):
            conn.execute(
                f"INSERT INTO requests ({cols}) VALUES (%s, %s, %s, %s, %s, %s)",
                (f"00000000-0000-7000-8000-{i:012d}", ts, account, user, cost, budget),
            )
        ensure(conn, key("seeded"), 1.0, END)
        ensure(conn, key("seeded", "bob", True), 1.0, END)
        ensure(conn, key("seeded", None, True), 1.0, END)
        ensure(conn, key("seeded"), 1.0, END)  # a second proxy: the row stays as it was
        s = sync(conn, "p", key("seeded"), 1.0, used=0.0, want=1.0)
    assert period_row(pg.url, key("seeded"))[1] == pytest.approx(0.35)
    assert period_row(pg.url, key("seeded", "bob", True))[1] == pytest.approx(0.10)
    assert period_row(pg.url, key("seeded", None, True))[1] == pytest.approx(0.05)
    assert s.granted == pytest.approx(0.65) and s.consumed == pytest.approx(0.35)


def wait_for(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_budgets_admit_against_the_proxy_slice(pg: PgServer) -> None:
    """Two proxies' Budgets on one database: each admits against its own slice, a request that does not fit
    makes the thread ask for more, and neither ever holds more than the limit between them."""
    now = DAY.timestamp() + 3600
    settings = BudgetSettings(accounts={"fleet": AccountBudgets(account=(Limit("daily", 1.0),))})
    books: list[LeaseBook] = []
    budgets: list[Budgets] = []
    for _ in range(2):
        b = Budgets(settings, clock=lambda: now)
        b.fleet = books.append(LeaseBook(pg.url, b).start()) or books[-1]
        budgets.append(b)
    try:
        k = key("fleet")
        a, b = budgets
        assert books[0].slice(k) > 0 and books[1].slice(k) > 0  # pre-leased at start
        assert books[0].slice(k) + books[1].slice(k) <= 1.0 + 1e-9
        a.open("t1", "fleet", None, now)
        big = books[0].slice(k) + 0.01  # fits the budget but not this proxy's slice
        check = a.reserve("t1", "fleet", None, big, now)
        assert check.blocked is not None and check.blocked.slice_only(big)
        wait_for(lambda: books[0].slice(k) >= big, "the thread to lease more")
        assert a.reserve("t1", "fleet", None, big, now).blocked is None
        a.settle("t1", big)
        b.open("t2", "fleet", None, now)
        assert b.reserve("t2", "fleet", None, 1.0, now).blocked is not None  # never more than the limit
        wait_for(lambda: books[1].free(k) is not None and books[1].others(k) >= big - 1e-9, "b to see a's spend")
        assert b.states("fleet", None, now)[0].spent == pytest.approx(big)
    finally:
        for book in books:
            book.close()
    granted, seed, leases = period_row(pg.url, k)
    assert granted == pytest.approx(big) and leases == pytest.approx(big)  # the closes gave back the rest


def test_an_idle_slice_gives_its_headroom_back(pg: PgServer) -> None:
    now = DAY.timestamp() + 3600
    settings = BudgetSettings(accounts={"idle": AccountBudgets(account=(Limit("daily", 1.0),))})
    b = Budgets(settings, clock=lambda: now)
    book = b.fleet = LeaseBook(pg.url, b, idle_return=0.0).start()
    try:
        k = key("idle")
        assert book.slice(k) == pytest.approx(0.5)  # half of what is free, with no other proxy holding any
        wait_for(lambda: period_row(pg.url, k)[0] < 0.5, "the idle headroom to go back")
        assert 0 < book.slice(k) < 0.5  # one low-water mark's worth stays, so the next request needs no wait
    finally:
        book.close()


def test_a_database_outage_admits_within_the_slice_until_its_lease_runs_out(pg: PgServer) -> None:
    now = DAY.timestamp() + 3600
    settings = BudgetSettings(accounts={"outage": AccountBudgets(account=(Limit("daily", 1.0),))})
    b = Budgets(settings, clock=lambda: now)
    book = b.fleet = LeaseBook(pg.url, b, ttl=6.0).start()  # admits on a slice up to 5 s after its last sync
    k = key("outage")
    try:
        assert book.slice(k) > 0
        pg.stop_server()
        b.open("during", "outage", None, now)
        assert b.reserve("during", "outage", None, 0.01, now).blocked is None  # the slice held: no database call
        b.settle("during", 0.01)
        wait_for(lambda: book.failing, "the lease thread to notice")
        wait_for(lambda: book.slice(k) == 0.0, "the slice to lapse before its lease can expire")
        b.open("later", "outage", None, now)
        check = b.reserve("later", "outage", None, 0.01, now)
        assert check.blocked is not None and check.blocked.slice_only(0.01)  # refused: fail closed
        b.settle("later", None)
    finally:
        pg.start_server()
    try:
        wait_for(lambda: not book.failing and book.slice(k) > 0, "the slice to come back with the database")
        b.open("after", "outage", None, now)
        assert b.reserve("after", "outage", None, 0.01, now).blocked is None
        b.settle("after", 0.01)
    finally:
        book.close()
    granted, _, leases = period_row(pg.url, k)
    assert granted == pytest.approx(0.02) and leases == pytest.approx(0.02)  # spent is all it holds after a stop
