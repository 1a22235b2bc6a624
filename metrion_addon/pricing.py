"""(model, usage, time) -> cost and its components, with the price source named.

Rates come from, first hit wins: (1) the config's overrides (longest model-id prefix), (2) genai-prices'
bundled data at the request's own timestamp, (3) nothing: cost is None and price_source is 'unknown'.
genai-prices is used as a *rate table* only; the arithmetic is ours, so every Anthropic billing rule is
applied the same way whichever source the rates came from (see docs/pricing.md).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version

from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, ModelPrice, TieredPrices

from metrion_addon.config import PriceOverride
from metrion_addon.schema import MONEY_COLUMNS
from metrion_addon.usage import TokenCounts, Usage

log = logging.getLogger(__name__)

MTOK = Decimal(1_000_000)
WRITE_5M = Decimal("1.25")  # multiples of the input rate, used when a source gives no explicit rate
WRITE_1H = Decimal(2)
READ = Decimal("0.1")
WEB_SEARCH_PER_1000 = Decimal(10)
BATCH = Decimal("0.5")
US_GEO = Decimal("1.1")
US_GEO_FROM_VERSION = (4, 6)
GENAI_PRICES = f"genai-prices@{version('genai-prices')}"

_VERSION_RES = (
    re.compile(r"claude-(?:opus|sonnet|haiku|fable|mythos)-(\d+)(?:[-.](\d{1,2})(?!\d))?"),
    re.compile(r"claude-(\d+)(?:[-.](\d)(?!\d))?-(?:opus|sonnet|haiku)"),
)


@dataclass(frozen=True)
class Rates:
    """USD per million tokens, and per 1000 web searches."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    web_search_per_1000: Decimal
    source: str
    batch_included: bool = False  # the source's rates are already the batch rates
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cost:
    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal
    tools: Decimal

    @property
    def total(self) -> Decimal:
        return self.input + self.output + self.cache_write + self.cache_read + self.tools

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.input + other.input,
            self.output + other.output,
            self.cache_write + other.cache_write,
            self.cache_read + other.cache_read,
            self.tools + other.tools,
        )


ZERO = Cost(Decimal(0), Decimal(0), Decimal(0), Decimal(0), Decimal(0))


@dataclass(frozen=True)
class Priced:
    cost: Cost | None  # None: no price known (never a silent 0)
    source: str

    def columns(self) -> dict[str, float | str | None]:
        """The row's cost columns (schema.COST_COLUMNS): the money columns in their order, then the source."""
        c = self.cost
        parts = (
            [None] * 6
            if c is None
            else [float(x) for x in (c.total, c.input, c.output, c.cache_write, c.cache_read, c.tools)]
        )
        return {**dict(zip(MONEY_COLUMNS, parts, strict=True)), "price_source": self.source}


COUNT_TOKENS_PATH = "/v1/messages/count_tokens"


def model_version(model: str) -> tuple[int, int] | None:
    """(major, minor) of a Claude model id: claude-opus-4-6 -> (4, 6), claude-3-5-haiku -> (3, 5)."""
    for rx in _VERSION_RES:
        m = rx.search(model.lower())
        if m:
            return int(m.group(1)), int(m.group(2) or 0)
    return None


def _tiered(price: Decimal | TieredPrices | None, prompt_tokens: int) -> Decimal | None:
    if price is None or isinstance(price, Decimal):
        return price
    rate = price.base
    for tier in price.tiers:  # ascending thresholds: the highest one exceeded applies to every token
        if prompt_tokens > tier.start:
            rate = tier.price
    return rate


def _variant(info: ModelInfo, ts: datetime, key: str, value: str) -> ModelPrice | None:
    """The prices of the model's variant selected by exactly {key: value}, if one is in force at `ts`."""
    for v in info.price_variants or ():
        if v.when == {key: value} and (v.constraint is None or v.constraint.active(ts)):
            return v.prices
    return None


_KEYS = ("input_mtok", "output_mtok", "cache_write_mtok", "cache_write_1h_mtok", "cache_read_mtok")


class Pricer:
    def __init__(self, overrides: tuple[PriceOverride, ...] = ()) -> None:
        # Longest prefix first, so "claude-opus-4" never prices "claude-opus-4-1-...".
        self._overrides = sorted(overrides, key=lambda o: len(o.prefix), reverse=True)
        self._warned: set[str] = set()

    def knows(self, model: str, ts: float) -> bool:
        """Whether any source has a price for `model` (for refusing unpriced models up front)."""
        return self.rates(model, datetime.fromtimestamp(ts, UTC), 0) is not None

    def rates(
        self,
        model: str,
        ts: datetime,
        prompt_tokens: int,
        service_tier: str | None = None,
        speed: str | None = None,
    ) -> Rates | None:
        for o in self._overrides:
            if model.startswith(o.prefix):
                return Rates(
                    input=o.input,
                    output=o.output,
                    cache_write_5m=o.cache_write_5m if o.cache_write_5m is not None else o.input * WRITE_5M,
                    cache_write_1h=o.cache_write_1h if o.cache_write_1h is not None else o.input * WRITE_1H,
                    cache_read=o.cache_read if o.cache_read is not None else o.input * READ,
                    web_search_per_1000=(
                        o.web_search_per_1000 if o.web_search_per_1000 is not None else WEB_SEARCH_PER_1000
                    ),
                    source=f"override:{o.prefix}",
                    flags=("fast-priced-as-standard",) if speed == "fast" else (),
                )
        return self._genai_rates(model, ts, prompt_tokens, service_tier, speed)

    def _genai_rates(
        self, model: str, ts: datetime, prompt_tokens: int, service_tier: str | None, speed: str | None
    ) -> Rates | None:
        try:
            _, info = data_snapshot.get_snapshot().find_provider_model(model, None, "anthropic", None)
        except LookupError:
            return None
        flags: list[str] = []
        fast = speed == "fast" and _variant(info, ts, "speed", "fast") is not None
        if speed == "fast":
            flags.append("fast" if fast else "fast-priced-as-standard")
        std = info.get_prices(ts, {"speed": "fast"} if fast else None)
        # Batch: the data's own batch rates where it has them (it may, from a date on); else 50% of standard.
        batch = service_tier == "batch"
        batch_prices = _variant(info, ts, "processing", "batch") if batch and not fast else None
        r: dict[str, Decimal | None] = {}
        for key in _KEYS:
            own = getattr(batch_prices, key) if batch_prices is not None else None
            rate = _tiered(own if own is not None else getattr(std, key), prompt_tokens)
            r[key] = rate * BATCH if rate is not None and batch and own is None else rate
        inp, out = r["input_mtok"], r["output_mtok"]
        if inp is None or out is None:
            return None
        w5, w1, rd = r["cache_write_mtok"], r["cache_write_1h_mtok"], r["cache_read_mtok"]
        ws = std.web_searches_kcount
        return Rates(
            input=inp,
            output=out,
            cache_write_5m=w5 if w5 is not None else inp * WRITE_5M,
            cache_write_1h=w1 if w1 is not None else inp * WRITE_1H,
            cache_read=rd if rd is not None else inp * READ,
            web_search_per_1000=ws if isinstance(ws, Decimal) else WEB_SEARCH_PER_1000,
            source=f"{GENAI_PRICES}:{info.id}",
            batch_included=batch,
            flags=tuple(flags),
        )

    def price(self, model: str | None, usage: Usage | None, ts: datetime, path: str = "/v1/messages") -> Priced:
        if path == COUNT_TOKENS_PATH:  # exactly: `/v1/messages;x/count_tokens` and the like are not free
            return Priced(ZERO, "free:count_tokens")
        if usage is None:
            return Priced(ZERO, "no_usage")
        if not usage.plausible:
            return Priced(None, "implausible_usage")  # never a bill from garbage counts
        total = ZERO
        sources: list[str] = []
        flags: list[str] = []
        tool_rates: Rates | None = None  # server tools are priced at the request's model
        for part in usage.parts:
            part_model = part.model or model
            rates = None
            if part_model:
                rates = self.rates(part_model, ts, part.prompt_tokens, usage.service_tier, usage.speed)
            if rates is None:
                self._warn_unknown(part_model)
                return Priced(None, "unknown")
            if tool_rates is None or part_model == model:
                tool_rates = rates
            total = total + self._token_cost(part, rates, usage, part_model)
            if rates.source not in sources:
                sources.append(rates.source)
            geo = ("us-geo-1.1x",) if _us_geo(usage, part_model) else ()
            flags += [f for f in (*rates.flags, *geo) if f not in flags]
        assert tool_rates is not None
        tools = usage.web_search_requests * tool_rates.web_search_per_1000 / 1000  # no batch or geo multiplier
        total = total + Cost(Decimal(0), Decimal(0), Decimal(0), Decimal(0), tools)
        if usage.service_tier == "batch":
            flags.append("batch")
        if usage.service_tier == "priority":
            flags.append("priority-priced-as-standard")  # no public priority price exists
        source = ";".join(sources) + "".join(f"+{f}" for f in flags)
        return Priced(total, source)

    @staticmethod
    def _token_cost(part: TokenCounts, rates: Rates, usage: Usage, model: str) -> Cost:
        mult = Decimal(1)
        if usage.service_tier == "batch" and not rates.batch_included:
            mult *= BATCH
        if _us_geo(usage, model):
            mult *= US_GEO
        return Cost(
            input=part.input_tokens * rates.input * mult / MTOK,
            output=part.output_tokens * rates.output * mult / MTOK,
            cache_write=(
                part.cache_creation_5m_input_tokens * rates.cache_write_5m
                + part.cache_creation_1h_input_tokens * rates.cache_write_1h
            )
            * mult
            / MTOK,
            cache_read=part.cache_read_input_tokens * rates.cache_read * mult / MTOK,
            tools=Decimal(0),
        )

    def _warn_unknown(self, model: str | None) -> None:
        key = model or "<no model>"
        if key not in self._warned:
            self._warned.add(key)
            log.warning("metrion: no price known for model %r: its cost is recorded as NULL (unknown)", key)


def _us_geo(usage: Usage, model: str | None) -> bool:
    if (usage.inference_geo or "").lower() != "us" or not model:
        return False
    v = model_version(model)
    return v is not None and v >= US_GEO_FROM_VERSION
