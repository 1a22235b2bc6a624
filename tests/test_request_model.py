"""record.request_model reads only the top-level "model" (without building the rest of a 2 MB body as Python
objects) and must give exactly json.loads's answer on every input: a "model" key inside messages, tools or
any nested value never counts; duplicate keys resolve as json.loads resolves them (the last wins)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrion_addon.record import MODEL_MAX, request_model
from metrion_addon.text import clean_text

CT = "application/json"


def reference(body: bytes) -> str | None:
    """What request_model answered when it was a full json.loads."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    return clean_text(model, MODEL_MAX) if isinstance(model, str) else None


# keys that collide with "model" in every way a parser could be fooled: nested, escaped, near misses
KEY_SPELLINGS = ['"model"', '"\\u006dodel"', '"mod\\u0065l"', '"\\u006D\\u006F\\u0064\\u0065\\u006C"', '"Model"',
                 '"model "', '"models"', '"mode"', '"mo\\"del"', '"messages"', '"tools"', '"system"']  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["claude-sonnet-5-5", "claude-haiku-4-5", "model", '{"model":"x"}', "\\", '"']),
)


@st.composite
def raw_json(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON text built by hand, so that objects may repeat a key and spell keys with escapes."""
    kind = draw(st.sampled_from(["scalar", "object", "array"] if depth < 4 else ["scalar"]))
    if kind == "scalar":
        return json.dumps(draw(scalars), ensure_ascii=draw(st.booleans()))
    ws = draw(st.sampled_from(["", " ", "\n  ", "\t"]))
    if kind == "array":
        items = draw(st.lists(raw_json(depth + 1), max_size=4))
        return "[" + ws + ("," + ws).join(items) + "]"
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEY_SPELLINGS), raw_json(depth + 1)), max_size=5))
    return "{" + ws + ("," + ws).join(f"{k}{ws}:{ws}{v}" for k, v in pairs) + ws + "}"


@st.composite
def top_level(draw: st.DrawFn) -> bytes:
    """A top-level object with "model" somewhere (or several times, or nowhere), the rest nested JSON."""
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEY_SPELLINGS), raw_json(1)), max_size=6))
    ws = draw(st.sampled_from(["", " ", "\r\n"]))
    text = "{" + ",".join(f"{ws}{k}:{ws}{v}" for k, v in pairs) + "}"
    return (ws + text + ws).encode("utf-8", "surrogatepass")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=top_level())
def test_same_answer_as_json_loads(body: bytes) -> None:
    assert request_model(body, CT) == reference(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=top_level(), cut=st.integers(min_value=0), flip=st.integers(min_value=0), byte=st.integers(0, 255))
def test_broken_bodies_same_answer(body: bytes, cut: int, flip: int, byte: int) -> None:
    """Truncated or corrupted bodies (what a hostile client sends): still json.loads's answer, never a raise."""
    truncated = body[: cut % (len(body) + 1)]
    assert request_model(truncated, CT) == reference(truncated)
    if body:
        i = flip % len(body)
        corrupted = body[:i] + bytes([byte]) + body[i + 1 :]
        assert request_model(corrupted, CT) == reference(corrupted)


@settings(max_examples=300, deadline=None)
@given(value=st.recursive(scalars, lambda c: st.lists(c) | st.dictionaries(st.sampled_from(["model", "x"]), c)))
def test_any_json_value(value: object) -> None:
    body = json.dumps(value).encode()
    assert request_model(body, CT) == reference(body)


def test_nested_model_keys_do_not_count() -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "tool_use", "input": {"model": "claude-haiku-4-5"}}]}],
        "tools": [{"name": "Task", "input_schema": {"properties": {"model": {"type": "string"}}}}],
        "metadata": {"model": "nope"},
    }
    assert request_model(json.dumps(body).encode(), CT) is None
    body["model"] = "claude-opus-4-8"  # last, after 2 MB of history in real bodies
    assert request_model(json.dumps(body).encode(), CT) == "claude-opus-4-8"


def test_duplicate_and_escaped_keys_resolve_as_json_loads() -> None:
    assert request_model(b'{"model":"claude-haiku-4-5","x":1,"model":"claude-opus-4-8"}', CT) == "claude-opus-4-8"
    assert request_model(b'{"model":"claude-haiku-4-5","mod\\u0065l":"claude-opus-4-8"}', CT) == "claude-opus-4-8"
    assert request_model(b'{"\\u006dodel":"claude-opus-4-8"}', CT) == "claude-opus-4-8"
    assert request_model(b'{"model":"claude-opus-4-8","model":7}', CT) is None


def test_encodings_and_odd_bodies() -> None:
    doc = {"model": "claude-sonnet-5-5", "messages": []}
    assert request_model(json.dumps(doc).encode("utf-16"), CT) == "claude-sonnet-5-5"  # json.loads detects it
    assert request_model(b"\xef\xbb\xbf" + json.dumps(doc).encode(), CT) == "claude-sonnet-5-5"  # BOM
    assert request_model(b'{"model":"\\ud800x"}', CT) == reference(b'{"model":"\\ud800x"}')  # lone surrogate
    assert request_model(b'[{"model":"x"}]', CT) is None
    assert request_model(b'{"model":"x"} trailing', CT) is None
    assert request_model(b"", CT) is None
    assert request_model(b'{"model":"x"}', "text/plain") == "x"  # looks like JSON: read it
    assert request_model(b"model=x", "application/x-www-form-urlencoded") is None
    deep = b'{"model":"x","n":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert request_model(deep, CT) == reference(deep)
