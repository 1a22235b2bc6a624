"""Accounting off the event loop (accountant.py): the same rows as on the loop, in hand-over order, every one of
them at close, and one bad job never stops the others. Plus, in-process, which rows the hooks build themselves
(under a budget: settled before the hook returns)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow, tutils

from metrion_addon import accountant as accountant_module
from metrion_addon.accountant import Accountant, Finished, account
from metrion_addon.addon import Metrion
from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, finish
from tests.conftest import CAPPED_ACCOUNT, CAPPED_TOKEN, MANAGED_TOKEN, configured_addon

ANSWER = json.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "model": "claude-sonnet-5-5",
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1000, "output_tokens": 100},
    }
).encode()


class ListStore:
    def __init__(self, fail_on: str | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.fail_on = fail_on
        self.thread: set[str] = set()

    def put(self, row: dict[str, Any]) -> None:
        self.thread.add(threading.current_thread().name)
        if row.get("user") == self.fail_on:
            raise RuntimeError("a store that refuses this row")
        self.rows.append(row)


def pending(user: str = "u", path: str = "/v1/messages") -> Pending:
    return Pending(started=1_780_000_000.0, method="POST", path=path, account="acme", user=user, mode="managed")


def job(p: Pending, body: bytes | None = ANSWER, encoding: str | None = None, status: int = 200) -> Finished:
    return Finished(p, status, "req_1", p.started + 0.1, p.started + 0.2, body=body, encoding=encoding)


def test_a_json_answer_gives_the_row_the_hook_used_to_build() -> None:
    pricer = Pricer()
    before = pending()
    before.facts.from_json_body(ANSWER)  # what the response hook did on the loop
    old = finish(before, pricer=pricer, status=200, request_id="req_1", headers_at=before.started + 0.1,
                 ended_at=before.started + 0.2)  # fmt: skip
    new = account(job(pending()), pricer)
    assert new == old
    assert (new["input_tokens"], new["output_tokens"], new["error"]) == (1000, 100, None) and new["cost_usd"] > 0


def test_a_compressed_answer_is_decoded_and_an_undecodable_one_is_unreadable() -> None:
    pricer = Pricer()
    assert account(job(pending(), gzip.compress(ANSWER), "gzip"), pricer)["output_tokens"] == 100
    bad = account(job(pending(), b"not gzip at all", "gzip"), pricer)
    assert (bad["error"], bad["price_source"], bad["cost_usd"]) == ("usage_unreadable", "usage_unreadable", None)
    assert account(job(pending(), ANSWER, "x-unknown"), pricer)["error"] == "usage_unreadable"


def test_count_tokens_keeps_its_count() -> None:
    row = account(job(pending(path="/v1/messages/count_tokens"), b'{"input_tokens": 42}'), Pricer())
    assert row["counted_tokens"] == 42


def test_rows_are_stored_in_hand_over_order_on_the_thread_and_all_of_them_at_close() -> None:
    store = ListStore()
    acc = Accountant(Pricer(), store).start()
    for i in range(500):
        acc.submit(job(pending(f"u{i}")) if i % 3 else {"ts": "x", "user": f"u{i}"})  # jobs and ready rows
    acc.close()
    assert [r["user"] for r in store.rows] == [f"u{i}" for i in range(500)]
    assert store.thread == {"metrion-accountant"}
    acc.submit(job(pending("late")))  # after close (a hook late at shutdown): stored here, not lost
    assert store.rows[-1]["user"] == "late" and acc.pending() == 0


def test_one_bad_job_or_row_never_stops_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    real = accountant_module.finish

    def buggy(p: Pending, **kw: Any) -> Any:
        if p.user == "bug":
            raise RuntimeError("a bug in accounting")
        return real(p, **kw)

    monkeypatch.setattr(accountant_module, "finish", buggy)
    store = ListStore(fail_on="refused")
    acc = Accountant(Pricer(), store).start()
    for user in ("a", "bug", "refused", "b"):
        acc.submit(job(pending(user)))
    acc.close()
    got = [(r["user"], r["error"], r["status"]) for r in store.rows]
    assert got == [("a", None, 200), ("bug", "metrion_internal_error", 200), ("b", None, 200)]


# --- the hooks: where each row is built --------------------------------------------------------------------

@pytest.fixture
def addon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Metrion]:
    with configured_addon(tmp_path, monkeypatch, CAPPED_ACCOUNT) as m:
        yield m


def answered(m: Metrion, token: str) -> Any:
    body = b'{"model":"claude-sonnet-5-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    headers = ((b"x-api-key", token.encode()), (b"content-type", b"application/json"))
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/v1/messages", content=body, headers=headers))
    f.request.timestamp_start = time.time()  # today's budget period and prices
    m.requestheaders(f)
    m.request(f)
    f.response = tutils.tresp(content=ANSWER, headers=((b"content-type", b"application/json"),))
    m.responseheaders(f)
    return f


def test_under_a_budget_the_real_cost_is_counted_before_the_hook_returns(addon: Metrion) -> None:
    """So a client's next request is checked against what this one cost, not against its reservation."""
    assert addon.rt is not None
    budgets = addon.rt.budgets
    f = answered(addon, CAPPED_TOKEN)
    assert [s.reserved for s in budgets.states("capped", None)] != [0.0]  # its worst case, reserved
    addon.response(f)
    (state,) = budgets.states("capped", None)
    assert state.reserved == 0.0 and state.spent == pytest.approx(1000 * 2 / 1e6 + 100 * 10 / 1e6)


def test_without_a_budget_the_hook_only_hands_over(addon: Metrion, monkeypatch: pytest.MonkeyPatch) -> None:
    assert addon.rt is not None
    called: list[str] = []
    monkeypatch.setattr(accountant_module, "finish", lambda *a, **k: called.append("finish") or {})
    f = answered(addon, MANAGED_TOKEN)
    addon.rt.accountant.close()  # the thread stops: what is handed over now stays queued, not accounted
    addon.rt.accountant._closed = False
    addon.response(f)
    assert called == [] and addon.rt.accountant.pending() == 1


def test_jobs_handed_over_during_the_gathering_pause_wait_for_it_and_close_cuts_it_short() -> None:
    """After a batch the thread pauses (`gather`) instead of being woken for each job: jobs handed over then stay
    queued until the pause ends. close() ends it at once, and the thread, not the caller, accounts them."""

    class Pause(threading.Event):  # the accountant's pause, telling the test when the thread has entered it
        entered = threading.Event()

        def wait(self, timeout: float | None = None) -> bool:
            self.entered.set()
            return super().wait(timeout)

    store = ListStore()
    acc = Accountant(Pricer(), store, gather=3600.0)  # a pause no test outlives: only close() ends it
    acc._closing = pause = Pause()
    acc.start()
    acc.submit(job(pending("first")))
    assert pause.entered.wait(30), "the idle thread takes the first job at once, then pauses"
    for user in ("second", "third"):
        acc.submit(job(pending(user)))
    assert [r["user"] for r in store.rows] == ["first"] and acc.pending() == 2  # gathering, not lost
    closing = threading.Thread(target=acc.close, kwargs={"timeout": 30.0})
    closing.start()
    closing.join(30)
    assert not closing.is_alive()
    assert [r["user"] for r in store.rows] == ["first", "second", "third"]
    assert store.thread == {"metrion-accountant"}  # the pause was cut short: close() did not account them itself
