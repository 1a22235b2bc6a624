"""Large request bodies go upstream as they arrive (reqtap.py) where no hard budget needs them whole: through a
real proxy, byte for byte, with the model still recorded. And the hooks' decision, in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy.test import tflow

from metrion_addon.addon import STREAM_BODY_MIN, Metrion
from metrion_addon.reqtap import RequestTap
from tests.conftest import CAPPED_ACCOUNT, CAPPED_TOKEN, MANAGED_TOKEN, REAL_KEY, Proxy, configured_addon
from tests.fake_upstream import FakeUpstream


def claude_code_like(size: int, model_first: bool = True) -> bytes:
    """About `size` bytes: tools whose schemas hold nested "model" keys, a long history; `model` first (Claude
    Code) or last (the SDKs send `messages` before it)."""
    tool = {"name": "Task", "input_schema": {"properties": {"model": {"type": "string", "enum": ["haiku"]}}}}
    turn = {"role": "user", "content": [{"type": "text", "text": 'x = {"model": "claude-fake-1"} ' * 40}]}
    n = max(1, size // len(json.dumps(turn)))
    rest = {"tools": [tool] * 30, "messages": [turn] * n, "max_tokens": 100, "stream": True}
    body = {"model": "claude-sonnet-5-5", **rest} if model_first else {**rest, "model": "claude-opus-5-5"}
    return json.dumps(body, separators=(",", ":")).encode()


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "model-last"])
def test_a_2mb_body_is_forwarded_byte_identical_and_its_row_has_the_model(
    proxy: Proxy, fake: FakeUpstream, model_first: bool
) -> None:
    body = claude_code_like(2 * 1024 * 1024, model_first)
    assert len(body) > 2_000_000
    label = f"reqstream-{str(model_first).lower()}"
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        content=body,
        headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": label, "content-type": "application/json"},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        r.read()
        rid = r.headers["request-id"]
    got = fake.received[rid]
    assert got.body == body  # every byte, unchanged
    assert got.headers["x-api-key"] == REAL_KEY and MANAGED_TOKEN not in json.dumps(got.raw_headers)
    row = proxy.row(rid)
    want = "claude-sonnet-5-5" if model_first else "claude-opus-5-5"
    assert (row["user"], row["model"], row["response_model"], row["error"]) == (label, want, want, None)
    assert row["completed"] == 1 and row["output_tokens"] and row["cost_usd"] > 0


# --- the decision, in-process ---------------------------------------------------------------------------

@pytest.fixture
def addon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Metrion]:
    with configured_addon(tmp_path, monkeypatch, getattr(request, "param", "")) as m:
        yield m


def post(size: int, path: str = "/v1/messages", **headers: str) -> Any:
    f = tflow.tflow()
    f.request.method, f.request.path = "POST", path
    f.request.headers.clear()
    f.request.headers.update({"x-api-key": MANAGED_TOKEN, "content-length": str(size), **headers})
    f.request.data.content = None  # headers only: the body has not been read yet
    return f


def test_a_large_body_is_streamed_and_tapped(addon: Metrion) -> None:
    f = post(STREAM_BODY_MIN)
    addon.requestheaders(f)
    assert f.response is None and isinstance(f.request.stream, RequestTap)


@pytest.mark.parametrize(
    "f",
    [
        post(STREAM_BODY_MIN - 1),  # small: buffered, read exactly
        post(STREAM_BODY_MIN, "/v1/messages/batches"),  # a batch create's body is read whole
        post(STREAM_BODY_MIN, **{"transfer-encoding": "chunked"}),  # no length: body_size_limit applies as it is read
        post(STREAM_BODY_MIN, **{"content-length": "1e9"}),
    ],
    ids=["small", "batch-create", "chunked", "bad-length"],
)
def test_other_bodies_are_buffered(addon: Metrion, f: Any) -> None:
    addon.requestheaders(f)
    assert f.response is None and not f.request.stream


@pytest.mark.parametrize(
    "addon", [CAPPED_ACCOUNT, "block_unknown_models: true\n"], indirect=True, ids=["hard", "block"]
)
def test_a_body_something_must_read_first_is_buffered(addon: Metrion) -> None:
    """A hard budget estimates from the whole body before forwarding; the unknown-model refusal reads the model."""
    assert addon.rt is not None
    token = CAPPED_TOKEN if addon.rt.config.budgets.any else MANAGED_TOKEN
    assert addon.rt.config.budgets.any or addon.rt.config.budgets.block_unknown_models
    f = post(10 * STREAM_BODY_MIN, **{"x-api-key": token})
    addon.requestheaders(f)
    assert f.response is None and not f.request.stream


def test_a_refused_request_is_never_streamed(addon: Metrion) -> None:
    f = post(10 * STREAM_BODY_MIN, **{"x-api-key": "sk-metrion-unknown-0000000000000000"})
    addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 401
    assert not callable(f.request.stream)
