"""Request bodies shaped like Claude Code's: a long system prompt, 30 tools with JSON schemas, a long history of
text, tool calls and tool results, `"stream": true`. Deterministic for a given size.

Claude Code sends `model` first; the history mentions `"model"` keys (in tool inputs and schemas, and in code it
read) so a reader that finds any `"model"` rather than the top-level one is caught out.
"""

from __future__ import annotations

import json
import random
from typing import Any

MODEL = "claude-sonnet-5-5"
_SENTENCE = (
    "the proxy meter request response stream token budget account model price usage cache write read event "
    "function return value config option test error header body json schema file path line change commit"
)
WORDS = _SENTENCE.split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _code(rng: random.Random, lines: int) -> str:
    out = []
    for i in range(lines):
        name = rng.choice(WORDS)
        out.append(f'{"    " * (i % 3)}{name}_{i} = {{"model": "{MODEL}", "{rng.choice(WORDS)}": [{i}, "{name}"]}}')
    return "\n".join(out)


def tools(n: int = 30) -> list[dict[str, Any]]:
    rng = random.Random(30)
    out = []
    for i in range(n):
        props: dict[str, Any] = {
            "model": {"type": "string", "description": "which model a sub-agent uses", "enum": ["haiku", "opus"]},
        }
        for j in range(8):
            props[f"{rng.choice(WORDS)}_{j}"] = {
                "type": rng.choice(["string", "integer", "boolean"]),
                "description": _text(rng, 25),
            }
        props["options"] = {"type": "object", "properties": {"model": {"type": "string"}, "depth": {"type": "integer"}}}
        out.append(
            {
                "name": f"{rng.choice(WORDS).capitalize()}Tool{i}",
                "description": _text(rng, 180),
                "input_schema": {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": props,
                    "required": list(props)[:3],
                    "additionalProperties": False,
                },
            }
        )
    return out


def claude_code_body(size: int, seed: int = 1) -> bytes:
    """A streamed Messages request of about `size` bytes (JSON, compact, as Claude Code sends it)."""
    rng = random.Random(seed)
    system = [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
        {"type": "text", "text": _text(rng, 2500), "cache_control": {"type": "ephemeral"}},
    ]
    head: dict[str, Any] = {"model": MODEL, "messages": []}
    tail = {
        "system": system,
        "tools": tools(),
        "metadata": {"user_id": "user_bench_account__session_0b5e6c1e-8f7e-4c1b-9a51-2d0f0f5c9e11"},
        "max_tokens": 32000,
        "stream": True,
    }
    fixed = len(json.dumps({**head, **tail}, separators=(",", ":")))
    messages: list[dict[str, Any]] = head["messages"]
    used = fixed
    turn = 0
    while used < size:
        tool_id = f"toolu_{seed:02d}{turn:08d}"
        pair = [
            {"role": "user", "content": [{"type": "text", "text": _text(rng, 40)}]}
            if turn % 3 == 0
            else {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": f"toolu_{seed:02d}{turn - 1:08d}",
                        "content": _code(rng, rng.randint(20, 80)),
                    }
                ],  # fmt: skip
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": _text(rng, rng.randint(10, 60))},
                    {
                        "type": "tool_use",
                        "id": tool_id,
                        "name": "ReadTool3",
                        "input": {"file_path": f"/src/{rng.choice(WORDS)}.py", "model": "claude-haiku-4-5"},
                    },
                ],  # fmt: skip
            },
        ]
        messages += pair
        used += len(json.dumps(pair, separators=(",", ":")))
        turn += 1
    messages.append({"role": "user", "content": [{"type": "text", "text": _text(rng, 30)}]})
    return json.dumps({**head, **tail}, separators=(",", ":")).encode()
