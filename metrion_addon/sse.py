"""Incremental Server-Sent Events parsing and content decoding, for bytes that arrive in arbitrary chunks.

The parser follows the WHATWG event-stream rules that matter here: lines end in CRLF, LF or CR (a CR at the
end of a chunk may be half of a CRLF split across chunks), lines starting with ':' are comments, `data:` with
or without the space, several data lines join with '\n', a blank line dispatches. Lines are split as bytes
and decoded only when whole, so a chunk boundary inside a UTF-8 character is harmless.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

_EOL = re.compile(rb"\r\n|\r|\n")
MAX_LINE = 32 * 1024 * 1024  # a line longer than this is not an SSE stream we can follow


class SSEParser:
    """Feed bytes, get back complete events as (event_type, data_bytes)."""

    __slots__ = ("_buf", "_event", "_data", "_skip_lf", "broken")

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[bytes] = []
        self._skip_lf = False
        self.broken = False

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        if self.broken or not chunk:
            return []
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        if self._skip_lf:
            self._skip_lf = False
            if buf[:1] == b"\n":
                start = 1
        events: list[tuple[str, bytes]] = []
        n = len(buf)
        for m in _EOL.finditer(buf, start):
            line = buf[start : m.start()]
            start = m.end()
            if start == n and m.group() == b"\r":
                self._skip_lf = True  # the LF of a CRLF may open the next chunk
            self._line(line, events)
        self._buf = buf[start:]
        if len(self._buf) > MAX_LINE:
            self.broken = True
            self._buf = b""
        return events

    def close(self) -> list[tuple[str, bytes]]:
        """End of stream: a final line without terminator counts; an undispatched event is dropped (per spec)."""
        events: list[tuple[str, bytes]] = []
        if self._buf and not self.broken:
            self._line(self._buf, events)
        self._buf = b""
        return events

    def _line(self, line: bytes, events: list[tuple[str, bytes]]) -> None:
        if not line:
            if self._data:
                events.append((self._event or "message", b"\n".join(self._data)))
            self._event = ""
            self._data = []
            return
        if line[0] == 0x3A:  # ':' comment
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")


def incremental_decoder(content_encoding: str | None) -> Callable[[bytes], bytes] | None:
    """A function that decodes one content-encoded chunk at a time (b'' flushes), or None if not supported.

    Identity (or no header) returns an identity function.
    """
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("identity", ""):
        return lambda b: b
    if enc in ("gzip", "x-gzip", "deflate"):
        d = zlib.decompressobj(wbits=47)  # 32 + 15: accepts both gzip and zlib framing
        return lambda b: d.decompress(b) if b else d.flush()
    if enc == "br":
        import brotli

        bd = brotli.Decompressor()
        return lambda b: bd.process(b) if b else b""
    if enc == "zstd":
        import zstandard

        zd = zstandard.ZstdDecompressor().decompressobj()
        return lambda b: zd.decompress(b) if b else b""
    return None
