"""What is known about one request, from start to end, and the row it becomes. Pure: no mitmproxy, no I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic_core import SchemaValidator, core_schema

from metrion_addon.pricing import COUNT_TOKENS_PATH, Priced, Pricer
from metrion_addon.schema import RequestRow, iso_ms
from metrion_addon.text import REDACTED, clean_text, looks_like_credential
from metrion_addon.usage import JsonTap, ResponseFacts, StreamTap, Usage

_MESSAGES_RE = re.compile(r"^(?:/v1)?/messages(/.*)?$")
LABEL_MAX = 200
MODEL_MAX = 200
# The endpoints that bill tokens: a 2xx answer from one of them without readable usage is flagged, never $0.
BILLED_ENDPOINTS = frozenset({("POST", "/v1/messages"), ("POST", "/v1/chat/completions")})


def upstream_path(path: str, prefix: str) -> str:
    """Client path (with query) -> upstream path (with query): strip the configured prefix, add a missing /v1."""
    p, sep, query = path.partition("?")
    if prefix and (p == prefix or p.startswith(prefix + "/")):
        p = p[len(prefix) :] or "/"
    if _MESSAGES_RE.match(p) and not p.startswith("/v1/"):
        p = "/v1" + p
    return p + sep + query


def clean_label(value: str | None) -> str | None:
    """A label from a request header as stored: valid UTF-8, control characters removed, length capped, empty
    -> None, and masked whole if it holds something that looks like a key or proxy token."""
    label = clean_text(value, LABEL_MAX)
    return REDACTED if label is not None and looks_like_credential(label) else label


def looks_json(body: bytes, content_type: str) -> bool:
    return bool(body) and ("json" in content_type.lower() or body.lstrip().startswith(b"{"))


def request_json(body: bytes, content_type: str) -> Any:
    """A JSON request body, parsed (once: the model and the budget estimate both read it); None if not JSON."""
    if not looks_json(body, content_type):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def model_of(obj: Any) -> str | None:
    model = obj.get("model") if isinstance(obj, dict) else None
    return clean_text(model, MODEL_MAX) if isinstance(model, str) else None


def attempt_headers(headers: Any) -> tuple[int | None, str | None]:
    """(retry count, request key) a client sent: the SDKs' `x-stainless-retry-count` (0 on the first attempt, N
    on the Nth retry), and a key that stays the same across the attempts of one call when the client sends one
    (`idempotency-key`, else `x-client-request-id`). Anything not a small number is no retry count."""
    raw = (headers.get("x-stainless-retry-count") or "").strip()
    retry = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 6 else None
    key = headers.get("idempotency-key") or headers.get("x-client-request-id")
    return retry, clean_label(key)


def counted_tokens(path: str, status: int, body: bytes | None) -> int | None:
    """The number a count_tokens answer counted (`{"input_tokens": N}`): kept, never billed or summed as input."""
    if path != COUNT_TOKENS_PATH or not 200 <= status < 300 or not body:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    n = obj.get("input_tokens") if isinstance(obj, dict) else None
    return n if type(n) is int and 0 <= n < 2**63 else None


# Reads only the top-level "model" of a JSON object. pydantic-core parses in Rust and builds no Python objects
# for the rest (system prompt, tools, history): 2.5x faster than json.loads on a 2 MB Claude Code body, and it
# validates the whole document as json.loads does (duplicate keys: the last one wins, as in json.loads).
_MODEL_ONLY = SchemaValidator(
    core_schema.typed_dict_schema(
        {"model": core_schema.typed_dict_field(core_schema.any_schema(), required=False)},
        extra_behavior="ignore",
    )
)


def request_model(body: bytes, content_type: str) -> str | None:
    """The `model` of a JSON request body; None when it is not JSON or has none. For when nothing else of the
    body is needed: `model_of(request_json(...))` builds all of it.

    The same answer as `json.loads(body).get("model")` on every input: where pydantic-core's parser refuses a
    body (a lone surrogate escape, UTF-16, a BOM, deep nesting...), json.loads decides.
    """
    if not looks_json(body, content_type):
        return None
    try:
        return model_of(_MODEL_ONLY.validate_json(body))
    except ValueError:  # pydantic_core.ValidationError is a ValueError
        return model_of(request_json(body, content_type))


@dataclass
class Pending:
    """One request in flight."""

    started: float
    method: str
    path: str  # upstream path without query
    model: str | None = None
    account: str | None = None
    user: str | None = None
    mode: str | None = None
    client: str | None = None
    session_id: str | None = None
    retry_count: int | None = None
    request_key: str | None = None
    counted_tokens: int | None = None
    local_error: str | None = None  # set when the proxy answered itself (e.g. authentication_error)
    local_message: str | None = None
    status: int | None = None  # from the response headers, once they arrived
    request_id: str | None = None
    headers_at: float | None = None
    streamed: bool = False
    tap: StreamTap | JsonTap | None = None
    facts: ResponseFacts = field(default_factory=ResponseFacts)
    body_tap: Any = None  # reqtap.RequestTap of a request body streamed upstream: the model is read from it


def tap_failed(p: Pending) -> bool:
    return p.tap is not None and p.tap.failed is not None


def identity(p: Pending, model: str | None) -> RequestRow:
    """The columns known before anything is forwarded: when, who, how and to what (every row starts with them)."""
    row: RequestRow = {
        "ts": iso_ms(p.started),
        "account": p.account,
        "user": p.user,
        "mode": p.mode,
        "method": p.method,
        "path": p.path,
        "model": model,
        "stream": int(p.streamed),
    }
    return row


def finish(
    p: Pending,
    *,
    pricer: Pricer,
    status: int | None,
    request_id: str | None,
    headers_at: float | None,
    ended_at: float,
    error: str | None = None,
    error_message: str | None = None,
) -> RequestRow:
    """The row for a finished request. `error` is the transport-level failure, if any (client_disconnect...)."""
    if p.model is None and p.body_tap is not None:
        p.model = p.body_tap.model()  # a streamed body: read on the side (at the end, a copy, off the loop)
    f = p.facts
    usage = f.usage
    model = p.model or clean_text(f.model, MODEL_MAX)
    priced = pricer.price(f.model or p.model, usage, datetime.fromtimestamp(p.started, UTC), p.path)
    implausible = usage is not None and not usage.plausible
    if implausible:
        usage = None  # garbage counts: kept raw in usage_json for an audit, not in the token columns
    ok = status is not None and 200 <= status < 300 and p.local_error is None and error is None
    unreadable = ok and f.error_type is None and (p.method, p.path) in BILLED_ENDPOINTS and f.raw_usage is None
    if unreadable and p.streamed and f.completed and f.usage_optional and not f.parse_errors and not tap_failed(p):
        unreadable = False  # a complete stream that was never asked to carry usage (no `include_usage`)
        priced = Priced(None, "usage_unavailable")
    elif unreadable:
        priced = Priced(None, "usage_unreadable")  # a billed answer whose usage could not be read: never $0

    err = p.local_error or error or clean_text(f.error_type, 100)
    if err is None and status is not None and status >= 400:
        err = f"http_{status}"
    if err is None and p.streamed and not f.completed:
        err = "incomplete_stream"  # the upstream closed cleanly but never sent message_stop
    if err is None and ((p.tap is not None and p.tap.failed) or f.parse_errors or implausible or unreadable):
        err = "usage_unreadable"  # forwarded as is, but part of the response could not be read: usage may be short
    message = p.local_message or f.error_message or error_message

    ttft_at = f.first_byte_at if p.streamed else headers_at
    row: RequestRow = {
        **identity(p, model),
        "status": status,
        "request_id": clean_text(request_id),
        "message_id": clean_text(f.message_id),
        "latency_ms": round((ended_at - p.started) * 1000, 3),
        "ttft_ms": None if ttft_at is None else round((ttft_at - p.started) * 1000, 3),
        "completed": int(err is None and (f.completed or not p.streamed) and status is not None and status < 400),
        "error": err,
        "error_message": clean_text(message),
        "stop_reason": clean_text(f.stop_reason),
        "client": p.client,
        "session_id": p.session_id,
        "retry_count": p.retry_count,
        "request_key": p.request_key,
        "counted_tokens": p.counted_tokens,
        "response_model": clean_text(f.model, MODEL_MAX),
        "usage_json": json.dumps(f.raw_usage, separators=(",", ":")) if f.raw_usage is not None else None,
        **priced.columns(),
    }
    if usage is not None:
        row.update(usage_columns(usage))
    return row


def usage_columns(usage: Usage) -> dict[str, Any]:
    """The token and billing-modifier columns of a row, from its billed usage."""
    row: dict[str, Any] = {
        "input_tokens": usage.total("input_tokens"),
        "output_tokens": usage.total("output_tokens"),
        "cache_creation_input_tokens": usage.total("cache_creation_input_tokens"),
        "cache_read_input_tokens": usage.total("cache_read_input_tokens"),
        "cache_creation_5m_input_tokens": usage.total("cache_creation_5m_input_tokens"),
        "cache_creation_1h_input_tokens": usage.total("cache_creation_1h_input_tokens"),
        "web_search_requests": usage.web_search_requests,
        "web_fetch_requests": usage.web_fetch_requests,
        "service_tier": clean_text(usage.service_tier),
        "inference_geo": clean_text(usage.inference_geo),
        "speed": clean_text(usage.speed),
        "iterations": usage.iterations,
    }
    return row
