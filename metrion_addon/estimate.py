"""A request's worst-case cost, read from its body before it is forwarded. Pure: no mitmproxy, no I/O, no clock.

The bound (docs/budgets.md explains each constant):

- **Input tokens** <= the body's size in bytes (UTF-8 JSON): a token covers at least one byte of the text it
  encodes, and JSON only adds bytes (quotes, keys, escapes). Added on top, for what the bytes do not show:
  OVERHEAD_TOKENS per request (the system prompt Anthropic adds for tools, message framing), IMAGE_TOKENS per
  image block (an image is billed by its pixel count, not its bytes) and DOCUMENT_TOKENS per document block (a
  PDF page is billed as text plus an image; a `url` or `file_id` source has no bytes here at all). The total is
  capped at CONTEXT_MAX_TOKENS: no model accepts a longer prompt.
- **Output tokens** = `max_tokens` (MAX_OUTPUT_TOKENS if absent).
- **Caching**: where the body has `cache_control`, input is reserved at the cache-write rate (1-hour if any
  breakpoint asks `ttl: 1h`), the most a prompt token can cost.
- **Server tools**: web search costs its per-use price times `max_uses` (DEFAULT_TOOL_USES when the tool sets
  none, the one place the bound is an assumption rather than a limit), and every use can start another sampling
  iteration that re-reads the prompt plus the results (WEB_RESULT_TOKENS per use): input and output are
  multiplied by the number of iterations (uses + 1).
- Rates are the model's at the request's start (prompt-size tiers, `speed: fast`, US-only inference at 1.1x);
  an unknown model takes the most expensive rate of every kind among the known models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from genai_prices import data_snapshot

from metrion_addon.pricing import BATCH, MTOK, US_GEO, Pricer, Rates

OVERHEAD_TOKENS = 2_000
IMAGE_TOKENS = 5_000
DOCUMENT_TOKENS = 200_000
CONTEXT_MAX_TOKENS = 1_000_000
MAX_OUTPUT_TOKENS = 128_000
MAX_BATCH_REQUESTS = 100_000  # Anthropic's limit on the requests of one Message Batch
MIN_BATCH_REQUEST_BYTES = 30  # {"custom_id":"a","params":{}} and a comma: no request of a batch body is shorter
DEFAULT_TOOL_USES = 10
WEB_RESULT_TOKENS = 10_000
_MAX_DEPTH = 64


@dataclass(frozen=True)
class Shape:
    """What the body says that changes the bound."""

    model: str | None = None
    max_tokens: int | None = None
    cache_ttl: str | None = None  # None: no cache_control; "5m" | "1h"
    images: int = 0
    documents: int = 0
    web_search_uses: int = 0
    web_fetch_uses: int = 0
    speed: str | None = None
    us_only: bool = False


@dataclass(frozen=True)
class Estimate:
    usd: Decimal
    input_tokens: int
    output_tokens: int
    searches: int
    rates: str  # where the rates came from ("max-known" for an unknown model)


def _tool_uses(tool: dict[str, Any]) -> int:
    uses = tool.get("max_uses")
    if isinstance(uses, int) and not isinstance(uses, bool) and uses >= 0:
        return uses
    return DEFAULT_TOOL_USES


def shape_of(obj: Any) -> Shape:
    """The parts of a Messages request body that the bound depends on."""
    if not isinstance(obj, dict):
        return Shape()
    counts = {"image": 0, "document": 0}
    ttl: list[str] = []

    def walk(node: Any, depth: int) -> None:
        if depth > _MAX_DEPTH:
            counts["document"] += 1  # deeper than any real body: count it as unknown content
            return
        if isinstance(node, dict):
            cc = node.get("cache_control")
            if isinstance(cc, dict):
                ttl.append("1h" if cc.get("ttl") == "1h" else "5m")
            kind = node.get("type")
            if kind in counts:
                counts[kind] += 1
            for value in node.values():
                if isinstance(value, dict | list):
                    walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                if isinstance(value, dict | list):
                    walk(value, depth + 1)

    walk(obj, 0)
    search = fetch = 0
    tools = obj.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith("web_search"):
            search += _tool_uses(tool)
        elif isinstance(kind, str) and kind.startswith("web_fetch"):
            fetch += _tool_uses(tool)
    mt = obj.get("max_tokens")
    model = obj.get("model")
    return Shape(
        model=model if isinstance(model, str) else None,
        max_tokens=mt if isinstance(mt, int) and not isinstance(mt, bool) and mt >= 0 else None,
        cache_ttl=("1h" if "1h" in ttl else "5m") if ttl else None,
        images=counts["image"],
        documents=counts["document"],
        web_search_uses=search,
        web_fetch_uses=fetch,
        speed=obj.get("speed") if isinstance(obj.get("speed"), str) else None,
        us_only=isinstance(obj.get("inference_geo"), str) and obj["inference_geo"].lower() == "us",
    )


def parse_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def input_bound(body_bytes: int, shape: Shape) -> int:
    """Prompt tokens of one sampling iteration, at most."""
    tokens = body_bytes + OVERHEAD_TOKENS + shape.images * IMAGE_TOKENS + shape.documents * DOCUMENT_TOKENS
    return min(tokens, CONTEXT_MAX_TOKENS)


def worst_case(body_bytes: int, shape: Shape, rates: Rates, source: str, tier: Decimal = Decimal(1)) -> Estimate:
    """`tier`: the multiplier on token prices (BATCH for a batch's requests; server tool uses keep their price)."""
    uses = shape.web_search_uses + shape.web_fetch_uses
    iterations = 1 + uses
    prompt = min(input_bound(body_bytes, shape) + uses * WEB_RESULT_TOKENS, CONTEXT_MAX_TOKENS)
    in_rate = rates.input
    if shape.cache_ttl is not None:
        in_rate = max(in_rate, rates.cache_write_1h if shape.cache_ttl == "1h" else rates.cache_write_5m)
    output = shape.max_tokens if shape.max_tokens is not None else MAX_OUTPUT_TOKENS
    mult = US_GEO if shape.us_only else Decimal(1)
    usd = (iterations * prompt * in_rate + iterations * output * rates.output) * mult * tier / MTOK
    usd += shape.web_search_uses * rates.web_search_per_1000 / 1000
    return Estimate(usd, iterations * prompt, iterations * output, shape.web_search_uses, source)


def max_rates(pricer: Pricer, ts: datetime) -> Rates:
    """The most expensive rate of every kind among all known Anthropic models (and the config's overrides)."""
    snapshot = data_snapshot.get_snapshot()
    ids = [m.id for p in snapshot.providers if p.id == "anthropic" for m in p.models]
    ids += [o.prefix for o in getattr(pricer, "_overrides", ())]
    found = [
        r for mid in ids for speed in (None, "fast") if (r := pricer.rates(mid, ts, CONTEXT_MAX_TOKENS, None, speed))
    ]
    if not found:
        raise LookupError("no known rates")
    return Rates(
        input=max(r.input for r in found),
        output=max(r.output for r in found),
        cache_write_5m=max(r.cache_write_5m for r in found),
        cache_write_1h=max(r.cache_write_1h for r in found),
        cache_read=max(r.cache_read for r in found),
        web_search_per_1000=max(r.web_search_per_1000 for r in found),
        source="max-known",
    )


def estimate(body_bytes: int, obj: Any, pricer: Pricer, ts: datetime, unknown: Rates | None) -> Estimate | None:
    """The worst-case cost of a Messages request; None when its model has no price and `unknown` is None."""
    shape = shape_of(obj)
    rates = None
    if shape.model:
        prompt = input_bound(body_bytes, shape)
        rates = pricer.rates(shape.model, ts, prompt, None, shape.speed)
    if rates is None:
        if unknown is None:
            return None
        return worst_case(body_bytes, shape, unknown, "max-known")
    return worst_case(body_bytes, shape, rates, rates.source)


def unreadable_body(body_bytes: int, unknown: Rates) -> Estimate:
    """A body the proxy cannot read before it goes upstream (over stream_large_bodies): its size bounds the
    prompt; max_tokens, the model and tools are unknown, so the most expensive rates and MAX_OUTPUT_TOKENS."""
    shape = Shape(cache_ttl="1h")
    return worst_case(body_bytes, shape, unknown, "max-known")


# -- Message Batches ----------------------------------------------------------------------------------------


def params_bytes(params: Any) -> int | None:
    """The size of one batch request's params as compact UTF-8 JSON: what that request's body would be. It holds
    all of the request's text, so it bounds its prompt tokens as a Messages body's size does."""
    try:
        return len(json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError, RecursionError):
        return None


def batch_estimate(
    body_bytes: int, obj: Any, pricer: Pricer, ts: datetime, unknown: Rates | None, top: Rates
) -> tuple[Estimate, int] | None:
    """The worst-case cost of a Message Batch (`POST /v1/messages/batches`) and its number of requests: the sum,
    over `requests[].params`, of each request's worst case as for a Messages request, at batch rates (the
    source's own batch rates, else 50% of every token price; server tool uses at full price). None when a
    request names a model without a price and `unknown` is None. A body that is not a list of requests (the
    upstream refuses it) is bounded by its size, as an unreadable batch body is, at the `top` rates."""
    reqs = obj.get("requests") if isinstance(obj, dict) else None
    if not isinstance(reqs, list):
        return unreadable_batch(body_bytes, top), 0
    total = Decimal(0)
    tokens_in = tokens_out = searches = 0
    sources: set[str] = set()
    cache: dict[tuple[str, str | None, int], Rates | None] = {}
    for r in reqs:
        params = r.get("params") if isinstance(r, dict) else None
        size = params_bytes(params)
        size = body_bytes if size is None else min(size, body_bytes)
        shape = shape_of(params)
        rates = None
        if shape.model:
            prompt = input_bound(size, shape)
            key = (shape.model, shape.speed, prompt)
            if key not in cache:
                cache[key] = pricer.rates(shape.model, ts, prompt, "batch", shape.speed)
            rates = cache[key]
        if rates is None:
            if unknown is None:
                return None
            e = worst_case(size, shape, unknown, "max-known", BATCH)
        else:
            e = worst_case(size, shape, rates, rates.source, Decimal(1) if rates.batch_included else BATCH)
        total += e.usd
        tokens_in += e.input_tokens
        tokens_out += e.output_tokens
        searches += e.searches
        sources.add(e.rates)
    return Estimate(total, tokens_in, tokens_out, searches, ",".join(sorted(sources))), len(reqs)


def batch_models(obj: Any) -> list[str]:
    """The models a batch body's requests name, in order, each once."""
    reqs = obj.get("requests") if isinstance(obj, dict) else None
    out: dict[str, None] = {}
    for r in reqs if isinstance(reqs, list) else ():
        params = r.get("params") if isinstance(r, dict) else None
        model = params.get("model") if isinstance(params, dict) else None
        if isinstance(model, str):
            out[model] = None
    return list(out)


def unreadable_batch(body_bytes: int, top: Rates) -> Estimate:
    """A batch body the proxy cannot read before it goes upstream (over stream_large_bodies): as an unreadable
    Messages body (its size as prompt tokens at the top cache-write rate), plus, for every request it can hold
    (MIN_BATCH_REQUEST_BYTES each, MAX_BATCH_REQUESTS at most), the per-request overhead and MAX_OUTPUT_TOKENS of
    output at the top output rate; all at batch prices."""
    n = max(1, min(MAX_BATCH_REQUESTS, body_bytes // MIN_BATCH_REQUEST_BYTES))
    prompt = body_bytes + n * OVERHEAD_TOKENS
    output = n * MAX_OUTPUT_TOKENS
    usd = (prompt * max(top.cache_write_1h, top.input) + output * top.output) * BATCH / MTOK
    return Estimate(usd, prompt, output, 0, "max-known")
