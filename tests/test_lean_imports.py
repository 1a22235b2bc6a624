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
