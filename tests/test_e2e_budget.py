"""Budgets through the real path: SDK -> mitmdump with the addon -> fake upstream, with a restart in between."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from tests.conftest import BIN, SHIM, free_port, wait_port
from tests.fake_upstream import FakeUpstream, Scenario

TOKEN = "sk-metrion-budget-0000000000000000"
MODEL = "claude-sonnet-5-5"  # $2 / MTok in, $10 / MTok out
# 10,000 in + 1,000 out = $0.02 + $0.01 = $0.03 per request; the daily hard limit is $0.05.
USAGE = {"input_tokens": 10_000, "output_tokens": 1_000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


class Launcher:
    def __init__(self, tmp: Path, upstream: str, top: str = "") -> None:
        self.tmp, self.upstream = tmp, upstream
        self.db = tmp / "budget.db"
        self.clock = tmp / "clock"
        self.cfg = tmp / "budget.yaml"
        self.cfg.write_text(
            f"""
database: {self.db}
{top}
accounts:
  - name: team
    tokens: [{TOKEN}]
    anthropic_api_key: fake-upstream-key
    allow_passthrough: false
    budget:
      daily: 0.05
      monthly: {{usd: 100, enforce: soft}}
    user_budgets:
      carol: {{daily: {{usd: 0.01, enforce: soft}}}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        cmd = [
            str(BIN / "mitmdump"), "-s", str(SHIM),
            "--mode", f"reverse:{self.upstream}@127.0.0.1:{port}",
            "--set", "connection_strategy=lazy",
            "--set", f"metrion_config={self.cfg}",
            "--set", f"metrion_test_clock={self.clock}",
            "--set", f"confdir={self.tmp / 'conf'}",
        ]  # fmt: skip
        with (self.tmp / "mitmdump.log").open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        wait_port(port, self.proc)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def client(self, user: str = "bob") -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.url,
            api_key=TOKEN,
            max_retries=0,
            default_headers={"x-fake-scenario": "budget", "x-metrion-user": user},
        )


@pytest.fixture
def launcher(fake: FakeUpstream, tmp_path: Path) -> Iterator[Launcher]:
    fake.add("budget", Scenario(usage=USAGE))
    launch = Launcher(tmp_path, fake.url)
    launch.start()
    yield launch
    launch.stop()


def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT status, error, cost_usd, account FROM requests ORDER BY id").fetchall()


def settled(launcher: Launcher, n: int) -> None:
    """Wait until the proxy has recorded n requests. A request that arrives while the previous one is still
    being accounted is 'in flight' for the budget (the documented overshoot bound); waiting makes it exact."""
    deadline = time.monotonic() + 10
    while len(rows(launcher.db)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} rows"
        time.sleep(0.02)


def stream_once(c: anthropic.Anthropic) -> str | None:
    """One streamed request; returns what the x-metrion-budget-remaining-usd header said was left *before* this
    request's own reservation (x-metrion-budget-reserved-usd), i.e. the limit minus what was spent."""
    with c.messages.stream(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
        s.until_done()
        h = s.response.headers
        remaining = h.get("x-metrion-budget-remaining-usd")
        if remaining is None:
            return None
        return f"{float(remaining) + float(h.get('x-metrion-budget-reserved-usd', 0)):.6f}"


def test_hard_budget_holds_across_restart_and_resets_next_day(launcher: Launcher, fake: FakeUpstream) -> None:
    c = launcher.client()
    assert stream_once(c) == "0.050000"  # streamed spend counts: $0.03 each
    settled(launcher, 1)
    assert stream_once(c) == "0.020000"
    settled(launcher, 2)

    before = len(fake.order)
    with pytest.raises(anthropic.RateLimitError) as blocked:
        c.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert len(fake.order) == before  # upstream saw nothing
    err = blocked.value
    assert err.status_code == 429
    assert err.body["type"] == "error" and err.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "account 'team' daily budget of $0.05" in err.message and "resets at" in err.message
    assert 0 < int(err.response.headers["retry-after"]) <= 86400

    settled(launcher, 3)
    launcher.stop()  # restart: the spend comes back from the database
    launcher.start()
    with pytest.raises(anthropic.RateLimitError):
        launcher.client().messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert len(fake.order) == before

    launcher.clock.write_text(str(time.time() + 86400))  # tomorrow
    assert stream_once(launcher.client()) == "0.050000"
    assert len(fake.order) == before + 1
    settled(launcher, 5)
    got = rows(launcher.db)
    assert [r[:2] for r in got] == [(200, None), (200, None), (429, "budget_exceeded"), (429, "budget_exceeded"),
                                     (200, None)]  # fmt: skip
    assert [r[2] for r in got] == pytest.approx([0.03, 0.03, 0, 0, 0.03], abs=1e-12)
    assert {r[3] for r in got} == {"team"}


def test_soft_user_budget_warns_in_a_header_but_allows(launcher: Launcher) -> None:
    c = launcher.client(user="carol")
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert "x-metrion-budget-warning" not in raw.headers
    settled(launcher, 1)
    left = float(raw.headers["x-metrion-budget-remaining-usd"]) + float(raw.headers["x-metrion-budget-reserved-usd"])
    assert f"{left:.6f}" == "0.010000"  # carol's $0.01 soft limit is tightest (less this request's reservation)
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert raw.http_response.status_code == 200
    assert "user 'carol' daily budget" in raw.headers["x-metrion-budget-warning"]
    assert raw.headers["x-metrion-budget-remaining-usd"] == "0.000000"


def test_unknown_models_can_be_refused_outright(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.add("budget", Scenario(usage=USAGE))
    launch = Launcher(tmp_path, fake.url, top="block_unknown_models: true")
    launch.start()
    try:
        before = len(fake.order)
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            launch.client().messages.create(
                model="claude-private-9", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
        assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
        assert "'claude-private-9' has no known price" in refused.value.message
        assert len(fake.order) == before
        assert stream_once(launch.client()) == "0.050000"  # a priced model passes
        settled(launch, 2)
        assert [r[:2] for r in rows(launch.db)] == [(403, "unknown_model_blocked"), (200, None)]
    finally:
        launch.stop()
