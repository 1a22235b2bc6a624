"""What the lean proxy's process loads: only the mitmproxy addons it runs (not mitmdump's ~35 defaults with
ldap3, flask and werkzeug), not genai-prices' HTTP updater, and not sqlite-utils once the database is up to date.
Each check runs in a fresh interpreter: the test process itself has imported everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("flask", "werkzeug", "jinja2", "ldap3", "httpx2", "sqlite_utils", "mitmproxy.tools.dump", "rich", "psycopg")


def loaded_after(code: str) -> list[str]:
    check = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60)
    return [m for m in out.stdout.strip().split(",") if m]


def test_lean_proxy_imports_only_what_it_runs(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    code = f"""
from pathlib import Path
from metrion_addon.store import migrate
migrate(Path({str(db)!r}))  # a new database: the migrations need sqlite-utils
from metrion_addon import proxy
proxy.without_package_inits()
addons = proxy.lean_addons()
proxy.settle()
from mitmproxy import master, options
from datetime import UTC, datetime
from metrion_addon.pricing import Pricer
assert Pricer([]).rates("claude-sonnet-4-5", datetime.now(UTC), 1000) is not None
"""
    assert loaded_after(code) == ["sqlite_utils"]
    # restarted on an up-to-date database: nothing heavy at all
    assert loaded_after(code) == []


def test_mitmdump_keeps_its_default_addons() -> None:
    """The package-init skip is the lean proxy's alone: where mitmproxy.addons was imported first, it stays whole."""
    code = """
import mitmproxy.addons
from metrion_addon import proxy
proxy.without_package_inits()
assert len(mitmproxy.addons.default_addons()) > 30
"""
    assert "flask" in loaded_after(code)


IDLE_EXTRAS = ("prometheus_client", "urllib.request", "metrion_addon.batch_poller")


def runtime_loads(tmp_path: Path, config_extra: str, setup: str = "") -> list[str]:
    """What a running lean proxy's runtime (built from a config with a managed account) loads beyond the lean set."""
    db = tmp_path / "m.db"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"database: {db}\naccounts:\n  - name: a\n    tokens: [sk-metrion-aaaaaaaaaaaaaaaaaa]\n"
                   f"    anthropic_api_key: k\n{config_extra}")  # fmt: skip
    code = f"""
from types import SimpleNamespace
from metrion_addon import proxy
proxy.without_package_inits()
proxy.lean_addons()
from metrion_addon.config import load_config
from metrion_addon.ops import Service
from metrion_addon.runtime import Runtime
from metrion_addon.store import migrate
from pathlib import Path
migrate(Path({str(db)!r}))
{setup}
options = SimpleNamespace(metrion_max_backlog=10, metrion_test_clock="", metrion_batch_poll_seconds=60, mode=[],
                          metrion_log_format="text", metrion_summary_interval=60, metrion_health_max_backlog=10)
rt = Runtime.open(load_config({str(cfg)!r}), options, Service())
rt.close()
"""
    check = f"import sys\n{code}\nprint(','.join(m for m in {IDLE_EXTRAS!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60)
    return [m for m in out.stdout.strip().split(",") if m]


def test_an_idle_proxy_loads_neither_metrics_nor_the_batch_poller(tmp_path: Path) -> None:
    assert runtime_loads(tmp_path, "") == []


def test_metrics_load_prometheus_and_unmetered_batches_start_the_poller(tmp_path: Path) -> None:
    from tests.netutil import free_port

    metrics = runtime_loads(tmp_path, f"metrics_listen: 127.0.0.1:{free_port()}\n")
    assert "prometheus_client" in metrics and "metrion_addon.batch_poller" not in metrics  # (it imports urllib)
    batch = """
import sqlite3
c = sqlite3.connect(Path({db!r}))
c.execute("INSERT INTO batches (id, ts, account, mode, upstream) VALUES ('b1', '2026-12-01T00:00:00.000Z', 'a', "
          "'managed', 'http://127.0.0.1:1')")
c.commit()
c.close()
""".format(db=str(tmp_path / "m.db"))
    assert runtime_loads(tmp_path, "", batch) == ["urllib.request", "metrion_addon.batch_poller"]
