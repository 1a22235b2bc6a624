"""A fake Anthropic API on a real loopback socket, speaking the Messages API's wire format.

Used by the end-to-end tests and the benchmark. Behaviour per request is chosen by the `x-fake-scenario`
header (a name registered with `FakeUpstream.add`), else a default: a JSON message, or an SSE stream when the
request body has `"stream": true`. Every request received and every response body sent is recorded, keyed by
the `request-id` the fake puts on its response.

Run standalone (for the benchmark or by hand): python tests/fake_upstream.py --port 9999
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:
    from tests import fake_endpoints
except ImportError:  # run as a script: python tests/fake_upstream.py
    import fake_endpoints  # type: ignore[no-redef]

DEFAULT_USAGE: dict[str, Any] = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "output_tokens": 12,
}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Scenario:
    status: int = 200
    usage: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_USAGE))
    model: str | None = None  # None: echo the request's model
    text: str = "Hello! How can I help?"
    stream: bool | None = None  # None: as the request asks
    headers: dict[str, str] = field(default_factory=dict)
    error_message: str = "fake error"
    body: bytes | None = None  # send exactly these bytes (JSON responses)
    content_type: str | None = None
    encoding: str | None = None  # gzip | br | zstd
    events: list[tuple[str, Any]] | None = None  # SSE: replace the generated events (data: dict or raw str)
    raw_sse: bytes | None = None  # SSE: send exactly these bytes
    chunk_size: int | None = None  # SSE: re-split the bytes into chunks of this size
    event_delay: float = 0.0  # SSE: seconds between events
    delta_count: int = 3  # SSE: number of text deltas
    cut_after: int | None = None  # SSE: close the connection abruptly after this many events
    error_after: int | None = None  # SSE: send `event: error` (overloaded) after this many events
    delay: float = 0.0  # seconds before the response headers
    repeat_usage_in_delta: bool = True  # message_delta repeats input/cache/server-tool fields (cumulative)
    reset_after: int | None = None  # SSE: reset the connection (TCP RST) after this many events
    hold_open: float = 0.0  # SSE: seconds to keep the stream open after its last event, before ending it
    gate: threading.Event | None = None  # wait (up to 30 s) for it: SSE after the first event, JSON before answering


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    at: float = field(default_factory=time.time)  # when it arrived (epoch seconds)


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen() backlog: it is used in the constructor, so set it on the class


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.scenarios: dict[str, Scenario] = {}
        self.received: dict[str, Received] = {}
        self.sent: dict[str, bytes | bytearray] = {}
        self.order: list[str] = []
        self.batches = fake_endpoints.FakeBatches()  # Message Batches state (tests/fake_endpoints.py)
        self.admin: Any = None  # tests/fake_admin.py attaches Anthropic's Admin API (/v1/organizations/...) here
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = _Server((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def add(self, name: str, scenario: Scenario) -> str:
        self.scenarios[name] = scenario
        return name

    def start(self) -> FakeUpstream:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-upstream")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_id(self) -> str:
        return f"req_fake_{next(self._ids):08d}"

    def record(self, rid: str, received: Received) -> None:
        with self._lock:
            self.received[rid] = received
            self.order.append(rid)


def message_json(model: str, usage: dict[str, Any], text: str, msg_id: str) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def sse_events(model: str, usage: dict[str, Any], text: str, msg_id: str, sc: Scenario) -> list[tuple[str, Any]]:
    start_usage = dict(usage)
    start_usage["output_tokens"] = 1  # a placeholder, as the real API sends
    start_usage.pop("server_tool_use", None)
    start_usage.pop("iterations", None)
    msg = message_json(model, start_usage, "", msg_id)
    msg["content"] = []
    msg["stop_reason"] = None
    events: list[tuple[str, Any]] = [
        ("message_start", {"type": "message_start", "message": msg}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]
    n = max(1, sc.delta_count)
    step = max(1, len(text) // n + (1 if len(text) % n else 0))
    for i in range(0, max(len(text), 1), step):
        events.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text[i : i + step]},
                },
            )
        )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if sc.repeat_usage_in_delta:
        delta_usage = {k: v for k, v in usage.items() if k not in ("service_tier", "inference_geo", "speed")}
    else:
        delta_usage = {"output_tokens": usage.get("output_tokens", 0)}
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": delta_usage,
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def encode_event(name: str, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {payload}\n\n".encode()


class _Compressor:
    def __init__(self, encoding: str | None) -> None:
        self.encoding = encoding
        if encoding == "gzip":
            self._c: Any = zlib.compressobj(wbits=31)
        elif encoding == "br":
            import brotli

            self._c = brotli.Compressor()
        elif encoding == "zstd":
            self._c = _zstd_compressor()
        else:
            self._c = None

    def chunk(self, data: bytes) -> bytes:
        if self._c is None:
            return data
        if self.encoding == "gzip":
            return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)
        if self.encoding == "br":
            return self._c.process(data) + self._c.flush()
        return self._c.compress(data) + self._c.flush(_ZSTD_FLUSH_BLOCK)

    def end(self) -> bytes:
        if self._c is None:
            return b""
        if self.encoding == "gzip":
            return self._c.flush()
        if self.encoding == "br":
            return self._c.finish()
        return self._c.flush()


try:  # `zstandard` if installed, else the zstd module mitmproxy itself uses (3.14 stdlib API)
    import zstandard

    _ZSTD_FLUSH_BLOCK = zstandard.COMPRESSOBJ_FLUSH_BLOCK

    def _zstd_compressor() -> Any:
        return zstandard.ZstdCompressor().compressobj()

except ImportError:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]

    _ZSTD_FLUSH_BLOCK = zstd.ZstdCompressor.FLUSH_BLOCK

    def _zstd_compressor() -> Any:
        c = zstd.ZstdCompressor()
        return type("C", (), {"compress": lambda _, d: c.compress(d), "flush": lambda _, m=c.FLUSH_FRAME: c.flush(m)})()


def compress_whole(data: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    c = _Compressor(encoding)
    return c.chunk(data) + c.end()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms Nagle/delayed-ACK stall
    fake: FakeUpstream

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        rid = self.fake.next_id()
        self.fake.record(
            rid,
            Received(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                raw_headers=list(self.headers.items()),
                body=body,
            ),
        )
        if self.fake.admin is not None and self.path.startswith("/v1/organizations/"):
            return self.fake.admin.handle(self, rid)
        try:
            req = json.loads(body) if body else {}
            if not isinstance(req, dict):
                req = {}
        except ValueError:
            req = {}
        sc = self.fake.scenarios.get(self.headers.get("x-fake-scenario", ""), Scenario())
        if self.headers.get("x-fake-usage"):  # "input,output": per-request token counts (load tests)
            tin, _, tout = self.headers["x-fake-usage"].partition(",")
            sc = replace(sc, usage={**sc.usage, "input_tokens": int(tin), "output_tokens": int(tout)})
        if sc.delay:
            time.sleep(sc.delay)
        if sc.gate is not None and not (sc.stream if sc.stream is not None else req.get("stream") is True):
            sc.gate.wait(30)
        model = sc.model or (req.get("model") if isinstance(req.get("model"), str) else None) or "claude-sonnet-5-5"
        path = self.path.partition("?")[0]
        msg_id = "msg_" + rid.removeprefix("req_")
        common = {"request-id": rid, "anthropic-organization-id": "org-fake", **sc.headers}
        if fake_endpoints.handle(self, sc, req, model, path, rid, common):  # chat completions, batches
            return

        if sc.status >= 400:
            payload = (
                sc.body
                or json.dumps(
                    {
                        "type": "error",
                        "error": {
                            "type": ERROR_TYPES.get(sc.status, "api_error"),
                            "message": sc.error_message,
                        },
                        "request_id": rid,
                    }
                ).encode()
            )
            return self._send(sc.status, payload, "application/json", common, sc.encoding, rid)
        if path == "/v1/messages/count_tokens":
            return self._send(200, json.dumps({"input_tokens": 42}).encode(), "application/json", common, None, rid)
        if path.startswith("/v1/models"):
            data = {"data": [{"type": "model", "id": "claude-sonnet-5-5"}], "has_more": False}
            return self._send(200, json.dumps(data).encode(), "application/json", common, None, rid)
        stream = sc.stream if sc.stream is not None else req.get("stream") is True
        if not stream:
            payload = sc.body or json.dumps(message_json(model, sc.usage, sc.text, msg_id)).encode()
            ctype = sc.content_type if sc.content_type is not None else "application/json"  # "": no header
            return self._send(200, payload, ctype, common, sc.encoding, rid)
        self._stream(sc, model, msg_id, common, rid)

    def _send(
        self, status: int, payload: bytes, ctype: str, headers: dict[str, str], encoding: str | None, rid: str
    ) -> None:
        wire = compress_whole(payload, encoding) if encoding else payload
        self.send_response(status)
        if ctype:
            self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(wire)))
        if encoding:
            self.send_header("content-encoding", encoding)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.fake.sent[rid] = wire  # before the write: a client that has read it all finds it recorded
        self.wfile.write(wire)

    def _stream(self, sc: Scenario, model: str, msg_id: str, headers: dict[str, str], rid: str) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        if sc.encoding:
            self.send_header("content-encoding", sc.encoding)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        comp = _Compressor(sc.encoding)
        # Recorded before each write, so a client that has read the whole stream finds all of it here.
        sent = self.fake.sent[rid] = bytearray()

        def pieces() -> Iterator[bytes]:
            if sc.raw_sse is not None:
                yield sc.raw_sse
                return
            events = sc.events if sc.events is not None else sse_events(model, sc.usage, sc.text, msg_id, sc)
            for i, (name, data) in enumerate(events):
                if sc.cut_after is not None and i >= sc.cut_after:
                    raise _Cut
                if sc.reset_after is not None and i >= sc.reset_after:
                    raise _Reset
                if sc.error_after is not None and i == sc.error_after:
                    yield encode_event(
                        "error",
                        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                    )
                    return
                if i and sc.event_delay:
                    time.sleep(sc.event_delay)
                if i == 1 and sc.gate is not None:
                    sc.gate.wait(30)
                yield encode_event(name, data)

        try:
            for piece in pieces():
                wire = comp.chunk(piece)
                parts = (
                    [wire]
                    if not sc.chunk_size
                    else [wire[i : i + sc.chunk_size] for i in range(0, len(wire), sc.chunk_size)]
                )
                for part in parts:
                    if part:
                        sent += part
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            if sc.hold_open:
                time.sleep(sc.hold_open)
            tail = comp.end()
            if tail:
                sent += tail
                self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except _Cut:
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        except _Reset:
            self.wfile.flush()
            self.close_connection = True
            # SO_LINGER with a zero timeout: close() sends a TCP RST instead of a FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Cut(Exception):
    pass


class _Reset(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description="A fake Anthropic API for tests and benchmarks (loopback only).")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    run_until_interrupted(FakeUpstream(port=args.port).start())


def run_until_interrupted(fake: FakeUpstream) -> None:
    """Standalone use (tests' subprocess fake, the benchmark): announce the URL and serve until stopped."""
    print(f"fake upstream on {fake.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
