"""Batch results through the real reading path (a results file, JSONL, compressed, split at any byte, through
JsonlTap -> parse_result_line -> result_row -> Pricer), against the accounting corpus's hand-worked costs:
cache writes and reads at batch rates, the US-geo multiplier with batch, long context with batch. And the
batch thread's exactly-once bookkeeping."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from metrion_addon.batch_recorder import BatchRecorder
from metrion_addon.batches import BatchMeta, BatchResult, JsonlTap, parse_result_line, result_row, rewrite_results_url
from metrion_addon.pricing import Pricer
from metrion_addon.store import connect, migrate
from tests.test_pricing_corpus import CASES, GP, Case, assert_row, expected, raw_usage, split_source

BATCH_CASES = [c for c in CASES if c.extra.get("service_tier") == "batch" and not c.iterations]


def result_line(custom_id: str, model: str, usage: dict[str, Any] | None, kind: str = "succeeded") -> bytes:
    result: dict[str, Any] = {"type": kind}
    if kind == "succeeded":
        result["message"] = {
            "id": f"msg_{custom_id}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "Grüße 👋\nwith a newline in the text"}],
            "stop_reason": "end_turn",
            "usage": usage,
        }
    elif kind == "errored":
        result["error"] = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return json.dumps({"custom_id": custom_id, "result": result}, ensure_ascii=False).encode() + b"\n"


def read_file(wire: bytes, encoding: str | None, size: int) -> list[BatchResult]:
    got: list[BatchResult] = []
    tap = JsonlTap(encoding, got.append)
    out = b"".join(tap(wire[i : i + size]) for i in range(0, len(wire), size)) + tap(b"")
    assert out == wire and tap.failed is None and tap.complete  # the client's bytes are untouched
    return got


@pytest.mark.parametrize("encoding", [None, "gzip"])
@pytest.mark.parametrize("case", BATCH_CASES, ids=[c.name for c in BATCH_CASES])
def test_batch_case(case: Case, encoding: str | None) -> None:
    lines = result_line("a", case.model, raw_usage(case)) + result_line("b", case.model, None, "errored")
    wire = gzip.compress(lines) if encoding else lines
    got = read_file(wire, encoding, 1 + BATCH_CASES.index(case) % 7)
    assert [r.custom_id for r in got] == ["a", "b"]
    meta = BatchMeta("msgbatch_1", "acct", "u", "managed", case.ts.timestamp())
    row = result_row(got[0], meta, Pricer(), "req_1")
    assert_row(row, expected(case))
    sources, flags = split_source(row["price_source"])
    assert sources == [f"{GP}:{s}" for s in case.sources] and flags == set(case.flags)
    assert (row["batch_id"], row["custom_id"], row["batch_result"], row["completed"]) == (
        "msgbatch_1",
        "a",
        "succeeded",
        1,
    )
    errored = result_row(got[1], meta, Pricer(), "req_1")
    assert (errored["cost_usd"], errored["price_source"], errored["error"]) == (
        0,
        "not_billed:errored",
        "batch_errored",
    )
    assert errored["error_message"] == "Overloaded"


def test_batch_result_without_service_tier_is_still_batch_priced() -> None:
    case = next(c for c in BATCH_CASES if c.name == "opus55-batch-own-50pct")
    usage = {k: v for k, v in raw_usage(case).items() if k != "service_tier"}
    (res,) = read_file(result_line("x", case.model, usage), None, 3)
    row = result_row(res, BatchMeta("b", None, None, None, case.ts.timestamp()), Pricer(), None)
    assert_row(row, expected(case))
    assert json.loads(row["usage_json"])["service_tier"] == "batch"  # repricing reads the tier from here


def test_unreadable_lines_and_garbage_usage() -> None:
    got = read_file(b'not json\n{"custom_id": "g", "result": {"type": "succeeded", "message": {}}}\n\n', None, 5)
    row = result_row(got[0], BatchMeta("b", None, None, None, 1.8e9), Pricer(), None)
    assert (row["cost_usd"], row["error"]) == (None, "usage_unreadable")  # billed, unreadable: never $0


def test_rewrite_only_touches_results_url() -> None:
    url = b"https://api.anthropic.com/v1/messages/batches/msgbatch_1/results"
    body = b'{"id":"msgbatch_1", "results_url": "' + url + b'",  "x":1}'
    out = rewrite_results_url(body, "http://127.0.0.1:8080/api/proxy")
    assert out == body.replace(b"https://api.anthropic.com", b"http://127.0.0.1:8080/api/proxy")
    assert rewrite_results_url(b'{"results_url": null}', "http://h:1") == b'{"results_url": null}'


def test_recorder_exactly_once_and_creator(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    migrate(db)
    rows: list[dict[str, Any]] = []
    rec = BatchRecorder(db, Pricer(), rows.append)
    rec.start()
    try:
        obj = {
            "id": "msgbatch_9",
            "type": "message_batch",
            "processing_status": "in_progress",
            "created_at": "2026-06-01T12:00:00Z",
        }
        body = json.dumps({"requests": [{"custom_id": "c1", "params": {"model": "claude-opus-5-5"}}]}).encode()
        rec.created([obj], ("acme", "alice", "managed"), body, 1.78e9, "http://upstream")
        usage = {"input_tokens": 10, "output_tokens": 1}
        res = parse_result_line(result_line("c1", "claude-opus-5-5", usage))
        assert res is not None
        for _ in range(3):
            rec.result("msgbatch_9", res, ("other", "bob", "passthrough"), None)
        rec.fetch_ended("msgbatch_9", True)
        rec.wait_idle()
    finally:
        rec.close()
    assert len(rows) == 1 and rec.duplicates == 2
    assert (rows[0]["account"], rows[0]["user"], rows[0]["ts"]) == ("acme", "alice", "2026-06-01T12:00:00.000Z")
    conn = connect(db)
    try:
        stored = conn.execute(
            "SELECT account, request_count, models, results_recorded, metered_at FROM batches"
        ).fetchone()
    finally:
        conn.close()
    assert stored[:4] == ("acme", 1, '["claude-opus-5-5"]', 1) and stored[4] is not None
