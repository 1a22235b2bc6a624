"""Usage facts from Anthropic responses: JSON bodies and SSE streams alike. Nothing here prices anything.

Streams: `message_start` carries the initial usage (its output_tokens is a placeholder); every `message_delta`
carries *cumulative* counts that replace the earlier ones (never add). So the raw usage object is kept and
updated key by key, and turned into billed numbers once, at the end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from metrion_addon.sse import SSEParser, incremental_decoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenCounts:
    """Token counts of one sampling step (the whole request, or one entry of `usage.iterations`)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    model: str | None = None  # an iteration entry may name its own model

    @property
    def cache_creation_input_tokens(self) -> int:
        return self.cache_creation_5m_input_tokens + self.cache_creation_1h_input_tokens

    @property
    def prompt_tokens(self) -> int:
        """Everything sent to the model: the figure long-context tiers are measured on."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


# No single response bills anywhere near this many tokens. Larger counts are garbage from a broken upstream:
# priced, one such response would be a bill of 1e24 USD and exhaust every budget of its account.
MAX_PLAUSIBLE_TOKENS = 10**10
_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
)


@dataclass(frozen=True)
class Usage:
    """Billed usage of one request. `parts` has one entry, or one per `usage.iterations` entry."""

    parts: tuple[TokenCounts, ...]
    from_iterations: bool = False  # parts come from `usage.iterations`, not the top-level counts
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    service_tier: str | None = None
    inference_geo: str | None = None
    speed: str | None = None
    malformed: bool = False  # a count that is not a non-negative integer (string, float, negative, NaN...)

    def total(self, name: str) -> int:
        parts = self.parts
        if len(parts) == 1:  # almost always (no iterations): called ~16 times per row, this halves the row's cost
            return getattr(parts[0], name)
        return sum(getattr(p, name) for p in parts)

    @property
    def plausible(self) -> bool:
        if self.malformed:
            return False
        counts = [self.total(n) for n in _TOKEN_FIELDS] + [self.web_search_requests, self.web_fetch_requests]
        return max(counts) <= MAX_PLAUSIBLE_TOKENS

    @property
    def iterations(self) -> int | None:
        return len(self.parts) if self.from_iterations else None


def _valid_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int(value: Any) -> int:
    return value if _valid_count(value) else 0


_COUNT_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _malformed(raw: dict[str, Any]) -> bool:
    """A count that is present (not null) but not a non-negative integer: the usage cannot be trusted."""
    nested = [raw.get("cache_creation"), raw.get("server_tool_use")]
    pairs = [(k, raw.get(k)) for k in _COUNT_FIELDS] + [
        (k, v) for d in nested if isinstance(d, dict) for k, v in d.items() if k.endswith(("_tokens", "_requests"))
    ]
    return any(v is not None and not _valid_count(v) for _, v in pairs)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _counts(raw: dict[str, Any], model: str | None = None) -> TokenCounts:
    total_write = _int(raw.get("cache_creation_input_tokens"))
    split = raw.get("cache_creation")
    if isinstance(split, dict) and ("ephemeral_5m_input_tokens" in split or "ephemeral_1h_input_tokens" in split):
        w1h = _int(split.get("ephemeral_1h_input_tokens"))
        # The split is authoritative; if it is partial, the rest of the total is a 5-minute write.
        w5m = _int(split.get("ephemeral_5m_input_tokens")) if "ephemeral_5m_input_tokens" in split else 0
        w5m = max(w5m, total_write - w1h)
    else:
        w5m, w1h = total_write, 0  # no split: the whole write is a 5-minute write
    return TokenCounts(
        input_tokens=_int(raw.get("input_tokens")),
        output_tokens=_int(raw.get("output_tokens")),
        cache_creation_5m_input_tokens=w5m,
        cache_creation_1h_input_tokens=w1h,
        cache_read_input_tokens=_int(raw.get("cache_read_input_tokens")),
        model=model,
    )


def usage_from_raw(raw: dict[str, Any]) -> Usage:
    """An Anthropic `usage` object (as merged from a body or a stream) -> billed Usage."""
    iterations = raw.get("iterations")
    entries = [i for i in iterations if isinstance(i, dict)] if isinstance(iterations, list) else []
    # Compaction and server-side loops: the billed usage is the sum of the entries, each at its own model
    # (a `compaction` entry's tokens are not in the top-level counts, so those cannot be used instead).
    parts = tuple(_counts(i, _str(i.get("model"))) for i in entries) or (_counts(raw),)
    tools = raw.get("server_tool_use")
    tools = tools if isinstance(tools, dict) else {}
    return Usage(
        parts=parts,
        from_iterations=bool(entries),
        malformed=any(_malformed(r) for r in (raw, *entries)),
        web_search_requests=_int(tools.get("web_search_requests")),
        web_fetch_requests=_int(tools.get("web_fetch_requests")),
        service_tier=_str(raw.get("service_tier")),
        inference_geo=_str(raw.get("inference_geo")),
        speed=_str(raw.get("speed")),
    )


@dataclass
class ResponseFacts:
    """What one response told us. Filled from a JSON body or event by event from a stream."""

    raw_usage: dict[str, Any] | None = None
    message_id: str | None = None
    model: str | None = None
    stop_reason: str | None = None
    completed: bool = False
    error_type: str | None = None
    error_message: str | None = None
    events: int = 0
    parse_errors: int = 0
    first_byte_at: float | None = None

    # True where a complete stream may lawfully carry no usage (the OpenAI-compatible endpoint without
    # `include_usage`): recorded as `usage_unavailable`, not as unreadable.
    usage_optional = False

    @property
    def usage(self) -> Usage | None:
        return None if self.raw_usage is None else usage_from_raw(self.raw_usage)

    def _merge_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        if self.raw_usage is None:
            self.raw_usage = {}
        for key, value in usage.items():
            # Cumulative values replace (never add); nested objects replace whole. A null in a message_delta
            # means "not reported here" (the SDKs keep the earlier value), so it never erases one.
            if value is not None or key not in self.raw_usage:
                self.raw_usage[key] = value

    def _error(self, obj: Any) -> None:
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict):
            self.error_type = _str(err.get("type")) or "error"
            msg = err.get("message")
            self.error_message = msg[:500] if isinstance(msg, str) else None
        else:
            self.error_type = "error"

    # -- JSON bodies -------------------------------------------------------------------------------

    def json_object(self, body: bytes) -> dict[str, Any] | None:
        """A JSON body's top-level object; None, counted as a parse error, when it is not one."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            self.parse_errors += 1
            return None
        return obj

    def from_json_body(self, body: bytes) -> None:
        obj = self.json_object(body)
        if obj is None:
            return
        kind = obj.get("type")
        if kind == "error":
            self._error(obj)
            return
        if kind == "message":
            self.message_id = _str(obj.get("id"))
            self.model = _str(obj.get("model"))
            self.stop_reason = _str(obj.get("stop_reason"))
            self._merge_usage(obj.get("usage"))
        self.completed = True

    # -- SSE events --------------------------------------------------------------------------------

    WANTED_EVENTS = frozenset({"message_start", "message_delta", "message_stop", "error", "message"})

    def on_event(self, event: str, data: bytes) -> None:
        self.events += 1
        if event not in self.WANTED_EVENTS:
            return  # content deltas and pings: not parsed at all
        obj = self.json_object(data)
        if obj is None:
            if event == "error":
                self.error_type = "error"  # an unreadable error event is still an error
            return
        kind = obj.get("type") if event == "message" else event
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                self.message_id = _str(msg.get("id"))
                self.model = _str(msg.get("model"))
                self._merge_usage(msg.get("usage"))
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and _str(delta.get("stop_reason")):
                self.stop_reason = delta["stop_reason"]
            self._merge_usage(obj.get("usage"))
        elif kind == "message_stop":
            self.completed = True
        elif kind == "error":
            self._error(obj)


class _Tap:
    """A `flow.response.stream` callable: returns every chunk unchanged, at once, and reads it on the side.

    It never raises (mitmproxy would silently drop the chunk): any failure switches reading off and the bytes
    keep flowing. Content-encoded bodies are decoded incrementally, for reading only.
    """

    __slots__ = ("facts", "_decode", "failed")

    def __init__(self, facts: ResponseFacts, content_encoding: str | None) -> None:
        self.facts = facts
        self.failed: str | None = None
        try:  # never raise from here either: the hook that builds the tap must still stream the bytes
            self._decode = incremental_decoder(content_encoding)
        except Exception as e:  # noqa: BLE001 - e.g. a decompression module missing
            self._decode = None
            self.failed = f"{e.__class__.__name__}: {e}"[:200]
        if self._decode is None and self.failed is None:
            self.failed = f"unsupported content-encoding {content_encoding!r}"

    def __call__(self, chunk: bytes) -> bytes:
        if chunk and self.facts.first_byte_at is None:
            self.facts.first_byte_at = time.time()
        if self.failed is None:
            try:
                self._read(chunk)
            except Exception as e:  # noqa: BLE001 - reading must never break the stream
                self.failed = f"{e.__class__.__name__}: {e}"[:200]
                log.warning("metrion: stopped reading a response's usage: %s", self.failed)
        return chunk

    def _read(self, chunk: bytes) -> None:
        raise NotImplementedError


class StreamTap(_Tap):
    """The tap for an SSE stream: events are parsed as they arrive, whatever the chunking."""

    __slots__ = ("_parser", "_plain")

    def __init__(self, facts: ResponseFacts, content_encoding: str | None) -> None:
        self._parser = SSEParser(wanted=ResponseFacts.WANTED_EVENTS)
        self._plain = (content_encoding or "identity").strip().lower() == "identity"
        super().__init__(facts, content_encoding)

    def __call__(self, chunk: bytes) -> bytes:
        # Content deltas arrive a chunk each: one match skips them (1.9 against 3.6 us per chunk, measured).
        if self._plain and self.facts.first_byte_at is not None and self._parser.skippable(chunk):
            return chunk
        return _Tap.__call__(self, chunk)

    def _read(self, chunk: bytes) -> None:
        assert self._decode is not None
        data = self._decode(chunk)
        events = self._parser.feed(data) if data else []
        if not chunk:  # clean end of stream
            events += self._parser.close()
        for event, payload in events:
            self.facts.on_event(event, payload)


# A JSON response read through a tap is kept (decoded) up to this size to be parsed at its end. Anthropic's
# JSON answers are far smaller; a larger one is forwarded whole but flagged as unreadable, never priced at $0.
JSON_TAP_MAX = 64 * 1024 * 1024


class JsonTap(_Tap):
    """The tap for a JSON response that mitmproxy streams instead of buffering (`stream_large_bodies`): a copy
    is kept and parsed at the clean end."""

    __slots__ = ("_buf",)

    def __init__(self, facts: ResponseFacts, content_encoding: str | None) -> None:
        self._buf = bytearray()
        super().__init__(facts, content_encoding)

    def _read(self, chunk: bytes) -> None:
        assert self._decode is not None
        self._buf += self._decode(chunk)
        if len(self._buf) > JSON_TAP_MAX:
            self._buf = bytearray()
            self.failed = f"JSON response over {JSON_TAP_MAX} bytes: not read"
        elif not chunk:  # clean end of the body
            self.facts.from_json_body(bytes(self._buf))
            self._buf = bytearray()
