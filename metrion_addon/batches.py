"""Message Batches (`/v1/messages/batches`): paths, the `results_url` rewrite, and reading results. Pure: no
mitmproxy, no I/O, no clock.

A batch is billed through its results, not its create call: the results file (JSONL, one line per request,
possibly large and compressed) is read line by line as it streams to the client, and each line becomes one
row, priced at batch rates. Only `succeeded` results are billed: Anthropic's batch guide describes `errored`,
`canceled` and `expired` results as requests for which no message was created (errored: "You will not be
billed for these requests"; canceled and expired requests were never sent to the model) and they carry no
usage. They are recorded at $0 so that the batch's outcome is complete in the database.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from metrion_addon.pricing import ZERO, Priced, Pricer
from metrion_addon.record import MODEL_MAX, usage_columns
from metrion_addon.schema import RequestRow, iso_ms
from metrion_addon.sse import incremental_decoder
from metrion_addon.text import clean_text
from metrion_addon.usage import usage_from_raw

BATCHES_PATH = "/v1/messages/batches"
_ID = r"[A-Za-z0-9_\-]{1,200}"
_RESULTS_RE = re.compile(rf"^/v1/messages/batches/({_ID})/results$")
_OBJECT_RE = re.compile(rf"^/v1/messages/batches(?:/({_ID})(?:/cancel)?)?$")
# `"results_url": "https://host[:port]/path"`: only the scheme and authority are replaced.
_RESULTS_URL_RE = re.compile(rb'("results_url"\s*:\s*")https?://[^/"\\\s]+(/[^"\\\s]*")')
RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")
# Batch result rows get a row_id derived from batch id + custom_id (UUIDv5), not a fresh UUIDv7: the same result
# read twice, by any proxy, is the same row, and PostgreSQL's ON CONFLICT (row_id) keeps it once as well.
_ROW_ID_NS = uuid.UUID("6d657472-696f-6e2d-6261-746368000000")
MAX_LINE = 64 * 1024 * 1024  # a result line longer than this is not read (the bytes still flow)


def results_batch_id(method: str, path: str) -> str | None:
    """The batch id of a results download (`GET /v1/messages/batches/{id}/results`), else None."""
    m = _RESULTS_RE.match(path) if method == "GET" else None
    return m.group(1) if m else None


def is_batch_object_call(method: str, path: str) -> bool:
    """Create, retrieve, list and cancel answer with batch objects (which carry `results_url`)."""
    return method in ("GET", "POST") and _OBJECT_RE.match(path) is not None


def rewrite_results_url(body: bytes, base: str) -> bytes:
    """Point every `results_url` in a batch object (or a list of them) at the proxy: `base` is the proxy's own
    scheme, authority and path prefix as the client reached it. The one change the proxy makes to a body;
    nothing else in it is touched (no re-serialisation)."""
    prefix = base.rstrip("/").encode()
    return _RESULTS_URL_RE.sub(lambda m: m.group(1) + prefix + m.group(2), body)


def proxy_base(tls: bool, sockname: Any, path_prefix: str) -> str:
    """The proxy's own base URL as the client reached it: the address it connected to, and the path prefix."""
    host, port = sockname[0], sockname[1]
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}{path_prefix}"


def used_prefix(client_path: str, path_prefix: str) -> str:
    """The configured path prefix if the client's request carried it, else '' (the prefix is optional)."""
    p = client_path.partition("?")[0]
    return path_prefix if path_prefix and (p == path_prefix or p.startswith(path_prefix + "/")) else ""


def batch_objects(body: bytes) -> list[dict[str, Any]]:
    """The batch objects in a create/retrieve/cancel answer (one) or a list answer (`data`)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(obj, dict):
        return []
    items = obj.get("data") if obj.get("type") != "message_batch" else [obj]
    return [o for o in items or () if isinstance(o, dict) and isinstance(o.get("id"), str)]


def request_summary(body: bytes) -> tuple[int | None, list[str]]:
    """(number of requests, models asked for) of a batch create body."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None, []
    reqs = obj.get("requests") if isinstance(obj, dict) else None
    if not isinstance(reqs, list):
        return None, []
    models: set[str] = set()
    for r in reqs:
        params = r.get("params") if isinstance(r, dict) else None
        model = params.get("model") if isinstance(params, dict) else None
        if isinstance(model, str):
            models.add(clean_text(model, MODEL_MAX) or "")
    return len(reqs), sorted(m for m in models if m)


@dataclass(frozen=True)
class BatchResult:
    """One line of a results file."""

    custom_id: str
    kind: str  # succeeded | errored | canceled | expired | (anything else the API sends, kept)
    model: str | None = None
    raw_usage: dict[str, Any] | None = None
    message_id: str | None = None
    stop_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None


def _s(v: Any, n: int = 200) -> str | None:
    return clean_text(v, n) if isinstance(v, str) and v else None


def parse_result_line(line: bytes) -> BatchResult | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
        return None
    result = obj.get("result")
    result = result if isinstance(result, dict) else {}
    kind = _s(result.get("type"), 50) or "unknown"
    msg = result.get("message")
    msg = msg if isinstance(msg, dict) else {}
    err = result.get("error")
    inner = err.get("error") if isinstance(err, dict) else None  # {"type": "error", "error": {...}}
    inner = inner if isinstance(inner, dict) else err if isinstance(err, dict) else {}
    usage = msg.get("usage")
    return BatchResult(
        custom_id=clean_text(obj["custom_id"], 200) or "",
        kind=kind,
        model=_s(msg.get("model"), MODEL_MAX),
        raw_usage=usage if isinstance(usage, dict) else None,
        message_id=_s(msg.get("id")),
        stop_reason=_s(msg.get("stop_reason")),
        error_type=_s(inner.get("type"), 100),
        error_message=_s(inner.get("message"), 500),
    )


class JsonlTap:
    """The `flow.response.stream` callable for a results download: every chunk passes through unchanged, at
    once; complete lines are parsed on the side and handed to `on_result`, so memory holds one line at most.

    Never raises (mitmproxy would drop the chunk). `complete` is set at a clean end of the body.
    """

    __slots__ = ("on_result", "_decode", "_buf", "failed", "lines", "bad_lines", "complete", "first_byte_at")

    def __init__(self, content_encoding: str | None, on_result: Any) -> None:
        self.on_result = on_result
        self._buf = bytearray()
        self.failed: str | None = None
        self.lines = 0
        self.bad_lines = 0
        self.complete = False
        self.first_byte_at: float | None = None
        try:
            self._decode = incremental_decoder(content_encoding)
        except Exception as e:  # noqa: BLE001 - the bytes must flow whatever happens here
            self._decode = None
            self.failed = f"{e.__class__.__name__}: {e}"[:200]
        if self._decode is None and self.failed is None:
            self.failed = f"unsupported content-encoding {content_encoding!r}"

    def __call__(self, chunk: bytes) -> bytes:
        if chunk and self.first_byte_at is None:
            self.first_byte_at = time.time()
        if self.failed is None:
            try:
                self._read(chunk)
            except Exception as e:  # noqa: BLE001 - reading must never break the download
                self.failed = f"{e.__class__.__name__}: {e}"[:200]
        return chunk

    def _read(self, chunk: bytes) -> None:
        assert self._decode is not None
        data = self._decode(chunk) if chunk else self._decode(b"")
        if data:
            start = 0
            while (nl := data.find(b"\n", start)) >= 0:
                self._line(bytes(self._buf) + data[start:nl] if self._buf else data[start:nl])
                self._buf.clear()
                start = nl + 1
            self._buf += data[start:]
            if len(self._buf) > MAX_LINE:
                self.failed = f"a result line over {MAX_LINE} bytes: not read"
                self._buf.clear()
        if not chunk:  # clean end: a last line without a newline still counts
            if self._buf:
                self._line(bytes(self._buf))
                self._buf.clear()
            self.complete = True

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        res = parse_result_line(line)
        if res is None:
            self.bad_lines += 1
            return
        self.lines += 1
        self.on_result(res)


@dataclass(frozen=True)
class BatchMeta:
    """Who created a batch, and when: its result rows are theirs."""

    batch_id: str
    account: str | None
    user: str | None
    mode: str | None
    ts: float  # when the batch's work is counted: its end if known, else its creation, else the fetch


def with_batch_tier(raw: dict[str, Any]) -> dict[str, Any]:
    """A result's usage, with `service_tier: batch` when the line leaves it out: a batch result is batch-priced
    whatever it says, and repricing reads the tier from the stored usage."""
    return raw if raw.get("service_tier") == "batch" else {**raw, "service_tier": "batch"}


def result_row(res: BatchResult, meta: BatchMeta, pricer: Pricer, request_id: str | None) -> RequestRow:
    """The row of one batch result."""
    billed = res.kind == "succeeded"
    raw = with_batch_tier(res.raw_usage) if billed and res.raw_usage is not None else None
    usage = usage_from_raw(raw) if raw is not None else None
    when = datetime.fromtimestamp(meta.ts, UTC)
    if not billed:
        priced = Priced(ZERO, f"not_billed:{res.kind}")  # no message was created
        error = f"batch_{res.kind}"
    elif usage is None:
        priced, error = Priced(None, "usage_unreadable"), "usage_unreadable"
    else:
        priced = pricer.price(res.model, usage, when)
        error = None if usage.plausible else "usage_unreadable"
    row: RequestRow = {
        "ts": iso_ms(meta.ts),
        "account": meta.account,
        "user": meta.user,
        "mode": meta.mode,
        "method": "POST",
        "path": "/v1/messages",  # each result is one Messages request, run by the batch
        "model": res.model,
        "response_model": res.model,
        "stream": 0,
        "status": 200 if billed else None,
        "request_id": clean_text(request_id),
        "message_id": res.message_id,
        "completed": int(billed and error is None),
        "error": error,
        "error_message": res.error_message if res.kind == "errored" else None,
        "stop_reason": res.stop_reason,
        "client": "metrion:batch-results",
        "usage_json": json.dumps(raw, separators=(",", ":")) if raw is not None else None,
        "row_id": str(uuid.uuid5(_ROW_ID_NS, f"{meta.batch_id}\x00{res.custom_id}")),
        "batch_id": meta.batch_id,
        "custom_id": res.custom_id,
        "batch_result": res.kind,
        **priced.columns(),
    }
    if usage is not None and usage.plausible:
        row.update(usage_columns(usage))
    return row


def parse_time(value: Any) -> float | None:
    """An RFC 3339 time from a batch object -> epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
