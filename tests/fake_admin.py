"""Anthropic's Admin API for the fake upstream, computed from what the fake actually served.

Attach with `FakeAdmin(fake, admin_key, prices)`: the fake then answers `GET /v1/organizations/api_keys`, the Usage and
Cost Analytics API (`/v1/organizations/analytics/usage` and `/cost`, beta header required) and the legacy reports
(`/v1/organizations/usage_report/messages`, `/v1/organizations/cost_report`), in the shapes docs/reconcile.md cites.
Usage is read back from the responses the fake sent to `/v1/messages` (JSON or SSE), per API key (the `x-api-key` or
Bearer credential the request carried), model, service tier and UTC day of arrival.

Switches to inject discrepancies: `extra` (usage the provider saw that no request to this fake carried),
`price_factor` (the provider bills a model at a multiple of `prices`), `page_size` (rows per page, to force
pagination), `analytics_enabled` (False: the analytics endpoints answer 404, as for an organisation without them).
Traffic that bypassed the proxy, or an unknown key, is best injected for real: send it to the fake directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fake_upstream import FakeUpstream

BETA = "analytics-usage-cost-2026-08-24"
KINDS = (
    "uncached_input_tokens",
    "cache_creation.ephemeral_5m_input_tokens",
    "cache_creation.ephemeral_1h_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
PRICE_FIELD = {  # token kind -> the config override field holding its USD per million tokens
    "uncached_input_tokens": "input",
    "cache_creation.ephemeral_5m_input_tokens": "cache_write_5m",
    "cache_creation.ephemeral_1h_input_tokens": "cache_write_1h",
    "cache_read_input_tokens": "cache_read",
    "output_tokens": "output",
}


@dataclass
class Served:
    key: str  # the secret credential (never returned by the fake: only its id and hint are)
    model: str
    tier: str
    day: str
    tokens: dict[str, int] = field(default_factory=dict)


def hint(secret: str) -> str:
    return f"{secret[:16]}...{secret[-4:]}"


def _tokens(usage: dict[str, Any]) -> dict[str, int]:
    cc = usage.get("cache_creation") or {}
    w1h = int(cc.get("ephemeral_1h_input_tokens") or 0)
    w5m = int(cc.get("ephemeral_5m_input_tokens") or (usage.get("cache_creation_input_tokens") or 0) - w1h)
    return {
        "uncached_input_tokens": int(usage.get("input_tokens") or 0),
        "cache_creation.ephemeral_5m_input_tokens": w5m,
        "cache_creation.ephemeral_1h_input_tokens": w1h,
        "cache_read_input_tokens": int(usage.get("cache_read_input_tokens") or 0),
        "output_tokens": int(usage.get("output_tokens") or 0),
    }


def usage_of(sent: bytes) -> tuple[str, dict[str, Any]] | None:
    """(model, usage) from a response the fake sent: a JSON message, or an SSE stream (start usage + final delta)."""
    try:
        doc = json.loads(sent)
        return (doc["model"], doc["usage"]) if isinstance(doc, dict) and "usage" in doc else None
    except ValueError:
        pass
    model, usage = None, {}
    for block in sent.decode("utf-8", "replace").split("\n\n"):
        data = next((line[5:].strip() for line in block.splitlines() if line.startswith("data:")), None)
        try:
            event = json.loads(data) if data else {}
        except ValueError:
            continue
        if event.get("type") == "message_start":
            model, usage = event["message"]["model"], dict(event["message"]["usage"])
        elif event.get("type") == "message_delta":
            usage.update(event.get("usage") or {})
    return (model, usage) if model else None


class FakeAdmin:
    def __init__(self, fake: FakeUpstream, admin_key: str, prices: dict[str, dict[str, Decimal]]) -> None:
        self.fake = fake
        self.admin_key = admin_key
        self.prices = prices  # model prefix -> {input, output, cache_write_5m, cache_write_1h, cache_read} per MTok
        self.price_factor: dict[str, Decimal] = {}  # model prefix -> what the provider bills, as a multiple
        self.extra: list[Served] = []
        self.page_size = 1000
        self.analytics_enabled = True
        self.key_ids: dict[str, str] = {}  # secret -> apikey_... (every credential the org has seen, plus listed)
        self.admin_requests: list[str] = []  # paths asked for
        fake.admin = self

    def add_key(self, secret: str) -> str:
        return self.key_ids.setdefault(secret, f"apikey_fake{len(self.key_ids) + 1:03d}")

    # --- what was served ----------------------------------------------------------------------------

    def served(self) -> list[Served]:
        out = []
        for rid in list(self.fake.order):
            rec = self.fake.received[rid]
            path = rec.path.partition("?")[0]
            if rec.method != "POST" or not path.endswith("/v1/messages") or rid not in self.fake.sent:
                continue
            got = usage_of(self.fake.sent[rid])
            secret = rec.headers.get("x-api-key") or rec.headers.get("authorization", "").removeprefix("Bearer ")
            if got is None or not secret:
                continue
            model, usage = got
            day = datetime.fromtimestamp(rec.at, UTC).strftime("%Y-%m-%d")
            out.append(Served(secret, model, usage.get("service_tier") or "standard", day, _tokens(usage)))
        return out + self.extra

    def cells(self) -> dict[tuple[str, str, str, str], dict[str, int]]:
        """(day, key id, model, tier) -> tokens by kind, plus requests."""
        out: dict[tuple[str, str, str, str], dict[str, int]] = {}
        for s in self.served():
            cell = out.setdefault((s.day, self.add_key(s.key), s.model, s.tier), {"requests": 0})
            cell["requests"] += 1
            for k, n in s.tokens.items():
                cell[k] = cell.get(k, 0) + n
        return out

    def cost_usd(self, model: str, kind: str, tokens: int) -> Decimal:
        prefix = max((p for p in self.prices if model.startswith(p)), key=len, default=None)
        if prefix is None:
            return Decimal(0)
        factor = next((f for p, f in self.price_factor.items() if model.startswith(p)), Decimal(1))
        return Decimal(tokens) * self.prices[prefix].get(PRICE_FIELD[kind], Decimal(0)) / 1_000_000 * factor

    # --- HTTP ------------------------------------------------------------------------------------------

    def handle(self, handler: Any, rid: str) -> None:
        url = urlsplit(handler.path)
        q = parse_qs(url.query, keep_blank_values=True)
        self.admin_requests.append(url.path)
        status, doc = self.route(url.path, q, {k.lower(): v for k, v in handler.headers.items()})
        handler._send(status, json.dumps(doc).encode(), "application/json", {"request-id": rid}, None, rid)

    def route(self, path: str, q: dict[str, list[str]], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if headers.get("x-api-key") != self.admin_key:
            return _error(401, "authentication_error", "invalid x-api-key")
        if path == "/v1/organizations/api_keys":
            return 200, self.api_keys(q)
        if path.startswith("/v1/organizations/analytics/"):
            if not self.analytics_enabled:
                return _error(404, "not_found_error", "Not found")
            if BETA not in headers.get("anthropic-beta", ""):
                return _error(400, "invalid_request_error", f"this endpoint requires the {BETA} beta header")
        rows = {
            "/v1/organizations/analytics/usage": self.analytics_usage,
            "/v1/organizations/analytics/cost": self.analytics_cost,
            "/v1/organizations/usage_report/messages": self.legacy_usage,
            "/v1/organizations/cost_report": self.legacy_cost,
        }.get(path)
        if rows is None:
            return _error(404, "not_found_error", f"no route {path}")
        start, end = _when(q["starting_at"][0]), _when(q["ending_at"][0])
        data = rows(start, end, set(q.get("group_by[]", [])))
        offset = int((q.get("page") or ["page_0"])[0].removeprefix("page_") or 0)
        size = min(int((q.get("limit") or ["20"])[0]), self.page_size)
        more = offset + size < len(data)
        doc = {
            "data": data[offset : offset + size],
            "has_more": more,
            "next_page": f"page_{offset + size}" if more else None,
        }
        if path.startswith("/v1/organizations/analytics/"):
            doc["data_refreshed_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, doc

    def api_keys(self, q: dict[str, list[str]]) -> dict[str, Any]:
        self.cells()  # every credential served so far is a key of the organisation
        keys = [
            {
                "id": kid, "type": "api_key", "name": f"key {kid[-3:]}", "partial_key_hint": hint(secret),
                "status": "active", "created_at": "2026-01-01T00:00:00Z",
                "scope": {"type": "workspace", "workspace_id": "wrkspc_fake"},
            }
            for secret, kid in sorted(self.key_ids.items(), key=lambda kv: kv[1])
        ]  # fmt: skip
        after = (q.get("after_id") or [None])[0]
        start = next((i + 1 for i, k in enumerate(keys) if k["id"] == after), 0)
        page = keys[start : start + min(int((q.get("limit") or ["20"])[0]), self.page_size)]
        more = start + len(page) < len(keys)
        return {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None}  # fmt: skip

    def _in_range(self, start: datetime, end: datetime):  # type: ignore[no-untyped-def]
        for (day, kid, model, tier), cell in sorted(self.cells().items()):
            lo = datetime.fromisoformat(day).replace(tzinfo=UTC)
            if start <= lo < end:
                yield lo, kid, model, tier, cell

    def analytics_usage(self, start: datetime, end: datetime, groups: set[str]) -> list[dict[str, Any]]:
        return [
            {"starting_at": _iso(lo), "ending_at": _iso(lo + timedelta(days=1)),
             "group": _group(groups, kid, model, tier), "usage": _usage(cell) | {"requests": cell["requests"]}}
            for lo, kid, model, tier, cell in self._in_range(start, end)
        ]  # fmt: skip

    def analytics_cost(self, start: datetime, end: datetime, groups: set[str]) -> list[dict[str, Any]]:
        out = []
        for lo, kid, model, tier, cell in self._in_range(start, end):
            parts = {k: self.cost_usd(model, k, cell.get(k, 0)) for k in KINDS}
            split = "token_type" in groups
            for kind, usd in parts.items() if split else [(None, sum(parts.values(), Decimal(0)))]:
                group = _group(groups, kid, model, tier) | {"cost_type": "tokens", "token_type": kind}
                cents = str(usd * 100)
                cost = {"amount": cents, "list_amount": cents, "currency": "USD", "requests": None}
                out.append({"starting_at": _iso(lo), "ending_at": _iso(lo + timedelta(days=1)), "group": group,
                            "cost": cost})  # fmt: skip
        return out

    def legacy_usage(self, start: datetime, end: datetime, groups: set[str]) -> list[dict[str, Any]]:
        buckets = []
        day = start
        while day < end:
            results = [
                _group(groups, kid, model, tier) | {"workspace_id": None, "context_window": None} | _usage(cell)
                for lo, kid, model, tier, cell in self._in_range(day, day + timedelta(days=1))
            ]
            buckets.append({"starting_at": _iso(day), "ending_at": _iso(day + timedelta(days=1)), "results": results})
            day += timedelta(days=1)
        return buckets

    def legacy_cost(self, start: datetime, end: datetime, groups: set[str]) -> list[dict[str, Any]]:
        """Daily, by description: model, tier and token type, but no API key (the legacy report has none)."""
        buckets = []
        day = start
        while day < end:
            sums: dict[tuple[str, str, str], Decimal] = {}
            for _, _, model, tier, cell in self._in_range(day, day + timedelta(days=1)):
                for k in KINDS:
                    usd = self.cost_usd(model, k, cell.get(k, 0))
                    sums[(model, tier, k)] = sums.get((model, tier, k), Decimal(0)) + usd
            results = [
                {"amount": str(usd * 100), "currency": "USD", "description": f"{model} {k}", "model": model,
                 "service_tier": tier, "cost_type": "tokens", "token_type": k, "workspace_id": None,
                 "context_window": "0-200k"}
                for (model, tier, k), usd in sorted(sums.items()) if tier != "priority"
            ]  # fmt: skip
            buckets.append({"starting_at": _iso(day), "ending_at": _iso(day + timedelta(days=1)), "results": results})
            day += timedelta(days=1)
        return buckets


def _usage(cell: dict[str, int]) -> dict[str, Any]:
    return {
        "uncached_input_tokens": cell.get("uncached_input_tokens", 0),
        "cache_creation": {
            "ephemeral_5m_input_tokens": cell.get("cache_creation.ephemeral_5m_input_tokens", 0),
            "ephemeral_1h_input_tokens": cell.get("cache_creation.ephemeral_1h_input_tokens", 0),
        },
        "cache_read_input_tokens": cell.get("cache_read_input_tokens", 0),
        "output_tokens": cell.get("output_tokens", 0),
        "server_tool_use": {"web_search_requests": 0},
        "total_tokens": sum(cell.get(k, 0) for k in KINDS),
    }


def _group(groups: set[str], kid: str, model: str, tier: str) -> dict[str, Any]:
    return {
        "api_key_id": kid if "api_key_id" in groups else None,
        "model": model if "model" in groups else None,
        "service_tier": tier if "service_tier" in groups else None,
    }


def _error(status: int, kind: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
