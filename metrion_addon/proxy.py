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

Options of the loaded addons work as with mitmdump (`-- --set stream_large_bodies=1m`); an option of an addon
that is not loaded is refused, naming `metrion-proxy --full` (mitmdump with every addon) as the way to get it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from mitmproxy import exceptions, master, options
from mitmproxy.addons import block, core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig, update_alt_svc

from metrion_addon.addon import Metrion

FULL_HINT = (
    "metrion-proxy runs a lean mitmproxy with only the addons a metering proxy uses; for every mitmdump addon "
    "and option, run `metrion-proxy --full ...` (mitmdump -s metrion_addon/mitm_script.py)"
)


class ArgumentError(Exception):
    pass


def lean_addons() -> list[Any]:
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
    asyncio.run(_serve(defaults, specs, banner))


async def _serve(defaults: dict[str, Any], specs: Sequence[str], banner: str) -> None:
    logging.getLogger().setLevel(logging.DEBUG)  # as mitmdump: TermLog filters by termlog_verbosity
    for noisy in ("asyncio", "hpack", "quic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    opts = options.Options()
    m = master.Master(opts, with_termlog=True)
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
    if banner:
        print(banner, file=sys.stderr)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as mitmdump: a peer that hangs up must not end the process
    await m.run()
