"""Where does time to first byte go? Bare mitmdump vs a no-op addon with the same hooks vs metrion, sequentially.

    python scripts/bench_ttfb.py [--requests 200]

One request at a time (no neighbours finishing streams), alternating between the three proxies, each in
front of the benchmark's fake upstream; prints p50 and mean time to the first response byte of a stream.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.netutil import free_port, wait_port  # noqa: E402

TOKEN = "sk-metrion-bench-0000000000000000"
NOOP = """
class Noop:
    def request(self, flow): pass
    def responseheaders(self, flow):
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = lambda b: b
    def response(self, flow): pass
    def error(self, flow): pass
addons = [Noop()]
"""
BODY = json.dumps(
    {"model": "claude-sonnet-5-5", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
)


def ttfb(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    t = time.perf_counter()
    conn.request("POST", "/v1/messages", BODY, {"x-api-key": TOKEN, "x-fake-scenario": "slow"})
    conn.getresponse().read(1)
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "noop.py").write_text(NOOP)
        (Path(tmp) / "cfg.yaml").write_text(
            f"database: {tmp}/m.db\naccounts:\n  - name: a\n    tokens: [{TOKEN}]\n    anthropic_api_key: fake\n"
        )
        up = free_port()
        procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_upstream.py"), "--port", str(up)],
                                  stdout=subprocess.DEVNULL)]  # fmt: skip
        try:
            wait_port(up, procs[0])
            variants = {
                "bare": [],
                "no-op addon": ["-s", f"{tmp}/noop.py"],
                "metrion": ["-s", str(ROOT / "metrion_addon" / "mitm_script.py"),
                            "--set", f"metrion_config={tmp}/cfg.yaml"],
            }  # fmt: skip
            ports = {}
            for name, extra in variants.items():
                port = free_port()
                cmd = [str(bin_dir / "mitmdump"), "--mode", f"reverse:http://127.0.0.1:{up}@127.0.0.1:{port}",
                       "--set", "connection_strategy=lazy", "--set", "flow_detail=0", "--set", "stream_large_bodies=1",
                       "--set", f"confdir={tmp}/conf", *extra]  # fmt: skip
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_port(port, procs[-1])
                ports[name] = port
            for name in variants:  # warm-up
                for _ in range(20):
                    ttfb(ports[name])
            results: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.requests):
                for name in variants:
                    results[name].append(ttfb(ports[name]))
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    bare = statistics.median(results["bare"])
    for name, values in results.items():
        p50 = statistics.median(values)
        mean = statistics.mean(values)
        print(f"{name:12} p50 {p50 * 1000:6.3f} ms  mean {mean * 1000:6.3f} ms  p50/bare {p50 / bare:.3f}")


if __name__ == "__main__":
    main()
