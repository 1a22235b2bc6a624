"""The request body tap (reqtap.py): the bytes pass unchanged, and the model is the body's top-level one, whatever
the chunking, for hostile bodies too."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from metrion_addon import reqtap
from metrion_addon.record import request_model
from metrion_addon.reqtap import RequestTap


def feed(body: bytes, sizes: list[int], ctype: str = "application/json", end: bool = True) -> tuple[str | None, int]:
    """The body through a tap in chunks of the given sizes (cycled); (model, bytes counted)."""
    tap = RequestTap(ctype)
    i = k = 0
    while i < len(body):
        chunk = body[i : i + sizes[k % len(sizes)]]
        assert tap(chunk) is chunk  # forwarded unchanged, at once
        i, k = i + len(chunk), k + 1
    if end:
        assert tap(b"") == b""
    return tap.model(), tap.size


SPLITS = [[1], [2], [3], [7], [64], [1000], [1 << 20], [1, 5, 2, 300]]


def every_split(body: bytes) -> set[tuple[str | None, int]]:
    return {feed(body, s) for s in SPLITS} | {feed(body, [n]) for n in range(1, 40)}


NESTED_FIRST = {
    "tools": [{"name": "Task", "input_schema": {"properties": {"model": {"type": "string"}}}}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": '{"model": "claude-fake"}'}]}],
    "model": "claude-sonnet-5-5",
}


@pytest.mark.parametrize(
    "body, model",
    [
        (b'{"model":"claude-sonnet-5-5","max_tokens":5}', "claude-sonnet-5-5"),  # Claude Code: model first
        (b' \r\n\t{ "model" : "claude-opus-5-5" , "stream": true}', "claude-opus-5-5"),
        (b'{"max_tokens":1024,"stream":true,"temperature":-0.5e1,"x":null,"model":"m"}', "m"),  # scalars first
        (json.dumps(NESTED_FIRST).encode(), "claude-sonnet-5-5"),  # nested "model" keys never count
        (b'{"model":"claude\\u002dsonnet\\"x"}', 'claude-sonnet"x'),  # escapes decoded
        (b'{"mod\\u0065l":"escaped-key"}', "escaped-key"),
        (b'{"x":"\\"model\\":\\"in a string\\"","model":"real"}', "real"),
        (b'{"text":"}{ \\\\","model":"after-braces"}', "after-braces"),
        (b'\xef\xbb\xbf{"model":"bom"}', "bom"),
        ('{"model":"claude-ünïcode"}'.encode(), "claude-ünïcode"),
        (b'{"model":"x\\ud800y"}', "x\ufffdy"),  # a lone surrogate escape: made valid text, as for any label
        (b'{"model":5,"a":1}', None),  # not a string
        (b'{"model":{"id":"x"}}', None),
        (b'{"model":null}', None),
        (b"{}", None),
        (b'{"a":1}', None),
        (b'[{"model":"in-an-array"}]', None),  # not an object
        (b"model=claude-sonnet-5-5", None),  # not JSON
        (b"", None),
        (b"   ", None),
        (b'{"model":"unterminated', None),
        (b'{"a":[1,2', None),  # cut short
        (b'\xff\xfe{"model":"x"}', None),
        (b'{"model":"\xff\xfe"}', None),  # not UTF-8: json.loads refuses it, so does the tap
    ],
)
def test_the_model_whatever_the_chunking(body: bytes, model: str | None) -> None:
    assert every_split(body) == {(model, len(body))}


def test_agrees_with_json_loads_on_random_bodies() -> None:
    """Valid JSON objects with at most one top-level model, keys in any order, nested models and look-alikes in
    strings: the tap's model is json.loads' (the model column as a buffered body gets it)."""
    rng = random.Random(12)
    values: list[Any] = [1, -2.5e3, True, None, "x", "\"model\": 'y'", {"model": "nested"}, [{"model": "n"}, "}"]]
    for _ in range(300):
        obj = {f"k{i}": rng.choice(values) for i in range(rng.randint(0, 6))}
        if rng.random() < 0.8:
            obj["model"] = rng.choice(["claude-sonnet-5-5", 'a\u00e9\\b"c', 7, None, ""])
        items = list(obj.items())
        rng.shuffle(items)
        body = json.dumps(dict(items), separators=rng.choice([(",", ":"), (", ", ": ")])).encode()
        want = request_model(body, "application/json")
        for sizes in ([1], [rng.randint(1, 9)], [len(body) or 1]):
            assert feed(body, sizes) == (want, len(body)), body


def test_a_duplicate_model_key_the_first_one_counts() -> None:
    """Unlike json.loads (the last one wins): documented in reqtap.py. The price follows the answer's model."""
    assert feed(b'{"model":"first","model":"second"}', [4])[0] == "first"


def test_a_model_after_nested_members_is_read_from_a_copy_up_to_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps({"messages": [{"content": "x" * 5000}], "model": "late"}).encode()
    assert feed(body, [100]) == ("late", len(body))
    monkeypatch.setattr(reqtap, "COPY_MAX", 1000)  # over it: no copy kept, no model, the bytes still flow
    assert feed(body, [100]) == (None, len(body))


def test_a_start_that_never_decides_is_not_kept_past_the_scan_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reqtap, "COPY_MAX", 64 * 1024)
    body = b"{" + b" " * (reqtap.SCAN_MAX * 2) + b'"model":"m"}'  # whitespace past the scan limit: then a copy
    assert feed(body, [10]) == ("m", len(body))
    huge = b'{"' + b"k" * (128 * 1024) + b'":1,"model":"m"}'  # past both limits: unread, never held whole
    assert feed(huge, [4096]) == (None, len(huge))


def test_a_body_cut_short_reads_what_arrived() -> None:
    assert feed(b'{"model":"m","messages":[', [3], end=False) == ("m", 25)
    assert feed(b'{"messages":[1],"model":"m"', [3], end=False) == (None, 27)  # not valid JSON: no model


def test_a_failure_inside_the_tap_still_forwards_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug in the scanner")

    monkeypatch.setattr(reqtap, "scan", broken)
    tap = RequestTap()
    assert tap(b'{"model":"m"}') == b'{"model":"m"}'
    assert tap(b"") == b""
    assert tap.model() is None and tap.size == 13
