"""Issue 10 end to end (client -> real mitmdump with the addon -> fake upstream): reservations hold a hard budget
under a burst, token-bound users, normalised labels, start-time attribution across midnight (live and after a
restart), free endpoints, webhook alerts, and the report's reserved column."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from metrion_addon import estimate, report
from metrion_addon.config import load_config
from metrion_addon.pricing import Pricer
from tests.conftest import Proxy, start_proxy, stop_proxy
from tests.fake_upstream import FakeUpstream, Scenario
from tests.webhook import Hooks

TOKEN = "sk-metrion-team-0000000000000000"
ALICE_TOKEN = "sk-metrion-alice-000000000000000"
MODEL = "claude-test-1"  # priced by the override below: $2 / MTok in, $10 / MTok out
# 1,000 in + 100 out = $0.002 + $0.001 = $0.003 a request; the SDK-sized body (~100 bytes) with max_tokens 100
# reserves (100 + 2,000 overhead) x $2 + 100 x $10 per MTok = about $0.0052.
SMALL = {"input_tokens": 1000, "output_tokens": 100, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
COST = 0.003


def config(budget: str, user_budget: str = "{daily: 0.015}", top: str = "") -> str:
    return f"""
  - name: team
    tokens:
      - {TOKEN}
      - {{token: {ALICE_TOKEN}, user: Alice}}
    anthropic_api_key: fake-upstream-key
    allow_passthrough: false
    budget: {budget}
    user_budget: {user_budget}
pricing:
  overrides:
    - {{prefix: claude-test, input: 2, output: 10}}
{top}
"""


def post(
    c: httpx.Client,
    scenario: str,
    user: str | bytes | None = None,
    token: str = TOKEN,
    content: str = "x",
    max_tokens: int = 100,
    path: str = "/v1/messages",
    stream: bool = False,
) -> httpx.Response:
    headers: list[tuple[str, str | bytes]] = [
        ("x-api-key", token),
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
        ("x-fake-scenario", scenario),
    ]
    if user is not None:
        headers.append(("x-metrion-user", user.encode() if isinstance(user, str) else user))
    return c.post(path, headers=headers, content=body_of(content, max_tokens, stream))


def body_of(content: str, max_tokens: int = 100, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    """Poll a state the test controls (no sleeping for a guessed duration); fail rather than hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        time.sleep(0.01)


def team_rows(proxy: Proxy, n: int) -> list[dict[str, Any]]:
    return proxy.wait_rows("account = 'team'", n=n)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Proxy]]:
    proxies: list[Proxy] = []
    yield proxies
    for p in proxies:
        stop_proxy(p)


def run(started: list[Proxy], tmp: Path, fake: FakeUpstream, extra: str, *args: str) -> Proxy:
    p = start_proxy(tmp, fake.url, extra, tuple(args))
    started.append(p)
    return p


def test_burst_of_50_slow_requests_spends_at_most_the_hard_limit(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    # Each request really costs 600 in + 400 out = $0.0052; its body (2,000 bytes of text) and max_tokens 500
    # reserve (about 2,100 + 2,000) x $2 + 500 x $10 per MTok = about $0.0132. 50 arrive together, each held
    # 0.5 s upstream.
    usage = {**SMALL, "input_tokens": 600, "output_tokens": 400}
    fake.add("burst", Scenario(usage=usage, delay=0.5))
    proxy = run(started, tmp_path, fake, config("{daily: 0.03}", user_budget="{daily: 10}"))
    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    with httpx.Client(base_url=proxy.url, timeout=30, limits=limits) as c, ThreadPoolExecutor(50) as ex:
        answers = list(ex.map(lambda _: post(c, "burst", content="word " * 400, max_tokens=500), range(50)))
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(served) + len(refused) == 50 and served
    assert all(a.json()["error"]["type"] == "rate_limit_error" for a in refused)
    rows = team_rows(proxy, 50)
    spent = sum(r["cost_usd"] or 0 for r in rows)
    reserved = sum(float(a.headers["x-metrion-budget-reserved-usd"]) for a in served)
    print(
        f"\nburst: 50 concurrent slow requests against a $0.03 hard daily budget: {len(served)} served, "
        f"{len(refused)} refused; spent ${spent:.4f} of $0.03 (overshoot ${max(0.0, spent - 0.03):.4f}); "
        f"reserved ${reserved:.4f} for the served ones (real cost {spent / max(reserved, 1e-9):.0%} of it)"
    )
    assert spent <= 0.03 + 1e-9  # the fake's usage lies within the bound: the estimation error is 0
    assert sum(r["error"] == "budget_exceeded" for r in rows) == len(refused)
    assert sum(1 for rid in fake.order if fake.received[rid].headers.get("x-fake-scenario") == "burst") == len(served)


def test_label_variants_share_one_budget_and_mixed_scripts_are_refused(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    fake.add("labels", Scenario(usage=SMALL))
    proxy = run(started, tmp_path, fake, config("{daily: 10}", user_budget="{daily: 0.015}"))
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        # 3 x $0.003 spent + a $0.0052 reservation fits $0.015; a fourth spend does not leave room for a fifth.
        for i, label in enumerate(["alice", "Alice", "\u00a0alice\u00a0", "alice\u200b"], 1):  # no-break spaces
            assert post(c, "labels", user=label).status_code == 200, label
            team_rows(proxy, i)
        for label in ["ALICE", "\uff41lice", "alice\u2060"]:  # full-width a, word joiner: still alice
            answer = post(c, "labels", user=label)
            assert answer.status_code == 429 and "user 'alice' daily budget" in answer.json()["error"]["message"]
        assert post(c, "labels", user="bob").status_code == 200  # another user has a budget of their own
        mixed = post(c, "labels", user="alic\u0435")  # Cyrillic e
        assert mixed.status_code == 400 and "mixes scripts" in mixed.json()["error"]["message"]
    rows = team_rows(proxy, 9)
    assert [r["user"] for r in rows[:7]] == ["alice"] * 7
    assert rows[8]["error"] == "invalid_user"


def test_token_bound_user_cannot_escape_its_budget_with_a_header(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    fake.add("bound", Scenario(usage=SMALL))
    proxy = run(started, tmp_path, fake, config("{daily: 10}", user_budget="{daily: 0.015}"))
    before = len(fake.order)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        for i in range(1, 4):
            assert post(c, "bound", token=ALICE_TOKEN, user="ALICE" if i == 2 else None).status_code == 200
            team_rows(proxy, i)
        assert post(c, "bound", token=ALICE_TOKEN).status_code == 200  # $0.009 + $0.0052 fits $0.015
        team_rows(proxy, 4)
        assert post(c, "bound", token=ALICE_TOKEN).status_code == 429  # $0.012 + $0.0052 does not
        dodge = post(c, "bound", token=ALICE_TOKEN, user="bob")
        assert dodge.status_code == 403 and "not this token's user 'alice'" in dodge.json()["error"]["message"]
        assert post(c, "bound", token=TOKEN, user="bob").status_code == 200  # the unbound token: bob's own budget
    assert len(fake.order) == before + 5
    rows = team_rows(proxy, 7)
    assert [(r["user"], r["error"]) for r in rows] == [("alice", None)] * 4 + [
        ("alice", "budget_exceeded"),
        ("alice", "user_conflict"),
        ("bob", None),
    ]


def test_a_stream_across_midnight_counts_in_its_start_day_live_and_after_restart(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    gate = threading.Event()
    fake.add("midnight", Scenario(usage=SMALL, gate=gate))
    fake.add("plain", Scenario(usage=SMALL))
    clock = tmp_path / "clock"
    day1 = datetime(2026, 11, 28, 23, 59, 59, tzinfo=UTC).timestamp()
    day2 = day1 + 2
    clock.write_text(str(day1))
    extra = config("{daily: 0.05}", user_budget="{daily: 10}")
    proxy = run(started, tmp_path, fake, extra, "--set", f"metrion_test_clock={clock}")
    before = len(fake.order)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        box: list[httpx.Response] = []
        t = threading.Thread(target=lambda: box.append(post(c, "midnight", stream=True)))
        t.start()
        until(lambda: len(fake.order) > before)  # the stream is admitted and upstream: its start time is taken
        clock.write_text(str(day2))  # midnight passes while it streams
        gate.set()
        t.join(30)
        assert box[0].status_code == 200 and "message_stop" in box[0].text
        rows = team_rows(proxy, 1)
        assert rows[0]["ts"].startswith("2026-11-28T23:59:5") and rows[0]["cost_usd"] == pytest.approx(COST)

        def spent_today() -> float:  # limit - remaining - this request's own reservation
            h = post(c, "plain").headers
            return 0.05 - float(h["x-metrion-budget-remaining-usd"]) - float(h["x-metrion-budget-reserved-usd"])

        assert spent_today() == pytest.approx(0, abs=1e-6)  # day 2 does not carry the stream
        clock.write_text(str(day1 + 0.5))
        assert spent_today() == pytest.approx(COST, abs=1e-6)  # day 1 does
    team_rows(proxy, 3)
    for now, spent in [(day1 + 0.5, 2 * COST), (day2 + 1, COST)]:  # restarts (the seed) on day 1, then on day 2
        stop_proxy(started.pop())
        clock.write_text(str(now))
        proxy = run(started, tmp_path, fake, extra, "--set", f"metrion_test_clock={clock}")
        with httpx.Client(base_url=proxy.url, timeout=30) as c:
            h = post(c, "plain").headers  # day 1: the stream and the day-1 request; day 2: the day-2 request
            left = float(h["x-metrion-budget-remaining-usd"]) + float(h["x-metrion-budget-reserved-usd"])
            assert left == pytest.approx(0.05 - spent, abs=1e-6)


def test_free_endpoints_pass_an_exhausted_budget(fake: FakeUpstream, tmp_path: Path, started: list[Proxy]) -> None:
    fake.add("free", Scenario(usage=SMALL))
    proxy = run(started, tmp_path, fake, config("{daily: 0.006}", user_budget="{daily: 10}"))
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        assert post(c, "free").status_code == 200
        team_rows(proxy, 1)
        assert post(c, "free").status_code == 429  # $0.003 + $0.0052 does not fit $0.006
        assert post(c, "free", path="/v1/messages/count_tokens").status_code == 200
        models = c.get("/v1/models", headers={"x-api-key": TOKEN, "x-fake-scenario": "free"})
        assert models.status_code == 200


def test_webhook_gets_one_call_per_threshold_per_period(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    hooks = Hooks()
    try:
        fake.add("alerts", Scenario(usage=SMALL))
        clock = tmp_path / "clock"
        day1 = datetime(2026, 11, 28, 12, tzinfo=UTC).timestamp()
        clock.write_text(str(day1))
        top = f"alerts:\n  - url: {hooks.url}\n    on: [soft, hard_80, hard]\n"
        extra = config("{daily: 0.0112, monthly: {usd: 0.005, enforce: soft}}", user_budget="{daily: 10}", top=top)
        proxy = run(started, tmp_path, fake, extra, "--set", f"metrion_test_clock={clock}")
        with httpx.Client(base_url=proxy.url, timeout=30) as c:
            for i in range(1, 4):  # $0.003, $0.006 (soft month), $0.009 (80% of the $0.0112 day)
                assert post(c, "alerts").status_code == 200
                team_rows(proxy, i)
            for _ in range(3):
                assert post(c, "alerts").status_code == 429  # hard: alerted once
            calls = hooks.wait(3)
            clock.write_text(str(day1 + 86400))  # next day: the day's thresholds may fire again, the month's not
            for i in range(7, 10):
                assert post(c, "alerts").status_code == 200
                team_rows(proxy, i)
            assert post(c, "alerts").status_code == 429
            calls = hooks.wait(5)
        by = [(x["event"], x["period"], x["period_start"][:10]) for x in calls]
        assert by[:3] == [("soft", "monthly", "2026-11-01"), ("hard_80", "daily", "2026-11-28"),
                          ("hard", "daily", "2026-11-28")]  # fmt: skip
        assert by[3:5] == [("hard_80", "daily", "2026-11-29"), ("hard", "daily", "2026-11-29")]
        first = calls[0]
        assert first["budget"] == "account 'team' monthly budget" and first["limit"] == 0.005
        assert first["spent"] == pytest.approx(0.006) and first["resets_at"].startswith("2026-12-01")
        stop_proxy(started.pop())
        assert len(hooks.calls) == 5  # the proxy has stopped: nothing else was queued
    finally:
        hooks.close()


def test_report_shows_what_is_reserved_in_flight(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy], capsys: pytest.CaptureFixture[str]
) -> None:
    gate = threading.Event()
    fake.add("stall", Scenario(usage=SMALL, gate=gate))
    proxy = run(started, tmp_path, fake, config("{daily: 1}", user_budget="{daily: 10}"))
    cfg = str(tmp_path / "config.yaml")
    pricer = Pricer(load_config(cfg, env={"METRION_TEST_REAL_KEY": "x"}).price_overrides)
    bodies = [body_of("x" * 1000 * (i + 1)) for i in range(3)]

    def worst_case(body: bytes) -> estimate.Estimate:
        e = estimate.estimate(len(body), json.loads(body), pricer, datetime.now(UTC), None)
        assert e is not None
        return e

    before = len(fake.order)

    def team_day() -> dict[str, Any]:
        assert report.main(["budgets", "--config", cfg, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["rows"]
        return next(r for r in rows if r["account"] == "team" and r["user"] is None and r["period"] == "daily")

    with httpx.Client(base_url=proxy.url, timeout=30) as c, ThreadPoolExecutor(3) as ex:
        futures = [ex.submit(post, c, "stall", None, TOKEN, "x" * 1000 * (i + 1)) for i in range(3)]
        until(lambda: len(fake.order) >= before + 3)  # all three are upstream, held by the gate
        expected = sum(float(e.usd) for e in map(worst_case, bodies))
        seen: list[dict[str, Any]] = []
        until(lambda: seen.append(team_day()) or seen[-1]["reserved_usd"] >= expected - 1e-9)  # published
        held = seen[-1]
        gate.set()
        answers = [f.result() for f in futures]
    proxy_reserved = sum(float(a.headers["x-metrion-budget-reserved-usd"]) for a in answers)
    assert held["spent_usd"] == 0 and held["reserved_usd"] == pytest.approx(proxy_reserved, abs=1e-9)
    assert held["remaining_usd"] == pytest.approx(1 - proxy_reserved, abs=1e-9)
    team_rows(proxy, 3)
    stop_proxy(started.pop())  # a clean stop removes the in-flight file
    after = team_day()
    assert after["reserved_usd"] == 0 and after["spent_usd"] == pytest.approx(3 * COST)
    assert not list(tmp_path.glob("*.inflight-*"))


def test_a_body_over_stream_large_bodies_reserves_its_size_at_the_top_rates(
    fake: FakeUpstream, tmp_path: Path, started: list[Proxy]
) -> None:
    """Such a body goes upstream before metrion can read it: its Content-Length bounds the prompt, the most
    expensive known rates and 128k output tokens the rest. Under $1 that cannot fit; under $100 it does."""
    fake.add("big", Scenario(usage=SMALL))
    proxy = run(started, tmp_path, fake, config("{daily: 1}", user_budget="{daily: 100}"), "--set",
                "stream_large_bodies=1k")  # fmt: skip
    before = len(fake.order)
    # Refused without reading the body: the connection is closed.
    with httpx.Client(base_url=proxy.url, timeout=30) as c, pytest.raises(httpx.HTTPError):
        post(c, "big", content="y" * 4000)
    assert len(fake.order) == before
    assert team_rows(proxy, 1)[0]["error"] == "budget_exceeded"
    stop_proxy(started.pop())
    proxy = run(started, tmp_path, fake, config("{daily: 100}", user_budget="{daily: 100}"), "--set",
                "stream_large_bodies=1k")  # fmt: skip
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        answer = post(c, "big", content="y" * 4000)
    assert answer.status_code == 200 and float(answer.headers["x-metrion-budget-reserved-usd"]) > 10
