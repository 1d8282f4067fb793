"""What the server does with a session, independent of HTTP: load it, answer, remember, write it back.

A turn on the server:

    lock the session -> load its state from the store -> stream the answer (model thread pool)
    -> answer complete: the response ends here
    -> in the background: wait for the memory update, write the new state (compare-and-set), unlock

The next request on the same session waits for the lock, so it always reads the memory of every
earlier turn; requests on other sessions run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio

from rxt.baselines import StatelessEngine
from rxt.engine import AnswerEvent, ChatEngine, ReactiveEngine, TokenEvent
from rxt.generation import SamplingConfig
from rxt.serve.auth import same_owner
from rxt.serve.batching import BatchScheduler
from rxt.serve.errors import APIError, bad_request, response_not_found, session_not_found
from rxt.serve.kv_caches import KVCacheKeeper
from rxt.serve.locks import Lease, SessionLocks
from rxt.serve.metrics import ServerMetrics
from rxt.serve.schemas import SESSION_ID_PATTERN, ChatCompletionRequest
from rxt.serve.snapshots import Snapshots
from rxt.serve.store import SessionStore, StoredSession, StoreUnavailable, VersionConflict
from rxt.serve.turn import Turn
from rxt.session import Session, SessionStateError

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model_name: str
    max_body_bytes: int = 1 << 20  # JSON request bodies
    max_state_bytes: int | None = None  # imported session state; None: derived from the model's state size
    max_message_chars: int = 16_000
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128  # when a request does not say
    default_temperature: float = 0.0  # greedy unless the request says otherwise
    lock_ttl_s: float = 30.0  # a session lock held by a killed process frees itself after this
    session_wait_s: float = 60.0  # how long a request waits for its session's earlier turn
    write_retry_s: float = 30.0  # how long a finished turn retries writing its memory while the store is down
    model_threads: int = 4  # turns generated at the same time (max_batch 1: one turn per thread)
    max_batch: int = 64  # RxT: turns of different sessions decoded together (continuous batching); 1: off
    max_queue: int = 256  # turns waiting for a row beyond this are refused with 429
    kv_cache_sessions: int = 1024  # stateless model, cached mode: sessions whose KV cache this process keeps
    kv_cache_bytes: int | None = 1 << 30  # ... and the bytes of KV cache it keeps (None: no byte budget)
    max_sessions_per_key: int = 10_000  # sessions one API key may hold; 0: no limit
    session_idle_s: float = 30 * 86_400.0  # a session not written for this long is deleted; 0: never
    responses_per_session: int = 32  # Responses API: memory snapshots kept per session, the newest


class ChatService:
    def __init__(self, engine: ChatEngine, store: SessionStore, settings: ServeSettings,
                 metrics: ServerMetrics | None = None):
        self.engine, self.store, self.settings = engine, store, settings
        self.metrics = metrics or ServerMetrics()
        self.locks = SessionLocks(store, ttl_s=settings.lock_ttl_s, wait_s=settings.session_wait_s)
        self.executor = ThreadPoolExecutor(settings.model_threads, thread_name_prefix="rxt-generate")
        self.background: set[asyncio.Task] = set()
        initial = engine.new_session()
        self.state_name = next(iter(initial.tensors))  # "stm" (RxT) or "history" (a stateless model)
        self.state_dtype = initial.tensors[self.state_name].dtype
        self.stateless = isinstance(engine, StatelessEngine)
        if settings.max_state_bytes is None:
            history = 8 * engine.model.config.max_seq_len if self.stateless else 0  # int64 token ids
            settings.max_state_bytes = 2 * len(initial.to_bytes()) + history + 65_536
        cached = self.stateless and engine.mode == "cached"
        self.kv_caches = KVCacheKeeper(settings.kv_cache_sessions, settings.kv_cache_bytes) if cached else None
        batched = isinstance(engine, ReactiveEngine) and settings.max_batch > 1
        self.scheduler = BatchScheduler(engine, self.metrics, settings.max_batch) if batched else None
        self.capacity = settings.max_batch if batched else settings.model_threads  # turns answered at once
        self.answering = 0  # turns admitted and not yet answered (running or waiting for a row)
        self.snapshots = Snapshots(store, settings.responses_per_session)

    # -- store access ----------------------------------------------------------------------------
    async def _store(self, method: Callable, *args):
        return await anyio.to_thread.run_sync(method, *args)

    async def _owned(self, session_id: str, owner: str) -> StoredSession:
        stored = await self._store(self.store.get, session_id)
        if stored is None or not same_owner(stored.owner, owner) or self._idle(stored):
            raise session_not_found(session_id)
        return stored

    def _idle(self, stored: StoredSession) -> bool:
        idle_s = self.settings.session_idle_s
        return idle_s > 0 and stored.updated < time.time() - idle_s

    async def _acquire(self, session_id: str, owner: str) -> tuple[Lease, StoredSession]:
        """The session's lock and its stored record. The owner is checked before waiting for the lock,
        so another key's request never queues behind a turn (nor learns from a wait that the id exists)."""
        check_session_id(session_id)
        await self._owned(session_id, owner)
        lease = await self.locks.acquire(session_id)
        try:
            return lease, await self._owned(session_id, owner)  # again: it may have been deleted meanwhile
        except BaseException:
            await lease.release()
            raise

    @contextlib.asynccontextmanager
    async def _locked(self, session_id: str, owner: str) -> AsyncIterator[StoredSession]:
        lease, stored = await self._acquire(session_id, owner)
        try:
            yield stored
        finally:
            await lease.release()

    # -- state -------------------------------------------------------------------------------------
    def decode(self, data: bytes, unreadable_status: int = 409) -> Session:
        """Bytes -> Session for this model: unreadable -> ``unreadable_status``, another model's -> 409."""
        def unreadable(why: str) -> APIError:
            return APIError(unreadable_status, f"session state is not readable: {why}", "invalid_session_state")

        try:
            session = Session.from_bytes(data, device=self.engine.device)
        except SessionStateError as error:
            raise unreadable(str(error)) from None
        if set(session.tensors) != {self.state_name}:
            raise unreadable(f"it holds the tensors {sorted(session.tensors)}; this server's sessions hold exactly "
                             f"one, {self.state_name!r}")
        state = session.tensors[self.state_name]
        if (session.model_type, session.model_identity) != (self.engine.model_type, self.engine.identity):
            raise APIError(409, f"session state does not fit the model this server runs: it was made by the "
                           f"{session.model_type} model {session.model_identity}, this server runs the model "
                           f"{self.engine.identity}", "model_mismatch",
                           type_="conflict_error")
        try:
            if state.dtype != self.state_dtype:
                raise SessionStateError(state.dtype)
            self.engine.check_session(session)
        except (SessionStateError, KeyError):  # worded here: the engine's message shows the model's shapes
            raise APIError(409, f"session state's {self.state_name} tensor ({str(state.dtype).removeprefix('torch.')}"
                           f", shape {list(state.shape)}) does not fit the model this server runs", "model_mismatch",
                           type_="conflict_error") from None
        if state.is_floating_point() and not bool(state.isfinite().all()):
            raise unreadable("its memory holds NaN or infinity")
        return session

    def info(self, session: Session, state_bytes: int) -> dict:
        return {
            "id": session.id, "object": "session", "created": int(session.created), "turns": session.turns,
            "model": self.settings.model_name, "model_identity": session.model_identity,
            "state_bytes": state_bytes, **self._state_shape(session),
        }

    def _state_shape(self, session: Session) -> dict:
        state = session.tensors[self.state_name]
        return {"history_tokens": state.numel()} if self.stateless else {"stm_shape": list(state.shape)}

    async def create(self, owner: str, session: Session | None = None) -> dict:
        await self._check_session_limit(owner)
        session = session or self.engine.new_session()
        data = session.to_bytes()
        await self._store(self.store.put, session.id, owner, data, 0)
        return self.info(session, len(data))

    async def _check_session_limit(self, owner: str) -> None:
        limit = self.settings.max_sessions_per_key
        if limit < 1:
            return
        since = time.time() - self.settings.session_idle_s if self.settings.session_idle_s > 0 else 0.0
        if await self._store(self.store.count_owned, owner, since) >= limit:
            raise APIError(429, f"this API key already holds the most sessions allowed ({limit}, "
                           "--max-sessions-per-key): delete one first", "too_many_sessions",
                           type_="rate_limit_error")

    async def inspect(self, session_id: str, owner: str) -> dict:
        async with self._locked(session_id, owner) as stored:  # waits for a turn in flight: shows all turns
            return self.info(self.decode(stored.state), len(stored.state))

    async def reset(self, session_id: str, owner: str) -> dict:
        """Fresh memory, same id. Works on state another model wrote too (it is not read)."""
        async with self._locked(session_id, owner) as stored:
            session = self.engine.new_session()
            session.id = session_id
            data = session.to_bytes()
            await self._store(self.store.put, session_id, owner, data, stored.version)
            return self.info(session, len(data))

    async def delete(self, session_id: str, owner: str) -> None:
        async with self._locked(session_id, owner):
            await self._store(self.store.delete, session_id)
            await self._store(self.snapshots.delete_all, session_id)

    async def export_state(self, session_id: str, owner: str) -> bytes:
        async with self._locked(session_id, owner) as stored:
            return stored.state

    async def delete_idle(self) -> int:
        """Delete the sessions not written for --session-idle-s (all keys); return how many."""
        if self.settings.session_idle_s <= 0:
            return 0
        deleted = await self._store(self.store.delete_idle, time.time() - self.settings.session_idle_s)
        if deleted:
            log.info("deleted %d idle sessions", deleted)
        return deleted

    async def sweep_idle_sessions(self) -> None:
        """Background task: delete idle sessions now and then (a turn on one is refused before that)."""
        interval = min(60.0, max(1.0, self.settings.session_idle_s / 10))
        while self.settings.session_idle_s > 0:
            try:
                await self.delete_idle()
            except StoreUnavailable as error:
                log.warning("could not delete idle sessions: %s", error)
            await asyncio.sleep(interval)

    async def import_state(self, owner: str, data: bytes, session_id: str | None = None) -> dict:
        """Validate exported bytes; store them as a new session, or replace an existing one's state."""
        session = self.decode(data, unreadable_status=400)
        if session_id is None:
            session.id = secrets.token_urlsafe(18)  # never the exported id: that one is taken
            return await self.create(owner, session)
        async with self._locked(session_id, owner) as stored:
            session.id = session_id
            data = session.to_bytes()
            await self._store(self.store.put, session_id, owner, data, stored.version)
            return self.info(session, len(data))

    # -- turns ---------------------------------------------------------------------------------------
    def sampling(self, request: ChatCompletionRequest, query: str) -> tuple[SamplingConfig, int]:
        """The request's decoding settings within the server's limits, and the prompt's token count."""
        s = self.settings
        if len(query) > s.max_message_chars:
            raise bad_request(f"the user message is longer than this server's limit of {s.max_message_chars} "
                              "characters (--max-message-chars)", "message_too_long", param="messages")
        budget = request.answer_budget()
        if budget is not None and budget > s.max_tokens_limit:
            raise bad_request(f"max_tokens={budget} exceeds this server's limit of {s.max_tokens_limit} "
                              "(--max-tokens-limit)", "max_tokens_too_large", param="max_tokens")
        prompt_tokens = len(self.engine.tokenizer.prompt(query))
        context = self.engine.model.config.max_seq_len
        room = context - prompt_tokens - 1  # the memory encoder reads prompt + answer + [EOT]
        if budget is None:
            budget = min(s.default_max_tokens, room)
        if room < 1 or budget > room:
            asked = "" if request.answer_budget() is None else f" plus max_tokens={budget}"
            raise bad_request(f"the message{asked} does not fit the model's context of {context} tokens per turn",
                              "context_length_exceeded", param="messages")
        temperature = s.default_temperature if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        return SamplingConfig(max_new_tokens=budget, temperature=temperature, top_p=top_p,
                              seed=request.seed), prompt_tokens

    async def start_turn(self, session_id: str | None, owner: str, query: str, sampling: SamplingConfig,
                         prompt_tokens: int, started: float, from_response: str | None = None) -> Turn:
        """Lock and load the session (a new one if ``session_id`` is None) and start answering.

        ``from_response``: start from the memory that response left instead of the session's latest."""
        self._check_room()  # before a new session is stored or a lock waited for
        created = session_id is None
        if created:  # stored first, so the id the client sees at once is valid at once
            session_id = (await self.create(owner))["id"]
        try:
            lease, stored = await self._acquire(session_id, owner)
        except BaseException:
            if created:
                await self._forget_new(session_id)
            raise
        turn = Turn(session_id, prompt_tokens)
        try:
            state = stored.state if from_response is None else await self.snapshot(from_response, owner)
            session = self.decode(state)
            session.id = session_id
            self._check_context(session, prompt_tokens, sampling.max_new_tokens)
            kept = self.kv_caches is not None and self.kv_caches.attach(session)
            turn.history_reread = self.stateless and not kept and session.turns > 0
            if turn.history_reread:
                self.metrics.history_rereads.inc()
            self._admit()
            answering = self._start_answer(turn, session, query, sampling, started)
        except BaseException:
            if created:  # a refused turn leaves no empty session behind
                await self._forget_new(session_id)
            await lease.release()
            raise
        work = self._run_turn(turn, answering, session, stored, lease, started)
        self._keep(asyncio.get_running_loop().create_task(work))
        return turn

    async def snapshot(self, response_id_: str, owner: str) -> bytes:
        """The memory a response left (404 if it was not kept, has expired or is another key's)."""
        data = await self._store(self.snapshots.get, response_id_, owner)
        if data is None:
            raise response_not_found(response_id_, "previous_response_not_found")
        return data

    async def start_unstored_turn(self, session: Session, query: str, sampling: SamplingConfig,
                                  prompt_tokens: int, started: float) -> Turn:
        """Answer from a given state and write nothing back (Responses API, ``store: false``)."""
        self._admit()
        turn = Turn(session.id, prompt_tokens)
        try:
            answering = self._start_answer(turn, session, query, sampling, started)
        except BaseException:
            self.answering -= 1
            raise
        self._keep(asyncio.get_running_loop().create_task(self._run_turn(turn, answering, session, None, None,
                                                                         started)))
        return turn

    async def _forget_new(self, session_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._store(self.store.delete, session_id)

    def _check_room(self) -> None:
        """Refuse the turn (429) when --max-queue turns already wait for a row."""
        if self.answering >= self.capacity + self.settings.max_queue:
            self.metrics.queue_rejections.inc()
            raise APIError(429, f"the server is busy: {self.settings.max_queue} turns are already waiting "
                           "(--max-queue); retry shortly", "queue_full", type_="rate_limit_error",
                           headers={"Retry-After": "1"})

    def _admit(self) -> None:
        self._check_room()  # again: other turns may have come in while this one waited for its session
        self.answering += 1

    def queued(self) -> int:
        """Turns admitted that do not have a row yet."""
        return max(0, self.answering - (self.scheduler.rows if self.scheduler else self.capacity))

    def _start_answer(self, turn: Turn, session: Session, query: str, sampling: SamplingConfig,
                      started: float) -> asyncio.Future:
        """The batching scheduler, or (--max-batch 1, stateless models) one model thread per turn."""
        if self.scheduler is not None:
            return self.scheduler.submit(turn, session, query, sampling, started)
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.executor, self._generate, turn, session, query, sampling, loop, started)

    def _check_context(self, session: Session, prompt_tokens: int, budget: int) -> None:
        """A stateless model re-reads its history: history, message and answer must fit its context."""
        if not self.stateless:
            return
        history, context = self.engine.history_tokens(session), self.engine.model.config.max_seq_len
        if history + prompt_tokens + budget + 1 > context:
            raise bad_request(f"this conversation, with the message and its answer, no longer fits the model's "
                              f"context of {context} tokens: reset the session or start a new one",
                              "context_length_exceeded", param="messages")

    def _keep(self, task: asyncio.Task) -> None:
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _run_turn(self, turn: Turn, answering: asyncio.Future, session: Session,
                        stored: StoredSession | None, lease: Lease | None, started: float) -> None:
        """Wait for the answer, then (unless ``lease`` is None: nothing to write) remember the turn."""
        try:
            try:
                answer = await answering
            finally:
                self.answering -= 1
            if answer is None:
                return  # the client left before the answer was complete: the turn is not remembered
            answered = time.perf_counter()
            self.metrics.answer.observe(answered - started)
            self.metrics.turns.inc()
            self.metrics.tokens.inc(answer.stats.answer_tokens)
            turn.queue.put_nowait(answer)
            if lease is None:
                return
            if self.kv_caches is not None:
                self.kv_caches.keep(session)
            await self._remember(turn, answer, session, stored, lease, answered)
        except asyncio.CancelledError:  # shutting down
            turn.cancelled.set()
            turn.queue.put_nowait(APIError(503, "the server is shutting down", "shutting_down", "server_error"))
            raise
        except Exception as error:  # the HTTP side shows it; the lock is released below either way
            turn.queue.put_nowait(error)
            if not isinstance(error, (APIError, StoreUnavailable)):
                log.exception("turn of session %s failed", turn.session_id)
        finally:
            if lease is not None:
                await lease.release()

    def _generate(self, turn: Turn, session: Session, query: str, sampling: SamplingConfig,
                  loop: asyncio.AbstractEventLoop, started: float) -> AnswerEvent | None:
        """Model thread: stream tokens to the event loop; return the AnswerEvent (memory update started)."""
        events = self.engine.stream(session, query, sampling)
        first = True
        try:
            for event in events:
                if turn.cancelled.is_set():
                    return None
                if isinstance(event, TokenEvent):
                    if first:
                        self.metrics.first_token.observe(time.perf_counter() - started)
                        first = False
                    loop.call_soon_threadsafe(turn.queue.put_nowait, event)
                elif isinstance(event, AnswerEvent):
                    return event
        finally:
            events.close()  # after the AnswerEvent: do not wait for the memory update here
        return None

    async def _remember(self, turn: Turn, answer: AnswerEvent, session: Session, stored: StoredSession,
                        lease: Lease, answered: float) -> None:
        """Wait for the memory update and write the new state; retry while the store is down."""
        try:
            await anyio.to_thread.run_sync(session.wait)  # the background memory update
        except Exception:
            self.metrics.write_failures.inc()
            log.exception("memory update of session %s failed; it keeps its previous state", session.id)
            return
        state = session.tensors[self.state_name]
        if state.is_floating_point() and not bool(state.isfinite().all()):
            self.metrics.write_failures.inc()
            self.metrics.nonfinite_memories.inc()
            log.error("turn %d of session %s gave a memory with NaN or infinity; the session keeps its previous "
                      "memory", session.turns, session.id)
            return
        data = await anyio.to_thread.run_sync(session.to_bytes)
        deadline = time.monotonic() + self.settings.write_retry_s
        while True:
            try:
                await self._store(self.store.put, session.id, stored.owner, data, stored.version)
                break
            except StoreUnavailable as error:
                if time.monotonic() > deadline:
                    return self._lost(session, f"the store stayed unavailable: {error}")
                await asyncio.sleep(0.25)
            except VersionConflict as error:  # our lock expired and another turn wrote first
                return self._lost(session, str(error))
        self.metrics.memory_update.observe(time.perf_counter() - answered)
        if lease.lost:
            log.warning("session %s: lock expired during the update, but no one wrote in between", session.id)
        if turn.describe is not None:
            try:
                await self._store(self.snapshots.add, session.id, turn.response_id, stored.owner, data,
                                  turn.describe(answer))
            except (StoreUnavailable, VersionConflict) as error:
                log.error("the memory snapshot of response %s was not kept: %s", turn.response_id, error)

    def _lost(self, session: Session, why: str) -> None:
        self.metrics.write_failures.inc()
        log.error("the memory of turn %d of session %s was not written: %s", session.turns, session.id, why)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def drain(self, timeout_s: float = 60.0) -> None:
        """Let turns in flight finish writing their memory (graceful shutdown)."""
        if self.background:
            await asyncio.wait(list(self.background), timeout=timeout_s)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def check_session_id(session_id: str) -> None:
    if not SESSION_ID_PATTERN.match(session_id):
        raise session_not_found(session_id)

