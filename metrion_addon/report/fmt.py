"""Numbers and times as the terminal and the html page show them."""

from __future__ import annotations

from datetime import datetime

from metrion_addon.report.queries import Options
from metrion_addon.report.when import show_time
from metrion_addon.schema import iso_ms


def fmt_usd(x: float | None) -> str:
    """Dollars with enough decimals that a small request never shows as $0.00."""
    if x is None:
        return "unpriced"
    a = abs(x)
    if a == 0:
        return "$0.00"
    if a < 0.0000005:
        return ("-" if x < 0 else "") + "<$0.000001"
    digits = 2 if a >= 1 else 4 if a >= 0.01 else 6
    return ("-" if x < 0 else "") + f"${a:,.{digits}f}"


def fmt_int(n: int | float | None) -> str:
    return "" if n is None else f"{n:,.0f}"


def fmt_pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.1f}%"


def fmt_ms(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f} ms"


_BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: float, top: float, width: int = 40) -> str:
    """A horizontal bar in eighths of a character; any positive value shows at least a sliver."""
    if top <= 0 or value <= 0:
        return ""
    eighths = max(1, round(value / top * width * 8))
    full, rest = divmod(eighths, 8)
    return "█" * full + (_BLOCKS[rest] if rest else "")


def scope(opts: Options) -> str:
    """The filters and time zone a report covers, in one line."""
    f = opts.filters
    bits = [f"{name} {show_time(iso_ms(t), opts.utc)}" for name, t in (("since", f.since), ("until", f.until)) if t]
    for name, values in (("account", f.accounts), ("user", f.users), ("model", [m + "*" for m in f.models])):
        if values:
            bits.append(f"{name} {' | '.join(values)}")
    return " · ".join([*bits, "UTC" if opts.utc else f"local time ({datetime.now().astimezone().tzname()})"])
