"""`metrion-reconcile`: prove the meter against the bill, per UTC day x API key x model x service tier.

The provider side comes from Anthropic's Admin API (admin_api.py): the Usage and Cost Analytics API when the
organisation has it, else the legacy usage and cost reports. The meter side is the `requests` table, read-only.
Managed accounts' keys are matched to Admin API key ids by `partial_key_hint`; pass-through traffic uses clients'
own keys, which the meter never sees, so it is counted and reported as out of scope. See docs/reconcile.md.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from metrion_addon.admin_api import KINDS, SHORT, ApiKey, Usage
from metrion_addon.report.db import EXIT_USAGE

EXIT_DRIFT = 1  # a difference beyond the tolerance (also EXIT_ERROR's value: a failed check alerts either way)
EXIT_ADMIN_API = 6  # the Admin API could not be read (unreachable, refused the key, unexpected answer)
ALL_KINDS = (*KINDS, "web_search_requests")
COST_PARTS = {  # meter cost column -> the provider's cost components it corresponds to
    "cost_input_usd": ("uncached_input_tokens",),
    "cost_cache_write_usd": ("cache_creation.ephemeral_5m_input_tokens", "cache_creation.ephemeral_1h_input_tokens"),
    "cost_cache_read_usd": ("cache_read_input_tokens",),
    "cost_output_usd": ("output_tokens",),
    "cost_tools_usd": ("web_search",),
}
NOT_BEHIND = "not behind this proxy"
UNMETERED = "unmetered traffic"
OVER_COUNT = "over-count"
PRICE_DRIFT = "price drift"


class ReconcileError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- matching managed accounts' keys to Admin API key ids ----------------------------------------------


def hint_matches(hint: str | None, key: str) -> bool:
    """`partial_key_hint` is the key's first characters, an ellipsis and its last four: `sk-ant-api03-R2D...igAA`."""
    if not hint:
        return False
    for sep in ("...", "…"):
        if sep in hint:
            head, _, tail = hint.rpartition(sep)
            return bool(head) and len(key) >= len(head) + len(tail) and key.startswith(head) and key.endswith(tail)
    return False


@dataclass
class KeyMap:
    accounts_by_id: dict[str, tuple[str, ...]]  # Admin API key id -> the accounts holding that key
    id_by_account: dict[str, str]
    names: dict[str, str]  # key id -> the key's name in the Console
    unmatched: list[str]  # managed accounts whose key the organisation does not list


def match_keys(accounts: Sequence[tuple[str, str]], api_keys: Sequence[ApiKey]) -> KeyMap:
    """(account, its Anthropic key) pairs -> key ids. Refuses a key that fits several hints, or a hint that fits
    the different keys of several accounts (the same key in several accounts is fine: they share the key id)."""
    id_by_account: dict[str, str] = {}
    unmatched: list[str] = []
    secret_by_id: dict[str, tuple[str, str]] = {}  # key id -> (the first account's key, that account)
    for name, secret in accounts:
        fits = [k for k in api_keys if hint_matches(k.hint, secret)]
        if len(fits) > 1:
            listed = ", ".join(f"{k.id} ({k.name!r}, {k.hint})" for k in fits)
            raise ReconcileError(
                f"account {name!r}: its Anthropic key fits {len(fits)} Admin API keys' hints ({listed}); "
                "cannot tell which one it is. Rotate one of them, or reconcile with --account for the others.",
                EXIT_USAGE,
            )
        if not fits:
            unmatched.append(name)
            continue
        kid = fits[0].id
        if kid in secret_by_id and secret_by_id[kid][0] != secret:
            other = secret_by_id[kid][1]
            raise ReconcileError(
                f"accounts {other!r} and {name!r} hold different Anthropic keys that both fit the hint of Admin "
                f"API key {kid} ({fits[0].hint}): cannot tell whose usage it is. Reconcile them one at a time "
                "with --account.",
                EXIT_USAGE,
            )
        secret_by_id.setdefault(kid, (secret, name))
        id_by_account[name] = kid
    by_id: dict[str, tuple[str, ...]] = {}
    for name, kid in id_by_account.items():
        by_id[kid] = (*by_id.get(kid, ()), name)
    return KeyMap(by_id, id_by_account, {k.id: k.name for k in api_keys}, unmatched)


# --- the meter's side -----------------------------------------------------------------------------------

_W1H = "COALESCE(cache_creation_1h_input_tokens, 0)"
_METER_SQL = f"""
SELECT substr(ts, 1, 10) AS day, account, COALESCE(response_model, model, '(no model)') AS model,
       COALESCE(service_tier, 'standard') AS tier, COUNT(*) AS requests,
       TOTAL(input_tokens), TOTAL(COALESCE(cache_creation_5m_input_tokens,
                                           COALESCE(cache_creation_input_tokens, 0) - {_W1H})),
       TOTAL({_W1H}), TOTAL(cache_read_input_tokens), TOTAL(output_tokens), TOTAL(web_search_requests),
       TOTAL(cost_usd), COUNT(*) - COUNT(cost_usd),
       TOTAL(cost_input_usd), TOTAL(cost_cache_write_usd), TOTAL(cost_cache_read_usd), TOTAL(cost_output_usd),
       TOTAL(cost_tools_usd)
FROM requests
WHERE ts >= ? AND ts < ? AND mode = 'managed' AND input_tokens IS NOT NULL
  AND COALESCE(path, '') NOT LIKE '%/count_tokens'
  AND account IN ({{accounts}})
GROUP BY 1, 2, 3, 4
"""


@dataclass
class MeterCell:
    tokens: dict[str, int] = field(default_factory=dict)
    cost: Decimal = Decimal(0)
    parts: dict[str, Decimal] = field(default_factory=dict)  # meter cost columns
    requests: int = 0
    unpriced: int = 0


def _usd(x: float) -> Decimal:
    return Decimal(repr(x)).quantize(Decimal("1e-10"))


def meter_usage(
    conn: sqlite3.Connection, lo: str, hi: str, accounts: Sequence[str]
) -> dict[tuple[str, str, str, str], MeterCell]:
    """(day, account, model, tier) -> what the meter recorded for managed traffic in [lo, hi)."""
    if not accounts:
        return {}
    sql = _METER_SQL.replace("{accounts}", ", ".join("?" * len(accounts)))
    out: dict[tuple[str, str, str, str], MeterCell] = {}
    for r in conn.execute(sql, [lo, hi, *accounts]):
        day, account, model, tier, n = r[:5]
        cell = MeterCell(requests=n, cost=_usd(r[11]), unpriced=r[12])
        cell.tokens = {k: int(v) for k, v in zip(ALL_KINDS, r[5:11], strict=True)}
        cell.parts = {k: _usd(v) for k, v in zip(COST_PARTS, r[13:18], strict=True)}
        out[(day, account, model, tier)] = cell
    return out


def passthrough_usage(conn: sqlite3.Connection, lo: str, hi: str, accounts: Sequence[str]) -> tuple[int, float]:
    where = "ts >= ? AND ts < ? AND mode = 'passthrough' AND input_tokens IS NOT NULL"
    params: list[Any] = [lo, hi]
    if accounts:
        where += f" AND account IN ({', '.join('?' * len(accounts))})"
        params += list(accounts)
    n, cost = conn.execute(f"SELECT COUNT(*), TOTAL(cost_usd) FROM requests WHERE {where}", params).fetchone()
    return int(n), float(cost)


# --- the comparison -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    relative: Decimal = Decimal("0.005")
    floor_usd: Decimal = Decimal("0.01")
    floor_tokens: int = 0

    def tokens_ok(self, a: int, b: int) -> bool:
        return abs(a - b) <= self.relative * max(a, b) + self.floor_tokens

    def usd_ok(self, a: Decimal, b: Decimal) -> bool:
        return abs(a - b) <= self.relative * max(abs(a), abs(b)) + self.floor_usd


def price_detail(p_parts: dict[str, Decimal] | None, tokens: dict[str, int], m: MeterCell, tol: Tolerance) -> str:
    """Where tokens agree but cost does not: the implied per-MTok rates that differ (or the overall ratio)."""
    bits = []
    if p_parts and any(k in p_parts for k in KINDS):  # the provider split its cost by token type
        for col, kinds in COST_PARTS.items():
            n = sum(tokens.get(k if k != "web_search" else "web_search_requests", 0) for k in kinds)
            billed = sum((p_parts.get(k, Decimal(0)) for k in kinds), Decimal(0))
            metered = m.parts.get(col, Decimal(0))
            if n and not tol.usd_ok(billed, metered):
                unit = "/1000 searches" if col == "cost_tools_usd" else "/MTok"
                scale = 1000 if col == "cost_tools_usd" else 1_000_000
                label = SHORT.get(kinds[0], kinds[0]).replace("_5m", "")
                rates = f"billed ${billed * scale / n:.4f}{unit}, metered ${metered * scale / n:.4f}{unit}"
                bits.append(f"{label}: {rates}")
    if m.unpriced:
        bits.append(f"{m.unpriced} request(s) the meter could not price")
    if not bits and m.cost:
        bits.append(f"billed x{sum(p_parts.values()) / m.cost if p_parts else 0:.4f} the metered cost")
    return "; ".join(bits)


@dataclass
class Row:
    day: str
    api_key_id: str | None
    key_name: str
    accounts: tuple[str, ...]
    model: str
    service_tier: str
    provider: dict[str, int]
    meter: dict[str, int]
    provider_cost: Decimal | None
    meter_cost: Decimal
    ok: bool = True
    cause: str = "ok"
    detail: str = ""
    ignored: bool = False

    @property
    def token_diff(self) -> int:
        return sum(self.provider.values()) - sum(self.meter.values())

    @property
    def cost_diff(self) -> Decimal | None:
        return None if self.provider_cost is None else self.provider_cost - self.meter_cost

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "day": self.day,
            "api_key_id": self.api_key_id,
            "key_name": self.key_name,
            "accounts": "+".join(self.accounts),
            "model": self.model,
            "service_tier": self.service_tier,
        }
        for k in ALL_KINDS:
            d[f"provider_{SHORT[k]}"] = self.provider.get(k, 0)
            d[f"meter_{SHORT[k]}"] = self.meter.get(k, 0)
        d["provider_tokens"] = sum(self.provider.values())
        d["meter_tokens"] = sum(self.meter.values())
        d["token_diff"] = self.token_diff
        d["provider_cost_usd"] = None if self.provider_cost is None else str(self.provider_cost.normalize())
        d["meter_cost_usd"] = str(self.meter_cost.normalize())
        d["cost_diff_usd"] = None if self.cost_diff is None else str(self.cost_diff.normalize())
        d |= {"within_tolerance": self.ok, "cause": self.cause, "detail": self.detail, "ignored": self.ignored}
        return d


FIELDS = list(Row("", None, "", (), "", "", {}, {}, None, Decimal(0)).as_dict())


def compare(
    provider: dict[tuple[str, str | None, str, str], Usage],
    provider_cost: dict[tuple[str, str | None, str, str], dict[str, Decimal]] | None,
    meter: dict[tuple[str, str, str, str], MeterCell],
    keys: KeyMap,
    tol: Tolerance,
    ignore: frozenset[str] = frozenset(),
    only_ids: frozenset[str] | None = None,
    cost_complete: bool = True,
) -> list[Row]:
    """One row per (day, key id, model, tier) seen on either side, classified; largest drift first.

    `provider_cost` None: no cost at all; `cost_complete` False: cost only for the cells it holds (legacy reports,
    which have no cost per key); rows without a provider cost compare tokens only. `only_ids`: with
    --account, provider usage of other keys is left out instead of being reported as not behind this proxy.
    """
    provider, provider_cost = _merge_model_dates(provider, provider_cost)
    by_key: dict[tuple[str, str | None, str, str], MeterCell] = {}
    for (day, account, model, tier), cell in meter.items():
        kid = keys.id_by_account.get(account)
        if kid is None:
            continue
        k = (day, kid, base_model(model), tier)
        agg = by_key.setdefault(k, MeterCell())
        for kind, n in cell.tokens.items():
            agg.tokens[kind] = agg.tokens.get(kind, 0) + n
        for col, usd in cell.parts.items():
            agg.parts[col] = agg.parts.get(col, Decimal(0)) + usd
        agg.cost += cell.cost
        agg.requests += cell.requests
        agg.unpriced += cell.unpriced
    rows = []
    for k in sorted(set(provider) | set(by_key), key=lambda k: (k[0], k[1] or "", k[2], k[3])):
        day, kid, model, tier = k
        if only_ids is not None and kid not in only_ids:
            continue
        p = provider.get(k, Usage())
        m = by_key.get(k, MeterCell())
        parts = provider_cost.get(k) if provider_cost is not None else None
        p_cost: Decimal | None = sum(parts.values(), Decimal(0)) if parts is not None else None
        if p_cost is None and provider_cost is not None and cost_complete:
            p_cost = Decimal(0)  # the cost report lists every key that cost anything: none here
        accounts = keys.accounts_by_id.get(kid or "", ())
        row = Row(
            day, kid, keys.names.get(kid or "", ""), accounts, model, tier,
            {kind: p.tokens.get(kind, 0) for kind in ALL_KINDS}, {kind: m.tokens.get(kind, 0) for kind in ALL_KINDS},
            p_cost, m.cost, ignored=kid in ignore,
        )  # fmt: skip
        classify(row, parts, m, tol)
        rows.append(row)
    rows.sort(key=lambda r: (abs(r.cost_diff or 0), abs(r.token_diff)), reverse=True)
    return rows


_DATED = re.compile(r"-\d{8}$")


def base_model(model: str) -> str:
    """`claude-haiku-4-5-20251001` -> `claude-haiku-4-5`: the report may name a model without the date the response
    carried (or the other way round); the same model must land in one row."""
    return _DATED.sub("", model)


def _merge_model_dates(
    provider: dict[tuple[str, str | None, str, str], Usage],
    cost: dict[tuple[str, str | None, str, str], dict[str, Decimal]] | None,
) -> tuple[
    dict[tuple[str, str | None, str, str], Usage], dict[tuple[str, str | None, str, str], dict[str, Decimal]] | None
]:
    usage: dict[tuple[str, str | None, str, str], Usage] = {}
    for (day, kid, model, tier), u in provider.items():
        cell = usage.setdefault((day, kid, base_model(model), tier), Usage())
        for kind, n in u.tokens.items():
            cell.add(kind, n)
    if cost is None:
        return usage, None
    merged: dict[tuple[str, str | None, str, str], dict[str, Decimal]] = {}
    for (day, kid, model, tier), parts in cost.items():
        cell_cost = merged.setdefault((day, kid, base_model(model), tier), {})
        for part, usd in parts.items():
            cell_cost[part] = cell_cost.get(part, Decimal(0)) + usd
    return usage, merged


def classify(row: Row, parts: dict[str, Decimal] | None, m: MeterCell, tol: Tolerance) -> None:
    tokens_ok = all(tol.tokens_ok(row.provider[k], row.meter[k]) for k in ALL_KINDS)
    cost_ok = row.provider_cost is None or (tol.usd_ok(row.provider_cost, row.meter_cost) and not m.unpriced)
    row.ok = tokens_ok and cost_ok
    if not row.accounts:
        row.ok, row.cause = False, NOT_BEHIND
        row.detail = (
            "no account holds this key: traffic that went around the proxy, or pass-through clients"
            if row.api_key_id
            else "usage no API key authenticated (e.g. the Console's Workbench)"
        )
    elif not tokens_ok:
        row.cause = UNMETERED if row.token_diff > 0 else OVER_COUNT
        diffs = [f"{SHORT[k]} {row.provider[k] - row.meter[k]:+,}" for k in ALL_KINDS if row.provider[k] - row.meter[k]]
        row.detail = "provider - meter: " + ", ".join(diffs)
    elif not cost_ok:
        row.cause, row.detail = PRICE_DRIFT, price_detail(parts, row.provider, m, tol)
    if row.ignored:
        row.ok, row.detail = True, f"ignored (--ignore-key); {row.detail}".rstrip("; ")
