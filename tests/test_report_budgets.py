"""metrion-report budgets: each budget's limit, spend, remaining and reset, from the config and the DB."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from metrion_addon import report
from metrion_addon.record import iso_ms
from metrion_addon.store import Store, migrate

CONFIG = """
database: {db}
accounts:
  - name: acme
    tokens: [sk-metrion-aaaaaaaaaaaaaaaa]
    anthropic_api_key: ${{NOT_SET_AND_NOT_NEEDED}}
    budget: {{daily: 10, monthly: {{usd: 100, enforce: soft}}}}
    user_budget: {{daily: 2}}
    user_budgets: {{alice: {{daily: 5}}}}
  - name: free
    tokens: [sk-metrion-bbbbbbbbbbbbbbbb]
"""


def test_budgets_view_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.format(db=db))
    now = datetime.now(UTC).timestamp()
    store = Store(db)
    store.start()
    for user, cost in [("alice", 1.5), ("bob", 2.25), ("alice", 0.25), (None, 0.5)]:
        store.put({"ts": iso_ms(now - 1), "account": "acme", "user": user, "cost_usd": cost})
    store.put({"ts": iso_ms(now - 1), "account": "free", "user": "x", "cost_usd": 9.0})
    store.close()

    assert report.main(["budgets", "--config", str(cfg), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    got = {(r["account"], r["user"], r["period"]): (r["enforce"], r["limit_usd"], r["spent_usd"],
                                                     r["remaining_usd"], r["exceeded"]) for r in rows}  # fmt: skip
    assert got == {
        ("acme", None, "daily"): ("hard", 10.0, 4.5, 5.5, False),
        ("acme", None, "monthly"): ("soft", 100.0, 4.5, 95.5, False),
        ("acme", "alice", "daily"): ("hard", 5.0, 1.75, 3.25, False),
        ("acme", "bob", "daily"): ("hard", 2.0, 2.25, 0.0, True),
        ("acme", "(no label)", "daily"): ("hard", 2.0, 0.5, 1.5, False),
    }
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    daily = next(r for r in rows if r["period"] == "daily")
    assert daily["resets_at"].startswith(tomorrow) and daily["resets_at"].endswith("+00:00")

    assert report.main(["budgets", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "acme" in out and "$2.25" in out and "(whole account)" in out


def test_budgets_view_without_budgets_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.format(db=tmp_path / "m.db").split("  - name: acme")[0]
                   + "  - name: free\n    tokens: [sk-metrion-bbbbbbbbbbbbbbbb]\n")  # fmt: skip
    migrate(tmp_path / "m.db")
    assert report.main(["budgets", "--config", str(cfg)]) == report.EXIT_USAGE
    assert "no budgets in the config" in capsys.readouterr().err
