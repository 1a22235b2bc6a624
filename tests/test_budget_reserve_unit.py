"""Issue 10's pure parts: labels, the worst-case estimate, the reservation ledger (injected clock), admission
rules, token-bound users, alert delivery and the in-flight file. No mitmproxy."""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from metrion_addon import estimate as est
from metrion_addon.admission import Gate
from metrion_addon.alerts import Alerter, AlertHook
from metrion_addon.auth import Authenticator, AuthOk
from metrion_addon.budget import Budgets
from metrion_addon.budget_settings import AccountBudgets, BudgetSettings, Limit
from metrion_addon.config import ConfigError, PriceOverride, parse_config
from metrion_addon.inflight import InflightWriter, inflight_path, read_inflight
from metrion_addon.labels import LabelError, UserConflict, label_key, resolve_user
from metrion_addon.pricing import Pricer

NOW = datetime(2026, 11, 28, 10, tzinfo=UTC).timestamp()
PRICER = Pricer((PriceOverride("claude-test", Decimal(2), Decimal(10)),))


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "raw", ["alice", "Alice", " alice ", "alice\u200b", "ALICE", "\uff41\uff4c\uff49\uff43\uff45", "a\u00adlice",
            "\u202ealice", "alice\ufeff", "\u00a0alice", "alice\u2060"],
)  # fmt: skip
def test_label_variants_are_one_key(raw: str) -> None:
    assert label_key(raw) == "alice"


def test_labels_keep_meaningful_differences_and_refuse_mixed_scripts() -> None:
    assert label_key("Straße") == label_key("STRASSE") == "strasse"  # case folding, not lowering
    assert label_key("build  bot") == "build bot"
    assert label_key("山田たろう") == "山田たろう" and label_key("john 山田") == "john 山田"  # allowed mixes
    assert label_key("\u200b \u200b") is None and label_key(None) is None
    assert label_key("alice\udcff") == "alice\ufffd"  # a raw byte in a header: replaced, never a crash
    for mixed in ["alic\u0435", "b\u043eb", "\u03b1lice"]:  # Cyrillic e, Cyrillic o, Greek alpha
        with pytest.raises(LabelError, match="mixes scripts"):
            label_key(mixed)
    assert label_key("\u0430\u043b\u0438\u0441\u0430") == "алиса"  # one script: a label of its own


def test_resolve_user_bound_token_wins_or_refuses() -> None:
    assert resolve_user(None, " Bob ") == "bob"
    assert resolve_user("alice", None) == "alice"
    assert resolve_user("alice", "ALICE\u200b") == "alice"
    with pytest.raises(UserConflict):
        resolve_user("alice", "bob")
    with pytest.raises(UserConflict):
        resolve_user("alice", "alic\u0435")
    assert resolve_user("alice", "bob", "ignore") == "alice"
    with pytest.raises(LabelError):
        resolve_user(None, "alic\u0435")


def test_estimate_bounds_each_part() -> None:
    body = {"model": "claude-test-1", "max_tokens": 1000, "messages": [{"role": "user", "content": "x" * 5000}]}
    raw = json.dumps(body).encode()
    at = datetime.fromtimestamp(NOW, UTC)
    e = est.estimate(len(raw), body, PRICER, at, None)
    assert e is not None and e.input_tokens == len(raw) + est.OVERHEAD_TOKENS and e.output_tokens == 1000
    assert e.usd == (Decimal(e.input_tokens) * 2 + 1000 * 10) / 1_000_000
    cached = {**body, "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}
    c = est.estimate(len(raw), cached, PRICER, at, None)
    assert c is not None and c.usd == (Decimal(e.input_tokens) * 4 + 1000 * 10) / 1_000_000  # 1h write: 2x input
    tools = {**body, "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}
    w = est.estimate(len(raw), tools, PRICER, at, None)
    prompt = e.input_tokens + 3 * est.WEB_RESULT_TOKENS
    assert w is not None and w.searches == 3 and w.input_tokens == 4 * prompt and w.output_tokens == 4000
    assert w.usd == (Decimal(4 * prompt) * 2 + 4000 * 10) / 1_000_000 + Decimal(3) * 10 / 1000
    image = {**body, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url"}}]}]}
    i = est.estimate(10, image, PRICER, at, None)
    assert i is not None and i.input_tokens == 10 + est.OVERHEAD_TOKENS + est.IMAGE_TOKENS
    huge = est.input_bound(10**9, est.Shape())
    assert huge == est.CONTEXT_MAX_TOKENS
    assert est.estimate(len(raw), {**body, "model": "claude-nobody-9"}, PRICER, at, None) is None
    top = est.max_rates(PRICER, at)
    unknown = est.estimate(len(raw), {**body, "model": "claude-nobody-9"}, PRICER, at, top)
    assert unknown is not None and unknown.rates == "max-known" and unknown.usd > e.usd


def test_real_text_stays_within_the_byte_bound() -> None:
    """The bound's premise: no token encodes less than one byte. Text tokenises at ~3-4 bytes a token in
    English and ~1-3 in CJK; the bound charges 1 token per byte of the JSON body, whatever the language."""
    for text in ["hello world " * 100, "山田たろう" * 100, "🙂" * 100, json.dumps({"k": [1, 2, 3]}) * 50]:
        assert len(json.dumps(text).encode()) >= len(text)


def settings(**user_budgets: tuple[Limit, ...]) -> BudgetSettings:
    return BudgetSettings(
        accounts={
            "acme": AccountBudgets(
                account=(Limit("daily", 1.0), Limit("monthly", 100.0, hard=False)),
                user_default=(Limit("daily", 0.5),),
                users=dict(user_budgets),
            )
        }
    )


def test_reservations_hold_a_hard_limit_under_a_burst() -> None:
    b = Budgets(settings(), Clock())
    admitted = 0
    for i in range(50):  # 50 requests in flight at once, each reserving $0.3
        b.open(f"t{i}", "acme", f"u{i % 5}", NOW)
        if b.reserve(f"t{i}", "acme", f"u{i % 5}", 0.3, NOW).blocked is None:
            admitted += 1
    assert admitted == 3  # 3 x 0.3 <= 1.0 < 4 x 0.3
    states = {(s.scope, s.limit.period): s for s in b.states("acme", None)}
    assert states[(("acme", None, False), "daily")].reserved == pytest.approx(0.9)
    for i in range(50):
        b.settle(f"t{i}", 0.1 if i < 3 else None)
    day = {(s.scope, s.limit.period): s for s in b.states("acme", None)}[(("acme", None, False), "daily")]
    assert day.spent == pytest.approx(0.3) and day.reserved == 0 and not b.reservations()
    assert b.settle("t0", 1.0) is False  # settled once only


def test_a_reservation_that_fills_the_limit_exactly_is_admitted() -> None:
    """The check after reserving says what remains for the headers; it is not a second admission test. It once
    refused a request whose reservation reached the limit exactly, and the reservation stayed held."""
    clock = Clock()
    b = Budgets(settings(alice=(Limit("daily", 0.25),)), clock)
    b.open("exact", "acme", "alice", clock.now)
    c = b.reserve("exact", "acme", "alice", 0.25, clock.now)
    assert c.blocked is None and c.remaining == pytest.approx(0.0)
    assert b.reserved_for("exact") == pytest.approx(0.25)
    b.open("next", "acme", "alice", clock.now)
    assert b.reserve("next", "acme", "alice", 0.01, clock.now).blocked is not None  # the next one is refused
    assert b.reserved_for("next") == 0
    b.settle("exact", 0.1)
    assert b.check("acme", "alice").remaining == pytest.approx(0.15)


def test_refusal_message_and_spent_counts_in_the_start_period() -> None:
    clock = Clock(datetime(2026, 11, 28, 23, 59, 59, tzinfo=UTC).timestamp())
    b = Budgets(settings(alice=(Limit("daily", 0.2),)), clock)
    b.open("s", "acme", "alice", clock.now)
    assert b.reserve("s", "acme", "alice", 0.15, clock.now).blocked is None
    c = b.reserve("x", "acme", "alice", 0.1, clock.now)
    assert c.blocked is not None and "cannot cover this request's worst-case cost of $0.1000" in c.blocked.message(
        c.asked
    )
    started = clock.now
    clock.now += 10  # the next day
    b.settle("s", 0.12)
    assert b.check("acme", "alice").remaining == pytest.approx(0.2)  # today: untouched
    assert b.check("acme", "alice", now=started).remaining == pytest.approx(0.08)  # the start day has it


def test_alerts_fire_once_per_budget_threshold_and_period() -> None:
    got: list[tuple[str, str]] = []
    b = Budgets(settings(), Clock(), on_alert=lambda event, s: got.append((event, s.name)))
    for _ in range(3):
        b.add("acme", "bob", 0.45, now=NOW)  # bob's $0.5 day: 80% at 0.45; the account's $1 day
    assert b.check("acme", "bob").blocked is not None
    assert got == [
        ("hard_80", "account 'acme' user 'bob' daily budget"),
        ("hard_80", "account 'acme' daily budget"),
        ("hard", "account 'acme' user 'bob' daily budget"),
        ("hard", "account 'acme' daily budget"),
    ]


def test_gate_free_paths_streamed_bodies_and_unknown_models() -> None:
    s = settings()
    gate = Gate(s, PRICER, Clock())
    gate.budgets.add("acme", None, 1.0, now=NOW)  # the account's day is used up
    assert gate.at_headers("a", "acme", None, "/v1/messages/count_tokens", NOW)[0] is None
    assert gate.at_headers("b", "acme", None, "/v1/models", NOW)[0] is None
    refused = gate.at_headers("c", "acme", None, "/v1/messages", NOW)[0]
    assert refused is not None and refused.status == 429 and refused.record_as == "budget_exceeded"

    gate = Gate(s, PRICER, Clock())
    r = gate.at_headers("d", "acme", None, "/v1/messages", NOW, streamed_body=True, content_length=None)[0]
    assert r is not None and r.status == 413  # nothing bounds it
    r = gate.at_headers("e", "acme", None, "/v1/messages", NOW, streamed_body=True, content_length="2000000")[0]
    assert r is not None and r.status == 429  # 2 MB at the most expensive rates cannot fit $0.5

    refuse = Gate(BudgetSettings(accounts=s.accounts, unknown_model="refuse"), PRICER, Clock())
    body = {"model": "claude-nobody-9", "max_tokens": 10, "messages": []}
    assert refuse.at_headers("f", "acme", None, "/v1/messages", NOW)[0] is None
    r = refuse.at_body("f", "acme", None, "/v1/messages", NOW, 100, body)[0]
    assert r is not None and r.status == 403 and r.record_as == "unknown_model_blocked"
    gate = Gate(s, PRICER, Clock())
    assert gate.at_headers("g", "acme", None, "/v1/messages", NOW)[0] is None
    refusal, headers = gate.at_body("g", "acme", None, "/v1/messages", NOW, 100, body)
    assert refusal is None and headers is not None and float(headers["x-metrion-budget-reserved-usd"]) > 0
    gate.settle("g", "acme", None, 0.01, NOW)
    assert gate.budgets.reservations() == []


def test_token_bound_users_from_config(tmp_path: Path) -> None:
    text = """
bound_user_header: ignore
accounts:
  - name: acme
    tokens: [sk-metrion-plain-00000000, {token: sk-metrion-alice-00000000, user: " Alice\u200b"}]
    anthropic_api_key: k
    user_budgets: {ALICE: {daily: 5}}
"""
    cfg = parse_config(text, tmp_path / "c.yaml", {})
    assert cfg.bound_user_header == "ignore" and cfg.budgets.accounts["acme"].users == {"alice": (Limit("daily", 5),)}
    auth = Authenticator(cfg.accounts)
    ok = auth.authenticate({"x-api-key": "sk-metrion-alice-00000000"})
    assert isinstance(ok, AuthOk) and ok.user == "alice"
    plain = auth.authenticate({"x-api-key": "sk-metrion-plain-00000000"})
    assert isinstance(plain, AuthOk) and plain.user is None
    for bad, fragment in [
        (text.replace("ALICE", "alice: {daily: 1}, Alice"), "is the same user as another entry"),
        (text.replace("ignore", "maybe"), "field 'bound_user_header'"),
        (text.replace('" Alice\u200b"', "al\u0456ce"), "field 'accounts[0].tokens[1].user': the label mixes"),
        (text.replace("token: sk-metrion-alice-00000000, ", ""), "field 'accounts[0].tokens[1].token': required"),
        (text + "alerts: [{url: ftp://x}]\n", "field 'alerts[0].url'"),
        (text + "alerts: [{url: 'http://x', on: [sometimes]}]\n", "field 'alerts[0].on'"),
        (text + "unknown_model_budget: guess\n", "field 'unknown_model_budget'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            parse_config(bad, tmp_path / "c.yaml", {})
    hooks = parse_config(text + "alerts: [{url: 'http://x/h', on: [hard]}]\n", tmp_path / "c.yaml", {}).alerts
    assert hooks == (AlertHook("http://x/h", frozenset({"hard"})),)


def test_alert_delivery_retries_then_gives_up_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    answers = [500, 503, 204]
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(answers.pop(0) if answers else 500)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook?token=secret"
    try:
        alerter = Alerter((AlertHook(url),), attempts=3, backoff=0.001)
        assert alerter.deliver(url, {"event": "hard", "budget": "b"}) is True and len(seen) == 3
        assert alerter.deliver(url, {"event": "hard", "budget": "b"}) is False  # 500 three times
        assert "was not delivered" in caplog.text and "secret" not in caplog.text
        closed = Alerter((AlertHook("http://127.0.0.1:1/x"),), attempts=2, backoff=0.001)
        assert closed.deliver("http://127.0.0.1:1/x", {"event": "soft"}) is False  # refused: logged, not raised
    finally:
        server.shutdown()
        server.server_close()


def test_inflight_file_round_trip_and_dead_writers_are_ignored(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    b = Budgets(settings(), Clock())
    b.open("t", "acme", "bob", NOW)
    b.reserve("t", "acme", "bob", 0.25, NOW)
    writer = InflightWriter(db, b).start()
    try:
        got = {(k[0], k[1]): usd for k, usd in read_inflight(db)}
        assert got[(("acme", None, False), "daily")] == 0.25 and got[(("acme", "bob", True), "daily")] == 0.25
        other = Budgets(settings(), Clock())
        for key, usd in read_inflight(db):
            other.add_reserved(key, usd)
        assert other.check("acme", "bob").remaining == pytest.approx(0.25)
    finally:
        writer.close()
    assert read_inflight(db) == [] and not inflight_path(db).exists()
    dead = inflight_path(db, pid=2**22 + 7)  # no such process
    entry = {"account": "acme", "user": None, "is_user": False, "period": "daily", "usd": 1}
    dead.write_text(json.dumps({"pid": 2**22 + 7, "reserved": [{**entry, "period_start": "2026-11-28T00:00:00Z"}]}))
    assert read_inflight(db) == [] and os.path.exists(dead)


def test_an_unpriced_request_counts_at_its_reservation_live_and_after_restart(tmp_path: Path) -> None:
    from metrion_addon.record import iso_ms
    from metrion_addon.store import Store, connect

    gate = Gate(settings(), PRICER, Clock())
    body = {"model": "claude-nobody-9", "max_tokens": 10, "messages": []}
    gate.at_headers("u", "acme", "bob", "/v1/messages", NOW)
    gate.at_body("u", "acme", "bob", "/v1/messages", NOW, 100, body)
    held = gate.budgets.reserved_for("u")
    assert held > 0 and gate.settle("u", "acme", "bob", None, NOW) == held  # no price: its worst case counts
    assert gate.settle("v", "acme", "bob", 0.01, NOW) is None  # no ticket: counted as priced
    live = gate.budgets.check("acme", "bob").remaining

    db = tmp_path / "m.db"
    store = Store(db)
    store.start()
    store.put({"ts": iso_ms(NOW), "account": "acme", "user": "Bob", "cost_usd": None, "budget_usd": held})
    store.put({"ts": iso_ms(NOW), "account": "acme", "user": "bob", "cost_usd": 0.01})
    store.close()
    restarted = Budgets(settings(), Clock())
    conn = connect(db)
    try:
        restarted.seed(conn)
    finally:
        conn.close()
    assert restarted.check("acme", "bob").remaining == pytest.approx(live)


def test_overshoot_is_at_most_the_estimation_error() -> None:
    """Requests that cost more than they reserved (an estimate beaten) overshoot by exactly that, no more."""
    b = Budgets(settings(), Clock())
    admitted = []
    for i in range(10):
        b.open(f"t{i}", "acme", f"u{i}", NOW)
        if b.reserve(f"t{i}", "acme", f"u{i}", 0.3, NOW).blocked is None:
            admitted.append(f"t{i}")
    for t in admitted:
        b.settle(t, 0.45)  # 0.15 more than reserved, each
    day = next(s for s in b.states("acme", None) if s.limit.period == "daily")
    assert len(admitted) == 3 and day.spent == pytest.approx(1.35)
    assert day.spent <= day.limit.usd + len(admitted) * 0.15 + 1e-9
    b.open("late", "acme", "x", NOW)
    assert b.reserve("late", "acme", "x", 0.01, NOW).blocked is not None  # used up: nothing more gets in


def test_past_periods_are_forgotten_but_current_ones_kept() -> None:
    clock = Clock()
    b = Budgets(settings(), clock)
    b.add("acme", "bob", 0.4, now=NOW)
    for day in range(1, 40):
        clock.now = NOW + day * 86400
        b.open(f"t{day}", "acme", "bob", clock.now)
        b.settle(f"t{day}", 0.01)
    days = {k[2] for k in b._spent if k[1] == "daily"}
    assert len(days) <= 5 and b.check("acme", "bob").remaining == pytest.approx(0.49)  # today and 4 before
