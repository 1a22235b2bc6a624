"""The `metrion` command and its subcommands, and `metrion proxy` itself.

`metrion proxy|report|reprice|reconcile ...` runs the same code as the `metrion-proxy`, `metrion-report`,
`metrion-reprice` and `metrion-reconcile` commands, which stay as aliases. `metrion proxy` validates the config
and the database before the port opens, then serves with the lean master (metrion_addon/proxy.py) or, with
`--full`, mitmdump.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import sys
from pathlib import Path
from typing import Any

from metrion_addon.config import ConfigError, load_config
from metrion_addon.store import migrate, store_name

SHIM = Path(__file__).with_name("mitm_script.py")


def proxy_options(config_path: Path, upstream: str, host: str, port: int) -> dict[str, Any]:
    """The options both ways of running share (lean master and full mitmdump)."""
    return {
        "mode": [f"reverse:{upstream}@{host}:{port}"],
        "metrion_config": str(config_path),
        "connection_strategy": "lazy",  # an unreachable upstream then gives the client a 502 and us a record
    }


def mitmdump_args(config_path: Path, upstream: str, host: str, port: int, extra: list[str]) -> list[str]:
    opts = proxy_options(config_path, upstream, host, port)
    return [
        "--mode",
        opts["mode"][0],
        "-s",
        str(SHIM),
        "--set",
        f"metrion_config={opts['metrion_config']}",
        "--set",
        f"connection_strategy={opts['connection_strategy']}",
        "--set",
        "flow_detail=0",  # mitmproxy's own flow output off: it could print headers
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
        description="Run the metrion metering proxy: a lean mitmproxy in reverse mode with the metrion addon.",
        epilog="After '--': mitmproxy options as --set NAME=VALUE (and -q/-v); with --full, any mitmdump argument.",
    )
    ap.add_argument("-c", "--config", default="config.yaml", help="YAML config file (default: config.yaml)")
    ap.add_argument("--listen-host", help="override listen_host from the config")
    ap.add_argument("--listen-port", type=int, help="override listen_port from the config")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    ap.add_argument(
        "--full",
        action="store_true",
        help="run mitmdump with all its addons (and every mitmdump option after --) instead of the lean proxy",
    )
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
    banner = f"metrion-proxy: http://{host}:{port} -> {config.upstream}, recording to {store_name(config)}"
    if args.full:
        from mitmproxy.tools.main import mitmdump

        print(banner, file=sys.stderr)
        mitmdump(mitmdump_args(config.path, config.upstream, host, port, extra))
        return
    from metrion_addon import proxy

    try:
        specs = proxy.parse_extra(extra)
    except proxy.ArgumentError as e:
        print(f"metrion-proxy: {e}", file=sys.stderr)
        sys.exit(2)
    proxy.run(proxy_options(config.path, config.upstream, host, port), specs, banner)


SUBCOMMANDS = {
    "proxy": ("metrion_addon.cli:proxy_main", "run the metering proxy"),
    "report": ("metrion_addon.report:main", "cost reports from the database (read-only)"),
    "reprice": ("metrion_addon.reprice:main", "recompute stored costs after a price change"),
    "reconcile": ("metrion_addon.reconcile_cli:main", "compare the meter with Anthropic's usage and cost reports"),
    "db": ("metrion_addon.dbcopy:main", "database tools: copy rows between SQLite and PostgreSQL"),
}


def main(argv: list[str] | None = None) -> int:
    """`metrion SUBCOMMAND ...`: each subcommand is loaded only when used (the proxy never imports the report)."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="metrion",
        description="Self-hosted cost meter for Anthropic API traffic.",
        epilog="Run 'metrion SUBCOMMAND --help' for a subcommand's options.",
    )
    ap.add_argument(
        "subcommand", choices=list(SUBCOMMANDS), help=", ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items())
    )
    ap.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv:
        ap.print_help(sys.stderr)
        return 2
    args = ap.parse_args(argv[:1])
    module, _, func = SUBCOMMANDS[args.subcommand][0].partition(":")
    result = getattr(importlib.import_module(module), func)(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
