"""HTTP/1.1 over a raw socket, for requests no HTTP library will send (raw bytes in headers, obs-fold, trailers)."""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"", *, length: bool = True
) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method.encode(), path), b"host: 127.0.0.1"]
    lines += [k + b": " + v for k, v in headers]
    if length:
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def send_raw(port: int, data: bytes, timeout: float = 20) -> RawResponse:
    """Send `data` on a new connection and read one response (or the connection closing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # The proxy may close the connection before reading everything: then read what it said, if anything.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        return read_response(s)


def read_response(s: socket.socket) -> RawResponse:
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return RawResponse(None, {}, buf)
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if status == 100:  # informational: the real answer follows
            rest = read_response_from(s, body)
            return rest
        n = int(headers.get("content-length", "0"))
        while len(body) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return RawResponse(status, headers, body)
    except ConnectionResetError:
        return RawResponse(None, {}, buf)


def read_response_from(s: socket.socket, already: bytes) -> RawResponse:
    class _Prefixed:
        def __init__(self) -> None:
            self.pending = already

        def recv(self, n: int) -> bytes:
            if self.pending:
                out, self.pending = self.pending, b""
                return out
            return s.recv(n)

    return read_response(_Prefixed())  # type: ignore[arg-type]
