"""Property tests: any split of a valid SSE byte stream (plain or compressed) reads the same usage, and the
client's bytes come back unchanged through StreamTap."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrion_addon.sse import SSEParser
from metrion_addon.usage import ResponseFacts, StreamTap
from tests.test_pricing_corpus import CASES, compress, raw_usage, sse_body

ENCODINGS = (None, "gzip", "br", "zstd")


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def tap_all(chunks: list[bytes], encoding: str | None) -> tuple[bytes, ResponseFacts, StreamTap]:
    facts = ResponseFacts()
    tap = StreamTap(facts, encoding)
    out = b"".join(tap(c) for c in chunks) + tap(b"")
    return out, facts, tap


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(CASES),
    encoding=st.sampled_from(ENCODINGS),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    points=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=60),
)
def test_any_split_same_usage_same_bytes(case, encoding, eol, points) -> None:  # type: ignore[no-untyped-def]
    usage = raw_usage(case)
    wire = compress(sse_body(case.model, usage, eol), encoding)
    whole_out, whole, _ = tap_all([wire], encoding)
    out, facts, tap = tap_all(cut(wire, points), encoding)
    assert out == wire == whole_out
    assert tap.failed is None
    assert facts.raw_usage == whole.raw_usage
    assert facts.usage == whole.usage
    assert (facts.completed, facts.model, facts.stop_reason) == (True, case.model, "end_turn")
    assert facts.raw_usage is not None and facts.raw_usage["output_tokens"] == usage["output_tokens"]


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A random but valid event stream and the events it must produce."""
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    out = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    events: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            out += b":" + draw(text).encode() + eol  # comment
        name = draw(st.sampled_from(["", "message_start", "message_delta", "ping", "error", "événement"]))
        if name:
            out += b"event:" + (b" " if draw(st.booleans()) else b"") + name.encode() + eol
        lines = [draw(text).encode() for _ in range(draw(st.integers(1, 3)))]
        for line in lines:
            space = b" " if draw(st.booleans()) or line.startswith(b" ") else b""
            out += b"data:" + space + line + eol
        out += eol
        events.append((name or "message", b"\n".join(lines)))
    return out, events


@settings(max_examples=400, deadline=None)
@given(stream=event_streams(), points=st.lists(st.integers(min_value=0, max_value=4096), max_size=40))
def test_parser_any_split(stream: tuple[bytes, list[tuple[str, bytes]]], points: list[int]) -> None:
    data, want = stream
    parser = SSEParser()
    got = [e for chunk in cut(data, points) for e in parser.feed(chunk)] + parser.close()
    assert got == want


@settings(max_examples=100, deadline=None)
@given(points=st.lists(st.integers(min_value=0, max_value=4096), max_size=40), stop=st.integers(0, 2000))
def test_cut_stream_keeps_what_was_seen(points: list[int], stop: int) -> None:
    """A stream cut anywhere: never raises, bytes unchanged, completed only if message_stop arrived."""
    case = CASES[0]
    wire = sse_body(case.model, raw_usage(case))[:stop]
    facts = ResponseFacts()
    tap = StreamTap(facts, None)
    assert b"".join(tap(c) for c in cut(wire, points)) == wire  # no clean end (b"") on a cut
    assert tap.failed is None
    assert facts.completed == (b'"message_stop"}\n\n' in wire)
    if b"message_start" in wire and facts.raw_usage is not None:
        assert facts.raw_usage["input_tokens"] == raw_usage(case)["input_tokens"]


def test_json_data_roundtrip_sanity() -> None:
    body = sse_body(CASES[0].model, raw_usage(CASES[0]))
    parser = SSEParser()
    events = parser.feed(body) + parser.close()
    assert [e for e, _ in events][0] == "message_start"
    assert all(isinstance(json.loads(d), dict) for _, d in events)


@st.composite
def tricky_streams(draw: st.DrawFn) -> bytes:
    """Events meant to look skippable: wanted names with odd spacing, several event lines, bare data, comments."""
    names = ["content_block_delta", "ping", "message_delta", "message_stop", "error", "message", "message_deltax", ""]
    out = b""
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(names)).encode()
        sep = draw(st.sampled_from([b": ", b":", b":  "]))
        if draw(st.booleans()):
            out += b"event" + sep + draw(st.sampled_from(names)).encode() + b"\n"  # two event lines: the last counts
        if name or draw(st.booleans()):
            out += b"event" + sep + name + b"\n"
        if draw(st.integers(0, 9)) == 0:
            out += b": a comment\n"
        usage = {"input_tokens": draw(st.integers(0, 9)), "output_tokens": draw(st.integers(0, 9))}
        payload = {"type": name.decode(), "usage": usage, "delta": {"stop_reason": "end_turn"}}
        out += b"data: " + json.dumps(payload).encode() + b"\n\n"
    return out


@settings(max_examples=300, deadline=None)
@given(wire=tricky_streams(), points=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_skipping_unwanted_chunks_changes_nothing(wire: bytes, points: list[int]) -> None:
    """StreamTap skips a chunk of whole unwanted events with one match (SSEParser.skippable): the facts are
    those of feeding every chunk, whatever the split."""
    _, skipped, _ = tap_all(cut(wire, points), None)
    reference = ResponseFacts()
    parser = SSEParser(wanted=ResponseFacts.WANTED_EVENTS)
    for chunk in cut(wire, points):
        for event, data in parser.feed(chunk):
            reference.on_event(event, data)
    for event, data in parser.close():
        reference.on_event(event, data)
    got = (skipped.raw_usage, skipped.completed, skipped.stop_reason, skipped.events, skipped.error_type)
    assert got == (reference.raw_usage, reference.completed, reference.stop_reason, reference.events,
                   reference.error_type)  # fmt: skip


def test_skippable_only_between_events_and_for_whole_unwanted_ones() -> None:
    p = SSEParser(wanted=ResponseFacts.WANTED_EVENTS)
    delta = b'event: content_block_delta\ndata: {"x": 1}\n\n'
    assert not p.skippable(delta)  # nothing seen yet (a BOM may open the stream)
    p.feed(b"event: ping\ndata: {}\n\n")
    assert p.skippable(delta) and p.skippable(delta * 3)
    for chunk in (b"event: message_delta\ndata: {}\n\n", b"event:message_stop\ndata: {}\n\n", b"data: {}\n\n",
                  delta[:-1], delta + b"event: error\ndata: {}\n\n", delta.replace(b"\n", b"\r\n"), b""):  # fmt: skip
        assert not p.skippable(chunk), chunk
    p.feed(b"event: ping\n")  # inside an event: the next chunk belongs to it
    assert not p.skippable(delta)
