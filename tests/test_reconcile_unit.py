"""The reconciliation core without a proxy: key matching by hint, the comparison and its causes, the tolerance,
the config section, and the Admin API client's error path (no key in any message)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from metrion_addon.admin_api import AdminClient, AdminError, ApiKey, Usage, usage_tokens, windows
from metrion_addon.config import ConfigError, parse_config
from metrion_addon.reconcile import (
    NOT_BEHIND,
    OVER_COUNT,
    PRICE_DRIFT,
    UNMETERED,
    MeterCell,
    ReconcileError,
    Tolerance,
    compare,
    hint_matches,
    match_keys,
)
from metrion_addon.reconcile_cli import parse_tolerance
from tests.fake_upstream import FakeUpstream

K1 = "sk-ant-api03-AAAAbbbbCCCCdddd-one-key-1111"
K2 = "sk-ant-api03-EEEEffffGGGGhhhh-two-key-2222"


def api_key(kid: str, secret: str, name: str = "") -> ApiKey:
    return ApiKey(kid, name or kid, f"{secret[:16]}...{secret[-4:]}", "active")


def test_hint_matches_prefix_and_last_four_only() -> None:
    assert hint_matches("sk-ant-api03-AAA...1111", K1)
    assert hint_matches("sk-ant-api03-AAA…1111", K1)  # a typographic ellipsis too
    assert not hint_matches("sk-ant-api03-AAA...1112", K1)
    assert not hint_matches("sk-ant-api03-EEE...1111", K1)
    assert not hint_matches(None, K1) and not hint_matches("sk-ant-api03-AAA", K1) and not hint_matches("...1111", K1)


def test_match_keys_maps_shares_and_reports_unmatched() -> None:
    keys = [api_key("apikey_1", K1, "prod"), api_key("apikey_2", K2)]
    m = match_keys([("acme", K1), ("acme-ci", K1), ("gone", "sk-ant-api03-ZZZZ-not-listed-9999")], keys)
    assert m.id_by_account == {"acme": "apikey_1", "acme-ci": "apikey_1"}
    assert m.accounts_by_id == {"apikey_1": ("acme", "acme-ci")}  # one key in two accounts: they share the id
    assert m.unmatched == ["gone"] and m.names["apikey_1"] == "prod"


def test_match_keys_refuses_a_key_that_fits_two_hints() -> None:
    twin = K1[:16] + "-other-middle-" + K1[-4:]
    with pytest.raises(ReconcileError, match=r"account 'acme'.*fits 2 Admin API keys") as e:
        match_keys([("acme", K1)], [api_key("apikey_1", K1), api_key("apikey_9", twin)])
    assert e.value.code == 2 and K1 not in e.value.message


def test_match_keys_refuses_two_accounts_whose_keys_fit_one_hint() -> None:
    twin = K1[:16] + "-other-middle-" + K1[-4:]
    with pytest.raises(ReconcileError, match="accounts 'acme' and 'beta' hold different Anthropic keys") as e:
        match_keys([("acme", K1), ("beta", twin)], [api_key("apikey_1", K1)])
    assert K1 not in e.value.message and twin not in e.value.message


def cell(inp: int, out: int, cost: str, **kw: Any) -> MeterCell:
    c = MeterCell(cost=Decimal(cost), requests=1, **kw)
    c.tokens = {"uncached_input_tokens": inp, "output_tokens": out}
    c.parts = {"cost_input_usd": Decimal(inp * 2) / 10**6, "cost_output_usd": Decimal(out * 10) / 10**6}
    return c


def usage(inp: int, out: int) -> Usage:
    return Usage({"uncached_input_tokens": inp, "output_tokens": out})


def cost(inp: int, out: int, factor: str = "1") -> dict[str, Decimal]:
    f = Decimal(factor)
    return {"uncached_input_tokens": Decimal(inp * 2) / 10**6 * f, "output_tokens": Decimal(out * 10) / 10**6 * f}


KEYS = match_keys([("acme", K1)], [api_key("apikey_1", K1), api_key("apikey_2", K2)])
DAY = "2026-11-30"


DEFAULT = Tolerance()


def one(provider: dict, pcost: dict | None, meter: dict, tol: Tolerance = DEFAULT, **kw: Any):  # type: ignore[no-untyped-def]
    rows = compare(provider, pcost, meter, KEYS, tol, **kw)
    assert len(rows) == 1
    return rows[0]


def test_compare_causes() -> None:
    p = {(DAY, "apikey_1", "m", "standard"): usage(100_000, 50_000)}
    meter_same = {(DAY, "acme", "m", "standard"): cell(100_000, 50_000, "0.7")}
    assert one(p, {k: cost(100_000, 50_000) for k in p}, meter_same).cause == "ok"
    # The meter recorded more than the provider billed.
    r = one(p, {k: cost(100_000, 50_000) for k in p}, {(DAY, "acme", "m", "standard"): cell(120_000, 50_000, "0.74")})
    assert (r.cause, r.ok, r.token_diff) == (OVER_COUNT, False, -20_000)
    # The provider saw more.
    r = one({k: usage(130_000, 50_000) for k in p}, {k: cost(130_000, 50_000) for k in p}, meter_same)
    assert (r.cause, r.token_diff, r.cost_diff) == (UNMETERED, 30_000, Decimal("0.06"))
    # Same tokens, dearer: price drift with the implied per-MTok rate.
    r = one(p, {k: cost(100_000, 50_000, "1.1") for k in p}, meter_same)
    assert r.cause == PRICE_DRIFT and "output: billed $11.0000/MTok, metered $10.0000/MTok" in r.detail
    # A key no account holds.
    r = one({(DAY, "apikey_2", "m", "standard"): usage(10, 10)}, {}, {})
    assert (r.cause, r.ok, r.accounts) == (NOT_BEHIND, False, ())
    r = one({(DAY, "apikey_2", "m", "standard"): usage(10, 10)}, {}, {}, ignore=frozenset({"apikey_2"}))
    assert (r.cause, r.ok, r.ignored) == (NOT_BEHIND, True, True)


def test_compare_tolerance_relative_and_floor() -> None:
    p = {(DAY, "apikey_1", "m", "standard"): usage(100_000, 50_000)}
    near = {(DAY, "acme", "m", "standard"): cell(100_400, 50_000, "0.7008")}  # 0.4% more input tokens
    assert one(p, {k: cost(100_000, 50_000) for k in p}, near).ok
    assert not one(p, {k: cost(100_000, 50_000) for k in p}, near, Tolerance(Decimal("0.001"))).ok
    tiny = {(DAY, "acme", "m", "standard"): cell(100_000, 50_000, "0.705")}  # $0.005: under the $0.01 floor
    assert one(p, {k: cost(100_000, 50_000) for k in p}, tiny, Tolerance(Decimal(0))).ok
    assert not one(p, {k: cost(100_000, 50_000) for k in p}, tiny, Tolerance(Decimal(0), Decimal(0))).ok


def test_compare_unpriced_rows_and_missing_cost() -> None:
    p = {(DAY, "apikey_1", "m", "standard"): usage(100, 100)}
    unpriced = {(DAY, "acme", "m", "standard"): cell(100, 100, "0", unpriced=1)}
    r = one(p, {k: cost(100, 100) for k in p}, unpriced)
    assert r.cause == PRICE_DRIFT and "1 request(s) the meter could not price" in r.detail
    # Legacy: no cost for this key (cost_complete=False): tokens only, cost shown as unknown.
    r = one(p, {}, {(DAY, "acme", "m", "standard"): cell(100, 100, "0.0012")}, cost_complete=False)
    assert (r.ok, r.provider_cost, r.cost_diff) == (True, None, None)


def test_compare_sorts_largest_drift_first_and_sums_accounts_sharing_a_key() -> None:
    keys = match_keys([("a", K1), ("b", K1)], [api_key("apikey_1", K1)])
    p = {(DAY, "apikey_1", "m", "standard"): usage(300, 0), (DAY, "apikey_1", "n", "standard"): usage(0, 100_000)}
    meter = {
        (DAY, "a", "m", "standard"): cell(100, 0, "0.0002"),
        (DAY, "b", "m", "standard"): cell(200, 0, "0.0004"),
        (DAY, "a", "n", "standard"): cell(0, 0, "0"),
    }
    rows = compare(p, {k: cost(*((300, 0) if k[2] == "m" else (0, 100_000))) for k in p}, meter, keys, Tolerance())
    assert [(r.model, r.cause, r.accounts) for r in rows] == [("n", UNMETERED, ("a", "b")), ("m", "ok", ("a", "b"))]


def test_parse_tolerance_and_windows() -> None:
    assert parse_tolerance("0.5%") == Decimal("0.005") and parse_tolerance("0.01") == Decimal("0.01")
    for bad in ("lots", "100%", "-1%", "nan"):
        with pytest.raises(ReconcileError):
            parse_tolerance(bad)
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 10, 1, tzinfo=UTC)
    spans = windows(start, start + timedelta(days=70))
    assert [(b - a).days for a, b in spans] == [31, 31, 8]


def test_usage_tokens_reads_both_report_shapes() -> None:
    legacy = {
        "uncached_input_tokens": 5,
        "cache_creation": {"ephemeral_1h_input_tokens": 3, "ephemeral_5m_input_tokens": 2},
        "cache_read_input_tokens": 7,
        "output_tokens": 11,
        "server_tool_use": {"web_search_requests": 1},
    }
    t = usage_tokens(legacy)
    assert t["cache_creation.ephemeral_1h_input_tokens"] == 3 and t["web_search_requests"] == 1
    assert usage_tokens({"output_tokens": "x"})["output_tokens"] == 0  # garbage is not a count


def test_config_reconcile_section_resolves_the_key_only_when_asked(tmp_path: Path) -> None:
    text = "accounts:\n  - name: a\n    tokens: [sk-metrion-aaaaaaaaaaaa]\n    anthropic_api_key: k\n"
    cfg = parse_config(text + "reconcile:\n  admin_api_key: ${ADMIN}\n  base_url: http://127.0.0.1:9/\n", tmp_path, {})
    assert cfg.reconcile.base_url == "http://127.0.0.1:9" and "ADMIN" not in repr(cfg)
    with pytest.raises(ConfigError, match="ADMIN is not set"):
        cfg.reconcile.admin_key({})
    assert cfg.reconcile.admin_key({"ADMIN": "sk-ant-admin01-x"}) == "sk-ant-admin01-x"
    assert parse_config(text, tmp_path, {}).reconcile.admin_key({}) is None
    for extra, fragment in (
        ("reconcile:\n  base_url: ftp://x\n", "reconcile.base_url"),
        ("reconcile:\n  admin_key: x\n", "reconcile.admin_key': unknown key"),
        ("reconcile:\n  admin_api_key: pre${X}\n", "exactly '${VAR_NAME}'"),
    ):
        with pytest.raises(ConfigError, match=fragment.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
            parse_config(text + extra, tmp_path, {})


class _Echo:
    """An Admin API that answers 403 with the credential it was sent in the message (a worst case)."""

    def handle(self, handler: Any, rid: str) -> None:
        body = b'{"type":"error","error":{"type":"permission_error","message":"key %s lacks scope"}}' % (
            handler.headers["x-api-key"].encode()
        )
        handler._send(403, body, "application/json", {}, None, rid)


def test_admin_errors_never_carry_the_key() -> None:
    fake = FakeUpstream().start()
    fake.admin = _Echo()
    secret = "sk-ant-admin01-SECRET-never-shown-0000"
    try:
        with pytest.raises(AdminError) as e:
            AdminClient(fake.url, secret).api_keys()
        assert e.value.status == 403 and secret not in e.value.message and "[admin key]" in e.value.message
        with pytest.raises(AdminError) as e:
            AdminClient("http://127.0.0.1:1", secret, timeout=5).api_keys()
        assert e.value.status == 0 and secret not in e.value.message
    finally:
        fake.stop()


def test_dated_and_undated_model_names_meet_in_one_row() -> None:
    p = {
        (DAY, "apikey_1", "claude-haiku-4-5", "standard"): usage(60, 10),
        (DAY, "apikey_1", "claude-haiku-4-5-20251001", "standard"): usage(40, 0),
    }
    pc = {k: cost(*((60, 10) if k[2] == "claude-haiku-4-5" else (40, 0))) for k in p}
    meter = {(DAY, "acme", "claude-haiku-4-5-20251001", "standard"): cell(100, 10, "0.0003")}
    r = one(p, pc, meter)
    assert (r.model, r.cause, r.token_diff, r.cost_diff) == ("claude-haiku-4-5", "ok", 0, Decimal(0))


class _Redirect:
    def handle(self, handler: Any, rid: str) -> None:
        handler._send(302, b"{}", "application/json", {"location": "http://127.0.0.1:1/steal"}, None, rid)


def test_admin_client_does_not_follow_redirects_with_the_key() -> None:
    fake = FakeUpstream().start()
    fake.admin = _Redirect()
    try:
        with pytest.raises(AdminError) as e:
            AdminClient(fake.url, "sk-ant-admin01-SECRET-0000").api_keys()
        assert e.value.status == 302
    finally:
        fake.stop()
