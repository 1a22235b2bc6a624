"""py-spy samples of a proxy under a load -> where its event loop (the main thread, where mitmproxy runs every
hook and every stream callable) spends its time."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib.client import loop_requests

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")
# metrion_addon modules that only start the proxy: every frame of the lean master is under them
RUNNERS = frozenset({"cli", "proxy"})
LIBS = ("mitmproxy", "genai_prices", "asyncio", "sqlite_utils", "h11", "h2", "pydantic", "logging", "json")


def pyspy_bin() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


async def profile_under(pid: int, port: int, raw: bytes, conc: int, seconds: float, out: Path) -> dict[str, Any]:
    """Sample `pid` with py-spy while `conc` connections send `raw` back to back for `seconds`."""
    spy = pyspy_bin()
    assert spy is not None
    argv = ["record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--format", "raw",
            "--nonblocking", "--threads", "-o", str(out)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(spy, *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await asyncio.sleep(0.5)
    await loop_requests(port, raw, conc, 0.0, seconds + 0.5)
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
    return analyse_stacks(out.read_text())


def analyse_stacks(raw: str) -> dict[str, Any]:
    """Collapsed stacks (py-spy --threads --format raw) -> shares of the event loop's samples.

    The event loop's samples are the ones that cost latency and throughput; the writer thread is reported on
    its own.
    """
    threads: Counter[str] = Counter()
    loop_total = loop_ours = loop_dispatch = 0
    per_func: Counter[str] = Counter()
    per_leaf_area: Counter[str] = Counter()
    per_leaf: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] if frames[0].startswith("thread (") else "?"
        threads[thread] += n
        if thread != "MainThread":
            continue
        loop_total += n
        seen: set[str] = set()
        dispatch = False
        for frame in frames[1:]:
            m = _FRAME.match(frame)
            if m and "metrion_addon" in m["file"] and Path(m["file"]).stem not in RUNNERS:
                seen.add(f"{Path(m['file']).stem}.{m['func']}")
            elif m and m["file"].endswith("mitmproxy/addonmanager.py"):
                dispatch = True
        if seen:
            loop_ours += n
            for f in seen:
                per_func[f] += n
        elif dispatch:
            loop_dispatch += n
        leaf = _FRAME.match(frames[-1])
        per_leaf_area[_area(leaf["file"] if leaf else "?")] += n
        per_leaf[f"{_area(leaf['file'])}: {Path(leaf['file']).stem}.{leaf['func']}" if leaf else "?"] += n
    total = sum(threads.values())

    def share(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(f, 100 * n / loop_total) for f, n in c.most_common(k)] if loop_total else []

    return {
        "samples": total,
        "loop_samples": loop_total,
        "threads": [(t, 100 * n / total) for t, n in threads.most_common()] if total else [],
        "ours_pct": 100 * loop_ours / loop_total if loop_total else 0.0,
        # mitmproxy running hooks (its addon manager, and every other addon's hooks), metrion's excluded
        "dispatch_pct": 100 * loop_dispatch / loop_total if loop_total else 0.0,
        "funcs": share(per_func, 10),
        "areas": share(per_leaf_area, 8),
        "leaves": share(per_leaf, 10),
    }


def _area(file: str) -> str:
    """A leaf frame's file -> the library it belongs to."""
    if "metrion_addon" in file:
        return "metrion_addon"
    for lib in LIBS:
        if f"/{lib}/" in file or file.startswith(f"{lib}/"):
            return lib
    if "python3" in file:
        return "stdlib (other)"
    return Path(file).name or "?"
