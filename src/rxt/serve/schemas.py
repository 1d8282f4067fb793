"""Request parsing and response objects of the OpenAI chat-completions API (the subset RxT serves).

Requests are parsed strictly: bad JSON, invalid UTF-8, wrong types and unknown top-level fields are
400 errors that name the field. The client sends only the new message: the server answers the
LAST user message; earlier messages are ignored because the session's memory holds the past.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rxt.serve.errors import APIError, bad_request

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
Parsed = TypeVar("Parsed", bound=BaseModel)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    # extra fields are ignored: clients echo earlier assistant messages with fields RxT does not use
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        return content_text(self.content, ("text",), "messages")


def content_text(content: str | list[ContentPart] | None, text_types: tuple[str, ...], param: str) -> str:
    """A message's text: a string, or text parts joined by newlines (any other part is a 400)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type not in text_types or part.text is None:
            raise bad_request(f"only text content parts are supported, got type {part.type!r}",
                              "unsupported_content", param=param)
        parts.append(part.text)
    return "\n".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None  # must name the served model when given
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int | None = Field(None, ge=1, le=1)  # one answer per turn: the memory follows one conversation
    user: str | None = None  # accepted and ignored
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN.pattern)  # extension: selects the memory

    def query(self) -> str:
        """The text of the last user message."""
        for message in reversed(self.messages):
            if message.role == "user":
                text = message.text()
                check_text(text, "messages")
                if not text.strip():
                    raise bad_request("the last user message is empty", "empty_message", param="messages")
                return text
        raise bad_request("no user message: send the new message as {'role': 'user', 'content': ...}",
                          "no_user_message", param="messages")

    def answer_budget(self) -> int | None:
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens disagree; send one of them",
                              "invalid_request", param="max_tokens")
        return self.max_completion_tokens or self.max_tokens


def check_text(text: str, param: str) -> None:
    """JSON can carry lone surrogates (\\ud800) that are not valid Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} contains an unpaired surrogate; send valid Unicode text", "invalid_text",
                          param=param) from None


class NotFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise NotFinite(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8", "invalid_utf8") from None
    if not text.strip():
        raise bad_request("the request body is empty; send a JSON object", "invalid_json")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise bad_request(f"the request body is not valid JSON: {error.msg}", "invalid_json") from None
    except NotFinite as error:
        raise bad_request(f"the request body is not valid JSON: {error}", "invalid_json") from None
    except (ValueError, RecursionError):  # Python's own limits: digits of one integer, nesting depth
        raise bad_request("the request body holds an integer too long or values nested too deeply",
                          "invalid_json") from None


def parse_body(body: bytes, model: type[Parsed]) -> Parsed:
    """A JSON object body, validated strictly by ``model``; every problem is a 400 naming the field."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return parse_body(body, ChatCompletionRequest)


def validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return bad_request(f"unknown field {where!r}", "unknown_field", param=where)
    message = re.sub(r", not \d+$", "", first["msg"])  # pydantic appends a count the client did not send
    return bad_request(f"{where}: {message}", "invalid_value", param=where)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` for a JSON body parsed by ``model`` (the routes read the raw bytes
    themselves, for strict parsing and size limits, so FastAPI cannot describe the body on its own)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def binary_body(description: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, state_bytes: int | None = None,
          history_reread: bool | None = None) -> dict[str, Any]:
    """OpenAI's token counts, and two extensions: the bytes the server holds for the session after
    the turn (RxT: its STM; a stateless model: its KV cache) and whether a stateless session's
    history was read again because its KV cache was not kept."""
    counts: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    if state_bytes is not None:
        counts.update(state_bytes=state_bytes, history_reread=bool(history_reread))
    return counts


def completion(id_: str, model: str, fingerprint: str, session_id: str, text: str, finish_reason: str,
               usage_: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint, "session_id": session_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage_,
    }


def chunk(id_: str, model: str, fingerprint: str, session_id: str, delta: dict[str, Any] | None,
          finish_reason: str | None = None, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; with ``delta=None`` the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "session_id": session_id, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
