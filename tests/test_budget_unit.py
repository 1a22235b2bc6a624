"""Budget periods, checks and seeding, without mitmproxy."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metrion_addon.budget import Budgets
from metrion_addon.budget_settings import AccountBudgets, BudgetSettings, Limit
from metrion_addon.config import ConfigError, parse_config
from metrion_addon.store import Store


def ts(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


class Clock:
    def __init__(self, at: str) -> None:
        self.now = ts(at)

    def __call__(self) -> float:
        return self.now


SETTINGS = BudgetSettings(
    accounts={
        "acme": AccountBudgets(
            account=(Limit("daily", 10.0), Limit("monthly", 100.0, hard=False)),
            user_default=(Limit("daily", 2.0),),
            users={"alice": (Limit("daily", 5.0),)},
        )
    }
)


def test_daily_and_monthly_periods_in_a_dst_time_zone() -> None:
    b = Budgets(BudgetSettings(timezone="Europe/Berlin"))
    start, end = b.period("daily", ts("2026-10-25T12:00:00+01:00"))  # the day clocks go back: 25 hours
    assert start.isoformat() == "2026-10-25T00:00:00+02:00"
    assert end.isoformat() == "2026-10-26T00:00:00+01:00"
    assert end.timestamp() - start.timestamp() == 25 * 3600
    start, end = b.period("monthly", ts("2026-12-31T23:30:00+00:00"))  # already January in Berlin
    assert (start.isoformat(), end.isoformat()) == ("2027-01-01T00:00:00+01:00", "2027-02-01T00:00:00+01:00")


def test_hard_limit_blocks_exactly_at_the_limit_and_rolls_over() -> None:
    clock = Clock("2026-11-28T10:00:00+00:00")
    b = Budgets(SETTINGS, clock)
    b.add("acme", "bob", 1.5)
    c = b.check("acme", "bob")
    assert c.blocked is None and c.remaining == pytest.approx(0.5)  # bob's default $2/day is tightest
    b.add("acme", "bob", 0.5)
    c = b.check("acme", "bob")
    assert c.blocked is not None and c.remaining == 0
    assert "account 'acme' user 'bob' daily budget of $2.00" in c.blocked.message()
    assert b.retry_after(c.blocked) == 14 * 3600
    assert b.check("acme", "carol").blocked is None  # other users have their own default budget
    clock.now = ts("2026-11-29T00:00:00+00:00")
    assert b.check("acme", "bob").blocked is None  # new day


def test_account_limit_covers_all_users_and_named_user_overrides_default() -> None:
    b = Budgets(SETTINGS, Clock("2026-11-28T10:00:00+00:00"))
    b.add("acme", "alice", 4.0)
    assert b.check("acme", "alice").blocked is None  # alice has $5, not the $2 default
    for user in ("u1", "u2", "u3"):
        b.add("acme", user, 2.0)
    c = b.check("acme", "alice")
    assert c.blocked is not None and c.blocked.scope == ("acme", None, False)  # $10 account day used up
    assert b.check("other", None) == b.check("other", "x")  # no budgets: nothing applies
    assert b.check("other", None).remaining is None


def test_soft_limit_warns_once_and_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    settings = BudgetSettings(accounts={"acme": AccountBudgets(account=(Limit("monthly", 1.0, hard=False),))})
    b = Budgets(settings, Clock("2026-11-28T10:00:00+00:00"))
    b.add("acme", None, 3.0)
    for _ in range(3):
        c = b.check("acme", None)
        assert c.blocked is None and len(c.warnings) == 1
    assert sum("soft limit reached" in r.message for r in caplog.records) == 1


def test_seed_from_database_counts_only_current_periods(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    store = Store(db)
    store.start()
    for t, user, cost in [
        ("2026-11-28T09:00:00.000Z", "bob", 1.25),
        ("2026-11-28T09:30:00.000Z", None, 0.5),
        ("2026-11-27T23:59:59.999Z", "bob", 7.0),  # yesterday: month only
        ("2026-10-31T12:00:00.000Z", "bob", 50.0),  # last month: nothing
    ]:
        store.put({"ts": t, "account": "acme", "user": user, "cost_usd": cost})
    store.put({"ts": "2026-11-28T09:00:00.000Z", "account": "acme", "user": "bob", "cost_usd": None})
    store.close()
    b = Budgets(SETTINGS, Clock("2026-11-28T10:00:00+00:00"))
    with sqlite3.connect(db) as conn:
        b.seed(conn)
    by = {(s.scope, s.limit.period): s.spent for s in b.states("acme", "bob")}
    assert by[(("acme", None, False), "daily")] == pytest.approx(1.75)
    assert by[(("acme", None, False), "monthly")] == pytest.approx(8.75)
    assert by[(("acme", "bob", True), "daily")] == pytest.approx(1.25)
    status = {(s.scope, s.limit.period) for s in b.status(ts("2026-11-28T10:00:00+00:00"))}
    assert (("acme", "bob", True), "daily") in status and (("acme", "alice", True), "daily") in status


def test_budget_config_parsing_and_errors(tmp_path: Path) -> None:
    base = """
budget_timezone: America/New_York
accounts:
  - name: acme
    tokens: [sk-metrion-aaaaaaaaaaaaaaaa]
    budget: {daily: 50, monthly: {usd: 1000, enforce: soft}}
    user_budget: {daily: 5}
    user_budgets: {alice: {daily: 20}}
"""
    cfg = parse_config(base, tmp_path / "c.yaml", {})
    spec = cfg.budgets.accounts["acme"]
    assert cfg.budgets.timezone == "America/New_York"
    assert spec.account == (Limit("daily", 50.0), Limit("monthly", 1000.0, hard=False))
    assert spec.user_default == (Limit("daily", 5.0),) and spec.users == {"alice": (Limit("daily", 20.0),)}
    for bad, fragment in [
        (base.replace("America/New_York", "Mars/Olympus"), "line 2, field 'budget_timezone': unknown time zone"),
        (base.replace("daily: 50", "weekly: 50"), "field 'accounts[0].budget.weekly': unknown key"),
        (base.replace("enforce: soft", "enforce: maybe"), "field 'accounts[0].budget.monthly.enforce'"),
        (base.replace("daily: 5}", "daily: -5}"), "field 'accounts[0].user_budget.daily': must be a finite"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            parse_config(bad, tmp_path / "c.yaml", {})


def test_period_bounds_are_utc_aware() -> None:
    start, end = Budgets(BudgetSettings()).period("daily", ts("2026-11-28T23:59:59+00:00"))
    assert start == datetime(2026, 11, 28, tzinfo=UTC) and end == datetime(2026, 11, 29, tzinfo=UTC)
