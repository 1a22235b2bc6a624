"""A minimal asyncio HTTP/1.1 keep-alive client: as little client work as possible per request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchlib.procs import TOKEN


def build_request(scenario: str, stream: bool, body: bytes | None = None) -> bytes:
    """A POST /v1/messages the fake upstream answers with `scenario`; a small body unless one is given."""
    if body is None:
        body = json.dumps(
            {
                "model": "claude-sonnet-5-5",
                "max_tokens": 256,
                "stream": stream,
                "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            },
            separators=(",", ":"),
        ).encode()
    head = (
        "POST /v1/messages HTTP/1.1\r\n"
        "host: 127.0.0.1\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-api-key: {TOKEN}\r\n"
        "anthropic-version: 2023-06-01\r\n"
        "user-agent: metrion-bench/1\r\n"
        f"x-fake-scenario: {scenario}\r\n"
        "\r\n"
    )
    return head.encode() + body


@dataclass
class Reply:
    status: int
    first_byte: float  # perf_counter when the first body byte arrived
    nbytes: int
    keep_alive: bool


async def read_reply(reader: asyncio.StreamReader, on_first: Callable[[], None] | None = None) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            keep = False
    first = 0.0
    n = 0
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            await reader.readexactly(size + 2)
            if not n:
                first = time.perf_counter()
                if on_first is not None:
                    on_first()
            n += size
    elif length is not None:
        if length:
            await reader.readexactly(length)
        first = time.perf_counter()
        n = length
    else:
        n = len(await reader.read())
        first = time.perf_counter()
        keep = False
    return Reply(status, first, n, keep)


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes, on_first: Callable[[], None] | None = None) -> Reply:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        assert self.reader is not None
        self.writer.write(raw)
        try:
            reply = await read_reply(self.reader, on_first)
        except BaseException:
            self.close()
            raise
        if not reply.keep_alive:
            self.close()
        return reply

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


Sample = tuple[float, float, float, int]  # start, first byte, end (perf_counter), body bytes


async def loop_requests(
    port: int, raw: bytes, conc: int, warm: float, duration: float
) -> tuple[list[Sample], int, float, float]:
    """`conc` keep-alive connections each sending `raw` back to back until the window closes.

    Returns the samples of every request (the warm-up's too: a request that ends inside the window counts for
    throughput, whenever it started), the error count, and the window's bounds.
    """
    conns = [Conn(port) for _ in range(conc)]
    samples: list[Sample] = []
    errors = 0
    t_start = time.perf_counter() + warm
    t_stop = t_start + duration

    async def worker(c: Conn) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= t_stop:
                return
            try:
                r = await c.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if r.status != 200 or not r.nbytes:
                errors += 1
            else:
                samples.append((t0, r.first_byte, t1, r.nbytes))

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return samples, errors, t_start, t_stop


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
