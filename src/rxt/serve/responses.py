"""The OpenAI Responses API (``POST /v1/responses``) on top of the server's sessions.

A response is one turn. Without ``previous_response_id`` it opens a new session (or, with the
``session_id`` extension, continues that session's latest memory); with it, the turn starts from
the memory the named response left, so a client can branch a conversation or answer a turn again
from any kept response. Each answered turn keeps a snapshot of its memory (rxt/serve/snapshots.py;
``--responses-per-session`` of them per session, the newest); the session itself always holds the
latest memory, so chat completions with its ``session_id`` go on from there. ``store: false``
writes nothing: no snapshot, no session, the memory is not changed.

``GET /v1/responses/{id}`` returns a kept response's object as the turn answered it (kept in its
snapshot's record); ``DELETE`` forgets the response and its memory, nothing else. Both hold the
session's lock, so they see a turn in flight on the session finished.

Streaming sends the Responses events: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta (one per
piece of text), response.output_text.done, response.content_part.done, response.output_item.done,
then response.completed (or response.incomplete when max_output_tokens cut the answer).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rxt.engine import AnswerEvent, TokenEvent
from rxt.serve.errors import APIError, bad_request, response_not_found
from rxt.serve.schemas import (
    SESSION_ID_PATTERN,
    ContentPart,
    check_text,
    content_text,
    parse_body,
)
from rxt.serve.service import ChatService
from rxt.serve.snapshots import session_of
from rxt.serve.store import StoreUnavailable
from rxt.serve.turn import Turn

RESPONSE_ID_PATTERN = r"^resp_[A-Za-z0-9_-]{1,160}$"


class InputMessage(BaseModel):
    # extra fields are ignored: clients echo earlier output items with fields RxT does not use
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return content_text(self.content, ("input_text", "output_text", "text"), "input")


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None  # must name the served model when given
    input: str | list[InputMessage] = Field(min_length=1)
    previous_response_id: str | None = Field(None, pattern=RESPONSE_ID_PATTERN)
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    instructions: None = None  # RxT has no system prompt: each turn is the user's message alone
    metadata: dict[str, str] | None = None  # returned as sent
    user: str | None = None  # accepted and ignored
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN.pattern)  # extension: continue a session
    seed: int | None = Field(None, ge=0, lt=2**63)  # extension: reproducible sampling

    def query(self) -> str:
        """The text of the last user message (the memory holds the rest)."""
        if isinstance(self.input, str):
            text = self.input
        else:
            users = [m for m in self.input if m.role == "user"]
            if not users:
                raise bad_request("no user message in input", "no_user_message", param="input")
            text = users[-1].text()
        check_text(text, "input")
        if not text.strip():
            raise bad_request("the user message is empty", "empty_message", param="input")
        return text

    def answer_budget(self) -> int | None:
        return self.max_output_tokens


def parse_response_request(body: bytes) -> ResponseRequest:
    return parse_body(body, ResponseRequest)


async def create_response(service: ChatService, owner: str, request: ResponseRequest, started: float) -> Response:
    query = request.query()
    sampling, prompt_tokens = service.sampling(request, query)
    session_id, previous = request.session_id, request.previous_response_id
    if previous is not None:
        root = session_of(previous)
        if root is None:
            raise response_not_found(previous, "previous_response_not_found")
        if session_id is not None and session_id != root:
            raise bad_request("previous_response_id belongs to another session than session_id",
                              "conflicting_session_id", param="session_id")
        session_id = root
    if request.store:
        turn = await service.start_turn(session_id, owner, query, sampling, prompt_tokens, started,
                                        from_response=previous)
    else:
        session = await _unstored_start(service, owner, session_id, previous)
        turn = await service.start_unstored_turn(session, query, sampling, prompt_tokens, started)
    meta = _meta(service, request, turn)
    if request.store:  # no await since start_turn: the turn's task has not reached its answer yet
        turn.describe = lambda answer: _response(meta, answer.text, answer)
    headers = {"X-Session-Id": turn.session_id} if request.store else {}
    if request.stream:
        return StreamingResponse(_stream(turn, meta), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    answer = await turn.answer()
    return JSONResponse(_response(meta, answer.text, answer), headers=headers)


async def retrieve_response(service: ChatService, owner: str, response_id_: str, stream: bool) -> dict[str, Any]:
    """The response object as its turn answered it (after that turn's memory is written)."""
    if stream:
        raise bad_request("a kept response is not streamed again: retrieve it without stream", param="stream")
    async with _session_locked(service, owner, response_id_):
        body = await service._store(service.snapshots.response, response_id_, owner)
    if body is None:
        raise response_not_found(response_id_)
    return body


async def delete_response(service: ChatService, owner: str, response_id_: str) -> None:
    """Forget a response and its memory; the session and the other responses stay as they are."""
    async with _session_locked(service, owner, response_id_) as session_id:
        if not await service._store(service.snapshots.delete, session_id, response_id_, owner):
            raise response_not_found(response_id_)


@contextlib.asynccontextmanager
async def _session_locked(service: ChatService, owner: str, response_id_: str) -> AsyncIterator[str]:
    """Hold the lock of the response's session: a turn in flight on it finishes (and keeps its
    snapshot) first. A session of another key is the same 404 as no session: ids do not leak."""
    session_id = session_of(response_id_)
    if session_id is None:
        raise response_not_found(response_id_)
    try:
        lease, _ = await service._acquire(session_id, owner)
    except APIError as error:
        if error.code == "session_not_found":
            raise response_not_found(response_id_) from None
        raise
    try:
        yield session_id
    finally:
        await lease.release()


async def _unstored_start(service: ChatService, owner: str, session_id: str | None, previous: str | None):
    """The state a ``store: false`` turn starts from, read under the session's lock (a turn in flight
    on the session is waited for): the named response's, the session's latest, or a fresh one."""
    if session_id is None:
        return service.engine.new_session()
    async with service._locked(session_id, owner) as stored:
        state = stored.state if previous is None else await service.snapshot(previous, owner)
    session = service.decode(state)
    session.id = session_id
    return session


def _meta(service: ChatService, request: ResponseRequest, turn: Turn) -> dict[str, Any]:
    """The fields of the response object that do not depend on the answer."""
    return {
        "id": turn.response_id, "object": "response", "created_at": int(time.time()),
        "model": service.settings.model_name, "previous_response_id": request.previous_response_id,
        "store": request.store, "instructions": None, "metadata": request.metadata or {},
        "max_output_tokens": request.max_output_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "user": request.user,
        "session_id": turn.session_id if request.store else None,  # extension
        "prompt_tokens": turn.prompt_tokens, "item_id": "msg_" + secrets.token_hex(12),
    }


def _message(meta: dict, text: str, status: str) -> dict[str, Any]:
    content = [] if status == "in_progress" else [_text_part(text)]
    return {"type": "message", "id": meta["item_id"], "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response(meta: dict, text: str, answer: AnswerEvent | None) -> dict[str, Any]:
    """The response object: in progress (no answer yet), completed, or incomplete (cut by the budget)."""
    body = {k: v for k, v in meta.items() if k not in ("prompt_tokens", "item_id")}
    if answer is None:
        return {**body, "status": "in_progress", "output": [], "usage": None, "error": None,
                "incomplete_details": None}
    cut = answer.stats.answer_tokens == len(answer.token_ids)  # no end-of-turn token: max_output_tokens
    status = "incomplete" if cut else "completed"
    return {
        **body, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": [_message(meta, text, "incomplete" if cut else "completed")],
        "usage": {"input_tokens": meta["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": answer.stats.answer_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": meta["prompt_tokens"] + answer.stats.answer_tokens},
    }


async def _stream(turn: Turn, meta: dict) -> AsyncIterator[bytes]:
    sequence, finished = 0, False
    item = {"output_index": 0, "item_id": meta["item_id"], "content_index": 0}

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        data = {"type": kind, "sequence_number": sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    try:
        yield event("response.created", response=_response(meta, "", None))
        yield event("response.in_progress", response=_response(meta, "", None))
        yield event("response.output_item.added", output_index=0, item=_message(meta, "", "in_progress"))
        yield event("response.content_part.added", **item, part=_text_part(""))
        text = ""
        while True:
            try:
                answer = await turn.next()
            except Exception as error:  # headers are sent: the error goes in the stream
                failure = error if isinstance(error, APIError) else (
                    APIError(503, "the session store is unavailable; retry shortly", "store_unavailable",
                             "server_error") if isinstance(error, StoreUnavailable) else
                    APIError(500, "internal server error", "internal_error", "server_error"))
                yield event("error", code=failure.code, message=failure.message, param=failure.param)
                break
            if isinstance(answer, TokenEvent):
                piece = answer.text if text else answer.text.lstrip()  # as the non-streamed answer
                if piece:
                    text += piece
                    yield event("response.output_text.delta", **item, delta=piece, logprobs=[])
                continue
            done = _response(meta, answer.text, answer)
            yield event("response.output_text.done", **item, text=answer.text, logprobs=[])
            yield event("response.content_part.done", **item, part=_text_part(answer.text))
            yield event("response.output_item.done", output_index=0, item=done["output"][0])
            yield event(f"response.{done['status']}", response=done)
            break
        finished = True
    finally:
        if not finished:
            turn.cancelled.set()  # the client left mid-answer: stop generating, remember nothing
