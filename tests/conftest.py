"""Fixtures for end-to-end tests: the fake upstream on a loopback socket and a real mitmdump process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.fake_upstream import FakeUpstream
from tests.netutil import free_port, stop_process, wait_port

if TYPE_CHECKING:
    from metrion_addon.addon import Metrion
    from tests.pgserver import PgServer

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "metrion_addon" / "mitm_script.py"
BIN = Path(sys.executable).parent

REAL_KEY = "sk-ant-api03-REAL-upstream-key-DO-NOT-LEAK-0123456789"
CLIENT_KEY = "sk-ant-api03-CLIENT-own-key-DO-NOT-LEAK-9876543210"
OAUTH_TOKEN = "sk-ant-oat01-CLIENT-oauth-DO-NOT-LEAK-5555555555"
MANAGED_TOKEN = "sk-metrion-managed-aaaaaaaaaaaaaaaa"
HASHED_TOKEN = "sk-metrion-hashed-bbbbbbbbbbbbbbbb"
PASS_TOKEN = "sk-metrion-pass-cccccccccccccccc"
NOPASS_TOKEN = "sk-metrion-nopass-dddddddddddddddd"
SECRETS = (REAL_KEY, CLIENT_KEY, OAUTH_TOKEN, MANAGED_TOKEN, HASHED_TOKEN, PASS_TOKEN, NOPASS_TOKEN)
CAPPED_TOKEN = "sk-metrion-capped-eeeeeeeeeeeeeeee"
# An account under a hard daily budget, for config_text's `extra`.
CAPPED_ACCOUNT = f"""  - name: capped
    tokens: [{CAPPED_TOKEN}]
    anthropic_api_key: fake-key
    budget: {{daily: 100}}
"""


def config_text(db: Path, extra: str = "") -> str:
    import hashlib

    hashed = "sha256:" + hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()
    return f"""
upstream: http://127.0.0.1:1
database: {db}
path_prefix: /api/proxy
accounts:
  - name: acme
    tokens: [{MANAGED_TOKEN}, "{hashed}"]
    anthropic_api_key: ${{METRION_TEST_REAL_KEY}}
    allow_passthrough: false
  - name: labs
    tokens: [{PASS_TOKEN}]
    allow_passthrough: true
  - name: locked
    tokens: [{NOPASS_TOKEN}]
    anthropic_api_key: literal-but-unused-key
    allow_passthrough: false
{extra}
"""


@contextmanager
def configured_addon(tmp: Path, monkeypatch: pytest.MonkeyPatch, extra: str = "") -> Iterator[Metrion]:
    """The addon in mitmproxy's test context, configured on config_text(tmp / "m.db", extra); `done` on leaving."""
    from mitmproxy.test import taddons

    from metrion_addon.addon import Metrion

    monkeypatch.setenv("METRION_TEST_REAL_KEY", REAL_KEY)
    cfg = tmp / "config.yaml"
    cfg.write_text(config_text(tmp / "m.db", extra))
    m = Metrion()
    with taddons.context(m) as tctx:
        tctx.configure(m, metrion_config=str(cfg))
        yield m
        m.done()


@dataclass
class Proxy:
    url: str
    port: int
    db: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def rows(self, where: str = "1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY id", params)]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def wait_rows(self, where: str, params: tuple[Any, ...] = (), n: int = 1, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(where, params)
            if len(rows) >= n or time.monotonic() > deadline:
                assert len(rows) >= n, f"expected {n} row(s) for {where} {params}, found {len(rows)}"
                return rows
            time.sleep(0.05)

    def row(self, request_id: str) -> dict[str, Any]:
        return self.wait_rows("request_id = ?", (request_id,))[0]


def start_proxy(
    tmp: Path, upstream_url: str, extra_config: str = "", extra_args: tuple[str, ...] = (), db: Path | None = None
) -> Proxy:
    db = db or tmp / "metrion.db"
    cfg = tmp / "config.yaml"
    cfg.write_text(config_text(db, extra_config))
    port = free_port()
    log = tmp / "mitmdump.log"
    env = {**os.environ, "METRION_TEST_REAL_KEY": REAL_KEY}
    cmd = [
        str(BIN / "mitmdump"),
        "-s",
        str(SHIM),
        "--mode",
        f"reverse:{upstream_url}@127.0.0.1:{port}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        f"metrion_config={cfg}",
        "--set",
        f"confdir={tmp / 'mitmproxy-conf'}",
        *extra_args,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        wait_port(port, proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"mitmdump did not start:\n{log.read_text()}") from None
    return Proxy(url=f"http://127.0.0.1:{port}", port=port, db=db, log=log, proc=proc)


def stop_proxy(proxy: Proxy) -> None:
    stop_process(proxy.proc)


@pytest.fixture(scope="module")
def pg(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    """A throwaway PostgreSQL server for one test module (tests/pgserver.py); with metrion's tables already made
    when the module sets `PG_MIGRATED = True`. The module marks itself with `pytestmark = needs_pg()`."""
    from tests.pgserver import start_pg

    server = start_pg(migrated=getattr(request.module, "PG_MIGRATED", False))
    yield server
    server.close()


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    f = FakeUpstream().start()
    yield f
    f.stop()


@pytest.fixture(scope="session")
def proxy(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(tmp_path_factory.mktemp("proxy"), fake.url)
    yield p
    stop_proxy(p)


# --- helpers for fault, load and security tests ------------------------------------------------------


def proc_fds(pid: int) -> int:
    """Open file descriptors of a process (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class FakeProcess:
    """The fake upstream in its own process: keeps the test process's cores free for clients (load tests)."""

    url: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


def start_fake_process() -> FakeProcess:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    wait_port(port, proc)
    return FakeProcess(url=f"http://127.0.0.1:{port}", proc=proc)
