"""The `requests` row: one definition of its columns and their types, and the one timestamp format."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_ms(moment: float | datetime) -> str:
    """The stored timestamp format: UTC ISO 8601 with milliseconds and Z (`2026-11-28T14:00:00.000Z`), from epoch
    seconds or an aware datetime. Sorts as text in time order, which every `ts` range query relies on."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
