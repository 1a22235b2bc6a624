"""The `requests` row: one definition of its columns and their types, and the one timestamp format. Pure.

`RequestRow` is the row as the code writes it; `COLUMNS` (name -> Python type, in table order) is derived from
it, and the stores (SQLite, PostgreSQL), the pricing columns, repricing and the report take their column names
from here. The table is a public contract: people query it directly. Add columns (at the end, with a migration
in store.py); never rename or repurpose one.
"""

from __future__ import annotations

import types
import typing
from datetime import UTC, datetime
from typing import TypedDict


class RequestRow(TypedDict, total=False):
    """One row of `requests`. Keys left out are stored as NULL."""

    id: int  # SQLite rowid / PostgreSQL identity: assigned by the database, never written
    ts: str  # request start, UTC ISO 8601 with milliseconds and Z (iso_ms); the only NOT NULL column
    account: str | None
    user: str | None
    mode: str | None  # managed | passthrough
    method: str | None
    path: str | None  # upstream path, without query
    model: str | None
    stream: int | None
    status: int | None  # HTTP status sent to the client
    request_id: str | None  # upstream request-id header
    message_id: str | None
    input_tokens: int | None
    output_tokens: int | None
    cache_creation_input_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_5m_input_tokens: int | None
    cache_creation_1h_input_tokens: int | None
    web_search_requests: int | None
    web_fetch_requests: int | None
    service_tier: str | None
    inference_geo: str | None
    speed: str | None
    iterations: int | None  # number of usage.iterations entries billed, when present
    cost_usd: float | None  # None: no price known (never a silent 0); the cost_* columns come from pricing
    cost_input_usd: float | None
    cost_output_usd: float | None
    cost_cache_write_usd: float | None
    cost_cache_read_usd: float | None
    cost_tools_usd: float | None
    price_source: str | None
    latency_ms: float | None
    ttft_ms: float | None
    completed: int | None
    error: str | None
    error_message: str | None
    stop_reason: str | None
    client: str | None
    session_id: str | None
    usage_json: str | None  # the raw usage object as received (for audits and repricing; holds no secrets)
    response_model: str | None  # the model the response named (what was billed; repricing uses it)
    row_id: str | None  # a UUIDv7 made by the proxy: the same row written twice (replayed, copied) counts once
    batch_id: str | None  # a Message Batches result: its batch
    custom_id: str | None  # ... and the request's custom_id within it
    batch_result: str | None  # ... and its result type: succeeded | errored | canceled | expired
    retry_count: int | None  # the SDK's x-stainless-retry-count: 0 first attempt, N the Nth retry; NULL: not sent
    request_key: str | None  # the client's idempotency-key (or x-client-request-id): the same on every attempt
    counted_tokens: int | None  # count_tokens answers: the number counted (never billed, never in input_tokens)
    budget_usd: float | None  # set only when cost_usd is NULL: what budgets counted (the request's reservation)


def _column_type(hint: object) -> type:
    """`int | None` -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    (kind,) = args
    assert isinstance(kind, type)
    return kind


COLUMNS: dict[str, type] = {name: _column_type(h) for name, h in typing.get_type_hints(RequestRow).items()}
INSERT_COLUMNS = tuple(c for c in COLUMNS if c != "id")  # what the code writes; `id` is the database's
# The priced columns, as Priced.columns() fills them and metrion-reprice rewrites them: the money columns in
# COLUMNS order (total, input, output, cache write, cache read, tools), then where the price came from.
MONEY_COLUMNS = tuple(c for c in COLUMNS if c.startswith("cost_"))
COST_COLUMNS = (*MONEY_COLUMNS, "price_source")


def names(*columns: str) -> tuple[str, ...]:
    """`columns`, checked: a name that is not a column fails here, at import, instead of reading NULL."""
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise KeyError(f"not columns of requests: {', '.join(unknown)}")
    return columns


def iso_ms(moment: float | datetime) -> str:
    """The stored timestamp format: UTC ISO 8601 with milliseconds and Z (`2026-11-28T14:00:00.000Z`), from epoch
    seconds or an aware datetime. Sorts as text in time order, which every `ts` range query relies on."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
