"""Fleet-mode admission without a database: Budgets and Gate against a stand-in lease book. A hard budget admits
against the proxy's slice, a request that does not fit asks the book for more, and each refusal tells the client
why (no slice yet, the rest held by other proxies, the database away, the budget used up fleet-wide)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from metrion_addon.admission import Gate
from metrion_addon.budget_settings import AccountBudgets, BudgetSettings, Limit
from metrion_addon.config import PriceOverride
from metrion_addon.pricing import Pricer

NOW = datetime(2026, 11, 28, 10, tzinfo=UTC).timestamp()
PRICER = Pricer((PriceOverride("claude-test", Decimal(2), Decimal(10)),))
KEY = (("team", None, False), "daily", datetime(2026, 11, 28, tzinfo=UTC))


class Book:
    """What Budgets and Gate read of leases.LeaseBook."""

    def __init__(self) -> None:
        self.slices: dict[Any, float] = {}
        self.others_spent = 0.0
        self.free_left: float | None = None
        self.failing = False
        self.wanted: dict[Any, float] = {}

    def slice(self, key: Any) -> float:
        return self.slices.get(key, 0.0)

    def others(self, key: Any) -> float:
        return self.others_spent

    def free(self, key: Any) -> float | None:
        return self.free_left

    def want(self, key: Any, shortfall: float, size: float = 0.0) -> None:
        self.wanted[key] = shortfall

    def close(self) -> None:
        pass


def gate(limit: float = 1.0) -> tuple[Gate, Book]:
    settings = BudgetSettings(accounts={"team": AccountBudgets(account=(Limit("daily", limit),))})
    g = Gate(settings, PRICER, lambda: NOW)
    book = Book()
    g.budgets.fleet = book  # type: ignore[assignment]
    return g, book


def body(max_tokens: int = 1000) -> dict[str, Any]:
    return {"model": "claude-test-1", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}


def test_no_slice_yet_is_a_429_to_retry_in_a_second_and_asks_for_one() -> None:
    g, book = gate()
    refusal, _ = g.at_headers(1, "team", None, "/v1/messages", NOW)
    assert refusal is not None and refusal.status == 429 and refusal.retry_after == "1"
    assert "getting this proxy's share" in refusal.message and KEY in book.wanted
    assert g.budgets.check("team", None, now=NOW).blocked is not None  # fail closed: nothing passes without a slice


def test_a_request_is_admitted_within_the_slice_and_refused_beyond_it() -> None:
    g, book = gate()
    book.slices[KEY] = 0.05
    book.free_left = 0.5
    assert g.at_headers(1, "team", None, "/v1/messages", NOW)[0] is None
    refusal, headers = g.at_body(1, "team", None, "/v1/messages", NOW, 100, body(1000), "POST")
    assert refusal is None and float(headers["x-metrion-budget-reserved-usd"]) > 0  # type: ignore[index]
    first = g.budgets.reserved_for(1)
    assert g.at_headers(2, "team", None, "/v1/messages", NOW)[0] is None
    refusal, _ = g.at_body(2, "team", None, "/v1/messages", NOW, 100, body(5000), "POST")  # $0.05 worst case
    assert refusal is not None and refusal.retry_after == "1" and "worst-case cost" in refusal.message
    assert book.wanted[KEY] > first  # what this request lacked on this proxy: more than the headroom left
    book.free_left = 0.0
    refusal, _ = g.at_body(2, "team", None, "/v1/messages", NOW, 100, body(5000), "POST")
    assert refusal is not None and refusal.retry_after == "5" and "held by other proxies" in refusal.message
    book.failing = True
    refusal, _ = g.at_body(2, "team", None, "/v1/messages", NOW, 100, body(5000), "POST")
    assert refusal is not None and refusal.retry_after == "5" and "unreachable" in refusal.message
    g.settle(1, "team", None, 0.001, NOW)
    assert g.budgets.states("team", None, NOW)[0].own == 0.001


def test_fleet_wide_spend_is_used_up_as_on_one_proxy() -> None:
    g, book = gate(limit=1.0)
    book.slices[KEY] = 0.5
    book.others_spent = 1.0  # the other proxies spent it all
    refusal, _ = g.at_headers(1, "team", None, "/v1/messages", NOW)
    assert refusal is not None and "is used up" in refusal.message
    assert int(refusal.retry_after or 0) > 60  # until the day resets
    assert g.budgets.states("team", None, NOW)[0].spent == 1.0
