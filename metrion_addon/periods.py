"""Calendar periods (hour, day, week, month) in wall-clock time: the one place budgets and the report get them.

Pure: the time is always passed in. Arithmetic is done on naive wall-clock times and only then given a zone,
so a day is the span between two midnights however long it is (23 or 25 hours across a DST change).
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo

PERIODS = ("hour", "day", "week", "month")


def add_months(wall: datetime, n: int) -> datetime:
    """The first of the month `n` months after `wall`'s (n may be negative), at `wall`'s time of day."""
    y, m = divmod(wall.month - 1 + n, 12)
    return wall.replace(year=wall.year + y, month=m + 1, day=1)


def floor(wall: datetime, period: str) -> datetime:
    """The start of the period holding the wall-clock time `wall` (weeks start on Monday)."""
    day = wall.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    match period:
        case "hour":
            return wall.replace(minute=0, second=0, microsecond=0, fold=0)
        case "day":
            return day
        case "week":
            return day - timedelta(days=day.weekday())
        case "month":
            return day.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def next_start(wall: datetime, period: str) -> datetime:
    """The start of the period after the one starting at `wall`."""
    match period:
        case "hour":
            return wall + timedelta(hours=1)
        case "day":
            return wall + timedelta(days=1)
        case "week":
            return wall + timedelta(days=7)
        case "month":
            return add_months(wall, 1)
    raise ValueError(f"unknown period {period!r}")


def bounds(moment: datetime, period: str, tz: tzinfo) -> tuple[datetime, datetime]:
    """(start, end) of the period holding the aware time `moment`, as aware times in `tz`; end exclusive."""
    start = floor(moment.astimezone(tz).replace(tzinfo=None), period)
    return start.replace(tzinfo=tz), next_start(start, period).replace(tzinfo=tz)


def named(name: str, wall_now: datetime) -> tuple[datetime, datetime] | None:
    """The wall-clock (start, end) of a named period around `wall_now` (`today`, `last-month`...); None if the
    name is not one."""
    today = floor(wall_now, "day")
    week = floor(wall_now, "week")
    month = floor(wall_now, "month")
    year = month.replace(month=1)
    return {
        "today": (today, today + timedelta(days=1)),
        "yesterday": (today - timedelta(days=1), today),
        "this-week": (week, week + timedelta(days=7)),
        "last-week": (week - timedelta(days=7), week),
        "this-month": (month, add_months(month, 1)),
        "last-month": (add_months(month, -1), month),
        "this-year": (year, year.replace(year=year.year + 1)),
    }.get(name)
