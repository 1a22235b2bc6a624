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
from typing import Any

_EOL = re.compile(rb"\r\n|\r|\n")
MAX_LINE = 32 * 1024 * 1024  # a line longer than this is not an SSE stream we can follow
_BOM = b"\xef\xbb\xbf"


class SSEParser:
    """Feed bytes, get back complete events as (event_type, data_bytes).

    With `wanted`, events of other types are not assembled or returned at all: a stream is mostly
    content deltas that a meter never needs to look at.
    """

    __slots__ = ("_buf", "_event", "_data", "_skip_lf", "_started", "_wanted", "_skip", "broken", "_unwanted")

    def __init__(self, wanted: frozenset[str] | None = None) -> None:
        self._buf = bytearray()  # the unterminated tail of the current line (never holds an end of line)
        self._event = ""
        self._data: list[bytes] = []
        self._skip_lf = False
        self._started = False
        self._wanted = wanted
        self._skip = False  # the current event's type is not wanted
        self.broken = False
        # Whole events of unwanted types, in the plain form (`event:` line first, `data:` lines, blank line):
        # a stream is mostly content deltas, and a chunk made only of them changes nothing here.
        names = b"|".join(re.escape(w.encode()) for w in sorted(wanted or ()))
        self._unwanted = (
            re.compile(rb"(?:event:(?! ?(?:" + names + rb")\n)[^\n\r]*\n(?:data:[^\n\r]*\n)*\n)+") if wanted else None
        )

    def skippable(self, chunk: bytes) -> bool:
        """Whether feeding `chunk` would change nothing: the parser is between events and the chunk is only whole
        events that are not wanted. One regular expression match, instead of a line-by-line feed."""
        return (
            self._unwanted is not None
            and self._started
            and not self._buf
            and not self._data
            and not self._event
            and not self._skip_lf
            and self._unwanted.fullmatch(chunk) is not None
        )

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        if self.broken or not chunk:
            return []
        if not self._started:  # a UTF-8 BOM may open the stream (it may itself be split across chunks)
            self._buf += chunk
            if len(self._buf) < 3 and _BOM.startswith(bytes(self._buf)):
                return []
            chunk = bytes(self._buf[3:] if self._buf.startswith(_BOM) else self._buf)
            self._buf.clear()
            self._started = True
        start = 0
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                start = 1
        events: list[tuple[str, bytes]] = []
        if b"\r" not in chunk:  # the common case, split at C speed; skipped events cost one check per line
            lines = chunk[start:].split(b"\n") if start else chunk.split(b"\n")
            tail = lines.pop()
            if lines and self._buf:
                lines[0] = bytes(self._buf) + lines[0]
                self._buf.clear()
            for line in lines:
                if line and self._skip and line[:4] == b"data":
                    continue
                self._line(line, events)
        else:
            # Only the new chunk is scanned: the buffered tail holds no end of line, so parsing stays linear.
            for m in _EOL.finditer(chunk, start):
                line = chunk[start : m.start()]
                if self._buf:
                    line = bytes(self._buf) + line
                    self._buf.clear()
                start = m.end()
                if start == len(chunk) and m.group() == b"\r":
                    self._skip_lf = True  # the LF of a CRLF may open the next chunk
                self._line(line, events)
            tail = chunk[start:]
        self._buf += tail
        if len(self._buf) > MAX_LINE:
            self.broken = True
            self._buf.clear()
        return events

    def close(self) -> list[tuple[str, bytes]]:
        """End of stream: a final line without terminator counts; an undispatched event is dropped (per spec)."""
        events: list[tuple[str, bytes]] = []
        if self._buf and not self.broken:
            self._line(bytes(self._buf), events)
        self._buf.clear()
        return events

    def _line(self, line: bytes, events: list[tuple[str, bytes]]) -> None:
        if not line:
            if self._data and not self._skip:
                event = self._event or "message"
                if self._wanted is None or event in self._wanted:
                    events.append((event, b"\n".join(self._data)))
            self._event = ""
            self._data = []
            self._skip = False
            return
        if line[0] == 0x3A:  # ':' comment
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            if not self._skip:
                self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
            self._skip = self._wanted is not None and self._event not in self._wanted


# What one received chunk may decode to. A real answer compresses a few times over (SSE text 5-20x); a chunk that
# expands past this is a compression bomb from a hostile upstream, and reading stops before it is allocated
# (the bytes still pass through to the client unchanged).
MAX_CHUNK_EXPANSION = 16 * 1024 * 1024


class DecodeLimit(ValueError):
    """A content-encoded chunk would decode to more than the limit: reading stops, the bytes keep flowing."""


def incremental_decoder(
    content_encoding: str | None, limit: int = MAX_CHUNK_EXPANSION
) -> Callable[[bytes], bytes] | None:
    """A function that decodes one content-encoded chunk at a time (b'' flushes), or None if not supported.
    A chunk that would decode to more than `limit` bytes raises DecodeLimit before the output is allocated.

    Identity (or no header) returns an identity function.
    """
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("identity", ""):
        return lambda b: b
    if enc in ("gzip", "x-gzip"):  # 32 + 15: gzip or zlib framing
        return _Frames(lambda: zlib.decompressobj(wbits=47), lambda d: bool(d.unconsumed_tail), limit)
    if enc == "deflate":
        return _Deflate(limit)
    if enc == "br":
        import brotli

        return _Brotli(brotli.Decompressor(), limit)
    if enc == "zstd":
        try:  # the same zstd module mitmproxy uses: the stdlib from 3.14, else its backport
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            from backports import zstd  # type: ignore[import-not-found,no-redef]
        return _Frames(zstd.ZstdDecompressor, lambda d: not d.needs_input and not d.eof, limit)
    return None


def _over(limit: int) -> DecodeLimit:
    return DecodeLimit(f"a chunk decodes to over {limit:,} bytes (a compression bomb?): not read")


class _Frames:
    """Decode concatenated frames (zstd) or members (gzip): each ends its decompressor, the next starts anew.
    `more(d)`: whether `d` has output left beyond what it was allowed to return."""

    def __init__(self, new: Callable[[], Any], more: Callable[[Any], bool], limit: int) -> None:
        self._new, self._more, self._limit = new, more, limit
        self._d = new()

    def __call__(self, b: bytes) -> bytes:
        out: list[bytes] = []
        left = self._limit
        while b:
            piece = self._d.decompress(b, left)
            left -= len(piece)
            if self._more(self._d):
                raise _over(self._limit)
            out.append(piece)
            if not self._d.eof:
                break
            b, self._d = self._d.unused_data, self._new()
        return b"".join(out)


class _Brotli:
    def __init__(self, d: Any, limit: int) -> None:
        self._d, self._limit = d, limit

    def __call__(self, b: bytes) -> bytes:
        if not b:
            return b""
        out = self._d.process(b, output_buffer_limit=self._limit)
        if len(out) > self._limit or not self._d.can_accept_more_data():
            raise _over(self._limit)
        return out


class _Deflate:
    """HTTP 'deflate' is meant to be zlib-wrapped, but raw deflate is common: detect it from the first bytes."""

    def __init__(self, limit: int) -> None:
        self._d: zlib._Decompress | None = None
        self._head = b""
        self._limit = limit

    def __call__(self, b: bytes) -> bytes:
        if self._d is None:
            self._head += b
            if len(self._head) < 2 and b:
                return b""
            h = self._head
            zlib_framed = len(h) >= 2 and h[0] & 0x0F == 8 and (h[0] << 8 | h[1]) % 31 == 0
            self._d = zlib.decompressobj(wbits=15 if zlib_framed else -15)
            b, self._head = h, b""
        if not b:
            return self._d.flush()
        out = self._d.decompress(b, self._limit)
        if self._d.unconsumed_tail:
            raise _over(self._limit)
        return out
