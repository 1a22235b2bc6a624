"""More of the fake Anthropic API: the OpenAI-compatible `/v1/chat/completions` and Message Batches.

`tests/fake_upstream.py` hands a request here first (`handle`); what is not ours goes back to it.

Chat completions speak the OpenAI wire format as Anthropic's compatibility layer serves it: a JSON
`chat.completion`, or `data: {chunk}` lines ending with `data: [DONE]`, with a usage chunk (empty `choices`)
only when the request asks for `stream_options.include_usage`. Errors are OpenAI-shaped.

Batches: create stores the requests; the batch ends on the `FakeBatches.polls_to_end`-th retrieve after
create; results are JSONL generated lazily from the stored requests (never built whole), gzip-encoded when
the batch was created with `x-fake-encoding: gzip`. A request's result type follows its `custom_id` prefix
(`errored-`, `canceled-`, `expired-`, else succeeded); its usage is `params.fake_usage` if given, else the
scenario's, with `service_tier: batch`.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    if "prompt_tokens" in usage:
        return dict(usage)
    prompt = sum(usage.get(k, 0) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    out = usage.get("output_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def _chunk(cid: str, model: str, choices: list[dict[str, Any]], usage: Any, with_usage: bool) -> bytes:
    obj: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": choices,
    }
    if with_usage:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chat_chunks(model: str, usage: dict[str, Any], text: str, cid: str, include_usage: bool) -> list[bytes]:
    out = [
        _chunk(
            cid,
            model,
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            None,
            include_usage,
        )
    ]
    for i in range(0, len(text), 8):
        delta = {"index": 0, "delta": {"content": text[i : i + 8]}, "finish_reason": None}
        out.append(_chunk(cid, model, [delta], None, include_usage))
    out.append(_chunk(cid, model, [{"index": 0, "delta": {}, "finish_reason": "stop"}], None, include_usage))
    if include_usage:
        out.append(_chunk(cid, model, [], openai_usage(usage), True))
    out.append(b"data: [DONE]\n\n")
    return out


def _write_chunked(
    handler: Any,
    parts: Iterator[bytes],
    encoding: str | None,
    sent: bytearray,
    cut_after: int | None = None,
    hold_open: float = 0.0,
) -> None:
    comp = zlib.compressobj(wbits=31) if encoding == "gzip" else None
    try:
        for i, piece in enumerate(parts):
            if cut_after is not None and i >= cut_after:
                handler.wfile.flush()
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            wire = comp.compress(piece) + comp.flush(zlib.Z_SYNC_FLUSH) if comp else piece
            if wire:
                sent += wire
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(wire), wire))
        if hold_open:
            handler.wfile.flush()
            time.sleep(hold_open)
        tail = comp.flush() if comp else b""
        if tail:
            sent += tail
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    except OSError:
        handler.close_connection = True


def _start_chunked(handler: Any, ctype: str, headers: dict[str, str], encoding: str | None) -> None:
    handler.send_response(200)
    handler.send_header("content-type", ctype)
    handler.send_header("transfer-encoding", "chunked")
    if encoding:
        handler.send_header("content-encoding", encoding)
    for k, v in headers.items():
        handler.send_header(k, v)
    handler.end_headers()


def chat_completions(handler: Any, sc: Any, req: dict[str, Any], model: str, rid: str, headers: dict) -> None:
    cid = "chatcmpl_" + rid.removeprefix("req_")
    if sc.status >= 400:
        err = {
            "error": {
                "message": sc.error_message,
                "type": ERROR_TYPES.get(sc.status, "api_error"),
                "param": None,
                "code": None,
            }
        }
        return handler._send(sc.status, json.dumps(err).encode(), "application/json", headers, None, rid)
    stream = sc.stream if sc.stream is not None else req.get("stream") is True
    if not stream:
        body = (
            sc.body
            or json.dumps(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": sc.text}, "finish_reason": "stop"}
                    ],
                    "usage": openai_usage(sc.usage),
                }
            ).encode()
        )
        return handler._send(200, body, "application/json", headers, sc.encoding, rid)
    opts = req.get("stream_options")
    include = isinstance(opts, dict) and opts.get("include_usage") is True
    _start_chunked(handler, "text/event-stream", headers, sc.encoding)
    sent = handler.fake.sent[rid] = bytearray()
    pieces = [sc.raw_sse] if sc.raw_sse is not None else chat_chunks(model, sc.usage, sc.text, cid, include)
    _write_chunked(handler, iter(pieces), sc.encoding, sent, sc.cut_after, sc.hold_open)


# --- Message Batches ----------------------------------------------------------------------------------


@dataclass
class FakeBatch:
    id: str
    requests: list[tuple[str, str, dict[str, Any] | None]]  # custom_id, model, fake usage
    encoding: str | None
    created_at: str
    polls: int = 0
    ended: bool = False
    cut_after: int | None = None  # results: close the connection after this many lines (once)


@dataclass
class FakeBatches:
    polls_to_end: int = 1
    batches: dict[str, FakeBatch] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    results_fetches: int = 0
    text: str | None = None  # the text of every succeeded result (large, to test memory)


def batch_object(b: FakeBatch, base: str) -> dict[str, Any]:
    counts = {
        "processing": 0 if b.ended else len(b.requests),
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    if b.ended:
        for cid, _, _ in b.requests:
            counts[result_type(cid)] += 1
    return {
        "id": b.id,
        "type": "message_batch",
        "processing_status": "ended" if b.ended else "in_progress",
        "request_counts": counts,
        "ended_at": b.created_at if b.ended else None,
        "created_at": b.created_at,
        "expires_at": b.created_at,
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": f"{base}/v1/messages/batches/{b.id}/results" if b.ended else None,
    }


def result_type(custom_id: str) -> str:
    for kind in ("errored", "canceled", "expired"):
        if custom_id.startswith(kind + "-"):
            return kind
    return "succeeded"


def result_line(b: FakeBatch, i: int, custom_id: str, model: str, usage: dict[str, Any], text: str) -> bytes:
    kind = result_type(custom_id)
    result: dict[str, Any] = {"type": kind}
    if kind == "succeeded":
        result["message"] = {
            "id": f"msg_{b.id}_{i}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {**usage, "service_tier": "batch"},
        }
    elif kind == "errored":
        result["error"] = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad request"}}
    return json.dumps({"custom_id": custom_id, "result": result}, separators=(",", ":")).encode() + b"\n"


_BATCH_RE = re.compile(r"^/v1/messages/batches(?:/([^/]+))?(/results|/cancel)?$")


def batches(handler: Any, sc: Any, req: dict[str, Any], path: str, rid: str, headers: dict) -> None:
    fake = handler.fake
    state: FakeBatches = fake.batches
    base = fake.url
    m = _BATCH_RE.match(path)
    assert m is not None
    bid, action = m.group(1), m.group(2)
    if sc.status >= 400:
        return None  # the generic Anthropic-shaped error
    if bid is None and handler.command == "POST":
        reqs = []
        for r in req.get("requests") or []:
            params = r.get("params") or {}
            reqs.append((r["custom_id"], params.get("model", "claude-sonnet-5-5"), params.get("fake_usage")))
        b = FakeBatch(
            id="msgbatch_" + rid.removeprefix("req_fake_"),
            requests=reqs,
            encoding=handler.headers.get("x-fake-encoding"),
            created_at="2026-12-01T12:00:00Z",
        )
        cut = handler.headers.get("x-fake-cut-results")
        b.cut_after = int(cut) if cut else None
        with state.lock:
            state.batches[b.id] = b
        return _json(handler, batch_object(b, base), headers, rid)
    if bid is None:
        with state.lock:
            data = [batch_object(b, base) for b in state.batches.values()]
        return _json(handler, {"data": data, "has_more": False, "first_id": None, "last_id": None}, headers, rid)
    b = state.batches.get(bid)
    if b is None:
        err = {"type": "error", "error": {"type": "not_found_error", "message": "no such batch"}}
        return handler._send(404, json.dumps(err).encode(), "application/json", headers, None, rid)
    if action is None:
        with state.lock:
            b.polls += 1
            b.ended = b.ended or b.polls >= state.polls_to_end
        return _json(handler, batch_object(b, base), headers, rid)
    if action == "/cancel":
        return _json(handler, batch_object(b, base), headers, rid)
    with state.lock:
        state.results_fetches += 1
        cut, b.cut_after = b.cut_after, None
    usage = dict(sc.usage)
    text = state.text or "Batch answer"

    def lines() -> Iterator[bytes]:
        for i, (cid, model, u) in enumerate(b.requests):
            yield result_line(b, i, cid, model, u if u is not None else usage, text)

    _start_chunked(handler, "application/binary", headers, b.encoding)
    _write_chunked(handler, lines(), b.encoding, fake.sent.setdefault(rid, bytearray()), cut)
    return None


def _json(handler: Any, obj: dict[str, Any], headers: dict[str, str], rid: str) -> None:
    handler._send(200, json.dumps(obj).encode(), "application/json", headers, None, rid)


def handle(handler: Any, sc: Any, req: dict[str, Any], model: str, path: str, rid: str, headers: dict) -> bool:
    """Answer the request if it is one of ours; False leaves it to fake_upstream."""
    if path == "/v1/chat/completions":
        chat_completions(handler, sc, req, model, rid, headers)
        return True
    if _BATCH_RE.match(path) and sc.status < 400:
        batches(handler, sc, req, path, rid, headers)
        return True
    return False
