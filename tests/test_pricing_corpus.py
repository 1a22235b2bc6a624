"""The accounting corpus: usage shapes x models, as JSON bodies and as SSE streams, through the real parsing path
(ResponseFacts / StreamTap -> record.finish -> Pricer), against costs worked out by hand below.

The rates are the published per-MTok prices, copied once by eye from genai-prices' bundled data (0.2.3) and
written here as constants. Nothing here asks the code under test or the price library for a rate.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal as D
from importlib.metadata import version
from typing import Any

import brotli
import pytest
from backports import zstd

from metrion_addon.config import PriceOverride
from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, finish
from metrion_addon.usage import ResponseFacts, StreamTap


@dataclass(frozen=True)
class R:
    """USD per million tokens: uncached input, output, 5-minute write, 1-hour write, cache read."""

    inp: D
    out: D
    w5: D
    w1: D
    rd: D


def r(*v: str) -> R:
    return R(*(D(x) for x in v))


# --- the published rates ---------------------------------------------------------------------------------------
OPUS_5_5 = r("4", "20", "5", "8", "0.2")  # reads 0.05x input, not 0.1x
OPUS_5_5_FAST = r("8", "40", "10", "16", "0.4")  # speed: fast
SONNET_5_5 = r("2", "10", "2.5", "4", "0.1")
HAIKU_5_5 = r("0.1", "0.5", "0.125", "0.2", "0.01")  # prompt <= 100k
HAIKU_5_5_LONG = r("0.5", "2.5", "0.625", "1", "0.05")  # prompt > 100k: every token
OPUS_4_6 = r("5", "25", "6.25", "10", "0.5")
OPUS_4_6_LONG = r("10", "37.5", "12.5", "20", "1")  # prompt > 200k, before 2026-03-13
SONNET_4_6 = r("3", "15", "3.75", "6", "0.3")
SONNET_4_6_LONG = r("6", "22.5", "7.5", "12", "0.6")  # prompt > 200k, before 2026-03-13
HAIKU_4_5 = r("1", "5", "1.25", "2", "0.1")
HAIKU_3 = r("0.25", "1.25", "0.3", "0.5", "0.03")  # explicit write/read rates, not 1.25x / 0.1x
WEB_SEARCH_PER_SEARCH = D("10") / 1000
BATCH = D("0.5")
US = D("1.1")
MTOK = D(1_000_000)

GP = f"genai-prices@{version('genai-prices')}"
JUNE = datetime(2026, 6, 1, 12, tzinfo=UTC)  # after the 4.6 long-context premium, before dated batch variants
NOV = datetime(2026, 11, 2, 12, tzinfo=UTC)  # the data's own batch rates are in force
FEB = datetime(2026, 2, 1, 12, tzinfo=UTC)  # the 4.6 long-context premium still applies


@dataclass(frozen=True)
class Part:
    """One billed step: its rate (picked by hand for its model, date and prompt size) and its token counts."""

    rates: R
    inp: int
    out: int
    w5: int = 0
    w1: int = 0
    rd: int = 0
    model: str | None = None  # for a usage.iterations entry naming its own model
    kind: str = "message"
    split: bool = True  # send cache_creation {ephemeral_5m, ephemeral_1h}; else only the total (= a 5m write)


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    parts: tuple[Part, ...]
    sources: tuple[str, ...]  # genai-prices model ids (or "override:...") as named in price_source
    flags: frozenset[str] = frozenset()
    mult: D = D(1)  # batch / US geo multiplier on every token category
    searches: int = 0
    fetches: int = 0
    ts: datetime = JUNE
    iterations: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # service_tier, inference_geo, speed


def P(rates: R, inp: int, out: int, w5: int = 0, w1: int = 0, rd: int = 0, **kw: Any) -> Part:
    return Part(rates, inp, out, w5, w1, rd, **kw)


def C(
    name: str, model: str, *parts: Part, sources: tuple[str, ...] = (), flags: tuple[str, ...] = (), **kw: Any
) -> Case:
    return Case(name, model, parts, sources, frozenset(flags), **kw)


CASES: list[Case] = [
    # Opus 5.5
    C("opus55-plain", "claude-opus-5-5", P(OPUS_5_5, 1234, 567), sources=("claude-opus-5-5",)),
    C(
        "opus55-5m-no-split",
        "claude-opus-5-5",
        P(OPUS_5_5, 10, 200, w5=5000, rd=40000, split=False),
        sources=("claude-opus-5-5",),
    ),
    C(
        "opus55-5m-1h-split",
        "claude-opus-5-5",
        P(OPUS_5_5, 12, 300, w5=1500, w1=2500, rd=9000),
        sources=("claude-opus-5-5",),
    ),
    C(
        "opus55-web-search-fetch",
        "claude-opus-5-5",
        P(OPUS_5_5, 3000, 800, rd=1000),
        searches=3,
        fetches=2,
        sources=("claude-opus-5-5",),
    ),
    C(
        "opus55-batch-own-50pct",
        "claude-opus-5-5",
        P(OPUS_5_5, 5000, 1000, w5=100, w1=200, rd=300),
        mult=BATCH,
        extra={"service_tier": "batch"},
        sources=("claude-opus-5-5",),
        flags=("batch",),
    ),
    C(
        "opus55-batch-data-rates",
        "claude-opus-5-5",
        P(OPUS_5_5, 5000, 1000, w5=100, w1=200, rd=300),
        mult=BATCH,
        ts=NOV,
        extra={"service_tier": "batch"},
        sources=("claude-opus-5-5",),
        flags=("batch",),
    ),
    C(
        "opus55-us-geo",
        "claude-opus-5-5",
        P(OPUS_5_5, 700, 90, w5=10, w1=20, rd=30),
        mult=US,
        extra={"inference_geo": "us"},
        sources=("claude-opus-5-5",),
        flags=("us-geo-1.1x",),
    ),
    C(
        "opus55-batch-us-web",
        "claude-opus-5-5",
        P(OPUS_5_5, 800, 70, w5=60, w1=50, rd=40),
        mult=BATCH * US,
        searches=7,
        extra={"service_tier": "batch", "inference_geo": "us"},
        sources=("claude-opus-5-5",),
        flags=("batch", "us-geo-1.1x"),
    ),
    C(
        "opus55-priority",
        "claude-opus-5-5",
        P(OPUS_5_5, 400, 40),
        extra={"service_tier": "priority"},
        sources=("claude-opus-5-5",),
        flags=("priority-priced-as-standard",),
    ),
    C(
        "opus55-fast",
        "claude-opus-5-5",
        P(OPUS_5_5_FAST, 400, 40, w1=100, rd=50),
        extra={"speed": "fast"},
        sources=("claude-opus-5-5",),
        flags=("fast",),
    ),
    C(
        "opus55-fast-us",
        "claude-opus-5-5",
        P(OPUS_5_5_FAST, 400, 40),
        mult=US,
        extra={"speed": "fast", "inference_geo": "us"},
        sources=("claude-opus-5-5",),
        flags=("fast", "us-geo-1.1x"),
    ),
    C(
        "opus55-global-geo",
        "claude-opus-5-5",
        P(OPUS_5_5, 400, 40),
        extra={"inference_geo": "global"},
        sources=("claude-opus-5-5",),
    ),
    # Sonnet 5.5
    C("sonnet55-thinking-output", "claude-sonnet-5-5", P(SONNET_5_5, 25, 31_000), sources=("claude-sonnet-5-5",)),
    C("sonnet55-1h-only", "claude-sonnet-5-5", P(SONNET_5_5, 3, 100, w1=4096, rd=2048), sources=("claude-sonnet-5-5",)),
    C(
        "sonnet55-web-us",
        "claude-sonnet-5-5",
        P(SONNET_5_5, 2000, 500),
        mult=US,
        searches=12,
        extra={"inference_geo": "us"},
        sources=("claude-sonnet-5-5",),
        flags=("us-geo-1.1x",),
    ),
    C(
        "sonnet55-compaction",
        "claude-sonnet-5-5",
        P(SONNET_5_5, 180_000, 3_000, kind="compaction"),
        P(SONNET_5_5, 4_000, 900, w5=100, rd=2000, model="claude-sonnet-5-5"),
        iterations=True,
        sources=("claude-sonnet-5-5",),
    ),
    C(
        "sonnet55-iterations-models",
        "claude-sonnet-5-5",
        P(HAIKU_5_5, 5_000, 100, model="claude-haiku-5-5"),
        P(OPUS_5_5, 6_000, 700, rd=1000, model="claude-opus-5-5", kind="advisor_message"),
        P(SONNET_5_5, 7_000, 300, w1=500, model="claude-sonnet-5-5"),
        iterations=True,
        searches=2,
        sources=("claude-haiku-5-5", "claude-opus-5-5", "claude-sonnet-5-5"),
    ),
    C(
        "sonnet55-iterations-batch-us",
        "claude-sonnet-5-5",
        P(SONNET_5_5, 1_000, 100, kind="compaction"),
        P(SONNET_5_5, 2_000, 200, w5=50, model="claude-sonnet-5-5"),
        iterations=True,
        mult=BATCH * US,
        extra={"service_tier": "batch", "inference_geo": "us"},
        sources=("claude-sonnet-5-5",),
        flags=("batch", "us-geo-1.1x"),
    ),
    # Haiku 5.5: its long-context tier starts above 100k prompt tokens (input + writes + reads)
    C(
        "haiku55-plain",
        "claude-haiku-5-5",
        P(HAIKU_5_5, 50_000, 2_000, w5=10_000, rd=20_000),
        sources=("claude-haiku-5-5",),
    ),
    C(
        "haiku55-at-100k",
        "claude-haiku-5-5",
        P(HAIKU_5_5, 40_000, 9_000, w5=20_000, w1=10_000, rd=30_000),
        sources=("claude-haiku-5-5",),
    ),
    C(
        "haiku55-over-100k",
        "claude-haiku-5-5",
        P(HAIKU_5_5_LONG, 40_001, 9_000, w5=20_000, w1=10_000, rd=30_000),
        sources=("claude-haiku-5-5",),
    ),
    C(
        "haiku55-long-batch-us",
        "claude-haiku-5-5",
        P(HAIKU_5_5_LONG, 150_000, 4_000, rd=1),
        mult=BATCH * US,
        ts=NOV,
        extra={"service_tier": "batch", "inference_geo": "us"},
        sources=("claude-haiku-5-5",),
        flags=("batch", "us-geo-1.1x"),
    ),
    # Opus 4.6 / Sonnet 4.6: long-context premium above 200k, until 2026-03-13
    C(
        "opus46-feb-over-200k",
        "claude-opus-4-6",
        P(OPUS_4_6_LONG, 150_001, 5_000, w5=20_000, rd=30_000),
        ts=FEB,
        sources=("claude-opus-4-6",),
    ),
    C(
        "opus46-feb-at-200k",
        "claude-opus-4-6",
        P(OPUS_4_6, 150_000, 5_000, w5=20_000, rd=30_000),
        ts=FEB,
        sources=("claude-opus-4-6",),
    ),
    C(
        "opus46-june-300k-no-premium",
        "claude-opus-4-6",
        P(OPUS_4_6, 250_000, 5_000, w1=20_000, rd=30_000),
        sources=("claude-opus-4-6",),
    ),
    C(
        "opus46-us-geo",
        "claude-opus-4-6",
        P(OPUS_4_6, 1_000, 100, w5=10, rd=20),
        mult=US,
        extra={"inference_geo": "us"},
        sources=("claude-opus-4-6",),
        flags=("us-geo-1.1x",),
    ),
    C(
        "opus46-feb-long-us-batch",
        "claude-opus-4-6",
        P(OPUS_4_6_LONG, 210_000, 1_000),
        ts=FEB,
        mult=BATCH * US,
        extra={"service_tier": "batch", "inference_geo": "us"},
        sources=("claude-opus-4-6",),
        flags=("batch", "us-geo-1.1x"),
    ),
    C(
        "opus46-iterations-one-long",
        "claude-opus-4-6",
        P(OPUS_4_6_LONG, 190_000, 2_000, rd=10_001, kind="compaction"),
        P(OPUS_4_6, 20_000, 3_000, rd=5_000, model="claude-opus-4-6"),
        iterations=True,
        ts=FEB,
        sources=("claude-opus-4-6",),
    ),
    C(
        "sonnet46-mar12-long-split",
        "claude-sonnet-4-6",
        P(SONNET_4_6_LONG, 100_000, 2_000, w5=50_000, w1=50_000, rd=1),
        ts=datetime(2026, 3, 12, 23, 59, tzinfo=UTC),
        sources=("claude-sonnet-4-6",),
    ),
    C(
        "sonnet46-mar13-no-premium",
        "claude-sonnet-4-6",
        P(SONNET_4_6, 100_000, 2_000, w5=50_000, w1=50_000, rd=1),
        ts=datetime(2026, 3, 13, 0, 1, tzinfo=UTC),
        sources=("claude-sonnet-4-6",),
    ),
    C(
        "sonnet46-web-search",
        "claude-sonnet-4-6",
        P(SONNET_4_6, 900, 90),
        searches=1001,
        sources=("claude-sonnet-4-6",),
    ),
    # Haiku 4.5 (a dated id): before 4.6, so no US-geo multiplier
    C(
        "haiku45-dated-cache",
        "claude-haiku-4-5-20251001",
        P(HAIKU_4_5, 77, 888, w5=9_999, rd=123_456, split=False),
        sources=("claude-haiku-4-5",),
    ),
    C(
        "haiku45-dated-us-not-multiplied",
        "claude-haiku-4-5-20251001",
        P(HAIKU_4_5, 1000, 1000, w1=1000),
        extra={"inference_geo": "us"},
        sources=("claude-haiku-4-5",),
    ),
    C(
        "haiku45-dated-batch-web",
        "claude-haiku-4-5-20251001",
        P(HAIKU_4_5, 10_000, 1_000, w5=3_000, w1=1_000),
        mult=BATCH,
        searches=5,
        extra={"service_tier": "batch"},
        sources=("claude-haiku-4-5",),
        flags=("batch",),
    ),
    # Claude 3 Haiku: its own write ($0.30) and read ($0.03) rates
    C(
        "haiku3-cache",
        "claude-3-haiku-20240307",
        P(HAIKU_3, 2_000, 300, w5=40_000, rd=160_000, split=False),
        sources=("claude-3-haiku",),
    ),
    C(
        "haiku3-batch-1h",
        "claude-3-haiku-20240307",
        P(HAIKU_3, 2_000, 300, w5=1_000, w1=3_000, rd=5_000),
        mult=BATCH,
        extra={"service_tier": "batch"},
        sources=("claude-3-haiku",),
        flags=("batch",),
    ),
]


# --- building the wire forms of a case ---------------------------------------------------------------------------


def counts(p: Part) -> dict[str, Any]:
    u: dict[str, Any] = {
        "input_tokens": p.inp,
        "cache_creation_input_tokens": p.w5 + p.w1,
        "cache_read_input_tokens": p.rd,
        "output_tokens": p.out,
    }
    if p.split:
        u["cache_creation"] = {"ephemeral_5m_input_tokens": p.w5, "ephemeral_1h_input_tokens": p.w1}
    return u


def raw_usage(case: Case) -> dict[str, Any]:
    """The usage object the API would send for this case."""
    if case.iterations:
        usage = counts(case.parts[-1])  # top level: the last sampling step (compaction tokens are not in it)
        usage["iterations"] = [
            {"type": p.kind, **counts(p), **({"model": p.model} if p.model else {})} for p in case.parts
        ]
    else:
        (part,) = case.parts
        usage = counts(part)
    if case.searches or case.fetches:
        usage["server_tool_use"] = {"web_search_requests": case.searches, "web_fetch_requests": case.fetches}
    usage.setdefault("service_tier", "standard")
    usage.update(case.extra)
    return usage


def json_body(model: str, usage: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "id": "msg_corpus",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "Grüße 👋"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        },
        ensure_ascii=False,
    ).encode()


def sse_body(model: str, usage: dict[str, Any], eol: str = "\n") -> bytes:
    """message_start (placeholder output) -> content -> a partial then a final cumulative message_delta."""
    start = {k: v for k, v in usage.items() if k not in ("iterations", "server_tool_use")}
    start["output_tokens"] = 1
    final = {k: v for k, v in usage.items() if k not in ("service_tier", "inference_geo", "speed")}
    partial = {
        "output_tokens": max(1, usage["output_tokens"] // 2),
        "input_tokens": None,  # null in a delta: "not reported here", must not erase message_start's value
        "cache_read_input_tokens": None,
    }
    events: list[tuple[str, Any]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_corpus",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start,
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Grüße 👋 "}},
        ),
        ("some_future_event", {"type": "some_future_event", "usage": {"input_tokens": 999_999_999}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": None}, "usage": partial}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "日本語"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": final},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    out = ":" + " keep-alive comment" + eol
    for name, data in events:
        out += f"event: {name}{eol}data: {json.dumps(data, ensure_ascii=False)}{eol}{eol}"
    return out.encode()


def compress(data: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "br":
        return brotli.compress(data)
    if encoding == "zstd":
        return zstd.compress(data)
    return data


def run(
    model: str,
    usage: dict[str, Any],
    ts: datetime,
    *,
    stream: bool,
    variant: int = 0,
    pricer: Pricer | None = None,
    path: str = "/v1/messages",
) -> dict[str, Any]:
    """One response through the real reading path and record.finish: the row it becomes."""
    p = Pending(started=ts.timestamp(), method="POST", path=path, model=model, streamed=stream)
    if stream:
        encoding = (None, "gzip", "br", "zstd")[variant % 4]
        wire = compress(sse_body(model, usage, ("\n", "\r\n", "\r")[variant % 3]), encoding)
        p.tap = StreamTap(p.facts, encoding)
        size = 1 + variant % 13
        received = b"".join(p.tap(wire[i : i + size]) for i in range(0, len(wire), size)) + p.tap(b"")
        assert received == wire  # the client's bytes are untouched
        assert p.tap.failed is None
    else:
        p.facts = ResponseFacts()
        p.facts.from_json_body(json_body(model, usage))
    return finish(
        p, pricer=pricer or Pricer(), status=200, request_id="req_x", headers_at=None, ended_at=ts.timestamp() + 1
    )


# --- the expectations, by hand -----------------------------------------------------------------------------------


def expected(case: Case) -> dict[str, Any]:
    m = case.mult
    inp = sum(D(p.inp) * p.rates.inp for p in case.parts) * m / MTOK
    out = sum(D(p.out) * p.rates.out for p in case.parts) * m / MTOK
    write = sum(D(p.w5) * p.rates.w5 + D(p.w1) * p.rates.w1 for p in case.parts) * m / MTOK
    read = sum(D(p.rd) * p.rates.rd for p in case.parts) * m / MTOK
    tools = case.searches * WEB_SEARCH_PER_SEARCH  # never discounted or multiplied
    return {
        "cost_input_usd": inp,
        "cost_output_usd": out,
        "cost_cache_write_usd": write,
        "cost_cache_read_usd": read,
        "cost_tools_usd": tools,
        "cost_usd": inp + out + write + read + tools,
        "input_tokens": sum(p.inp for p in case.parts),
        "output_tokens": sum(p.out for p in case.parts),
        "cache_creation_input_tokens": sum(p.w5 + p.w1 for p in case.parts),
        "cache_creation_5m_input_tokens": sum(p.w5 for p in case.parts),
        "cache_creation_1h_input_tokens": sum(p.w1 for p in case.parts),
        "cache_read_input_tokens": sum(p.rd for p in case.parts),
        "web_search_requests": case.searches,
        "web_fetch_requests": case.fetches,
        "iterations": len(case.parts) if case.iterations else None,
        "service_tier": case.extra.get("service_tier", "standard"),
        "inference_geo": case.extra.get("inference_geo"),
        "speed": case.extra.get("speed"),
    }


def assert_row(row: dict[str, Any], want: dict[str, Any]) -> None:
    for key, value in want.items():
        if isinstance(value, D):
            assert row[key] is not None, key
            assert abs(D(repr(row[key])) - value) <= D("1e-9"), (key, row[key], value)
        else:
            assert row[key] == value, (key, row[key], value)


def split_source(source: str) -> tuple[list[str], set[str]]:
    base, *flags = source.split("+")
    return base.split(";"), set(flags)


def test_corpus_is_big_enough() -> None:
    assert len(CASES) * 2 >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, stream: bool) -> None:
    variant = CASES.index(case)
    row = run(case.model, raw_usage(case), case.ts, stream=stream, variant=variant)
    assert_row(row, expected(case))
    sources, flags = split_source(row["price_source"])
    assert sources == [f"{GP}:{s}" for s in case.sources]
    assert flags == set(case.flags)
    assert row["completed"] == 1 and row["error"] is None
    assert row["model"] == case.model and row["stop_reason"] == "end_turn"
    assert json.loads(row["usage_json"])["output_tokens"] == raw_usage(case)["output_tokens"]


# --- the source chain: overrides, unknown models, count_tokens ---------------------------------------------------

OVERRIDES = (
    PriceOverride(prefix="claude-opus-4", input=D("1"), output=D("2")),  # cache rates derived: 1.25x/2x/0.1x
    PriceOverride(
        prefix="claude-opus-4-1",
        input=D("3"),
        output=D("4"),
        cache_write_5m=D("5"),
        cache_write_1h=D("6"),
        cache_read=D("0.7"),
        web_search_per_1000=D("20"),
    ),
    PriceOverride(prefix="claude-sonnet-5-5", input=D("2.5"), output=D("11")),  # shadows the bundled price
)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    ("model", "rates", "prefix", "search_rate"),
    [
        ("claude-opus-4-20250514", r("1", "2", "1.25", "2", "0.1"), "claude-opus-4", D("0.01")),
        ("claude-opus-4-1-20250805", r("3", "4", "5", "6", "0.7"), "claude-opus-4-1", D("0.02")),
        ("claude-sonnet-5-5", r("2.5", "11", "3.125", "5", "0.25"), "claude-sonnet-5-5", D("0.01")),
    ],
)
def test_override_longest_prefix(model: str, rates: R, prefix: str, search_rate: D, stream: bool) -> None:
    case = C(
        "o",
        model,
        P(rates, 1000, 2000, w5=3000, w1=4000, rd=5000),
        searches=2,
        mult=BATCH * US,
        extra={"service_tier": "batch", "inference_geo": "us"},
    )
    row = run(model, raw_usage(case), JUNE, stream=stream, pricer=Pricer(OVERRIDES))
    want = expected(case)
    us = model.startswith("claude-sonnet-5-5")  # only the 4.6+ model gets the US multiplier
    m = BATCH * (US if us else 1)
    want |= {
        "cost_input_usd": 1000 * rates.inp * m / MTOK,
        "cost_output_usd": 2000 * rates.out * m / MTOK,
        "cost_cache_write_usd": (3000 * rates.w5 + 4000 * rates.w1) * m / MTOK,
        "cost_cache_read_usd": 5000 * rates.rd * m / MTOK,
        "cost_tools_usd": 2 * search_rate,
    }
    want["cost_usd"] = sum(want[k] for k in want if k.startswith("cost_") and k != "cost_usd")
    assert_row(row, want)
    assert split_source(row["price_source"]) == (
        [f"override:{prefix}"],
        {"batch", "us-geo-1.1x"} if us else {"batch"},
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    "case",
    [
        C("unknown-model", "claude-nonexistent-9", P(OPUS_5_5, 100, 10)),
        C(
            "unknown-iteration-model",
            "claude-sonnet-5-5",
            P(SONNET_5_5, 100, 10, kind="compaction"),
            P(OPUS_5_5, 100, 10, model="claude-from-the-future-1"),
            iterations=True,
        ),
    ],
    ids=lambda c: c.name,
)
def test_unknown_is_null_never_zero(case: Case, stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    pricer = Pricer()
    row = run(case.model, raw_usage(case), JUNE, stream=stream, pricer=pricer)
    cost_cols = [k for k in row if k.startswith("cost_")]
    assert len(cost_cols) == 6 and all(row[k] is None for k in cost_cols)
    assert row["price_source"] == "unknown"
    assert row["input_tokens"] == sum(p.inp for p in case.parts)  # tokens are still recorded
    run(case.model, raw_usage(case), JUNE, stream=stream, pricer=pricer)
    assert len([r for r in caplog.records if "no price known" in r.getMessage()]) == 1  # warned once per model


def test_count_tokens_is_free_and_says_so() -> None:
    p = Pending(started=JUNE.timestamp(), method="POST", path="/v1/messages/count_tokens", model="claude-opus-5-5")
    p.facts.from_json_body(b'{"input_tokens": 123456}')
    row = finish(p, pricer=Pricer(), status=200, request_id=None, headers_at=None, ended_at=JUNE.timestamp())
    assert row["cost_usd"] == 0 and row["price_source"] == "free:count_tokens"


def test_hand_arithmetic_spot_check() -> None:
    """One case worked fully on paper, so the helper above is itself checked: Opus 5.5, batch + US,
    800 in, 70 out, 60 5m-writes, 50 1h-writes, 40 reads, 7 searches.
    input 800*4*0.55/1e6 = 0.00176; output 70*20*0.55/1e6 = 0.00077; writes (60*5 + 50*8)*0.55/1e6 = 0.000385;
    reads 40*0.2*0.55/1e6 = 0.0000044; searches 7*0.01 = 0.07; total 0.0729194."""
    case = next(c for c in CASES if c.name == "opus55-batch-us-web")
    row = run(case.model, raw_usage(case), case.ts, stream=True, variant=5)
    assert abs(row["cost_usd"] - 0.0729194) < 1e-12
    assert abs(row["cost_cache_write_usd"] - 0.000385) < 1e-12
