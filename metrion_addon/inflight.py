"""What the proxy has reserved for requests in flight, published for `metrion-report budgets`.

The report only reads the database, and reservations are not rows: they live in the proxy's memory. So the proxy
keeps a small JSON file next to the database, `<database>.inflight-<pid>.json`, rewritten (atomically, by a
background thread, at most every WRITE_INTERVAL seconds) whenever a reservation changes, and removed at a clean
shutdown. The report adds the reservations of every such file whose process is still alive on this host; a file
left by a crashed proxy is ignored (its reservations ended with it). A proxy on another host is not seen: the
report says "reserved: as published by proxies on this host".
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from metrion_addon.budget import Budgets, Key

log = logging.getLogger(__name__)

WRITE_INTERVAL = 0.1


def inflight_path(db: Path, pid: int | None = None) -> Path:
    return db.with_name(f"{db.name}.inflight-{os.getpid() if pid is None else pid}.json")


def snapshot(budgets: Budgets, now: float) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "written_at": now,
        "reserved": [
            {
                "account": scope[0],
                "user": scope[1],
                "is_user": scope[2],
                "period": period,
                "period_start": start.isoformat(),
                "usd": usd,
            }
            for (scope, period, start), usd in budgets.reservations()
        ],
    }


class InflightWriter:
    def __init__(self, db: Path, budgets: Budgets) -> None:
        self.path = inflight_path(db)
        self.budgets = budgets
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> InflightWriter:
        self._write()
        self._thread = threading.Thread(target=self._run, name="metrion-inflight", daemon=True)
        self._thread.start()
        return self

    def changed(self) -> None:
        """Called on the event loop after a reservation changed: never blocks."""
        self._changed.set()

    def close(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            log.warning("metrion: could not remove %s", self.path)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.is_set():
                return
            self._changed.clear()
            self._write()
            self._stop.wait(WRITE_INTERVAL)

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(snapshot(self.budgets, time.time())))
            os.replace(tmp, self.path)
        except Exception:
            log.exception("metrion: could not write the in-flight reservations file %s", self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_inflight(db: Path) -> list[tuple[Key, float]]:
    """The reservations published by live proxies on this host for this database."""
    out: list[tuple[Key, float]] = []
    for f in sorted(db.parent.glob(f"{db.name}.inflight-*.json")):
        try:
            data = json.loads(f.read_text())
            if not isinstance(data, dict) or not _alive(int(data["pid"])):
                continue
            for r in data["reserved"]:
                scope = (str(r["account"]), r["user"], bool(r["is_user"]))
                key = (scope, str(r["period"]), datetime.fromisoformat(r["period_start"]))
                out.append((key, float(r["usd"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours: skip
    return out
