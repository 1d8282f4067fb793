"""`rxt serve`: an OpenAI-compatible chat server whose sessions keep their memory (the STM) in a store.

    rxt serve --model models/nano/rxt --store sqlite:///sessions.db --port 8000 --api-key KEY

A stateless model directory (e.g. one from `rxt import gguf`) is served the same way; its session
state is the conversation's history, re-read every turn, or (``--baseline cached``, the default)
continued from a KV cache this process keeps for its recent sessions.

Endpoints (docs/serving.md): POST /v1/chat/completions (SSE with ``stream: true``), /v1/responses
(previous_response_id continues from any kept turn's memory; retrieve, delete), GET /v1/models,
/v1/sessions (create, inspect, reset, delete, export and import state), GET /health, GET /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rxt.engine import AnswerEvent, ChatEngine, TokenEvent
from rxt.serve import responses as responses_api
from rxt.serve.auth import ApiKeys
from rxt.serve.errors import APIError, bad_request, error_body, not_found
from rxt.serve.metrics import CONTENT_TYPE, ServerMetrics
from rxt.serve.schemas import (
    ChatCompletionRequest,
    binary_body,
    chunk,
    completion,
    completion_id,
    json_body,
    parse_chat_request,
    sse,
    usage,
)
from rxt.serve.service import ChatService, ServeSettings
from rxt.serve.store import SessionStore, StoreUnavailable, VersionConflict
from rxt.serve.turn import Turn

log = logging.getLogger(__name__)

DELAY_ENV = "RXT_MEMORY_UPDATE_DELAY_S"  # test hook: slow every memory update down by this many seconds
KEYS_ENV = "RXT_API_KEYS"  # comma-separated keys, kept out of the process list
STATE_BODY = "session state exported by GET /v1/sessions/{session_id}/state (safetensors)"


def create_app(engine: ChatEngine, store: SessionStore, settings: ServeSettings,
               api_keys: Sequence[str] = ()) -> FastAPI:
    metrics = ServerMetrics()
    service = ChatService(engine, store, settings, metrics)
    metrics.add_gauge("rxt_active_sessions", "Sessions with a request running or queued in this process.",
                      lambda: service.locks.held())
    metrics.add_gauge("rxt_batch_rows", "Turns being answered now (rows of the running batch with --max-batch > 1).",
                      lambda: service.scheduler.rows if service.scheduler else service.answering - service.queued())
    metrics.add_gauge("rxt_queued_turns", "Turns admitted that wait for a row (at most --max-queue).",
                      service.queued)
    if service.kv_caches is not None:
        metrics.add_gauge("rxt_kv_cache_bytes", "Stateless model: bytes of KV cache kept between turns.",
                          lambda: service.kv_caches.nbytes)
        metrics.add_gauge("rxt_kv_cache_sessions", "Stateless model: sessions whose KV cache is kept.",
                          lambda: len(service.kv_caches))
    metrics.add_gauge("rxt_stored_sessions", "Sessions in the store (absent while the store is down).",
                      lambda: _or_none(store.count))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(service.sweep_idle_sessions())
        yield
        sweeper.cancel()
        await service.drain()  # turns answered but not yet remembered get written first
        service.close()

    app = FastAPI(title="rxt", summary="Reactive Transformer chat server", lifespan=lifespan)
    app.state.service, app.state.keys, app.state.metrics = service, ApiKeys(api_keys), metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_error_handlers(app)
    _add_routes(app)
    return app


def _or_none(read):
    try:
        return read()
    except StoreUnavailable:
        return None


class MetricsMiddleware:
    """Counts every response by route template and status, and times it to the response headers."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, started = time.perf_counter(), False

        def count(status: int) -> None:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.inc(method=scope["method"], route=route, status=str(status))
            self.metrics.request_seconds.observe(time.perf_counter() - start, route=route)

        async def send_and_count(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except Exception:  # the outermost handler answers 500 after this middleware: count it here
            if not started:
                count(500)
            raise


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(VersionConflict)
    async def conflict(request: Request, error: VersionConflict) -> JSONResponse:
        log.warning("concurrent write: %s", error)
        return JSONResponse(error_body("the session changed while this request ran; retry", "session_changed",
                                       "conflict_error"), status_code=409)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, error: StoreUnavailable) -> JSONResponse:
        log.warning("store unavailable: %s", error)
        return JSONResponse(store_error(error).body(), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": str(error)}
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(error_body(f"{where}: {first['msg']}", "invalid_value", param=where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(error_body(str(error.detail), code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "internal_error", "server_error"), status_code=500)


def store_error(error: StoreUnavailable) -> APIError:
    """The client learns that the store is down, not where it is (the log has the details)."""
    return APIError(503, "the session store is unavailable; retry shortly", "store_unavailable",
                    type_="server_error", headers={"Retry-After": "1"})


# -- request helpers ----------------------------------------------------------------------------------
def _service(request: Request) -> ChatService:
    return request.app.state.service


def _owner(request: Request) -> str:
    return request.app.state.keys.owner(request.headers.get("authorization"))


async def read_body(request: Request, limit: int, what: str = "--max-body-bytes") -> bytes:
    """The whole body, or 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header", "invalid_header")
        if int(declared) > limit:
            raise _too_large(limit, what)
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise _too_large(limit, what)
        chunks.append(piece)
    return b"".join(chunks)


def _too_large(limit: int, what: str) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes ({what})",
                    "request_too_large")


def _session_id(request: Request, body_value: str | None) -> str | None:
    header = request.headers.get("x-session-id")
    if header is not None and body_value is not None and header != body_value:
        raise bad_request("the X-Session-Id header and the session_id field name different sessions",
                          "conflicting_session_id", param="session_id")
    return body_value if body_value is not None else header


async def _parsed(request: Request, parse: Callable[[bytes], Any]) -> tuple[str, ChatService, Any]:
    """The owner, the service and the parsed JSON body of a request that names a model."""
    owner, service = _owner(request), _service(request)
    parsed = parse(await read_body(request, service.settings.max_body_bytes))
    _check_model(service, parsed.model)
    return owner, service, parsed


def _check_model(service: ChatService, name: str | None) -> None:
    if name is not None and name not in (service.settings.model_name, service.engine.identity):
        raise not_found(f"this server serves the model {service.settings.model_name!r}, not {name!r}",
                        "model_not_found")


def _model_card(service: ChatService) -> dict:
    return {"id": service.settings.model_name, "object": "model", "created": 0, "owned_by": "rxt",
            "identity": service.engine.identity, "max_seq_len": service.engine.model.config.max_seq_len}


# -- routes ----------------------------------------------------------------------------------------------
def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        service = _service(request)
        body = {"status": "ok", "model": service.settings.model_name, "model_identity": service.engine.identity,
                "store": "ok"}
        try:
            await anyio.to_thread.run_sync(service.store.ping)
        except StoreUnavailable as error:
            log.warning("health: store unavailable: %s", error)
            return JSONResponse({**body, "status": "degraded", "store": "unavailable"}, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        text = await anyio.to_thread.run_sync(request.app.state.metrics.render)
        return Response(text, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _owner(request)
        return {"object": "list", "data": [_model_card(_service(request))]}

    @app.get("/v1/models/{model_id}")
    async def model(request: Request, model_id: str) -> dict:
        _owner(request)
        _check_model(_service(request), model_id)
        return _model_card(_service(request))

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        owner, service, chat = await _parsed(request, parse_chat_request)
        query = chat.query()
        sampling, prompt_tokens = service.sampling(chat, query)
        session_id = _session_id(request, chat.session_id)
        turn = await service.start_turn(session_id, owner, query, sampling, prompt_tokens, started)
        headers = {"X-Session-Id": turn.session_id}
        if chat.stream:
            return StreamingResponse(stream_answer(turn, chat, service), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        answer = await turn.answer()
        body = completion(completion_id(), service.settings.model_name, service.engine.identity, turn.session_id,
                          answer.text, finish_reason(answer), turn_usage(turn, answer))
        return JSONResponse(body, headers=headers)

    @app.post("/v1/responses", openapi_extra=json_body(responses_api.ResponseRequest))
    async def create_response(request: Request) -> Response:
        started = time.perf_counter()
        owner, service, parsed = await _parsed(request, responses_api.parse_response_request)
        return await responses_api.create_response(service, owner, parsed, started)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(request: Request, response_id: str, stream: bool = False) -> dict:
        return await responses_api.retrieve_response(_service(request), _owner(request), response_id, stream)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> dict:
        await responses_api.delete_response(_service(request), _owner(request), response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request) -> JSONResponse:
        info = await _service(request).create(_owner(request))
        return JSONResponse(info, status_code=201, headers={"X-Session-Id": info["id"]})

    @app.post("/v1/sessions/import", status_code=201, openapi_extra=binary_body(STATE_BODY))
    async def import_session(request: Request) -> JSONResponse:
        owner, service = _owner(request), _service(request)
        data = await read_body(request, service.settings.max_state_bytes, "--max-state-bytes")
        info = await service.import_state(owner, data)
        return JSONResponse(info, status_code=201, headers={"X-Session-Id": info["id"]})

    @app.get("/v1/sessions/{session_id}")
    async def inspect_session(request: Request, session_id: str) -> dict:
        return await _service(request).inspect(session_id, _owner(request))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(request: Request, session_id: str) -> dict:
        await _service(request).delete(session_id, _owner(request))
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/reset")
    async def reset_session(request: Request, session_id: str) -> dict:
        return await _service(request).reset(session_id, _owner(request))

    @app.get("/v1/sessions/{session_id}/state")
    async def export_session(request: Request, session_id: str) -> Response:
        data = await _service(request).export_state(session_id, _owner(request))
        return Response(data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{session_id}.safetensors"'})

    @app.put("/v1/sessions/{session_id}/state", openapi_extra=binary_body(STATE_BODY))
    async def replace_session_state(request: Request, session_id: str) -> dict:
        owner, service = _owner(request), _service(request)
        data = await read_body(request, service.settings.max_state_bytes, "--max-state-bytes")
        return await service.import_state(owner, data, session_id)


def turn_usage(turn: Turn, answer: AnswerEvent) -> dict:
    stats = answer.stats
    return usage(stats.prompt_tokens, stats.answer_tokens, stats.state_bytes, turn.history_reread)


def finish_reason(answer: AnswerEvent) -> str:
    """'stop' when the model ended the answer itself ([EOT]), 'length' when max_tokens cut it."""
    return "stop" if answer.stats.answer_tokens > len(answer.token_ids) else "length"


async def stream_answer(turn: Turn, chat: ChatCompletionRequest, service: ChatService) -> AsyncIterator[bytes]:
    """SSE: a role chunk, one chunk per piece of text, a finish chunk, (usage), then [DONE]."""
    id_, model, fingerprint = completion_id(), service.settings.model_name, service.engine.identity

    def make(delta: dict | None, finish: str | None = None, usage_: dict | None = None) -> bytes:
        return sse(chunk(id_, model, fingerprint, turn.session_id, delta, finish, usage_))

    finished, text_started = False, False
    try:
        yield make({"role": "assistant", "content": ""})
        done = False
        while not done:
            # everything already queued goes out in one write: under load a client's tokens of several
            # decoding steps wait here together, and each write is a round of the server's HTTP machinery
            out = []
            for item in [await turn.queue.get(), *turn.ready()]:
                if isinstance(item, Exception):  # headers are sent: the error goes in the stream
                    body = (item if isinstance(item, APIError) else
                            store_error(item) if isinstance(item, StoreUnavailable) else
                            APIError(500, "internal server error", "internal_error", "server_error")).body()
                    out.append(sse(body))
                    done = True
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, TokenEvent):
                    text = item.text if text_started else item.text.lstrip()  # as the non-stream answer
                    if text:
                        text_started = True
                        out.append(make({"content": text}))
                    continue
                out.append(make({}, finish_reason(item)))
                if chat.stream_options is not None and chat.stream_options.include_usage:
                    out.append(make(None, usage_=turn_usage(turn, item)))
                done = True
                break
            if out:
                yield b"".join(out)
        yield sse("[DONE]")
        finished = True
    finally:
        if not finished:
            turn.cancelled.set()  # the client left mid-answer: stop generating, remember nothing
