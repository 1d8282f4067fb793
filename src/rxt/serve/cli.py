"""`rxt serve`: the command line of the OpenAI-compatible server (rxt.serve.app): its options, the checks
on them, loading the model into the right engine, and running it under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from rxt.baselines import MODES, StatelessEngine
from rxt.engine import ChatEngine, ReactiveEngine
from rxt.serve.app import DELAY_ENV, KEYS_ENV, create_app
from rxt.serve.service import ServeSettings
from rxt.serve.store import open_store

log = logging.getLogger("rxt.serve.app")  # (the server's one logger)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--base", help="for a reactive adapter directory (adapter.json): its pretrained base model "
                        "directory (default: where adapter.json says it was)")
    parser.add_argument("--baseline", choices=MODES, help="stateless model directories only: how to keep the history "
                        "(default cached: the history in the store, its KV cache kept in this process)")
    parser.add_argument("--store", default="sqlite:///rxt_sessions.db",
                        help="sqlite:///path.db (default sqlite:///rxt_sessions.db), sqlite:///:memory: or redis://host:port/db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help=f"accept this bearer key (repeatable; also ${KEYS_ENV}, comma-separated); none: auth off")
    parser.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    defaults = ServeSettings(model_name="")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--max-state-bytes", type=int, default=None, help="largest imported session state")
    parser.add_argument("--max-message-chars", type=int, default=defaults.max_message_chars)
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit)
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    parser.add_argument("--lock-ttl-s", type=float, default=defaults.lock_ttl_s,
                        help="a session lock left by a killed server frees itself after this")
    parser.add_argument("--session-wait-s", type=float, default=defaults.session_wait_s)
    parser.add_argument("--model-threads", type=int, default=None,
                        help="turns generated at the same time (default: 1 on CPU, where PyTorch already uses "
                             f"every core for one turn; {defaults.model_threads} on GPU)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="RxT: turns of different sessions decoded together in one continuously refilled "
                             f"batch (default {defaults.max_batch}); 1: one turn at a time per model thread")
    parser.add_argument("--compile", action="store_true",
                        help="static caches and compiled prefill/decode (rxt.fast) for turns answered one at a "
                             "time (stateless models, or RxT with --max-batch 1)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="turns that may wait for a row; beyond this the server answers 429 with Retry-After "
                             f"(default {defaults.max_queue})")
    parser.add_argument("--kv-cache-sessions", type=int, default=ServeSettings.kv_cache_sessions,
                        help="stateless models, cached mode: sessions whose KV cache this process keeps "
                             f"(default {ServeSettings.kv_cache_sessions})")
    parser.add_argument("--kv-cache-bytes", type=int, default=ServeSettings.kv_cache_bytes,
                        help="stateless models, cached mode: bytes of KV cache this process keeps, least recently "
                             "used evicted first; an evicted session's next turn re-reads its history "
                             "(default 1 GiB; 0: none kept)")
    parser.add_argument("--max-sessions-per-key", type=int, default=defaults.max_sessions_per_key,
                        help=f"sessions one API key may hold (default {defaults.max_sessions_per_key}; 0: no limit)")
    parser.add_argument("--session-idle-s", type=float, default=defaults.session_idle_s,
                        help="delete a session not written for this many seconds (default 30 days; 0: never)")
    parser.add_argument("--responses-per-session", type=int, default=defaults.responses_per_session,
                        help="Responses API: memory snapshots kept per session, the newest (default "
                             f"{defaults.responses_per_session}); previous_response_id may name any of them")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import torch

    for name in ("max_body_bytes", "max_message_chars", "max_tokens_limit", "default_max_tokens", "lock_ttl_s",
                 "session_wait_s"):
        if getattr(args, name) <= 0:
            return _fail(f"--{name.replace('_', '-')} must be > 0")
    if args.model_threads is not None and args.model_threads < 1:
        return _fail("--model-threads must be >= 1")
    if args.max_batch < 1:
        return _fail("--max-batch must be >= 1")
    if args.max_queue < 0:
        return _fail("--max-queue must be >= 0")
    if args.kv_cache_sessions < 0 or args.kv_cache_bytes < 0:
        return _fail("--kv-cache-sessions and --kv-cache-bytes must be >= 0")
    if min(args.max_sessions_per_key, args.responses_per_session) < 0 or not 0 <= args.session_idle_s < float("inf"):
        return _fail("--max-sessions-per-key, --session-idle-s and --responses-per-session must be >= 0")

    from rxt.model import ReactiveTransformer, StatelessLM, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_model(args.model, device, args.base)
    except (FileNotFoundError, ValueError) as error:
        return _fail(f"cannot load {args.model}: {error}")
    if not isinstance(model, StatelessLM) and args.baseline is not None:
        return _fail(f"{args.model} holds an RxT model; --baseline applies only to a stateless model directory")
    if model.tokenizer is None:
        return _fail(f"{args.model} has no tokenizer.json")
    try:
        store = open_store(args.store)
    except ValueError as error:
        return _fail(str(error))
    try:
        delay_s = float(os.environ.get(DELAY_ENV) or 0)
    except ValueError:
        return _fail(f"{DELAY_ENV} must be a number of seconds, got {os.environ[DELAY_ENV]!r}")
    inference = "compiled" if args.compile else "eager"
    if not isinstance(model, StatelessLM):  # an RxT, or a reactive adapter with its base
        if args.compile and not isinstance(model, ReactiveTransformer):
            return _fail("--compile runs rxt's own models; a reactive adapter runs on the eager path")
        engine: ChatEngine = ReactiveEngine(model, update_delay_s=delay_s, inference=inference)
        if args.compile and args.max_batch > 1:
            log.warning("--compile applies to turns answered one at a time: continuous batching "
                        "(--max-batch %d) decodes on the eager path; pass --max-batch 1 to compile", args.max_batch)
    else:  # a stateless model: its session state is the history; the server re-reads it (or its KV cache)
        engine = StatelessEngine(model, mode=args.baseline or "cached", inference=inference)
    settings = ServeSettings(
        model_name=args.model_name or Path(args.model).resolve().name,
        max_body_bytes=args.max_body_bytes, max_state_bytes=args.max_state_bytes,
        max_message_chars=args.max_message_chars, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, lock_ttl_s=args.lock_ttl_s,
        session_wait_s=args.session_wait_s,
        model_threads=args.model_threads or (1 if engine.device.type == "cpu" else ServeSettings.model_threads),
        kv_cache_sessions=args.kv_cache_sessions, kv_cache_bytes=args.kv_cache_bytes, max_batch=args.max_batch, max_queue=args.max_queue,
        max_sessions_per_key=args.max_sessions_per_key, session_idle_s=args.session_idle_s,
        responses_per_session=args.responses_per_session,
    )
    keys = list(args.api_key) + [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("auth is off (no --api-key) and the server listens on %s: anyone who reaches it can chat",
                    args.host)
    app = create_app(engine, store, settings, keys)
    log.info("serving %s (identity %s) on http://%s:%d, store %s, auth %s", settings.model_name, engine.identity,
             args.host, args.port, redact(args.store), "on" if keys else "off")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def _fail(message: str) -> int:
    print(f"rxt serve: {message}", file=sys.stderr)
    return 2


def redact(url: str) -> str:
    """A store URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url
