"""The lean mitmproxy master that `metrion-proxy` runs.

`mitmdump` loads some 35 addons (playback, map local/remote, sticky cookies, save, browser, onboarding,
blocklist...) and dispatches every hook of every request to each of them. A metering reverse proxy uses a
handful. This composes mitmproxy's own `Master` with only those, from mitmproxy's public addons and options (no
fork, no patch), plus metrion's addon:

- `Core`: core options and commands; `Proxyserver`: the listener, connections, keep-alive, graceful shutdown;
  `NextLayer`: HTTP/1, HTTP/2 and TLS detection; `TlsConfig`: TLS to an HTTPS upstream (and from clients, if
  configured); `UpdateAltSvc`: keeps a reverse proxy's clients from following an upstream `Alt-Svc` header
  around it; `DisableH2C`: refuses h2c upgrades mitmproxy cannot proxy; `Block`: the same client address
  policy as mitmdump (`block_global`, `block_private`); `ErrorCheck`: exit on start-up errors; `TermLog`: the
  log, with `termlog_verbosity`.

It imports only those addons' modules. `mitmproxy/addons/__init__.py` imports all ~35 of mitmdump's default
addons (for `default_addons()`), and with them ldap3, flask, werkzeug and jinja2: 11 MB of idle memory for code
a lean proxy never runs. `run()` registers that package from its spec without executing the file, so each
addon module loads on its own (see `without_package_inits`).

Options of the loaded addons work as with mitmdump (`-- --set stream_large_bodies=1m`); an option of an addon
that is not loaded is refused, naming `metrion-proxy --full` (mitmdump with every addon) as the way to get it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

FULL_HINT = (
    "metrion-proxy runs a lean mitmproxy with only the addons a metering proxy uses; for every mitmdump addon "
    "and option, run `metrion-proxy --full ...` (mitmdump -s metrion_addon/mitm_script.py)"
)


class ArgumentError(Exception):
    pass


# Packages whose `__init__.py` imports far more than the lean proxy uses of them, and what it would cost.
SKIPPED_INITS = {
    # mitmdump's `default_addons()`: every default addon, and with them ldap3, flask, werkzeug, jinja2 (11 MB)
    "mitmproxy.addons": "mitmproxy",
    # `UpdatePrices` (fetching newer prices over HTTP, which metrion never does) and with it httpx2 (2.7 MB);
    # pricing.py reads the bundled snapshot from `genai_prices.data_snapshot` and `genai_prices.types`
    "genai_prices": None,
}


def without_package_inits() -> None:
    """Make `from mitmproxy.addons import core` load that module alone, not the package's `__init__.py`; the
    same for genai_prices (see SKIPPED_INITS).

    Each package is registered from its own spec (its `__path__`), as a namespace package would be: the
    library's files are untouched and each submodule imports as usual; only the package-level names its
    `__init__.py` would define are missing, and the lean proxy uses none. Only for the lean proxy's own process,
    before anything has imported those packages: a process that did already (mitmdump, the tests) keeps them.
    """
    for name, parent in SKIPPED_INITS.items():
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        if parent is not None:  # what a completed import sets on the parent package
            setattr(importlib.import_module(parent), name.rpartition(".")[2], package)


def settle() -> None:
    """Before the port opens: load the price table pricing reads (genai-prices' bundled snapshot, ~50 ms), so
    that the first request does not pay for it on the event loop."""
    from genai_prices import data_snapshot

    data_snapshot.get_snapshot()


def lean_addons() -> list[Any]:
    from mitmproxy.addons import (
        block,
        core,
        disable_h2c,
        errorcheck,
        next_layer,
        proxyserver,
        tlsconfig,
        update_alt_svc,
    )

    from metrion_addon.addon import Metrion

    return [
        core.Core(),
        block.Block(),
        disable_h2c.DisableH2C(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        update_alt_svc.UpdateAltSvc(),
        Metrion(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
    ]


def without_legacy_log_events() -> None:
    """Remove the handler every `Master` puts on the root logger to relay each log record, formatted, to the
    deprecated `add_log` hook: it hands the record to the event loop (`call_soon_threadsafe`, a wake-up of the loop
    from whichever thread logged) and dispatches it to every addon. No addon in mitmproxy implements `add_log`
    any more, and the lean master loads no scripts that could; the one-line-per-request log went through it from
    the observer thread: measured ~80 µs of the loop's CPU per request at c=1, and 20 µs on the logging thread.
    TermLog, which writes the log, is a handler of its own and stays."""
    from mitmproxy import log

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, log.LegacyLogEvents):
            root.removeHandler(handler)


def parse_extra(args: Sequence[str]) -> list[str]:
    """mitmdump-style arguments after `--` -> option specs (`name=value`). Only `--set`, `-q` and `-v`."""
    specs: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--set":
            spec = next(it, None)
            if spec is None:
                raise ArgumentError("--set needs NAME=VALUE")
            specs.append(spec)
        elif arg.startswith("--set="):
            specs.append(arg.removeprefix("--set="))
        elif arg in ("-q", "--quiet"):
            specs.append("termlog_verbosity=error")
        elif arg in ("-v", "--verbose"):
            specs.append("termlog_verbosity=debug")
        else:
            raise ArgumentError(f"{arg!r} is not supported here: {FULL_HINT}")
    return specs


def run(defaults: dict[str, Any], specs: Sequence[str], banner: str = "") -> None:
    """Serve until SIGINT/SIGTERM. `defaults` are option values; `specs` the user's `--set` on top of them;
    `banner` is printed to stderr once the options are accepted."""
    without_package_inits()
    if isinstance(sys.stdout, io.TextIOWrapper):  # the log goes to stdout: to a pipe or journald, line by line
        # and each line in one write: with PYTHONUNBUFFERED (as services often set) stdout writes through, and
        # TermLog's print() made two system calls per line (the text, then "\n"), each giving the GIL away
        sys.stdout.reconfigure(line_buffering=True, write_through=False)
    asyncio.run(_serve(defaults, specs, banner))


async def _serve(defaults: dict[str, Any], specs: Sequence[str], banner: str) -> None:
    from mitmproxy import exceptions, master, options

    logging.getLogger().setLevel(logging.DEBUG)  # as mitmdump: TermLog filters by termlog_verbosity
    for noisy in ("asyncio", "hpack", "quic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    opts = options.Options()
    m = master.Master(opts, with_termlog=True)
    without_legacy_log_events()
    m.addons.add(*lean_addons())
    try:
        unknown = sorted({s.partition("=")[0] for s in specs} - set(opts.keys()))
        if unknown:
            raise ArgumentError(f"unknown option(s) {', '.join(unknown)}: {FULL_HINT}")
        opts.update(**defaults)
        opts.set(*specs)
    except (exceptions.OptionsError, ArgumentError) as e:
        print(f"metrion-proxy: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    settle()
    if banner:
        print(banner, file=sys.stderr)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as mitmdump: a peer that hangs up must not end the process
    await m.run()
