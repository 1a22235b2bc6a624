"""Fleet alerts against a real PostgreSQL: proxies that each decide an alert is due send it once between them
(to every hook), a restarted proxy does not send it again, and an unreachable database never silences one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from metrion_addon.alerts import Alerter, AlertHook
from metrion_addon.budget import BudgetState
from metrion_addon.budget_settings import Limit
from metrion_addon.fleet_alerts import AlertClaims
from tests.pgserver import PgServer, needs_pg
from tests.webhook import Hooks

pytestmark = needs_pg()
PG_MIGRATED = True  # the `pg` fixture (conftest.py) starts the server with metrion's tables made

DAY = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.close()


def received(hooks: Hooks) -> Counter[tuple[str, str, str]]:
    """(hook path, event, period_start) of each POST, counted."""
    with hooks.cond:
        return Counter((p, c["event"], c["period_start"]) for p, c in zip(hooks.paths, hooks.calls, strict=True))


def state(account: str, start: datetime = DAY) -> BudgetState:
    return BudgetState((account, None, False), Limit("daily", 1.0, True), 0.85, start, start + timedelta(days=1))


def proxy(url: str | None, hooks: Hooks) -> Alerter:
    alerter = Alerter((AlertHook(f"{hooks.base}/a"), AlertHook(f"{hooks.base}/b")), attempts=1).start()
    if url is not None:
        alerter.claims = AlertClaims(url)
    return alerter


def test_the_fleet_sends_each_alert_once(pg: PgServer, hooks: Hooks) -> None:
    fleet = [proxy(pg.url, hooks) for _ in range(3)]
    for alerter in fleet:  # every proxy saw the budget cross both thresholds
        alerter.enqueue("hard_80", state("once"))
        alerter.enqueue("hard", state("once"))
    for alerter in fleet:
        alerter.close(timeout=30)
    start = DAY.isoformat()
    assert received(hooks) == {(p, e, start): 1 for p in ("/a", "/b") for e in ("hard_80", "hard")}

    restarted = proxy(pg.url, hooks)  # a proxy restarted in the same period has forgotten what it sent
    restarted.enqueue("hard", state("once"))
    restarted.enqueue("hard", state("once", DAY + timedelta(days=1)))  # the next period's alert is new
    restarted.close(timeout=30)
    got = received(hooks)
    assert got[("/a", "hard", start)] == 1 and got[("/b", "hard", start)] == 1
    nxt = (DAY + timedelta(days=1)).isoformat()
    assert got[("/a", "hard", nxt)] == 1 and got[("/b", "hard", nxt)] == 1


def test_an_unreachable_database_does_not_silence_an_alert(hooks: Hooks, caplog: pytest.LogCaptureFixture) -> None:
    alerter = proxy("postgresql://metrion:secret@127.0.0.1:1/metrion", hooks)  # nothing listens on port 1
    alerter.enqueue("soft", state("down"))
    alerter.close(timeout=30)
    assert received(hooks) == {("/a", "soft", DAY.isoformat()): 1, ("/b", "soft", DAY.isoformat()): 1}
    assert "sending it" in caplog.text and "secret" not in caplog.text
