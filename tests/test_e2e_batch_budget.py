"""Issue 16, batches under a hard budget, end to end (client -> real mitmdump with the addon -> fake upstream): a
batch reserves its worst case at creation (refused locally with a 429 when that does not fit), and keeps it,
across a restart, until its results are metered, share by share."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from metrion_addon import estimate
from metrion_addon.config import PriceOverride
from metrion_addon.inflight import read_inflight
from metrion_addon.pricing import Pricer
from tests.conftest import Proxy, start_proxy, stop_proxy
from tests.fake_upstream import FakeUpstream

TOKEN = "sk-metrion-team-0000000000000000"
MODEL = "claude-test-1"  # priced by the override below: $2 / MTok in, $10 / MTok out; in a batch $1 / $5
CONFIG = f"""
  - name: team
    tokens: [{TOKEN}]
    anthropic_api_key: fake-upstream-key
    allow_passthrough: false
    budget: {{daily: LIMIT}}
    user_budget: {{daily: LIMIT}}
pricing:
  overrides:
    - {{prefix: claude-test, input: 2, output: 10}}
"""
NOW = datetime(2026, 12, 1, 13, tzinfo=UTC).timestamp()  # the fake ends its batches on 2026-12-01 at 12:00 UTC
HEADERS = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01", "content-type": "application/json"}


def request(custom_id: str, max_tokens: int, inp: int = 1000, out: int = 100) -> dict[str, Any]:
    usage = {"input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    params = {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": custom_id, "params": params | {"fake_usage": usage}}


def cost(inp: int, out: int) -> float:
    return (inp * 2 + out * 10) / 2 / 1e6


def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    """Poll a state the test controls (no sleeping for a guessed duration); fail rather than hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        time.sleep(0.01)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Proxy]]:
    proxies: list[Proxy] = []
    yield proxies
    for p in proxies:
        stop_proxy(p)


def run(started: list[Proxy], tmp: Path, fake: FakeUpstream, *args: str, limit: float = 1) -> Proxy:
    clock = tmp / "clock"
    clock.write_text(str(NOW))
    # No background polling: the test reads the results itself, when it chooses.
    extra = ("--set", f"metrion_test_clock={clock}", "--set", "metrion_batch_poll_seconds=0", *args)
    p = start_proxy(tmp, fake.url, CONFIG.replace("LIMIT", str(limit)), extra)
    started.append(p)
    return p


def remaining(c: httpx.Client) -> float:
    """What a following request is told is left of the tightest budget (the account's day): a batch list,
    billed by nothing, reserving nothing of its own."""
    r = c.get("/v1/messages/batches", headers=HEADERS)
    assert r.status_code == 200
    return float(r.headers["x-metrion-budget-remaining-usd"])


def in_flight(db: Path) -> float:
    """What `metrion-report budgets` shows as reserved for the account's day (the proxy's in-flight file)."""
    today = datetime.fromtimestamp(NOW, UTC).date()
    return sum(
        usd
        for ((_, _, is_user), period, start), usd in read_inflight(db)
        if not is_user and period == "daily" and start.date() == today
    )


def test_a_batch_whose_worst_case_does_not_fit_is_refused_locally(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    proxy = run(started, tmp_path, fake)
    body = {"requests": [request(f"big-{i}", 30_000) for i in range(10)]}  # 300,000 output tokens at $5: $1.50
    before = len(fake.order)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        r = c.post("/v1/messages/batches", headers=HEADERS, content=json.dumps(body))
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "cannot cover this request's worst-case cost" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
        assert len(fake.order) == before  # never reached the upstream
        row = proxy.wait_rows("account = 'team' AND path = '/v1/messages/batches'")[0]
        assert (row["status"], row["error"]) == (429, "budget_exceeded")
        assert remaining(c) == pytest.approx(1.0)  # nothing stays reserved
    assert proxy.rows("batch_id IS NOT NULL") == []


def test_an_admitted_batch_reserves_until_its_results_are_read_across_a_restart(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    proxy = run(started, tmp_path, fake)
    reqs = [request("ok-1", 10_000, 1000, 100), request("ok-2", 10_000, 2000, 200), request("errored-3", 10_000),
            request("ok-4", 10_000, 4000, 400)]  # fmt: skip
    raw = json.dumps({"requests": reqs}).encode()
    pricer = Pricer((PriceOverride("claude-test", Decimal(2), Decimal(10)),))  # as the config says
    ts = datetime.fromtimestamp(NOW, UTC)
    worst = estimate.batch_estimate(len(raw), json.loads(raw), pricer, ts, None, estimate.max_rates(pricer, ts))
    assert worst is not None and worst[1] == 4
    r_usd = float(worst[0].usd)  # about 40,000 output tokens at $5 / MTok: $0.20 and a little input
    assert 0.2 < r_usd < 0.25
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        created = c.post("/v1/messages/batches", headers={**HEADERS, "x-fake-cut-results": "2"}, content=raw)
        assert created.status_code == 200
        batch_id = created.json()["id"]
        assert float(created.headers["x-metrion-budget-reserved-usd"]) == pytest.approx(r_usd, abs=1e-6)
        assert proxy.row(created.headers["request-id"])["cost_usd"] == 0  # the call itself is free
        # The call has ended; the batch keeps its reservation: a following request sees it.
        assert remaining(c) == pytest.approx(1.0 - r_usd, abs=1e-6)
        until(lambda: in_flight(proxy.db) == pytest.approx(r_usd, abs=1e-6))  # and metrion-report budgets

        assert c.get(f"/v1/messages/batches/{batch_id}", headers=HEADERS).json()["processing_status"] == "ended"
        # Ended with 3 succeeded results to read: the errored one's share is released at once.
        until(lambda: remaining(c) == pytest.approx(1.0 - r_usd * 3 / 4, abs=1e-6))
        with pytest.raises(httpx.HTTPError):  # the upstream cuts the results after 2 lines
            c.get(f"/v1/messages/batches/{batch_id}/results", headers=HEADERS).read()
        proxy.wait_rows("batch_id = ?", (batch_id,), n=2)
        spent_2 = cost(1000, 100) + cost(2000, 200)
        until(lambda: remaining(c) == pytest.approx(1.0 - spent_2 - r_usd / 4, abs=1e-6))  # one share left

    stop_proxy(started.pop())  # a restart: the last share is still reserved
    proxy = run(started, tmp_path, fake)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        assert remaining(c) == pytest.approx(1.0 - spent_2 - r_usd / 4, abs=1e-6)
        until(lambda: in_flight(proxy.db) == pytest.approx(r_usd / 4, abs=1e-6))
        lines = c.get(f"/v1/messages/batches/{batch_id}/results", headers=HEADERS).text.splitlines()
        assert len(lines) == 4
        rows = proxy.wait_rows("batch_id = ?", (batch_id,), n=4)
        spent = cost(1000, 100) + cost(2000, 200) + cost(4000, 400)
        assert sum(r["cost_usd"] for r in rows) == pytest.approx(spent, abs=1e-9)
        until(lambda: remaining(c) == pytest.approx(1.0 - spent, abs=1e-6))  # all read: nothing reserved
        until(lambda: in_flight(proxy.db) == 0)

    stop_proxy(started.pop())  # and after another restart, nothing comes back
    proxy = run(started, tmp_path, fake)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        assert remaining(c) == pytest.approx(1.0 - spent, abs=1e-6)


def test_a_batch_body_over_stream_large_bodies_reserves_as_many_requests_as_it_can_hold(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    """Such a body goes upstream before metrion can read it: its size bounds its prompt tokens and its number of
    requests (30 bytes each at least), each with 128,000 output tokens, at the top rates and batch prices."""
    raw = json.dumps({"requests": [request(f"ok-{i}", 10) for i in range(5)]}).encode()
    assert len(raw) > 1024
    top = estimate.max_rates(Pricer((PriceOverride("claude-test", Decimal(2), Decimal(10)),)), datetime.now(UTC))
    worst = float(estimate.unreadable_batch(len(raw), top).usd)
    proxy = run(started, tmp_path, fake, "--set", "stream_large_bodies=1k")
    before = len(fake.order)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        with pytest.raises(httpx.HTTPError):  # refused without reading the body: the connection is closed
            c.post("/v1/messages/batches", headers=HEADERS, content=raw)
        assert len(fake.order) == before
    assert proxy.wait_rows("account = 'team'")[0]["error"] == "budget_exceeded"

    stop_proxy(started.pop())
    limit = 10 * worst
    proxy = run(started, tmp_path, fake, "--set", "stream_large_bodies=1k", limit=limit)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        created = c.post("/v1/messages/batches", headers=HEADERS, content=raw)
        assert created.status_code == 200
        assert float(created.headers["x-metrion-budget-reserved-usd"]) == pytest.approx(worst, rel=1e-6)
        batch_id = created.json()["id"]  # the batch object says it holds 5 requests: a fifth each
        until(lambda: in_flight(proxy.db) == pytest.approx(worst, rel=1e-6))
        c.get(f"/v1/messages/batches/{batch_id}", headers=HEADERS)
        assert len(c.get(f"/v1/messages/batches/{batch_id}/results", headers=HEADERS).text.splitlines()) == 5
        proxy.wait_rows("batch_id = ?", (batch_id,), n=5)
        until(lambda: in_flight(proxy.db) == 0)
