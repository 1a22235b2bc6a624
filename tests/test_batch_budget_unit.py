"""Issue 16's last budget piece, pure parts: a Message Batch's worst case (estimate.batch_estimate), and the life
of its reservation (batch_budget.py through admission.Gate): handed from the create call to the batch, released
share by share as results are recorded, at once when the batch ends with nothing billable, and the same after a
restart. No mitmproxy."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from metrion_addon import estimate as est
from metrion_addon.admission import Gate
from metrion_addon.batch_budget import BatchHold, ticket_of
from metrion_addon.budget_settings import AccountBudgets, BudgetSettings, Limit
from metrion_addon.config import PriceOverride
from metrion_addon.pricing import BATCH, Pricer

NOW = datetime(2026, 11, 28, 10, tzinfo=UTC).timestamp()
TS = datetime.fromtimestamp(NOW, UTC)
PRICER = Pricer((PriceOverride("claude-test", Decimal(2), Decimal(10)),))


def params(max_tokens: int = 100, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "claude-test-1", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]} | extra


def batch(*ps: dict[str, Any]) -> dict[str, Any]:
    return {"requests": [{"custom_id": f"r{i}", "params": p} for i, p in enumerate(ps)]}


def one(p: dict[str, Any]) -> est.Estimate:
    """A request's worst case as a Messages request (full price)."""
    size = len(json.dumps(p, separators=(",", ":")).encode())
    e = est.estimate(size, p, PRICER, TS, None)
    assert e is not None
    return e


def top() -> est.Rates:
    return est.max_rates(PRICER, TS)


def test_a_batch_reserves_the_sum_of_its_requests_worst_cases_at_half_price() -> None:
    ps = [params(100), params(4000, "x" * 5000), params(10, cache_control={"type": "ephemeral", "ttl": "1h"})]
    body = batch(*ps)
    got = est.batch_estimate(len(json.dumps(body)), body, PRICER, TS, None, top())
    assert got is not None
    e, n = got
    assert n == 3
    assert e.usd == sum(one(p).usd for p in ps) * BATCH  # tokens at 50%, cache-write (1h) multiplier on top
    assert e.output_tokens == 100 + 4000 + 10
    assert e.input_tokens == sum(one(p).input_tokens for p in ps)


def test_server_tool_uses_keep_their_price_in_a_batch() -> None:
    p = params(50, tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}])
    body = batch(p)
    e = est.batch_estimate(10_000, body, PRICER, TS, None, top())[0]  # type: ignore[index]
    full = one(p)
    search = 3 * Decimal(10) / 1000  # $10 per 1,000 searches, no batch discount
    assert e.usd == (full.usd - search) * BATCH + search


def test_a_published_model_uses_its_batch_rates() -> None:
    p = params(1000) | {"model": "claude-sonnet-5-5"}  # $2 / $10 standard: $1 / $5 in a batch
    e = est.batch_estimate(10_000, batch(p), Pricer(), TS, None, top())[0]  # type: ignore[index]
    size = len(json.dumps(p, ensure_ascii=False, separators=(",", ":")).encode())
    assert e.usd == ((size + est.OVERHEAD_TOKENS) * Decimal(1) + 1000 * Decimal(5)) / 1_000_000


def test_unknown_models_unreadable_bodies_and_odd_requests() -> None:
    unknown = batch(params(10) | {"model": "claude-nobody-9"})
    assert est.batch_estimate(100, unknown, PRICER, TS, None, top()) is None  # unknown_model_budget: refuse
    e, n = est.batch_estimate(100, unknown, PRICER, TS, top(), top())  # type: ignore[misc]
    assert n == 1 and e.rates == "max-known" and e.usd > 0
    # A request without params still reserves what a Messages request without max_tokens would, at top rates.
    e, n = est.batch_estimate(100, {"requests": [{"custom_id": "a"}]}, PRICER, TS, top(), top())  # type: ignore[misc]
    assert n == 1 and e.output_tokens == est.MAX_OUTPUT_TOKENS
    # Not a list of requests (the upstream refuses it): bounded by its size, as a body the proxy cannot read.
    e, n = est.batch_estimate(3000, {"requests": "nope"}, PRICER, TS, top(), top())  # type: ignore[misc]
    assert n == 0 and e == est.unreadable_batch(3000, top())
    big = est.unreadable_batch(3000, top())  # up to 100 requests of 30 bytes, each with 128,000 output tokens
    assert big.output_tokens == 100 * est.MAX_OUTPUT_TOKENS
    assert big.usd == (big.input_tokens * top().cache_write_1h + big.output_tokens * top().output) * BATCH / 1_000_000


def settings() -> BudgetSettings:
    return BudgetSettings(accounts={"acme": AccountBudgets(account=(Limit("daily", 1.0),))})


class Clock:
    def __call__(self) -> float:
        return NOW


def create(gate: Gate, ticket: str, body: dict[str, Any]) -> tuple[Any, dict[str, str] | None]:
    assert gate.at_headers(ticket, "acme", None, "/v1/messages/batches", NOW, method="POST")[0] is None
    return gate.at_body(ticket, "acme", None, "/v1/messages/batches", NOW, 1000, body, "POST")


def reserved(gate: Gate, now: float = NOW) -> float:
    """What the account's day of `now` has reserved."""
    return next(s.reserved for s in gate.budgets.states("acme", None, now) if s.limit.period == "daily")


def test_refused_when_the_batch_does_not_fit() -> None:
    gate = Gate(settings(), PRICER, Clock())
    body = batch(*[params(20_000)] * 10)  # 10 x 20,000 output at $5 / MTok = $1, plus input: over $1
    refusal, _ = create(gate, "c", body)
    assert refusal is not None and refusal.status == 429 and "worst-case cost" in refusal.message
    assert reserved(gate) == 0
    gate.settle("c", "acme", None, None, NOW)
    assert gate.at_body("l", "acme", None, "/v1/messages/batches", NOW, 10, None, "GET") == (None, None)  # list


def test_the_reservation_moves_to_the_batch_shrinks_per_result_and_ends() -> None:
    gate = Gate(settings(), PRICER, Clock())
    body = batch(*[params(10_000)] * 4)
    refusal, headers = create(gate, "c", body)
    assert refusal is None and headers is not None
    worst = float(headers["x-metrion-budget-reserved-usd"])
    assert worst == pytest.approx(float(est.batch_estimate(1000, body, PRICER, TS, None, top())[0].usd), abs=1e-6)  # type: ignore[index]
    assert gate.batch_created("c", {"id": "msgbatch_1", "processing_status": "in_progress"}) == pytest.approx(worst)
    gate.settle("c", "acme", None, 0.0, NOW)  # the create call's $0 row: the batch keeps the reservation
    assert reserved(gate) == pytest.approx(worst)
    assert gate.budgets.reserved_for(ticket_of("msgbatch_1")) == pytest.approx(worst)

    def result(cid: str, kind: str, cost: float) -> None:
        row = {"account": "acme", "user": None, "batch_id": "msgbatch_1", "custom_id": cid, "batch_result": kind}
        gate.batch_result(row | {"cost_usd": cost}, NOW)

    result("r0", "succeeded", 0.01)  # its share is released, its cost counted
    assert reserved(gate) == pytest.approx(worst * 3 / 4)
    result("r1", "errored", 0.0)  # not billed: releases its share
    assert reserved(gate) == pytest.approx(worst / 2)
    spent = 1.0 - gate.budgets.check("acme", None).remaining - reserved(gate)  # type: ignore[operator]
    assert spent == pytest.approx(0.01)
    gate.batch_seen([{"id": "msgbatch_1", "processing_status": "ended", "request_counts": {"succeeded": 2}}])
    assert reserved(gate) == pytest.approx(worst / 4)  # ended: only its one unread succeeded result is left
    result("r2", "succeeded", 0.02)
    result("r3", "canceled", 0.0)
    assert reserved(gate) == 0 and gate.batches.hold("msgbatch_1") is None


def test_an_ended_batch_with_nothing_billable_releases_at_once_and_failed_creates_release() -> None:
    gate = Gate(settings(), PRICER, Clock())
    create(gate, "c", batch(params(10), params(10)))
    gate.batch_created("c", {"id": "b2"})
    assert reserved(gate) > 0
    gate.batch_seen([{"id": "b2", "processing_status": "ended", "request_counts": {"canceled": 2, "succeeded": 0}}])
    assert reserved(gate) == 0
    create(gate, "d", batch(params(10)))  # the upstream refused the batch: the call's row settles it
    gate.settle("d", "acme", None, 0.0, NOW)
    assert reserved(gate) == 0 and not gate.batches._sizes


def test_a_hold_never_takes_more_than_its_worst_case() -> None:
    h = BatchHold(worst=1.0, requests=4)
    h.recorded, h.recorded_billed, h.spent = 1, 1, 0.9  # one result cost far more than its quarter
    assert h.left() == pytest.approx(0.1)  # reserved + spent stays at the worst case
    h.billable = 1
    assert h.left() == 0


def test_a_restart_seeds_what_unmetered_batches_still_reserve(tmp_path: Path) -> None:
    from metrion_addon.batch_recorder import BatchRecorder
    from metrion_addon.store import Store, connect

    db = tmp_path / "m.db"
    store = Store(db)
    store.start()
    rows: list[dict[str, Any]] = []
    rec = BatchRecorder(db, PRICER, rows.append)
    rec.start()
    who = ("acme", None, "managed")
    rec.created(
        [{"id": "b1", "processing_status": "in_progress"}], who, json.dumps(batch(*[params()] * 4)).encode(), NOW, "u"
    )
    rec.reserved("b1", 0.4, NOW, 4)
    rec.created([{"id": "b2"}], who, None, NOW, "u")
    rec.reserved("b2", 0.2, NOW, 2)
    rec.seen([{"id": "b2", "processing_status": "ended", "request_counts": {"expired": 2, "succeeded": 0}}])
    rec.wait_idle()
    rec.close()
    store.put({"ts": "2026-11-28T10:00:00.000Z", "account": "acme", "batch_id": "b1", "custom_id": "r0",
               "batch_result": "succeeded", "cost_usd": 0.01})  # fmt: skip
    store.close()

    gate = Gate(settings(), PRICER, Clock()).start(db, connect)
    try:
        assert gate.batches.reserved("b1") == pytest.approx(0.3)  # 3 of 4 results still to come
        assert gate.batches.reserved("b2") == 0  # ended with nothing billable
        assert reserved(gate) == pytest.approx(0.3)
        remaining = gate.budgets.check("acme", None).remaining
        assert remaining == pytest.approx(1.0 - 0.01 - 0.3)
    finally:
        gate.close()


def test_a_batch_created_late_in_the_day_must_fit_tomorrow_too() -> None:
    """Its results count at its end, up to 24 hours later: the reservation is held in both days."""
    late = datetime(2026, 11, 28, 22, tzinfo=UTC).timestamp()
    tomorrow = late + 6 * 3600

    class Late:
        def __call__(self) -> float:
            return late

    gate = Gate(settings(), PRICER, Late())
    gate.budgets.add("acme", None, 0.9, now=tomorrow)  # tomorrow is nearly used up already
    body = batch(params(30_000))  # $0.15 of output at batch prices: fits today, not tomorrow
    assert gate.at_headers("c", "acme", None, "/v1/messages/batches", late, method="POST")[0] is None
    refusal, _ = gate.at_body("c", "acme", None, "/v1/messages/batches", late, 1000, body, "POST")
    assert refusal is not None and refusal.status == 429
    gate.settle("c", "acme", None, 0.0, late)

    gate = Gate(settings(), PRICER, Late())
    assert gate.at_headers("d", "acme", None, "/v1/messages/batches", late, method="POST")[0] is None
    assert gate.at_body("d", "acme", None, "/v1/messages/batches", late, 1000, body, "POST")[0] is None
    gate.batch_created("d", {"id": "b"})
    held = gate.budgets.reserved_for(ticket_of("b"))
    assert reserved(gate, late) == reserved(gate, tomorrow) == pytest.approx(held)
    assert reserved(gate, tomorrow + 86400) == 0
    gate.batch_result({"account": "acme", "batch_id": "b", "batch_result": "succeeded", "cost_usd": 0.1}, tomorrow)
    assert reserved(gate, late) == reserved(gate, tomorrow) == 0
