"""The OpenAI-compatible endpoint (`/v1/chat/completions`) through a real mitmdump, driven by the official
`openai` SDK (sync, async, streams with and without `include_usage`) against the fake upstream."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from metrion_addon.openai_compat import ChatCompletionFacts, anthropic_usage
from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, finish
from tests.conftest import MANAGED_TOKEN, PASS_TOKEN, REAL_KEY, Proxy
from tests.fake_upstream import FakeUpstream, Scenario

MODEL = "claude-sonnet-5-5"
SONNET_5_5 = (2, 10)  # USD per MTok: input, output
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def cost(inp: int, out: int) -> float:
    return (inp * SONNET_5_5[0] + out * SONNET_5_5[1]) / 1e6


def client(proxy: Proxy, scenario: str = "", prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}{prefix}/v1/",
        api_key=MANAGED_TOKEN,
        max_retries=0,
        default_headers={"x-fake-scenario": scenario, "x-metrion-user": "oa-user"},
    )


def test_json_sync(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("oa-json", Scenario(usage={"input_tokens": 1200, "output_tokens": 340}))
    raw = client(proxy, "oa-json").chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.prompt_tokens == 1200
    assert completion.choices[0].message.content
    row = proxy.row(raw.headers["request-id"])
    assert (row["method"], row["path"], row["model"], row["response_model"]) == (
        "POST",
        "/v1/chat/completions",
        MODEL,
        MODEL,
    )
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_input_tokens"]) == (1200, 340, 0)
    assert row["cost_usd"] == pytest.approx(cost(1200, 340), abs=1e-12)
    assert row["price_source"].startswith("genai-prices@")
    assert (row["completed"], row["error"], row["stream"], row["stop_reason"]) == (1, None, 0, "stop")
    assert (row["account"], row["user"], row["mode"]) == ("acme", "oa-user", "managed")
    assert json.loads(row["usage_json"])["prompt_tokens"] == 1200
    sent = fake.received[raw.headers["request-id"]]
    assert sent.headers["x-api-key"] == REAL_KEY and "authorization" not in sent.headers


def test_json_async_with_path_prefix(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("oa-async", Scenario(usage={"input_tokens": 10, "output_tokens": 5}))

    async def go() -> str:
        c = openai.AsyncOpenAI(
            base_url=f"{proxy.url}/api/proxy/v1/",
            api_key=MANAGED_TOKEN,
            max_retries=0,
            default_headers={"x-fake-scenario": "oa-async"},
        )
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        await c.close()
        return raw.headers["request-id"]

    row = proxy.row(asyncio.run(go()))
    assert row["path"] == "/v1/chat/completions"
    assert row["cost_usd"] == pytest.approx(cost(10, 5), abs=1e-12)


def test_async_stream_with_usage(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("oa-astream", Scenario(usage={"input_tokens": 70, "output_tokens": 30}, text="async streamed answer"))

    async def go() -> tuple[str, str]:
        c = openai.AsyncOpenAI(
            base_url=f"{proxy.url}/v1/",
            api_key=MANAGED_TOKEN,
            max_retries=0,
            default_headers={"x-fake-scenario": "oa-astream"},
        )
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in raw.parse() if ch.choices])
        await c.close()
        return raw.headers["request-id"], text

    rid, text = asyncio.run(go())
    assert text == "async streamed answer"
    row = proxy.row(rid)
    assert (row["stream"], row["completed"], row["input_tokens"], row["output_tokens"]) == (1, 1, 70, 30)
    assert row["cost_usd"] == pytest.approx(cost(70, 30), abs=1e-12)


def test_stream_with_include_usage(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("oa-stream", Scenario(usage={"input_tokens": 500, "output_tokens": 90}, text="a streamed answer here"))
    raw = client(proxy, "oa-stream").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a streamed answer here"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 90
    rid = raw.headers["request-id"]
    row = proxy.row(rid)
    assert (row["stream"], row["completed"], row["error"]) == (1, 1, None)
    assert (row["input_tokens"], row["output_tokens"]) == (500, 90)
    assert row["cost_usd"] == pytest.approx(cost(500, 90), abs=1e-12)
    assert row["message_id"] == "chatcmpl_" + rid.removeprefix("req_")


def test_stream_without_include_usage_is_unpriced(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("oa-nousage", Scenario(usage={"input_tokens": 500, "output_tokens": 90}))
    raw = client(proxy, "oa-nousage").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True
    )
    chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks)
    rid = raw.headers["request-id"]
    assert b"stream_options" not in fake.received[rid].body  # the proxy never asks for usage itself
    row = proxy.row(rid)
    assert (row["cost_usd"], row["price_source"], row["input_tokens"]) == (None, "usage_unavailable", None)
    assert (row["completed"], row["error"]) == (1, None)


def test_openai_shaped_error_recorded(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("oa-400", Scenario(status=400, error_message="messages: bad role"))
    with pytest.raises(openai.BadRequestError) as e:
        client(proxy, "oa-400").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert e.value.body["message"] == "messages: bad role"  # type: ignore[index]
    row = proxy.row(e.value.response.headers["request-id"])
    assert (row["status"], row["error"], row["error_message"]) == (400, "invalid_request_error", "messages: bad role")
    assert (row["cost_usd"], row["completed"]) == (0, 0)


def test_models_list_through_this_route(proxy: Proxy) -> None:
    raw = client(proxy).models.with_raw_response.list()
    assert [m.id for m in raw.parse()] == ["claude-sonnet-5-5"]
    row = proxy.row(raw.headers["request-id"])
    assert (row["method"], row["path"], row["status"], row["cost_usd"], row["error"]) == (
        "GET",
        "/v1/models",
        200,
        0,
        None,
    )


def test_passthrough_and_bad_token(proxy: Proxy, fake: FakeUpstream) -> None:
    c = openai.OpenAI(
        base_url=f"{proxy.url}/v1/",
        api_key="sk-ant-client-own",
        max_retries=0,
        default_headers={"x-metrion-token": PASS_TOKEN},
    )
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    rid = raw.headers["request-id"]
    assert fake.received[rid].headers["authorization"] == "Bearer sk-ant-client-own"
    assert proxy.row(rid)["account"] == "labs"
    bad = openai.OpenAI(base_url=f"{proxy.url}/v1/", api_key="sk-metrion-nope-000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)


def test_done_then_hang_up_is_complete(proxy: Proxy, fake: FakeUpstream) -> None:
    """The client closes as soon as it has read `data: [DONE]`, while the upstream still holds the stream."""
    fake.add("oa-hangup", Scenario(usage={"input_tokens": 40, "output_tokens": 4}, hold_open=3))
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {MANAGED_TOKEN}", "x-fake-scenario": "oa-hangup"}
    with (
        httpx.Client(timeout=10) as h,
        h.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        rid = r.headers["request-id"]
        buf = b""
        for piece in r.iter_raw():
            buf += piece
            if b"data: [DONE]" in buf:
                break
    row = proxy.row(rid)
    assert (row["completed"], row["error"], row["input_tokens"]) == (1, None, 40)
    assert row["cost_usd"] == pytest.approx(cost(40, 4), abs=1e-12)


def test_gzip_stream_and_unreadable(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.add("oa-gzip", Scenario(usage={"input_tokens": 8, "output_tokens": 2}, encoding="gzip"))
    raw = client(proxy, "oa-gzip").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    list(raw.parse())
    assert proxy.row(raw.headers["request-id"])["cost_usd"] == pytest.approx(cost(8, 2), abs=1e-12)
    fake.add("oa-junk", Scenario(body=b'{"id": "x", "choices": []}'))  # a 200 with no usage: never $0
    raw = client(proxy, "oa-junk").chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    row = proxy.row(raw.headers["request-id"])
    assert (row["cost_usd"], row["price_source"], row["error"]) == (None, "usage_unreadable", "usage_unreadable")


# --- the mapping, without a proxy -----------------------------------------------------------------------


def test_usage_mapping_details_and_garbage() -> None:
    u = anthropic_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 7,
            "total_tokens": 107,
            "prompt_tokens_details": {"cached_tokens": 60},
        }
    )
    assert (u["input_tokens"], u["cache_read_input_tokens"], u["output_tokens"]) == (40, 60, 7)
    facts = ChatCompletionFacts()
    facts.from_json_body(b'{"model": "claude-sonnet-5-5", "usage": {"prompt_tokens": "12", "completion_tokens": 1}}')
    p = Pending(started=1_780_000_000.0, method="POST", path="/v1/chat/completions", facts=facts)
    row = finish(p, pricer=Pricer(), status=200, request_id="r", headers_at=None, ended_at=1_780_000_001.0)
    assert row["cost_usd"] is None and row["error"] == "usage_unreadable"  # a string count is never zero


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_stream_split_anywhere_gives_the_same_usage(size: int) -> None:
    from metrion_addon.usage import StreamTap
    from tests.fake_endpoints import chat_chunks

    wire = b"".join(chat_chunks(MODEL, {"input_tokens": 33, "output_tokens": 4}, "split me anywhere", "c1", True))
    wire = wire.replace(b"\n", b"\r\n") if size % 2 else wire
    facts = ChatCompletionFacts()
    tap = StreamTap(facts, None)
    assert b"".join(tap(wire[i : i + size]) for i in range(0, len(wire), size)) + tap(b"") == wire
    assert facts.completed and facts.stop_reason == "stop" and facts.model == MODEL
    assert (facts.raw_usage or {})["input_tokens"] == 33 and facts.usage is not None
    assert facts.usage.total("output_tokens") == 4 and tap.failed is None and not facts.parse_errors
