"""The processes a benchmark runs: the fake upstream and the targets in front of it (all on loopback)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_SCRIPT = ROOT / "scripts" / "bench_upstream.py"
TOKEN = "sk-metrion-bench-0000000000000000"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.netutil import free_port, stop_process, wait_port  # noqa: E402  (shared with the tests)

# What each target is, in the order the tables show them. "direct" is no proxy at all: the client talks to the
# fake upstream (the absolute floor); the ratios are to "bare".
TARGETS = ("direct", "bare", "lean", "full")
PROXIES = ("bare", "lean", "full")
TITLES = {
    "direct": "direct (no proxy)",
    "bare": "bare mitmdump",
    "lean": "metrion-proxy (lean)",
    "full": "metrion-proxy --full (mitmdump -s)",
}


def mitmdump_bin() -> str:
    here = Path(sys.executable).parent / "mitmdump"
    if here.exists():
        return str(here)
    found = shutil.which("mitmdump")
    if not found:
        raise SystemExit("mitmdump not found: install the project (pip install -e .)")
    return found


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    is_proxy: bool = True

    @property
    def pid(self) -> int | None:
        """The proxy's process (for CPU and RSS); None for the direct target, which has no proxy."""
        return self.proc.pid if self.is_proxy else None

    def stop(self) -> None:
        stop_process(self.proc)


class Cluster:
    """The fake upstream and the proxies. Every process started here is stopped by close()."""

    def __init__(self, tmp: Path, bare_buffered: bool = False) -> None:
        self.tmp = tmp
        self.bare_buffered = bare_buffered
        self.servers: list[Server] = []
        self.upstream = self._spawn("upstream", [sys.executable, str(UPSTREAM_SCRIPT), "--port", "{port}"])
        self.targets: dict[str, Server] = {"direct": Server("direct", self.upstream.port, self.upstream.proc,
                                                            self.upstream.log, is_proxy=False)}  # fmt: skip
        for name in PROXIES:
            self.targets[name] = self._proxy(name)

    def _spawn(self, name: str, argv: list[str]) -> Server:
        port = free_port()
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [a.replace("{port}", str(port)) for a in argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            )
        server = Server(name, port, proc, log)
        self.servers.append(server)
        try:
            wait_port(port, proc)
        except Exception:
            raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
        return server

    def _proxy(self, name: str) -> Server:
        confdir = f"confdir={self.tmp / 'mitmproxy-conf'}"
        if name == "bare":
            argv = [mitmdump_bin(), "--mode", f"reverse:http://127.0.0.1:{self.upstream.port}@127.0.0.1:{{port}}",
                    "--set", "connection_strategy=lazy", "--set", confdir, "--set", "flow_detail=0"]  # fmt: skip
            if not self.bare_buffered:
                # Without this a bare mitmdump buffers every response, SSE included, until the end: no baseline
                # for streaming. With it every body is relayed as it arrives (metrion streams SSE itself).
                argv += ["--set", "stream_large_bodies=1"]
            return self._spawn(name, argv)
        # metrion, as users run it: the `metrion-proxy` command, lean or --full (mitmdump -s the shim)
        cfg = self.tmp / f"metrion-{name}.yaml"
        cfg.write_text(
            f"upstream: http://127.0.0.1:{self.upstream.port}\n"
            f"database: {self.tmp / f'metrion-{name}.db'}\n"
            "accounts:\n"
            "  - name: bench\n"
            f"    tokens: [{TOKEN}]\n"
            "    anthropic_api_key: bench-fake-upstream-key\n"
            "    allow_passthrough: false\n"
        )
        argv = [sys.executable, "-m", "metrion_addon.cli", "proxy", "-c", str(cfg), "--listen-host", "127.0.0.1",
                "--listen-port", "{port}", *(["--full"] if name == "full" else []), "--", "--set", confdir]  # fmt: skip
        return self._spawn(name, argv)

    def restart_proxies(self) -> None:
        for name in PROXIES:
            old = self.targets[name]
            old.stop()
            self.servers.remove(old)
            self.targets[name] = self._proxy(name)

    def order(self, rnd: int, names: tuple[str, ...] = TARGETS) -> list[Server]:
        """The targets in an order that rotates with the round, so that none always goes first."""
        k = rnd % len(names)
        return [self.targets[n] for n in names[k:] + names[:k]]

    def close(self) -> None:
        for s in reversed(self.servers):
            with contextlib.suppress(Exception):
                s.stop()
        self.servers.clear()

    def dump_dead(self) -> str:
        """The log tails of processes that have exited (for an error report)."""
        out = []
        for srv in self.servers:
            if srv.proc.poll() is not None:
                out.append(f"{srv.name} exited with {srv.proc.returncode}; its log ends:")
                out.append(srv.log.read_text(errors="replace")[-4000:])
        return "\n".join(out)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS: it has exited")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (all threads); NaN without a process."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except OSError:
        return float("nan")
