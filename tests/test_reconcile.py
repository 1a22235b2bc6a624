"""metrion-reconcile end to end: traffic through a real proxy to the fake upstream, whose Admin API reports what it
actually served; then each injected discrepancy is found, attributed to its cause, and fails the exit status."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from metrion_addon import reconcile_cli
from tests.conftest import BIN, CLIENT_KEY, MANAGED_TOKEN, PASS_TOKEN, REAL_KEY, Proxy, start_proxy, stop_proxy
from tests.fake_admin import FakeAdmin
from tests.fake_upstream import FakeUpstream, Scenario

ADMIN_KEY = "sk-ant-admin01-FAKE-admin-key-DO-NOT-LEAK-4242424242"
OTHER_KEY = "sk-ant-api03-LEAKED-elsewhere-key-0000000000001111"
PRICES = {"claude-test-": {"input": 2, "output": 10, "cache_write_5m": 2.5, "cache_write_1h": 4, "cache_read": 0.2}}
EXTRA_CONFIG = """
reconcile:
  admin_api_key: ${{ANTHROPIC_ADMIN_KEY}}
  base_url: {url}
pricing:
  overrides:
    - prefix: claude-test-
      input: 2
      output: 10
      cache_write_5m: 2.5
      cache_write_1h: 4
      cache_read: 0.2
"""
CACHED = {
    "input_tokens": 1000,
    "output_tokens": 2000,
    "cache_creation_input_tokens": 4000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 3000},
    "cache_read_input_tokens": 9000,
}


@dataclass
class World:
    fake: FakeUpstream
    admin: FakeAdmin
    proxy: Proxy
    config: Path
    tmp: Path


def _wait_past_midnight() -> None:
    """Proxy and provider each date a request by its own clock: keep the traffic clear of a UTC day boundary."""
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    if (midnight - now).total_seconds() < 60:
        time.sleep((midnight - now).total_seconds() + 1)


def send(url: str, key_headers: dict[str, str], model: str, *, stream: bool = False, **headers: str) -> str:
    body = {"model": model, "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    h = {"anthropic-version": "2023-06-01", **key_headers, **headers}
    r = httpx.post(f"{url}/v1/messages", json=body, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["request-id"]


def managed(w: World, model: str, **kw: Any) -> str:
    rid = send(w.proxy.url, {"x-api-key": MANAGED_TOKEN}, model, **kw)
    w.proxy.row(rid)  # written
    return rid


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    fake = FakeUpstream().start()
    admin = FakeAdmin(fake, ADMIN_KEY, {p: {k: Decimal(str(v)) for k, v in r.items()} for p, r in PRICES.items()})
    fake.add("cached", Scenario(usage=CACHED))
    proxy = start_proxy(tmp_path, fake.url, EXTRA_CONFIG.format(url=fake.url))
    w = World(fake, admin, proxy, tmp_path / "config.yaml", tmp_path)
    try:
        _wait_past_midnight()
        managed(w, "claude-test-1", **{"x-fake-usage": "100000,50000"})
        managed(w, "claude-test-1", stream=True, **{"x-fake-usage": "30000,7000"})
        managed(w, "claude-test-2", **{"x-fake-scenario": "cached"})
        managed(w, "claude-test-2", stream=True, **{"x-fake-usage": "100000,50000"})
        yield w
    finally:
        stop_proxy(proxy)
        fake.stop()


def reconcile(
    w: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, dict[str, Any]]:
    monkeypatch.setenv("ANTHROPIC_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("METRION_TEST_REAL_KEY", REAL_KEY)
    code = reconcile_cli.main(["-c", str(w.config), "--json", *args])
    out, err = capsys.readouterr()
    assert ADMIN_KEY not in out + err and REAL_KEY not in out + err
    assert code in (0, 1), err
    return code, json.loads(out)


def bad(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["rows"] if not r["within_tolerance"]]


def assert_no_admin_key_anywhere(w: World) -> None:
    for path in [w.proxy.log, *w.tmp.glob("metrion.db*")]:
        assert ADMIN_KEY.encode() not in path.read_bytes(), path
    stop_proxy(w.proxy)  # flushes the log and checkpoints the WAL: look again
    for path in [w.proxy.log, *w.tmp.glob("metrion.db*")]:
        assert ADMIN_KEY.encode() not in path.read_bytes(), path


def test_all_green_analytics_then_paginated(world: World, capsys, monkeypatch) -> None:
    code, doc = reconcile(world, capsys, monkeypatch)
    assert code == 0 and doc["ok"] and doc["api"] == "analytics", bad(doc)
    assert {(r["model"], r["accounts"], r["cause"]) for r in doc["rows"]} == {
        ("claude-test-1", "acme", "ok"),
        ("claude-test-2", "acme", "ok"),
    }
    t2 = next(r for r in doc["rows"] if r["model"] == "claude-test-2")
    assert (t2["provider_cache_write_1h"], t2["meter_cache_write_1h"], t2["meter_cache_read"]) == (3000, 3000, 9000)
    assert Decimal(t2["provider_cost_usd"]) == Decimal(t2["meter_cost_usd"]) > 0
    assert any("may still be incomplete" in n for n in doc["notes"])
    # The same answer when every list comes one row per page.
    calls = len(world.admin.admin_requests)
    world.admin.page_size = 1
    code, paged = reconcile(world, capsys, monkeypatch)
    assert code == 0 and paged["rows"] == doc["rows"]
    assert len(world.admin.admin_requests) - calls > 4  # keys, usage and cost each took several pages
    assert_no_admin_key_anywhere(world)


def test_traffic_that_bypassed_the_proxy_is_unmetered(world: World, capsys, monkeypatch) -> None:
    send(world.fake.url, {"x-api-key": REAL_KEY}, "claude-test-1", **{"x-fake-usage": "5000,1000"})  # around it
    code, doc = reconcile(world, capsys, monkeypatch)
    assert code == 1 and not doc["ok"]
    [row] = bad(doc)
    assert (row["model"], row["accounts"], row["cause"]) == ("claude-test-1", "acme", "unmetered traffic")
    assert (row["provider_input"] - row["meter_input"], row["token_diff"]) == (5000, 6000)
    assert Decimal(row["cost_diff_usd"]) == Decimal("0.02")  # 5000 x $2 + 1000 x $10 per MTok
    assert_no_admin_key_anywhere(world)


def test_price_difference_is_price_drift_with_implied_rate(world: World, capsys, monkeypatch) -> None:
    world.admin.price_factor["claude-test-2"] = Decimal("1.25")
    code, doc = reconcile(world, capsys, monkeypatch)
    assert code == 1
    [row] = bad(doc)
    assert (row["model"], row["cause"], row["token_diff"]) == ("claude-test-2", "price drift", 0)
    assert "output: billed $12.5000/MTok, metered $10.0000/MTok" in row["detail"]
    assert "input: billed $2.5000/MTok, metered $2.0000/MTok" in row["detail"]
    assert abs(Decimal(row["cost_diff_usd"]) - Decimal(row["meter_cost_usd"]) * Decimal("0.25")) < Decimal("1e-8")


def test_unknown_key_is_not_behind_this_proxy(world: World, capsys, monkeypatch) -> None:
    send(world.fake.url, {"authorization": f"Bearer {OTHER_KEY}"}, "claude-test-1")
    code, doc = reconcile(world, capsys, monkeypatch)
    assert code == 1
    [row] = bad(doc)
    assert (row["accounts"], row["cause"], row["meter_tokens"]) == ("", "not behind this proxy", 0)
    assert OTHER_KEY not in json.dumps(doc)
    # A key known to be used elsewhere can be reported without alerting.
    code, doc = reconcile(world, capsys, monkeypatch, "--ignore-key", row["api_key_id"])
    assert code == 0 and [r["ignored"] for r in doc["rows"] if r["api_key_id"] == row["api_key_id"]] == [True]


def test_passthrough_is_out_of_scope_and_its_key_not_behind_the_proxy(world: World, capsys, monkeypatch) -> None:
    send(world.proxy.url, {"x-api-key": CLIENT_KEY, "x-metrion-token": PASS_TOKEN}, "claude-test-1")
    world.proxy.wait_rows("mode = 'passthrough'")
    code, doc = reconcile(world, capsys, monkeypatch)
    assert code == 1 and doc["passthrough_requests"] == 1
    assert [r["cause"] for r in bad(doc)] == ["not behind this proxy"]
    assert any("Out of scope: 1 pass-through request" in n for n in doc["notes"])
    # --account acme: only acme's key is compared; other keys are left out.
    code, doc = reconcile(world, capsys, monkeypatch, "--account", "acme")
    assert code == 0 and {r["accounts"] for r in doc["rows"]} == {"acme"}


def test_legacy_reports_when_analytics_is_refused(world: World, capsys, monkeypatch) -> None:
    world.admin.analytics_enabled = False
    code, doc = reconcile(world, capsys, monkeypatch)
    assert code == 0 and doc["api"] == "legacy", bad(doc)
    assert any("used the legacy reports" in n for n in doc["notes"])
    assert all(r["provider_cost_usd"] is not None for r in doc["rows"])  # one key per model: cost attributable
    world.admin.price_factor["claude-test-1"] = Decimal(2)
    code, doc = reconcile(world, capsys, monkeypatch)
    [row] = bad(doc)
    assert code == 1 and (row["model"], row["cause"]) == ("claude-test-1", "price drift")
    assert "billed x2.0000 the metered cost" in row["detail"]
    code, _ = reconcile(world, capsys, monkeypatch, "--api", "legacy")
    assert code == 1


def test_table_from_the_console_script_and_usage_errors(world: World) -> None:
    env = {**os.environ, "ANTHROPIC_ADMIN_KEY": ADMIN_KEY, "METRION_TEST_REAL_KEY": REAL_KEY, "COLUMNS": "220"}
    cmd = [str(BIN / "metrion-reconcile"), "-c", str(world.config)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage and Cost Analytics API" in r.stdout and "every row is within the tolerance" in r.stdout
    assert ADMIN_KEY not in r.stdout + r.stderr
    world.admin.price_factor["claude-test-"] = Decimal("1.1")
    r = subprocess.run([*cmd, "--csv"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stdout.count("price drift") == 2 and r.stdout.startswith("day,api_key_id,")
    # Usage errors: 2, like metrion-report; an Admin API that refuses the key: 6, without echoing it.
    for args, code, fragment in (
        (["--tolerance", "lots"], 2, "--tolerance"),
        (["--account", "nobody"], 2, "no account named 'nobody'"),
        (["--since", "yesterday-ish"], 2, "cannot read"),
    ):
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=60)
        assert (r.returncode, fragment in r.stderr) == (code, True), r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "ANTHROPIC_ADMIN_KEY": "sk-ant-admin01-wrong"})
    assert r.returncode == 6 and "HTTP 401" in r.stderr and "wrong" not in r.stderr
    no_key = {k: v for k, v in env.items() if k != "ANTHROPIC_ADMIN_KEY"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=no_key, timeout=60)
    assert r.returncode == 2 and "ANTHROPIC_ADMIN_KEY is not set" in r.stderr
