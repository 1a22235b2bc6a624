"""Times on the command line and on screen: wall clock (local, or UTC with --utc) <-> UTC, `--since/--until`
values, and the period bounds a report groups by. The calendar arithmetic is metrion_addon/periods.py's."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from metrion_addon import periods as P
from metrion_addon.schema import iso_ms

MAX_TS = "\U0010ffff"  # sorts after any stored timestamp


def to_utc(wall: datetime, utc: bool) -> datetime:
    """A naive wall-clock time (local, or UTC with --utc) -> aware UTC."""
    return wall.replace(tzinfo=UTC) if utc else wall.astimezone(UTC)


def to_wall(moment: datetime, utc: bool) -> datetime:
    """An aware time -> naive wall-clock time (local, or UTC with --utc)."""
    return moment.astimezone(UTC if utc else None).replace(tzinfo=None)


def period_label(wall: datetime, period: str) -> str:
    return wall.strftime({"hour": "%Y-%m-%d %H:00", "month": "%Y-%m"}.get(period, "%Y-%m-%d"))


def periods_between(first: datetime, last: datetime, period: str, utc: bool) -> list[tuple[str, str, str]]:
    """(label, lo, hi) for every period from the one holding `first` to the one holding `last`; lo/hi are
    stored-format UTC bounds, lo inclusive, hi exclusive."""
    out: list[tuple[str, str, str]] = []
    wall = P.floor(to_wall(first, utc), period)
    end = to_wall(last, utc)
    while wall <= end:
        nxt = P.next_start(wall, period)
        lo, hi = iso_ms(to_utc(wall, utc)), iso_ms(to_utc(nxt, utc))
        if hi > lo:  # a wall hour skipped by a DST change is empty
            out.append((period_label(wall, period), lo, hi))
        wall = nxt
    return out


_SPAN_RE = re.compile(r"^(\d+)\s*(m|min|h|d|w)$")
_SPAN_UNITS = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, end: bool, now: datetime, utc: bool) -> datetime:
    """A --since/--until value -> aware UTC time.

    Whole periods (a date, `today`, `this-month`...) give their start, or with `end` their end, so
    `--until 2026-11-30` includes that day. Spans (`24h`, `7d`, `30m`, `2w`) count back from now. Datetimes are
    points; without an offset they are local time (UTC with --utc).
    """
    t = text.strip().lower()
    if t == "now":
        return now
    if m := _SPAN_RE.match(t):
        return now - timedelta(**{_SPAN_UNITS[m.group(2)]: int(m.group(1))})
    if span := P.named(t, to_wall(now, utc)):
        return to_utc(span[1] if end else span[0], utc)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t):
        day = datetime.fromisoformat(t)
        return to_utc(day + timedelta(days=1) if end else day, utc)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a date (2026-11-28), datetime (2026-11-28T14:00), span (24h, 7d) "
            "or period (today, yesterday, this-week, last-week, this-month, last-month, this-year)"
        ) from None
    return to_utc(moment, utc) if moment.tzinfo is None else moment.astimezone(UTC)


def show_time(ts: str | None, utc: bool) -> str:
    if not ts:
        return ""
    try:
        return to_wall(datetime.fromisoformat(ts), utc).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return ts
