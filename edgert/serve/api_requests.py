"""OpenAI request bodies -> generation arguments, and the error body (pure: no server).

Each problem raises :class:`APIError` with OpenAI's status, message, ``param`` and ``code``;
the server turns it into ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgert.runtime.structured import SchemaError, parse_response_format


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                        code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class GenerationRequest:
    """What one chat or text completion asks the engine for."""

    prompt: Any  # a list of messages (chat) or a string (completions)
    chat: bool
    max_tokens: int | None = None  # None: up to the KV capacity
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    json_schema: dict | None = None  # response_format json_schema: the reply validates


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} in [{low}, {high}], got {value!r}",
                       param=name)
    return value


def _common(body: dict, prompt, chat: bool) -> GenerationRequest:
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number({name: max_tokens}, name, None, 1, 2 ** 31, integer=True)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    format_ = body.get("response_format") or {"type": "text"}
    if not isinstance(format_, dict):
        raise APIError(400, "'response_format' must be an object", param="response_format")
    try:
        schema = parse_response_format(format_)
    except SchemaError as exc:
        raise APIError(400, str(exc), param="response_format") from None
    return GenerationRequest(
        prompt=prompt, chat=chat, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        # top_p 0 (allowed by OpenAI) keeps only the most likely token
        top_p=max(_number(body, "top_p", 1.0, 0, 1), 1e-9),
        seed=_number(body, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True),
        stop=stop, stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)), json_schema=schema)


def parse_chat(body: Any) -> GenerationRequest:
    """A ``/v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'",
                           param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported",
                               param="messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": message["role"], "content": content})
    return _common(body, clean, chat=True)


def parse_completion(body: Any) -> GenerationRequest:
    """A ``/v1/completions`` body (one prompt string)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    return _common(body, prompt, chat=False)
