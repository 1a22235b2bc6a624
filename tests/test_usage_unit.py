"""Usage extraction edge cases: errors mid-stream, cut streams, deltas, splits, encodings."""

from __future__ import annotations

import gzip
import zlib
from datetime import UTC, datetime

from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, finish
from metrion_addon.sse import incremental_decoder
from metrion_addon.usage import ResponseFacts, StreamTap, usage_from_raw

START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-5-5",'
    b'"usage":{"input_tokens":1000,"output_tokens":1,"cache_read_input_tokens":2000,"service_tier":"standard"}}}\n\n'
)
DELTA = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":null},'
    b'"usage":{"output_tokens":50}}\n\n'
)
ERROR = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
TS = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


def stream_row(wire: bytes, clean_end: bool = True, error: str | None = None) -> dict:
    p = Pending(started=TS, method="POST", path="/v1/messages", model="claude-sonnet-5-5", streamed=True)
    p.tap = StreamTap(p.facts, None)
    for i in range(0, len(wire), 5):
        assert p.tap(wire[i : i + 5]) == wire[i : i + 5]
    if clean_end:
        p.tap(b"")
    return finish(p, pricer=Pricer(), status=200, request_id=None, headers_at=None, ended_at=TS + 1, error=error)


def test_error_event_mid_stream_keeps_usage_so_far() -> None:
    row = stream_row(START + DELTA + ERROR)
    assert row["completed"] == 0 and row["error"] == "overloaded_error" and row["error_message"] == "Overloaded"
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_input_tokens"]) == (1000, 50, 2000)
    # sonnet 5.5: 1000 * $2 + 50 * $10 + 2000 * $0.1 per MTok
    assert abs(row["cost_usd"] - (1000 * 2 + 50 * 10 + 2000 * 0.1) / 1e6) < 1e-12


def test_unreadable_error_event_is_still_an_error() -> None:
    row = stream_row(START + b"event: error\ndata: <html>oops\n\n")
    assert row["error"] == "error" and row["completed"] == 0


def test_cut_stream_keeps_what_was_seen() -> None:
    row = stream_row(
        START + DELTA + b'event: content_block_delta\ndata: {"type":"content',
        clean_end=False,
        error="upstream_disconnect",
    )
    assert row["completed"] == 0 and row["error"] == "upstream_disconnect"
    assert (row["input_tokens"], row["output_tokens"]) == (1000, 50)


def test_clean_end_without_message_stop_is_incomplete() -> None:
    row = stream_row(START + DELTA)
    assert row["completed"] == 0 and row["error"] == "incomplete_stream" and row["output_tokens"] == 50


def test_delta_replaces_never_adds_and_null_keeps() -> None:
    f = ResponseFacts()
    f.on_event("message_start", START.split(b"data: ")[1].strip())
    f.on_event("message_delta", b'{"type":"message_delta","usage":{"output_tokens":10,"input_tokens":1000}}')
    f.on_event(
        "message_delta",
        b'{"type":"message_delta","usage":{"output_tokens":30,"cache_read_input_tokens":null,'
        b'"server_tool_use":{"web_search_requests":2}}}',
    )
    f.on_event("ping", b"{}")
    f.on_event("brand_new_event", b'{"usage":{"output_tokens":999}}')
    u = f.usage
    assert u is not None
    assert (u.total("input_tokens"), u.total("output_tokens"), u.total("cache_read_input_tokens")) == (1000, 30, 2000)
    assert u.web_search_requests == 2 and u.service_tier == "standard"


def test_cache_split_rules() -> None:
    no_split = usage_from_raw({"input_tokens": 1, "output_tokens": 1, "cache_creation_input_tokens": 700})
    assert no_split.parts[0].cache_creation_5m_input_tokens == 700
    assert no_split.parts[0].cache_creation_1h_input_tokens == 0
    split = usage_from_raw(
        {
            "cache_creation_input_tokens": 700,
            "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 400},
        }
    )
    assert (split.parts[0].cache_creation_5m_input_tokens, split.parts[0].cache_creation_1h_input_tokens) == (300, 400)
    null_split = usage_from_raw({"cache_creation_input_tokens": 700, "cache_creation": None})
    assert null_split.parts[0].cache_creation_5m_input_tokens == 700


def test_iterations_count_even_for_one_entry() -> None:
    u = usage_from_raw(
        {
            "input_tokens": 5,
            "output_tokens": 5,
            "iterations": [{"type": "message", "input_tokens": 7, "output_tokens": 8}],
        }
    )
    assert u.iterations == 1 and u.total("input_tokens") == 7
    assert usage_from_raw({"input_tokens": 5, "iterations": []}).iterations is None


def test_unsupported_encoding_streams_bytes_untouched() -> None:
    f = ResponseFacts()
    tap = StreamTap(f, "compress")
    assert tap(b"abc") == b"abc" and tap.failed and f.raw_usage is None


def test_garbage_compressed_bytes_stop_reading_not_the_stream() -> None:
    f = ResponseFacts()
    tap = StreamTap(f, "gzip")
    assert tap(b"definitely not gzip") == b"definitely not gzip"
    assert tap.failed is not None
    assert tap(b"more") == b"more"


def test_gzip_multi_member_and_deflate_flavours() -> None:
    data = START + DELTA
    for enc, wire in [
        ("gzip", gzip.compress(data[:40]) + gzip.compress(data[40:])),
        ("deflate", zlib.compress(data)),
        ("deflate", (lambda c: c.compress(data) + c.flush())(zlib.compressobj(wbits=-15))),
    ]:
        d = incremental_decoder(enc)
        assert d is not None
        assert b"".join(d(wire[i : i + 3]) for i in range(0, len(wire), 3)) + d(b"") == data, enc


def _encoders() -> dict[str, object]:
    import brotli

    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    raw = zlib.compressobj(wbits=-15)
    return {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "deflate-raw": lambda d: raw.compress(d) + raw.flush(),
        "br": lambda d: brotli.compress(d, quality=5),
        "zstd": zstd.compress,
    }


def test_a_compression_bomb_stops_reading_not_the_stream() -> None:
    """A hostile upstream's chunk that inflates past MAX_CHUNK_EXPANSION is not decoded (nothing that size is
    allocated); its bytes still reach the client unchanged, and the row is unreadable rather than wrong."""
    from metrion_addon.sse import MAX_CHUNK_EXPANSION

    bomb_plain = START + b"\n" * (MAX_CHUNK_EXPANSION * 4)  # 64 MiB of blank lines: valid SSE, if decoded
    for name, compress in _encoders().items():
        wire = compress(bomb_plain)  # type: ignore[operator]
        assert len(wire) < MAX_CHUNK_EXPANSION // 64, name  # the bomb is small on the wire
        f = ResponseFacts()
        tap = StreamTap(f, name.removesuffix("-raw"))
        assert tap(wire) == wire and tap(b"") == b""
        assert tap.failed is not None and "compression bomb" in tap.failed, name


def test_a_long_compressed_stream_is_read_in_full() -> None:
    """The limit is per received chunk: a long answer, compressed, decodes whole when it arrives in chunks."""
    import random

    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    text = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"%s"}}\n\n'
    )
    deltas = b"".join(text % b" ".join(rng.choices(words, k=8)) for _ in range(60_000))  # ~8 MB, like text
    body = START + deltas + DELTA + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    for name, compress in _encoders().items():
        wire = compress(body)  # type: ignore[operator]
        f = ResponseFacts()
        tap = StreamTap(f, name.removesuffix("-raw"))
        for i in range(0, len(wire), 65536):
            tap(wire[i : i + 65536])
        tap(b"")
        assert tap.failed is None and f.completed, name
