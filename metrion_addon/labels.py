"""User and agent labels: one person, one budget key. Pure: no mitmproxy, no I/O.

A label (the `x-metrion-user` header, a token's bound user, a `user_budgets` key in the config) is compared and
stored as its *key*: Unicode NFKC, with format characters (zero-width space and joiners, BOM, bidi controls...)
and control characters removed, whitespace runs collapsed to one space and trimmed, case-folded, and NFKC again
(case folding can leave a string unnormalised). So `alice`, `Alice`, ` alice `, `ALICE` and `alice\\u200b` are
the same user, and full-width `ａｌｉｃｅ` too.

Mixed-script labels are refused, not folded: a label whose letters come from more than one script (Latin `o`
next to Cyrillic `о`) is almost always a confusable, and folding lookalikes would need Unicode's confusables
table, which the standard library does not have. Combinations that real names use are allowed, as in Unicode's
"highly restrictive" level (UTS #39): Latin with Han, Hiragana and Katakana (Japanese), with Han and Bopomofo,
or with Han and Hangul. A label written wholly in another script (`аlісе` all Cyrillic) is a different label:
self-asserted labels are tags, not identities; bind users to tokens to make a per-user budget enforceable.
"""

from __future__ import annotations

import re
import unicodedata

from metrion_addon.text import REDACTED, looks_like_credential, valid_utf8

LABEL_MAX = 200
_SPACE_RE = re.compile(r"\s+")
_ALLOWED_MIXES = (
    frozenset({"LATIN", "CJK", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "CJK", "BOPOMOFO"}),
    frozenset({"LATIN", "CJK", "HANGUL"}),
)


class LabelError(ValueError):
    """A label that cannot be used as a budget key (mixed scripts)."""


def _strip_invisible(value: str) -> str:
    # Cc: control characters; Cf: format characters (U+200B..U+200F, U+2060, U+FEFF, bidi controls, soft hyphen).
    return "".join(ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cf"))


def script_of(ch: str) -> str | None:
    """The script of a letter, from its Unicode name's first word (LATIN, CYRILLIC, GREEK, CJK, ...); None for
    anything that is not a letter (digits, punctuation, symbols are common to all scripts)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return "UNKNOWN"
    first = name.split(" ", 1)[0]
    if first in ("CJK", "IDEOGRAPHIC"):
        return "CJK"
    if first in ("HALFWIDTH", "FULLWIDTH"):  # NFKC has already mapped most of these
        return name.split(" ", 2)[1]
    return first


def required_label_key(label: object) -> str:
    """A label from the config: its key; LabelError when it is not a non-empty string or mixes scripts."""
    key = label_key(label) if isinstance(label, str) else None
    if key is None:
        raise LabelError("must be a non-empty user label")
    return key


def scripts(value: str) -> frozenset[str]:
    return frozenset(s for s in map(script_of, value) if s is not None)


def label_key(value: str | None) -> str | None:
    """The normalised form a label is stored and compared as; None when nothing is left.

    Raises LabelError for a label that mixes scripts (see the module docstring)."""
    if value is None:
        return None
    s = unicodedata.normalize("NFKC", valid_utf8(value[: LABEL_MAX * 4]))  # a huge header costs no more
    s = _strip_invisible(s)
    s = _SPACE_RE.sub(" ", s).strip()
    s = unicodedata.normalize("NFKC", s.casefold())
    s = _strip_invisible(s).strip()[:LABEL_MAX]
    if not s:
        return None
    if looks_like_credential(s):
        return REDACTED  # a key or proxy token pasted as a label is never stored
    found = scripts(s)
    if len(found) > 1 and not any(found <= mix for mix in _ALLOWED_MIXES):
        raise LabelError(f"the label mixes scripts ({', '.join(sorted(found))}); use one script")
    return s


class UserConflict(ValueError):
    """x-metrion-user names another user than the one the token is bound to."""


def resolve_user(bound: str | None, header: str | None, on_conflict: str = "refuse") -> str | None:
    """The user a request is attributed to: the token's bound user if it has one, else the header's label.

    A header that names a different user than the bound one raises UserConflict with `on_conflict="refuse"` and
    is ignored with "ignore"; a header equal to it after normalisation is fine. LabelError for a header label
    that cannot be a key (mixed scripts) when it is the one that counts, or when it must be compared.
    """
    if bound is None:
        return label_key(header)
    if header is None or on_conflict == "ignore":
        return bound
    try:
        asserted = label_key(header)
    except LabelError:
        raise UserConflict(f"x-metrion-user does not name this token's user {bound!r}") from None
    if asserted is not None and asserted != bound:
        raise UserConflict(f"x-metrion-user {asserted!r} is not this token's user {bound!r}")
    return bound
