"""The `requests` row has one definition (schema.py): every key the code writes is a column, and every column is
written somewhere or deliberately left NULL. A misspelled key would otherwise be stored as NULL, silently."""

from __future__ import annotations

import ast
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow, tutils

from metrion_addon import accountant as accountant_module
from metrion_addon import schema, store
from metrion_addon.batches import BatchMeta, BatchResult, result_row
from metrion_addon.pgstore import pg_type
from metrion_addon.pricing import Priced, Pricer
from metrion_addon.record import Pending, finish
from metrion_addon.usage import JsonTap, StreamTap
from tests.conftest import MANAGED_TOKEN, configured_addon

PACKAGE = Path(schema.__file__).parent
TS = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
LEFT_NULL = {"id": "assigned by the database"}  # the only column the code never writes
USAGE = {
    "input_tokens": 10,
    "output_tokens": 5,
    "cache_creation_input_tokens": 3,
    "cache_read_input_tokens": 2,
    "cache_creation": {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 2},
    "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 1},
    "service_tier": "standard",
    "inference_geo": "us",
    "speed": "fast",
    "iterations": [{"input_tokens": 10, "output_tokens": 5}],
}
SSE = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-5-5",'
    b'"usage":' + json.dumps(USAGE).encode() + b"}}\n\n"
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":5}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def finished(**pending: Any) -> dict[str, Any]:
    """record.finish's row for a request, in its branches: streamed or not, with or without usage, failed."""
    body: bytes | None = pending.pop("body", None)
    status = pending.pop("status", 200)
    error, error_message = pending.pop("error", None), pending.pop("error_message", None)
    p = Pending(**{"started": TS, "method": "POST", "path": "/v1/messages", "model": "claude-sonnet-5-5"} | pending)
    if p.streamed:
        p.tap = StreamTap(p.facts, None)
        p.tap(SSE)
        p.tap(b"")
    elif body is not None:
        p.tap = JsonTap(p.facts, None)
        p.tap(body)
        p.tap(b"")
    row = finish(p, pricer=Pricer(), status=status, request_id="req_1", headers_at=TS, ended_at=TS + 1,
                 error=error, error_message=error_message)  # fmt: skip
    return dict(row)


def finish_rows() -> list[dict[str, Any]]:
    message = json.dumps({"id": "msg_2", "model": "claude-sonnet-5-5", "stop_reason": "end_turn", "usage": USAGE})
    return [
        finished(
            streamed=True,
            account="acme",
            user="alice",
            mode="managed",
            client="sdk",
            session_id="s1",
            retry_count=1,
            request_key="k1",
        ),  # fmt: skip
        finished(body=message.encode()),
        finished(body=b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}', status=529),
        finished(local_error="authentication_error", local_message="no", status=401),
        finished(status=None, error="client_disconnect", error_message="Client disconnected."),
        finished(path="/v1/messages/count_tokens", counted_tokens=12, body=b'{"input_tokens": 12}'),
    ]


def batch_rows() -> list[dict[str, Any]]:
    meta = BatchMeta("msgbatch_1", "acme", "alice", "managed", TS)
    results = [
        BatchResult("a", "succeeded", "claude-sonnet-5-5", USAGE, "msg_1", "end_turn"),
        BatchResult("b", "succeeded", "claude-sonnet-5-5", None, "msg_2"),
        BatchResult("c", "errored", error_type="invalid_request_error", error_message="bad"),
        BatchResult("d", "expired"),
    ]
    return [dict(result_row(r, meta, Pricer(), "req_b")) for r in results]


def fallback_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """accountant.account's row when accounting itself fails (a bug in finish): what is certain, nothing else."""

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug in accounting")

    monkeypatch.setattr(accountant_module, "finish", broken)
    with configured_addon(tmp_path, monkeypatch) as m:
        assert m.rt is not None
        put, seen = m.rt.store.put, []
        monkeypatch.setattr(m.rt.store, "put", lambda row: (seen.append(dict(row)), put(row)))
        f = tflow.tflow()
        f.request.path = "/v1/messages"
        f.request.content = b'{"model": "claude-sonnet-5-5", "max_tokens": 5}'
        f.request.headers.clear()
        f.request.headers["content-type"] = "application/json"
        f.request.headers["x-api-key"] = MANAGED_TOKEN
        m.requestheaders(f)
        m.request(f)
        f.response = tutils.tresp()
        m.responseheaders(f)
        m.response(f)
    assert [r["error"] for r in seen] == ["metrion_internal_error"]
    return seen


# --- statically: every key any module writes into a row ---------------------------------------------------


def static_row_keys() -> dict[str, set[str]]:
    """Keys written to a variable named `row` anywhere in the package: dict literals assigned to it,
    `row[KEY] = ...`, `row.update(KEY=...)` and `row.setdefault(KEY, ...)` (module -> keys)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        keys: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "row" for t in targets):
                    keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id == "row" and isinstance(node.slice, ast.Constant):
                    keys.add(node.slice.value)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "row" and node.func.attr in ("update", "setdefault"):
                    keys |= {k.arg for k in node.keywords if k.arg}
                    if node.func.attr == "setdefault" and isinstance(node.args[0], ast.Constant):
                        keys.add(node.args[0].value)
        if keys:
            found[path.relative_to(PACKAGE).as_posix()] = keys
    return found


def test_every_key_written_anywhere_is_a_column() -> None:
    found = static_row_keys()
    assert {"record.py", "batches.py", "accountant.py", "admission.py", "store.py"} <= set(found)  # the scan sees them
    wrong = {module: sorted(keys - set(schema.COLUMNS)) for module, keys in found.items() if keys - set(schema.COLUMNS)}
    assert wrong == {}


def test_every_key_of_the_rows_the_code_builds_is_a_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = {"finish": finish_rows(), "batch": batch_rows(), "fallback": fallback_rows(tmp_path, monkeypatch)}
    for source, rows in built.items():
        for row in rows:
            assert set(row) <= set(schema.COLUMNS), (source, sorted(set(row) - set(schema.COLUMNS)))


def test_every_column_is_written_somewhere_or_deliberately_left_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = set().union(*static_row_keys().values())
    for row in [*finish_rows(), *batch_rows(), *fallback_rows(tmp_path, monkeypatch)]:
        written |= {k for k, v in row.items() if v is not None}
    assert set(schema.COLUMNS) - written == set(LEFT_NULL)


def test_a_misspelled_column_name_fails_at_import_time() -> None:
    assert schema.names("ts", "cost_usd") == ("ts", "cost_usd")
    with pytest.raises(KeyError, match="cost_usdd"):
        schema.names("ts", "cost_usdd")


def test_the_cost_columns_are_pricings() -> None:
    assert set(Priced(None, "unknown").columns()) == set(schema.COST_COLUMNS)
    assert schema.COST_COLUMNS[0] == "cost_usd" and schema.COST_COLUMNS[-1] == "price_source"


def test_stores_take_their_columns_from_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    store.migrate(db)
    conn = sqlite3.connect(db)
    try:
        table = {r[1]: r[2] for r in conn.execute("PRAGMA table_info(requests)")}
    finally:
        conn.close()
    assert list(table) == list(schema.COLUMNS)
    sqlite_type = {int: "INTEGER", str: "TEXT", float: "REAL"}
    assert table == {c: sqlite_type[t] for c, t in schema.COLUMNS.items()}
    assert store.INSERT_COLUMNS == schema.INSERT_COLUMNS == tuple(c for c in schema.COLUMNS if c != "id")
    assert {c: pg_type(c, t) for c, t in schema.COLUMNS.items()}["cost_usd"] == "numeric"


def test_one_timestamp_format() -> None:
    moment = datetime(2026, 11, 28, 14, 0, 0, 123999, tzinfo=UTC)
    assert schema.iso_ms(moment) == schema.iso_ms(moment.timestamp()) == "2026-11-28T14:00:00.123Z"
