"""Usage from Anthropic's OpenAI SDK compatibility endpoint (`POST /v1/chat/completions`). Pure: no I/O.

Its answers are OpenAI-shaped: a JSON `chat.completion` with `usage: {prompt_tokens, completion_tokens,
total_tokens, ...details}`, or an SSE stream of `data: {chat.completion.chunk}` lines (no `event:` names)
ending with `data: [DONE]`. A stream carries usage only when the client asked for it with
`stream_options: {"include_usage": true}`: then a last chunk with empty `choices` holds it. Errors are
`{"error": {"type", "message", ...}}` (an Anthropic-shaped `{"type": "error", ...}` is read too).

The usage is mapped onto the Messages columns and kept in `usage_json` in both shapes side by side (the
Anthropic keys, which repricing reads, and the endpoint's own keys, for audits):
`prompt_tokens` = everything sent, so input_tokens = prompt_tokens - cached tokens (if the endpoint ever
reports `prompt_tokens_details.cached_tokens`, those are cache reads); `completion_tokens` = output.
Anthropic documents the `*_details` objects of this endpoint as always empty and prompt caching as not
supported on it; they are read in case that changes.
"""

from __future__ import annotations

from typing import Any

from metrion_addon.usage import ResponseFacts, _str

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
DONE = b"[DONE]"


def _valid(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def anthropic_usage(raw: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped usage object -> the same object plus the Messages usage keys it implies.

    A count that is not a non-negative integer is carried over unchanged, so that the usage reads as
    malformed (unpriced), never as zero.
    """
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    out = dict(raw)
    if cached is not None and not _valid(cached):
        out["cache_read_input_tokens"] = cached
        cached = None
    cached = cached or 0
    if _valid(prompt):
        out["input_tokens"] = max(0, prompt - cached)
        out["cache_read_input_tokens"] = min(cached, prompt)
    else:
        out["input_tokens"] = prompt
    out["output_tokens"] = completion
    out.setdefault("cache_creation_input_tokens", 0)
    return out


class ChatCompletionFacts(ResponseFacts):
    """ResponseFacts for `/v1/chat/completions`: JSON bodies and `data:` chunk streams."""

    # A stream without `include_usage` is complete yet carries no usage: recorded as `usage_unavailable`.
    usage_optional = True

    def _openai_error(self, obj: dict[str, Any]) -> bool:
        err = obj.get("error")
        if obj.get("type") == "error" or isinstance(err, dict | str):
            self._error(obj if isinstance(err, dict) else {"error": {"message": err}})
            return True
        return False

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            super()._merge_usage(anthropic_usage(usage))

    def _chunk(self, obj: dict[str, Any]) -> None:
        if self.message_id is None:
            self.message_id = _str(obj.get("id"))
        self.model = _str(obj.get("model")) or self.model
        choices = obj.get("choices")
        if isinstance(choices, list):
            for c in choices:
                reason = c.get("finish_reason") if isinstance(c, dict) else None
                if _str(reason):
                    self.stop_reason = reason
        self._merge_usage(obj.get("usage"))

    def from_json_body(self, body: bytes) -> None:
        obj = self.json_object(body)
        if obj is None:
            return
        if self._openai_error(obj):
            return
        self._chunk(obj)
        self.completed = True

    def on_event(self, event: str, data: bytes) -> None:
        self.events += 1
        if data.strip() == DONE:
            self.completed = True  # the end of the stream: a hang-up after it cuts nothing
            return
        if event not in ("message", "error"):
            return
        obj = self.json_object(data)
        if obj is None:
            if event == "error":
                self.error_type = "error"  # an unreadable error event is still an error
            return
        if event == "error":
            self._error(obj)
        elif not self._openai_error(obj):
            self._chunk(obj)


def facts_for(method: str, path: str) -> ResponseFacts | None:
    """The facts reader an endpoint needs when it is not the Messages one; None for the default."""
    if method == "POST" and path == CHAT_COMPLETIONS_PATH:
        return ChatCompletionFacts()
    return None
