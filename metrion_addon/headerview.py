"""A read-only view of a request's headers, indexed once. Pure: no mitmproxy.

mitmproxy's `Headers` finds a name by lowering and comparing every field, for each lookup; the request hook looks
up some fifteen names per request. The view reads the same fields once into a dict and answers `get`, `get_all`,
`in` and `items(multi=True)` exactly as `Headers` does: names compared lowercased as bytes, values decoded as
UTF-8 with surrogateescape, several values of one name joined with ", " by `get`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def _native(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class HeaderView:
    __slots__ = ("_fields", "_index")

    def __init__(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        self._fields = tuple(fields)
        index: dict[bytes, list[str]] = {}
        for name, value in self._fields:
            index.setdefault(name.lower(), []).append(_native(value))
        self._index = index

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.encode("utf-8", "surrogateescape").lower(), ()))

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._index.get(name.encode("utf-8", "surrogateescape").lower())
        return ", ".join(values) if values else default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.encode("utf-8", "surrogateescape").lower() in self._index

    def items(self, multi: bool = True) -> Iterator[tuple[str, str]]:
        assert multi, "only items(multi=True)"
        return ((_native(k), _native(v)) for k, v in self._fields)
