"""A small client for the parts of Anthropic's Admin API that reconciliation reads (stdlib `urllib` only).

- `GET /v1/organizations/api_keys`: key ids, names and `partial_key_hint` (paginated by `after_id`/`last_id`).
- Usage and Cost Analytics API (beta header `anthropic-beta: analytics-usage-cost-2026-08-24`):
  `GET /v1/organizations/analytics/usage` and `.../analytics/cost`, one row per group and time bucket, paginated by
  `page`/`next_page`; cost `amount` and `list_amount` are decimal strings in (fractional) cents.
- Legacy Usage and Cost API: `GET /v1/organizations/usage_report/messages` (time buckets with `results`) and
  `GET /v1/organizations/cost_report` (daily; `amount` in cents; no cost per API key; no Priority Tier).

Everything is normalised to `Usage` rows keyed by (UTC day, api key id, model, service tier) and cost cells in USD
(`Decimal`). The Admin API key is sent as `x-api-key` and never appears in an exception, a log line or output.
See docs/reconcile.md for the sources of these shapes.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

ANTHROPIC_VERSION = "2023-06-01"
ANALYTICS_BETA = "analytics-usage-cost-2026-08-24"
MAX_SPAN = timedelta(days=31)  # both report families take at most 31 daily buckets per request
# Token kinds, in the analytics API's `token_type` spelling (the legacy report uses the same fields).
KINDS = (
    "uncached_input_tokens",
    "cache_creation.ephemeral_5m_input_tokens",
    "cache_creation.ephemeral_1h_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
SHORT = {  # short names for tables, JSON and CSV
    "uncached_input_tokens": "input",
    "cache_creation.ephemeral_5m_input_tokens": "cache_write_5m",
    "cache_creation.ephemeral_1h_input_tokens": "cache_write_1h",
    "cache_read_input_tokens": "cache_read",
    "output_tokens": "output",
    "web_search_requests": "web_search",
}
Key = tuple[str, str | None, str, str]  # (UTC day YYYY-MM-DD, api key id or None, model, service tier)


class AdminError(Exception):
    """The Admin API could not be read. `status` is the HTTP status (0: no answer). Never holds the key."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    hint: str | None
    status: str
    workspace_id: str | None = None


@dataclass
class Usage:
    """Provider token counts of one (day, key, model, tier) cell, by kind (KINDS + web_search_requests)."""

    tokens: dict[str, int] = field(default_factory=dict)
    requests: int | None = None

    def add(self, kind: str, n: int) -> None:
        self.tokens[kind] = self.tokens.get(kind, 0) + n


def utc_day(ts: str) -> str:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC).strftime("%Y-%m-%d")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def windows(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """[start, end) cut into spans the reports accept (at most 31 days each)."""
    out = []
    while start < end:
        out.append((start, min(end, start + MAX_SPAN)))
        start = out[-1][1]
    return out


def cents_to_usd(text: Any) -> Decimal:
    try:
        return Decimal(str(text)) / 100
    except (InvalidOperation, ValueError):
        raise AdminError(f"unreadable cost amount {str(text)[:40]!r}") from None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_tokens(u: dict[str, Any]) -> dict[str, int]:
    """A usage object of either report (analytics `usage`, legacy `results[]` item) -> tokens by kind."""
    cc = u.get("cache_creation") if isinstance(u.get("cache_creation"), dict) else {}
    stu = u.get("server_tool_use") if isinstance(u.get("server_tool_use"), dict) else {}
    return {
        "uncached_input_tokens": _int(u.get("uncached_input_tokens")),
        "cache_creation.ephemeral_5m_input_tokens": _int(cc.get("ephemeral_5m_input_tokens")),
        "cache_creation.ephemeral_1h_input_tokens": _int(cc.get("ephemeral_1h_input_tokens")),
        "cache_read_input_tokens": _int(u.get("cache_read_input_tokens")),
        "output_tokens": _int(u.get("output_tokens")),
        "web_search_requests": _int(stu.get("web_search_requests")),
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would repeat the request, admin key included, to wherever a redirect points: refuse instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class AdminClient:
    def __init__(self, base_url: str, admin_key: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = admin_key
        self.timeout = timeout
        self.data_refreshed_at: str | None = None  # analytics pages say how fresh their data is
        self.calls = 0

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[admin key]") if self._key else text

    def get(self, path: str, params: list[tuple[str, Any]], beta: str | None = None) -> dict[str, Any]:
        query = urlencode([(k, v) for k, v in params if v is not None])
        url = f"{self.base_url}{path}?{query}" if query else f"{self.base_url}{path}"
        headers = {"x-api-key": self._key, "anthropic-version": ANTHROPIC_VERSION, "accept": "application/json"}
        if beta:
            headers["anthropic-beta"] = beta
        req = urllib.request.Request(url, headers=headers, method="GET")
        self.calls += 1
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                err = json.loads(e.read() or b"{}").get("error") or {}
                detail = f": {err.get('type', '')}: {err.get('message', '')}".rstrip(": ")
            except (ValueError, AttributeError, OSError):
                pass
            raise AdminError(self._scrub(f"{path}: HTTP {e.code}{detail}"), e.code) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise AdminError(self._scrub(f"{path}: cannot reach {self.base_url}: {reason}")) from None
        try:
            doc = json.loads(body)
        except ValueError:
            raise AdminError(f"{path}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise AdminError(f"{path}: unexpected answer (not a JSON object)")
        return doc

    def _pages(self, path: str, params: list[tuple[str, Any]], beta: str | None = None) -> list[dict[str, Any]]:
        """Every `data` item across `page`/`next_page` pages (the report endpoints' cursor)."""
        items: list[dict[str, Any]] = []
        page: str | None = None
        for _ in range(10_000):
            doc = self.get(path, [*params, ("page", page)], beta)
            items += [d for d in doc.get("data") or [] if isinstance(d, dict)]
            if doc.get("data_refreshed_at"):
                self.data_refreshed_at = str(doc["data_refreshed_at"])
            page = doc.get("next_page")
            if not doc.get("has_more") or not page:
                return items
        raise AdminError(f"{path}: more than 10,000 pages; narrow --since/--until")

    # --- keys ---------------------------------------------------------------------------------------

    def api_keys(self) -> list[ApiKey]:
        """Every API key of the organisation, whatever its status (usage of a since-archived key still counts)."""
        keys: list[ApiKey] = []
        after: str | None = None
        for _ in range(10_000):
            doc = self.get("/v1/organizations/api_keys", [("limit", 1000), ("after_id", after)])
            for k in doc.get("data") or []:
                if isinstance(k, dict) and isinstance(k.get("id"), str):
                    scope = k.get("scope") if isinstance(k.get("scope"), dict) else {}
                    keys.append(
                        ApiKey(
                            id=k["id"],
                            name=str(k.get("name") or ""),
                            hint=k.get("partial_key_hint") if isinstance(k.get("partial_key_hint"), str) else None,
                            status=str(k.get("status") or ""),
                            workspace_id=k.get("workspace_id") or scope.get("workspace_id"),
                        )
                    )
            after = doc.get("last_id")
            if not doc.get("has_more") or not after:
                return keys
        raise AdminError("/v1/organizations/api_keys: more than 10,000 pages")

    # --- the analytics API (current) ------------------------------------------------------------------

    _GROUPS = [("group_by[]", "api_key_id"), ("group_by[]", "model"), ("group_by[]", "service_tier")]

    def analytics_usage(self, start: datetime, end: datetime) -> dict[Key, Usage]:
        out: dict[Key, Usage] = {}
        for lo, hi in windows(start, end):
            params = [("starting_at", rfc3339(lo)), ("ending_at", rfc3339(hi)), ("time_bucket_width", "1d")]
            params += [*self._GROUPS, ("limit", 1000)]
            for row in self._pages("/v1/organizations/analytics/usage", params, ANALYTICS_BETA):
                g = row.get("group") or {}
                u = row.get("usage") or {}
                cell = out.setdefault(_key(row.get("starting_at"), g), Usage())
                for kind, n in usage_tokens(u).items():
                    cell.add(kind, n)
                if isinstance(u.get("requests"), int):
                    cell.requests = (cell.requests or 0) + u["requests"]
        return out

    def analytics_cost(self, start: datetime, end: datetime, list_price: bool = False) -> dict[Key, dict[str, Decimal]]:
        """USD by (day, key, model, tier) and by component: a token kind, or `web_search`, `code_execution`..."""
        out: dict[Key, dict[str, Decimal]] = {}
        field_name = "list_amount" if list_price else "amount"
        for lo, hi in windows(start, end):
            params = [("starting_at", rfc3339(lo)), ("ending_at", rfc3339(hi)), ("time_bucket_width", "1d")]
            params += [*self._GROUPS, ("group_by[]", "cost_type"), ("group_by[]", "token_type"), ("limit", 1000)]
            for row in self._pages("/v1/organizations/analytics/cost", params, ANALYTICS_BETA):
                g = row.get("group") or {}
                cost = row.get("cost") or {}
                part = g.get("token_type") or g.get("cost_type") or "other"
                cell = out.setdefault(_key(row.get("starting_at"), g), {})
                cell[part] = cell.get(part, Decimal(0)) + cents_to_usd(cost.get(field_name, "0"))
        return out

    # --- the legacy reports ---------------------------------------------------------------------------

    def legacy_usage(self, start: datetime, end: datetime) -> dict[Key, Usage]:
        out: dict[Key, Usage] = {}
        for lo, hi in windows(start, end):
            params = [("starting_at", rfc3339(lo)), ("ending_at", rfc3339(hi)), ("bucket_width", "1d")]
            params += [*self._GROUPS, ("limit", 31)]
            for bucket in self._pages("/v1/organizations/usage_report/messages", params):
                for r in bucket.get("results") or []:
                    cell = out.setdefault(_key(bucket.get("starting_at"), r), Usage())
                    for kind, n in usage_tokens(r).items():
                        cell.add(kind, n)
        return out

    def legacy_cost(self, start: datetime, end: datetime) -> dict[tuple[str, str, str], Decimal]:
        """USD by (day, model, tier): the legacy cost report has no API key dimension and leaves out Priority Tier."""
        out: dict[tuple[str, str, str], Decimal] = {}
        for lo, hi in windows(start, end):
            params = [("starting_at", rfc3339(lo)), ("ending_at", rfc3339(hi)), ("group_by[]", "description")]
            params += [("limit", 31)]
            for bucket in self._pages("/v1/organizations/cost_report", params):
                day = utc_day(str(bucket.get("starting_at")))
                for r in bucket.get("results") or []:
                    k = (day, str(r.get("model") or "(no model)"), str(r.get("service_tier") or "standard"))
                    out[k] = out.get(k, Decimal(0)) + cents_to_usd(r.get("amount", "0"))
        return out


def _key(starting_at: Any, g: dict[str, Any]) -> Key:
    if not isinstance(starting_at, str):
        raise AdminError("a report row has no starting_at")
    return (
        utc_day(starting_at),
        g.get("api_key_id") if isinstance(g.get("api_key_id"), str) else None,
        str(g.get("model") or "(no model)"),
        str(g.get("service_tier") or "standard"),
    )
