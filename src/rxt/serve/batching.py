"""Continuous batching of RxT turns: the turns of different sessions share every decoding step.

One scheduler thread owns a running batch. Each loop:

    join   waiting turns take free rows (up to --max-batch): one batched prefill, then their KV caches
           are left-padded to the batch's length and concatenated (per-row positions and key masks keep
           every row's attention exactly its own)
    sample one token for every row, streamed to that row's client
    leave  rows that hit [EOT] or their budget, and rows whose client went away; the finished ones
           start their memory update together (one batch on the engine's background worker), off the
           answer path
    step   one batched decode step for the rows that remain

An RxT session's whole state is its fixed-size STM, so a row is just a prompt, the memory K/V the
decoder reads (projected once per turn) and a KV cache that lives only for the turn. For a model whose
memory encoder is its decoder (ReactivePretrained), each row also keeps the memory layers' states of the
tokens it ran, and a finished row hands them with its cache to the memory update (rxt.turn_states).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from rxt.attention import KVCache
from rxt.engine import AnswerEvent, ReactiveEngine, TokenEvent
from rxt.generation import SamplingConfig, left_pad, sample_next
from rxt.model import positions_from_mask
from rxt.pretrained.kv_memory import KVRead, as_prefix
from rxt.serve.metrics import ServerMetrics
from rxt.session import Session
from rxt.turn_states import MemoryKV, TurnStates, needs_surprisal, prompt_surprisal

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One turn in (or waiting for) the running batch."""

    turn: object  # rxt.serve.service.Turn: .queue gets TokenEvents, .cancelled says the client left
    session: Session
    prompt: list[int]
    sampling: SamplingConfig
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future  # resolved with the AnswerEvent, or None when the client left
    started: float  # perf_counter of the request, for time to first token
    answer: list[int] = field(default_factory=list)
    shown: int = 0  # characters streamed so far
    joined: float = 0.0
    first_token_s: float | None = None
    generator: torch.Generator | None = None
    states: list[list[torch.Tensor]] = field(default_factory=list)  # per memory layer: (T, D) pieces of the
    # states of the turn's tokens run so far (engines that keep them)
    surprisal: torch.Tensor | None = None  # the prompt tokens' -log p, for a memory that ranks by surprise

    def ended(self, end_id: int) -> bool:
        return bool(self.answer) and (self.answer[-1] == end_id or len(self.answer) >= self.sampling.max_new_tokens)


class Outbox:
    """What one step tells the clients (tokens, results), handed to each event loop in one wake-up."""

    def __init__(self) -> None:
        self._calls: dict[asyncio.AbstractEventLoop, list[tuple]] = {}

    def send(self, row: Row, event: TokenEvent) -> None:
        self._calls.setdefault(row.loop, []).append((row.turn.queue.put_nowait, event))

    def resolve(self, row: Row, value: AnswerEvent | BaseException | None) -> None:
        future = row.result
        setter = future.set_exception if isinstance(value, BaseException) else future.set_result
        self._calls.setdefault(row.loop, []).append((_settle, future, setter, value))

    def deliver(self) -> None:
        calls, self._calls = self._calls, {}
        for loop, items in calls.items():
            try:
                loop.call_soon_threadsafe(_run_all, items)
            except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
                pass


def _run_all(calls: list[tuple]) -> None:
    for function, *args in calls:
        function(*args)


def _settle(future: asyncio.Future, setter, value) -> None:
    if not future.done():
        setter(value)


class RunningBatch:
    """The decoder state of the rows in flight: KV caches, memory K/V, key mask, next positions."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.caches: list[KVCache] = []
        self.memory_kv: MemoryKV = []  # per decoder layer, None where it reads no memory
        self.key_mask: torch.Tensor | None = None  # (B, S) over cached tokens
        self.next_position: torch.Tensor | None = None  # (B,)
        self.logits: torch.Tensor | None = None  # (B, V): what the next token is sampled from

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, other: RunningBatch) -> None:
        """Append ``other``'s rows: the shorter cache is left-padded with masked-out columns."""
        if not self.rows:
            self.__dict__.update(other.__dict__)
            return
        width = max(self.key_mask.shape[1], other.key_mask.shape[1])
        for mine, theirs in zip(self.caches, other.caches, strict=True):
            mine.k = torch.cat([_pad_left(mine.k, width, 2), _pad_left(theirs.k, width, 2)])
            mine.v = torch.cat([_pad_left(mine.v, width, 2), _pad_left(theirs.v, width, 2)])
        self.memory_kv = [None if mine is None else (torch.cat([mine[0], theirs[0]]), torch.cat([mine[1], theirs[1]]))
                          for mine, theirs in zip(self.memory_kv, other.memory_kv, strict=True)]
        self.key_mask = torch.cat([_pad_left(self.key_mask, width, 1), _pad_left(other.key_mask, width, 1)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; drop cache columns that no remaining row attends to."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            self.__init__()
            return
        index = torch.tensor(indices, device=self.key_mask.device)
        used = self.key_mask[index].any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.key_mask.shape[1]
        for cache in self.caches:
            cache.k, cache.v = cache.k[index, :, first:], cache.v[index, :, first:]
        self.memory_kv = _memory_rows(self.memory_kv, index)
        self.key_mask = self.key_mask[index, first:]
        self.next_position, self.logits = self.next_position[index], self.logits[index]

    def turn_states(self, indices: list[int]) -> TurnStates:
        """What the memory update needs of these rows: their kept states, cache, key mask and memory K/V."""
        index = torch.tensor(indices, device=self.key_mask.device)
        caches = [KVCache(cache.k[index], cache.v[index]) for cache in self.caches]
        states = [[torch.cat(pieces) for pieces in self.rows[i].states] for i in indices]
        surprisal = [self.rows[i].surprisal for i in indices]
        return TurnStates(states, caches, self.key_mask[index], _memory_rows(self.memory_kv, index),
                          None if any(s is None for s in surprisal) else surprisal)


def _memory_rows(memory_kv: MemoryKV, index: torch.Tensor) -> MemoryKV:
    return [None if kv is None else (kv[0][index], kv[1][index]) for kv in memory_kv]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BatchScheduler:
    """A thread that answers the turns of many sessions in one continuously refilled batch."""

    def __init__(self, engine: ReactiveEngine, metrics: ServerMetrics, max_batch: int, start: bool = True):
        self.engine, self.metrics, self.max_batch = engine, metrics, max_batch
        self.end_id = engine.tokenizer.end_id
        self.batch = RunningBatch()
        self.outbox = Outbox()
        self._waiting: collections.deque[Row] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rxt-batch", daemon=True)
        if start:  # tests drive step() themselves
            self._thread.start()

    @property
    def rows(self) -> int:
        return len(self.batch)

    def submit(self, turn, session: Session, query: str, sampling: SamplingConfig, started: float) -> asyncio.Future:
        """Queue a turn (event loop thread); the future gets its AnswerEvent, or None if the client left."""
        loop = asyncio.get_running_loop()
        row = Row(turn, session, self._prompt(query), sampling, loop, loop.create_future(), started,
                  generator=sampling.generator(self.engine.device))
        with self._wake:
            self._waiting.append(row)
            self._wake.notify()
        return row.result

    def _prompt(self, query: str) -> list[int]:
        """The tokens the decoder reads for the message, as the engine's own turn loop builds them."""
        turn_prompt = getattr(self.engine, "turn_prompt", None)  # engines whose turns open with a preamble
        return turn_prompt(query) if turn_prompt is not None else self.engine.tokenizer.prompt(query)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(10)

    def step(self) -> None:
        """Waiting turns join (as many as there are free rows), then every row gets one token."""
        with self._wake:
            free = self.max_batch - len(self.batch)
            joining = [self._waiting.popleft() for _ in range(min(len(self._waiting), free))]
        try:
            with torch.no_grad():
                self._join(joining)
                self._advance()
        except Exception as error:  # a model error fails the turns in flight, not the server
            log.exception("batched decoding failed; the turns in flight fail")
            for row in {id(r): r for r in self.batch.rows + joining}.values():
                self.outbox.resolve(row, error)
            self.batch = RunningBatch()
        self.outbox.deliver()

    # -- the scheduler thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self.batch.rows:
                    self._wake.wait()
                if self._closed:
                    return
            self.step()

    def _join(self, rows: list[Row]) -> None:
        """Prefill the newcomers together and add them to the running batch."""
        rows = [r for r in rows if not self._left(r)]
        if not rows:
            return
        ids, mask = left_pad([r.prompt for r in rows], self.engine.tokenizer.pad_id, self.engine.device)
        positions = positions_from_mask(mask)
        stm = torch.cat([r.session.tensors["stm"] for r in rows], dim=1)  # (L, B, S, D)
        joining = RunningBatch()
        joining.rows, joining.caches = rows, [KVCache() for _ in self.engine.model.decoder.layers]
        joining.memory_kv = self.engine.model.project_memory(stm)
        if isinstance(joining.memory_kv, KVRead):  # a kv memory is read as the front of each row's cache
            joining.memory_kv, mask, positions = as_prefix(joining.memory_kv, joining.caches, mask, positions)
        hidden = self._forward(joining, ids, mask, positions)  # (B, T, D)
        joining.logits = self.engine.model.logits(hidden[:, -1])  # only the last position predicts the first token
        if self.engine.keeps_states and needs_surprisal(self.engine.model):  # the prompt's, for the write
            turn_mask = mask[:, -ids.shape[1]:]
            for row, values in zip(rows, prompt_surprisal(self.engine.model.logits(hidden), ids, turn_mask), strict=True):
                row.surprisal = values
        joining.key_mask, joining.next_position = mask, positions[:, -1] + 1
        now = time.perf_counter()
        for row in rows:
            row.joined = now
        self.batch.add(joining)

    def _advance(self) -> None:
        """Sample a token for every row, let finished and abandoned rows go, decode one step for the rest."""
        batch = self.batch
        if not batch.rows:
            return
        tokens = self._sample(batch)
        staying, finished = [], []
        for index, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
            if self._left(row):
                continue
            row.answer.append(token)
            self._stream(row)
            (finished if row.ended(self.end_id) else staying).append(index)
        kept = batch.turn_states(finished) if finished and self.engine.keeps_states else None
        self._finish([batch.rows[i] for i in finished], kept)
        batch.keep(staying)
        if batch.rows:
            batch.key_mask = torch.cat([batch.key_mask, torch.ones_like(batch.key_mask[:, :1])], dim=1)
            step_tokens = tokens[torch.tensor(staying, device=tokens.device)][:, None]  # (B, 1)
            hidden = self._forward(batch, step_tokens, batch.key_mask, batch.next_position[:, None])
            batch.logits, batch.next_position = self.engine.model.logits(hidden[:, -1]), batch.next_position + 1

    def _forward(self, batch: RunningBatch, tokens: torch.Tensor, key_mask: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """The decoder over the rows' new tokens (B, T): normed states (B, T, D). Where the engine keeps
        the memory layers' states, each row keeps those of its real tokens."""
        model = self.engine.model
        if not self.engine.keeps_states:
            return model.decoder(model.embedding(tokens), positions, key_mask, batch.memory_kv, batch.caches)
        hidden, states = model.run(tokens, batch.memory_kv, positions, key_mask, batch.caches)
        real = key_mask[:, -tokens.shape[1]:]
        for r, row in enumerate(batch.rows):
            if not row.states:
                row.states = [[] for _ in states]
            for pieces, layer in zip(row.states, states, strict=True):
                pieces.append(layer[r, real[r]])
        return hidden

    def _sample(self, batch: RunningBatch) -> torch.Tensor:
        """Greedy rows share one argmax; a row with its own sampling settings is sampled alone."""
        tokens = batch.logits.float().argmax(dim=-1)
        for index, row in enumerate(batch.rows):
            s = row.sampling
            if s.temperature != 0 or s.repetition_penalty != 1.0:
                seen = torch.tensor([row.prompt + row.answer], device=tokens.device)
                tokens[index] = sample_next(batch.logits[index : index + 1], s, seen, row.generator)[0]
        return tokens

    def _stream(self, row: Row) -> None:
        if row.first_token_s is None:
            row.first_token_s = time.perf_counter() - row.joined
            self.metrics.first_token.observe(time.perf_counter() - row.started)
        if row.answer[-1] != self.end_id:
            text, row.shown = self.engine._new_text(row.answer, row.shown)
            self.outbox.send(row, TokenEvent(row.answer[-1], text))

    def _left(self, row: Row) -> bool:
        """The client went away: its row is freed and the turn is not remembered."""
        if row.turn.cancelled.is_set():
            self.outbox.resolve(row, None)
            return True
        return False

    def _finish(self, rows: list[Row], kept: TurnStates | None = None) -> None:
        """Answers complete: one batched memory update for all of them (background), then the events."""
        if not rows:
            return
        engine, tokenizer, now = self.engine, self.engine.tokenizer, time.perf_counter()
        stats = [engine._stats(r.session, len(r.prompt), r.answer, r.first_token_s, now - r.joined) for r in rows]
        engine.finish([r.session for r in rows], [r.prompt + tokenizer.close(r.answer) for r in rows], stats, kept)
        for row, stat in zip(rows, stats, strict=True):
            row.session.stats.append(stat)
            ids = [t for t in row.answer if t != self.end_id]
            rest, row.shown = engine._new_text(ids, row.shown, final=True)  # held back at a split character
            if rest:
                self.outbox.send(row, TokenEvent(ids[-1], rest))
            self.outbox.resolve(row, AnswerEvent(tokenizer.decode(ids).strip(), ids, stat))
