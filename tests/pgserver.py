"""A throwaway PostgreSQL server for the tests: a fresh cluster in a temp dir, on a free loopback port.

PostgreSQL comes from Debian's packages (`.ci/run` installs it); its binaries live off PATH in
/usr/lib/postgresql/VERSION/bin. `initdb` refuses to run as root, so as root the cluster belongs to the
`postgres` user. Without PostgreSQL the tests that need it skip with the reason, except under CI=true, where a
missing server is a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netutil import free_port


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


@dataclass
class PgServer:
    datadir: Path
    port: int
    user: str | None  # the OS user the server runs as (None: the current one)

    @property
    def url(self) -> str:
        return f"postgresql://metrion@127.0.0.1:{self.port}/metrion"

    def _run(self, *args: str) -> None:
        # No pipes: a server started by pg_ctl would inherit them and keep them open, and we would wait forever.
        subprocess.run(
            list(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=self.user, timeout=120
        )

    def _pg_ctl(self, *args: str) -> None:
        self._run(pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "log"), "-w", *args)

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "restart")

    def stop_server(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def start_server(self) -> None:
        self._pg_ctl("start")

    def close(self) -> None:
        subprocess.run(
            [pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            user=self.user,
            timeout=60,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def unavailable_reason() -> str | None:
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to own the test cluster"
    return None


def needs_pg() -> pytest.MarkDecorator:
    """The mark of a module whose tests need a PostgreSQL server: they skip, with the reason, on a machine without
    one; under CI=true (where .ci/run installs it) a missing server is an error, never a silent skip."""
    reason = unavailable_reason()
    if reason and os.environ.get("CI") == "true":
        raise RuntimeError(f"CI=true needs PostgreSQL for these tests: {reason}")
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def start_pg(migrated: bool = False) -> PgServer:
    """initdb + start on 127.0.0.1 only, trust auth for the `metrion` role, database `metrion`; `migrated`: with
    metrion's tables (pgstore.pg_migrate) already made."""
    user = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="metrion-pg-"))
    datadir = base / "data"
    datadir.mkdir()
    if user is not None:
        pw = pwd.getpwnam(user)
        for p in (base, datadir):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = free_port()
    server = PgServer(datadir, port, user)
    initdb = pg_bin("initdb")
    assert initdb is not None
    server._run(initdb, "-D", str(datadir), "-U", "metrion", "--auth=trust", "-E", "UTF8", "--no-sync")
    with (datadir / "postgresql.conf").open("a") as f:
        f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{datadir}'\n")
        f.write("fsync = off\nfull_page_writes = off\n")  # a throwaway cluster: speed over durability
    server.start_server()
    server._run(pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "metrion", "metrion")
    if migrated:
        import psycopg

        from metrion_addon.pgstore import pg_migrate

        with psycopg.connect(server.url, autocommit=True) as conn:
            pg_migrate(conn)
    return server
