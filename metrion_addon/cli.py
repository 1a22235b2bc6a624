"""`metrion-proxy`: validate the config, then run mitmdump in reverse mode with the addon and safe defaults."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from metrion_addon.config import ConfigError, load_config
from metrion_addon.store import migrate

SHIM = Path(__file__).with_name("mitm_script.py")


def mitmdump_args(config_path: Path, upstream: str, host: str, port: int, extra: list[str]) -> list[str]:
    return [
        "--mode",
        f"reverse:{upstream}@{host}:{port}",
        "-s",
        str(SHIM),
        "--set",
        f"metrion_config={config_path}",
        "--set",
        "connection_strategy=lazy",  # an unreachable upstream then gives the client a 502 and us a record
        "--set",
        "flow_detail=0",  # mitmproxy's own flow output off: it could print headers; metrion logs one line each
        *extra,
    ]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="metrion-proxy",
        description="Run the metrion metering proxy (mitmdump in reverse mode with the metrion addon).",
        epilog="Arguments after '--' go to mitmdump unchanged.",
    )
    ap.add_argument("-c", "--config", default="config.yaml", help="YAML config file (default: config.yaml)")
    ap.add_argument("--listen-host", help="override listen_host from the config")
    ap.add_argument("--listen-port", type=int, help="override listen_port from the config")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = ap.parse_args(argv)

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"metrion-proxy: config error: {e}", file=sys.stderr)
        sys.exit(2)
    host = args.listen_host or config.listen_host
    port = args.listen_port or config.listen_port
    if args.check:
        print(f"metrion-proxy: {config.path} is valid ({len(config.accounts)} account(s))")
        return
    try:  # the database is part of the config: an unusable path is reported here, before the port opens
        migrate(config.database)
    except Exception as e:
        print(
            f"metrion-proxy: config error: {config.path}: field 'database': cannot open {config.database}: {e}",
            file=sys.stderr,
        )
        sys.exit(2)
    if not _is_loopback(host):
        print(
            f"metrion-proxy: WARNING: listening on {host}, not loopback: anyone who can reach this port and holds "
            "a proxy token can spend your accounts' money",
            file=sys.stderr,
        )
    print(
        f"metrion-proxy: http://{host}:{port} -> {config.upstream}, recording to {config.database}",
        file=sys.stderr,
    )
    from mitmproxy.tools.main import mitmdump

    mitmdump(mitmdump_args(config.path, config.upstream, host, port, extra))


if __name__ == "__main__":
    proxy_main()
