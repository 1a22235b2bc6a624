"""Exact accounting end to end: the official SDK (or raw httpx) -> a real mitmdump with the addon -> the fake
upstream. Expected costs are worked out by hand from the published per-MTok rates below."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.conftest import MANAGED_TOKEN, Proxy
from tests.fake_upstream import FakeUpstream, Scenario

# USD per MTok: (input, output, 5m write, 1h write, read)
SONNET_5_5 = (2, 10, 2.5, 4, 0.1)
OPUS_5_5 = (4, 20, 5, 8, 0.2)
HAIKU_5_5 = (0.1, 0.5, 0.125, 0.2, 0.01)
SEARCH = 10 / 1000
MODEL = "claude-sonnet-5-5"


def cost(rates: tuple[float, ...], inp: int, out: int, w5: int = 0, w1: int = 0, rd: int = 0) -> float:
    return (inp * rates[0] + out * rates[1] + w5 * rates[2] + w1 * rates[3] + rd * rates[4]) / 1e6


def sdk(proxy: Proxy, scenario: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=proxy.url, api_key=MANAGED_TOKEN, max_retries=0, default_headers={"x-fake-scenario": scenario}
    )


def call(proxy: Proxy, scenario: str, stream: bool, model: str = MODEL) -> dict:
    """One request through the SDK; returns the stored row."""
    c = sdk(proxy, scenario)
    kw = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        with c.messages.stream(**kw) as s:  # type: ignore[arg-type]
            s.get_final_message()
            rid = s.response.headers["request-id"]
    else:
        rid = c.messages.with_raw_response.create(**kw).headers["request-id"]  # type: ignore[arg-type]
    return proxy.row(rid)


def usage(**kw: object) -> dict:
    u: dict = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    u.update(kw)
    return u


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_1h_cache_split(proxy: Proxy, fake: FakeUpstream, stream: bool) -> None:
    split = {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 3000}
    u = usage(
        input_tokens=50,
        output_tokens=400,
        cache_creation_input_tokens=4000,
        cache_read_input_tokens=9000,
        cache_creation=split,
    )
    fake.add("acct-1h", Scenario(usage=u))
    row = call(proxy, "acct-1h", stream)
    assert (row["cache_creation_5m_input_tokens"], row["cache_creation_1h_input_tokens"]) == (1000, 3000)
    assert row["cost_cache_write_usd"] == pytest.approx((1000 * 2.5 + 3000 * 4) / 1e6, abs=1e-12)
    assert row["cost_usd"] == pytest.approx(cost(SONNET_5_5, 50, 400, 1000, 3000, 9000), abs=1e-12)
    assert row["completed"] == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_web_search(proxy: Proxy, fake: FakeUpstream, stream: bool) -> None:
    u = usage(input_tokens=3000, output_tokens=500, server_tool_use={"web_search_requests": 4, "web_fetch_requests": 1})
    fake.add("acct-web", Scenario(usage=u))
    row = call(proxy, "acct-web", stream)
    assert (row["web_search_requests"], row["web_fetch_requests"]) == (4, 1)
    assert row["cost_tools_usd"] == pytest.approx(4 * SEARCH, abs=1e-12)
    assert row["cost_usd"] == pytest.approx(cost(SONNET_5_5, 3000, 500) + 4 * SEARCH, abs=1e-12)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_iterations_per_entry_models(proxy: Proxy, fake: FakeUpstream, stream: bool) -> None:
    its = [
        {
            "type": "compaction",
            "input_tokens": 150000,
            "output_tokens": 2000,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
        {
            "type": "advisor_message",
            "model": "claude-opus-5-5",
            "input_tokens": 5000,
            "output_tokens": 300,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1000,
        },
        {
            "type": "message",
            "model": "claude-haiku-5-5",
            "input_tokens": 8000,
            "output_tokens": 700,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 0,
        },
    ]
    u = usage(input_tokens=8000, output_tokens=700, cache_creation_input_tokens=100, iterations=its)
    fake.add("acct-iter", Scenario(usage=u))
    row = call(proxy, "acct-iter", stream)
    assert row["iterations"] == 3
    assert (row["input_tokens"], row["output_tokens"]) == (163000, 3000)
    want = cost(SONNET_5_5, 150000, 2000) + cost(OPUS_5_5, 5000, 300, rd=1000) + cost(HAIKU_5_5, 8000, 700, w5=100)
    assert row["cost_usd"] == pytest.approx(want, abs=1e-12)
    assert {"claude-sonnet-5-5", "claude-opus-5-5", "claude-haiku-5-5"} <= {
        s.rsplit(":", 1)[-1] for s in row["price_source"].split("+")[0].split(";")
    }


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_batch_tier(proxy: Proxy, fake: FakeUpstream, stream: bool) -> None:
    u = usage(
        input_tokens=10000,
        output_tokens=2000,
        cache_read_input_tokens=5000,
        service_tier="batch",
        server_tool_use={"web_search_requests": 2},
    )
    fake.add("acct-batch", Scenario(usage=u))
    row = call(proxy, "acct-batch", stream)
    assert row["service_tier"] == "batch" and "+batch" in row["price_source"]
    assert row["cost_usd"] == pytest.approx(0.5 * cost(SONNET_5_5, 10000, 2000, rd=5000) + 2 * SEARCH, abs=1e-12)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_us_geo(proxy: Proxy, fake: FakeUpstream, stream: bool) -> None:
    u = usage(
        input_tokens=10000,
        output_tokens=2000,
        cache_creation_input_tokens=300,
        inference_geo="us",
        server_tool_use={"web_search_requests": 1},
    )
    fake.add("acct-us", Scenario(usage=u))
    row = call(proxy, "acct-us", stream)
    assert row["inference_geo"] == "us" and "+us-geo-1.1x" in row["price_source"]
    assert row["cost_usd"] == pytest.approx(1.1 * cost(SONNET_5_5, 10000, 2000, w5=300) + SEARCH, abs=1e-12)


def test_mid_stream_error_event(proxy: Proxy, fake: FakeUpstream) -> None:
    u = usage(input_tokens=1200, output_tokens=80, cache_read_input_tokens=100)
    fake.add("acct-err", Scenario(usage=u, error_after=4))
    c = sdk(proxy, "acct-err")
    kw = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(anthropic.APIStatusError), c.messages.stream(**kw) as s:  # type: ignore[arg-type]
        rid = s.response.headers["request-id"]
        s.get_final_message()
    row = proxy.row(rid)
    assert (row["status"], row["completed"], row["error"]) == (200, 0, "overloaded_error")
    # usage so far: message_start's counts (its output_tokens is the placeholder 1)
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_input_tokens"]) == (1200, 1, 100)
    assert row["cost_usd"] == pytest.approx(cost(SONNET_5_5, 1200, 1, rd=100), abs=1e-12)


def test_cut_stream(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("acct-cut", Scenario(usage=usage(input_tokens=900, output_tokens=70), cut_after=4))
    c = sdk(proxy, "acct-cut")
    rid, failed = None, False
    try:
        with c.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
            rid = s.response.headers["request-id"]
            s.get_final_message()
    except Exception:  # the SDK's transport error for an incomplete chunked body
        failed = True
    assert failed and rid is not None
    row = proxy.row(rid)
    assert (row["completed"], row["error"]) == (0, "upstream_disconnect")
    assert (row["input_tokens"], row["output_tokens"]) == (900, 1)
    assert row["cost_usd"] == pytest.approx(cost(SONNET_5_5, 900, 1), abs=1e-12)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_compressed_bytes_identical_usage_read(proxy: Proxy, fake: FakeUpstream, encoding: str, stream: bool) -> None:
    split = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 700}
    u = usage(input_tokens=321, output_tokens=123, cache_creation_input_tokens=700, cache_creation=split)
    name = f"acct-{encoding}-{stream}"
    fake.add(name, Scenario(usage=u, encoding=encoding, chunk_size=5, text="é漢字🙂 compressed"))
    body = {"model": MODEL, "max_tokens": 5, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    got = bytearray()
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        content=json.dumps(body),
        timeout=20,
        headers={"x-api-key": MANAGED_TOKEN, "x-fake-scenario": name, "accept-encoding": encoding},
    ) as r:
        assert r.headers.get("content-encoding") == encoding
        for chunk in r.iter_raw():
            got += chunk
        rid = r.headers["request-id"]
    assert bytes(got) == fake.sent[rid]
    row = proxy.row(rid)
    assert (row["completed"], row["error"], row["stream"]) == (1, None, int(stream))
    assert (row["input_tokens"], row["output_tokens"], row["cache_creation_1h_input_tokens"]) == (321, 123, 700)
    assert row["cost_usd"] == pytest.approx(cost(SONNET_5_5, 321, 123, w1=700), abs=1e-12)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_unknown_model_is_null(proxy: Proxy, fake: FakeUpstream, stream: bool) -> None:
    fake.add("acct-unknown", Scenario(usage=usage(input_tokens=10, output_tokens=10)))
    row = call(proxy, "acct-unknown", stream, model="claude-unreleased-9-9")
    assert row["price_source"] == "unknown"
    assert all(row[k] is None for k in row if k.startswith("cost_"))
    assert (row["input_tokens"], row["output_tokens"]) == (10, 10)
