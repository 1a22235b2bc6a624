"""The request body tap: a `flow.request.stream` callable that forwards every chunk unchanged and reads the
request's top-level `model` on the side, so that a large body goes upstream as it arrives instead of being
buffered first. Pure: no mitmproxy, no I/O.

Claude Code sends `model` first. The tap reads the body's first members, at most SCAN_MAX bytes, with a
regular expression per member (no document is built); once it has the model it only counts bytes. When a member
before `model` holds an object or an array (the SDKs send `messages` before `model`), or the start cannot be
read, it keeps a copy of the body instead (up to COPY_MAX) and the model is read from that at the end, off the
event loop, with `record.request_model` (exactly what a buffered body gets).

What it reads: the first top-level `"model"` key (escapes decoded, whatever the chunking), when it comes before
any nested value. Nested `"model"` keys (tool schemas, history) are never taken. A body that does not start as
a JSON object has no model. Unlike `json.loads`, a later duplicate top-level `model`, or a syntax error after the
model, is not seen: the row's `model` column then names the first one. The price is unaffected where the answer
names its model (it is priced by the answer's model first).
"""

from __future__ import annotations

import json
import re

from metrion_addon.record import model_of, request_model

SCAN_MAX = 16 * 1024  # the start of a body read for its model; past this (undecided), a copy is kept instead
COPY_MAX = 32 * 1024 * 1024  # Anthropic's own limit for a Messages body; a larger copy is dropped (no model)

_WS = rb"[ \t\n\r]*"
_STR = rb'"(?:[^"\\]|\\.)*"'
_OPEN = re.compile(_WS + rb"\{")
# one member of the top-level object: key, then a string value, the start of a nested one, or a scalar, then
# what follows it (a separator, or the object's end)
_MEMBER = re.compile(
    _WS + rb"(" + _STR + rb")" + _WS + rb":" + _WS
    + rb"(?:(" + _STR + rb")|([\[{])|(-?[0-9][0-9eE+.\-]*|true|false|null))"
    + _WS + rb"([,}])?",
    re.DOTALL,
)  # fmt: skip
_BOM = b"\xef\xbb\xbf"

# scan outcomes
_MORE, _FOUND, _COPY = 0, 1, 2


def _key(raw: bytes) -> str | None:
    if b"\\" not in raw:
        return raw[1:-1].decode("utf-8", "replace")
    try:
        key = json.loads(raw)
    except ValueError:
        return None
    return key if isinstance(key, str) else None


def scan(head: bytes, final: bool) -> tuple[int, str | None]:
    """(outcome, model) from the start of a body: _FOUND (model or None), _MORE (need more bytes), _COPY
    (cannot tell from the start: read the whole body)."""
    if head.startswith(_BOM):
        head = head[3:]
    m = _OPEN.match(head)
    if m is None:
        rest = head.lstrip(b" \t\n\r")
        if not rest and not final:
            return _MORE, None
        if _BOM.startswith(head) and head and not final:
            return _MORE, None
        return _FOUND, None  # not a JSON object: no model
    pos = m.end()
    while True:
        mm = _MEMBER.match(head, pos)
        if mm is None or (mm.group(5) is None and mm.group(3) is None):
            # the end of the object, an incomplete member (split across chunks), or not JSON
            if head[pos:].lstrip(b" \t\n\r").startswith(b"}"):
                return _FOUND, None
            return (_COPY, None) if final else (_MORE, None)
        key = _key(mm.group(1))
        if key is None:
            return _COPY, None
        if key == "model":
            if mm.group(2) is None:
                return _COPY, None  # not a string: json.loads decides (a later duplicate may be one)
            try:
                return _FOUND, model_of({"model": json.loads(mm.group(2))})
            except ValueError:
                return _COPY, None
        if mm.group(3) is not None:
            return _COPY, None  # a nested value before the model: skipping it here would be slow
        if mm.group(5) == b"}":
            return _FOUND, None  # the object ended without a model
        pos = mm.end()


class RequestTap:
    """A `flow.request.stream` callable. Returns every chunk unchanged and never raises (the bytes must flow);
    `model()` is called once the body has ended (on the accounting side)."""

    __slots__ = ("size", "_state", "_model", "_head", "_scanned", "_copy", "_kept", "_content_type")

    def __init__(self, content_type: str = "") -> None:
        self.size = 0  # body bytes forwarded
        self._state = _MORE
        self._model: str | None = None
        self._head = bytearray()  # the start of the body while it is being read (at most SCAN_MAX and one chunk)
        self._scanned = 0
        self._copy: list[bytes] | None = None
        self._kept = 0
        self._content_type = content_type

    def __call__(self, chunk: bytes) -> bytes:
        try:
            self.size += len(chunk)
            if self._state == _MORE:
                self._head += chunk
                n = len(self._head)
                # read again once the start has doubled (or ended): linear however small the chunks
                if chunk and n < 2 * self._scanned and n <= SCAN_MAX:
                    return chunk
                self._scanned = n
                head = bytes(self._head)
                state, model = scan(head, final=not chunk)
                if state == _MORE and n > SCAN_MAX:
                    state = _COPY
                if state == _FOUND:
                    self._state, self._model, self._head = _FOUND, model, bytearray()
                elif state == _COPY:
                    self._state, self._copy, self._kept, self._head = _COPY, [head], n, bytearray()
            elif self._state == _COPY and self._copy is not None and chunk:
                self._kept += len(chunk)
                if self._kept > COPY_MAX:
                    self._copy = None  # too large to read: no model
                else:
                    self._copy.append(chunk)
        except Exception:  # noqa: BLE001 - reading must never break the upload
            self._state, self._model, self._copy, self._head = _FOUND, None, None, bytearray()
        return chunk

    def model(self) -> str | None:
        """The request's model, once the body has ended (a body cut short: what could be read of it)."""
        if self._state == _FOUND:
            return self._model
        if self._state == _MORE:  # the body ended (or was cut) before the start was decided
            body = bytes(self._head)
        elif self._copy is None:
            return None
        else:
            body = b"".join(self._copy)
        return request_model(body, self._content_type)
