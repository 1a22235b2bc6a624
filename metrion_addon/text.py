"""Untrusted strings made safe to store and show. Pure: no mitmproxy, no I/O.

mitmproxy decodes header values with `surrogateescape`, so a raw 0xff byte arrives as a lone surrogate that
`.encode("utf-8")`, SQLite and JSON encoders refuse; a JSON body can hold `"\\ud800"` too. Everything that is
stored or displayed goes through `clean_text` once, at the edge: the result is always valid UTF-8, has no C0/C1
control characters (ESC sequences, NUL, CR/LF) and is at most `limit` characters long.
"""

from __future__ import annotations

import re

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What an Anthropic key or a metrion proxy token starts with. Rows and logs hold no secrets by design; a client
# that pastes one into a label (User-Agent, x-metrion-user, a session id) gets that label masked, not stored.
CREDENTIAL_RE = re.compile(r"sk-(?:ant|metrion)-", re.IGNORECASE)
REDACTED = "<redacted by metrion>"
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
TEXT_MAX = 500


def valid_utf8(value: str) -> str:
    """`value` with every lone surrogate turned into U+FFFD (raw bytes decoded with replacement)."""
    if not _SURROGATE_RE.search(value):
        return value
    # Escaped raw bytes go back to bytes and are decoded with replacement; any other lone surrogate
    # (from JSON "\ud800") has no byte form and is replaced directly.
    raw = value.encode("utf-8", "surrogateescape") if _is_escaped_bytes(value) else None
    if raw is not None:
        return raw.decode("utf-8", "replace")
    return _SURROGATE_RE.sub("\ufffd", value)


def _is_escaped_bytes(value: str) -> bool:
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def clean_text(value: str | None, limit: int = TEXT_MAX) -> str | None:
    """A string as stored: valid UTF-8, control characters removed, stripped, capped; empty -> None."""
    if value is None:
        return None
    if not value.isprintable():  # the common case (plain ASCII) skips the regexes
        value = _CONTROL_RE.sub("", valid_utf8(value))
    value = value.strip()[:limit]
    return value or None


def looks_like_credential(value: str) -> bool:
    return CREDENTIAL_RE.search(value) is not None


def is_clean_token(value: str) -> bool:
    """A credential can only be printable ASCII: anything else (raw bytes, controls, Unicode) is malformed."""
    return value.isascii() and value.isprintable()
