"""Turn-by-turn inference: stream an answer now, write the memory of the finished turn in the background.

    engine = ReactiveEngine(model, tokenizer)
    session = engine.new_session()
    for event in engine.stream(session, "Hi, my name is Ada."):
        ...  # TokenEvent, then AnswerEvent (memory update already running), then MemoryUpdatedEvent

The turn cycle of RxT is ``ReactiveEngine.run_turn``: generate -> (background) encode -> consolidate.
Baselines (rxt.baselines) share this streaming API through ``ChatEngine``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rxt.attention import KVCache
from rxt.fast import ANSWER_RESERVE, fast_decoder
from rxt.generation import SamplingConfig, Step, decode_tokens, left_pad
from rxt.model import ReactiveTransformer, positions_from_mask
from rxt.pretrained.kv_memory import KVRead, as_prefix
from rxt.session import Session, SessionStateError, TurnStats
from rxt.tokenizer import Tokenizer
from rxt.turn_states import StateRecorder, TurnStates, ed_from_generation, needs_surprisal, write_memory

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """One generated token of the answer; ``text`` is the new printable text (may be empty)."""

    token_id: int
    text: str


@dataclass
class AnswerEvent:
    """The answer is complete. For RxT the memory update is already running in the background."""

    text: str
    token_ids: list[int]
    stats: TurnStats


@dataclass
class MemoryUpdatedEvent:
    """The memory now holds the finished turn (RxT only)."""

    turn: int
    seconds: float


Event = TokenEvent | AnswerEvent | MemoryUpdatedEvent


@dataclass
class TurnPlan:
    """What one engine needs to answer a batch: the prompt and the decoding step."""

    prompt: torch.Tensor  # (B, T) left-padded
    key_mask: torch.Tensor  # (B, S) over cached + prompt tokens
    positions: torch.Tensor  # (B, T)
    step: Step
    prompt_tokens: list[int]  # tokens read in the prompt phase, per row
    recorder: StateRecorder | None = None  # keeps the memory layers' states of the turn, where the model can use them


class ChatEngine:
    """The shared streaming turn loop. Subclasses say how to prompt and what to keep after a turn."""

    model_type: str

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer | None = None,
        device: str | None = None,
        inference: str = "eager",
    ):
        self.tokenizer = tokenizer or getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(
                "the engine needs a tokenizer: pass one, or load a model directory that has tokenizer.json"
            )
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.identity = model.identity()
        self.inference = inference  # "eager" (reference), "static" or "compiled": see rxt.fast
        self.fast = fast_decoder(self.model, inference)

    # -- what differs between engines -------------------------------------------------------------
    def new_session(self) -> Session:
        raise NotImplementedError

    def plan(
        self,
        sessions: Sequence[Session],
        prompts: list[list[int]],
        all_logits: bool = False,
        max_new_tokens: int = ANSWER_RESERVE,
    ) -> TurnPlan:
        """The prompt and the step of one turn. The prefill's logits cover the last position only on the
        fast path, unless ``all_logits`` (scoring reads every position); its caches are sized for
        ``max_new_tokens`` answer tokens (and grow if more come)."""
        raise NotImplementedError

    def finish(
        self,
        sessions: Sequence[Session],
        interactions: list[list[int]],
        stats: list[TurnStats],
        kept: TurnStates | None = None,
    ) -> None:
        """Keep the finished turn (history, cache or memory); ``kept``: what generation computed of it,
        where the memory is written from that (rxt.turn_states)."""
        raise NotImplementedError

    def state_bytes(self, session: Session) -> int:
        return session.state_bytes()

    def turn_prompt(self, query: str) -> list[int]:
        """The tokens the decoder reads for a message, besides the history or memory the engine keeps."""
        return self.tokenizer.prompt(query)

    # -- shared --------------------------------------------------------------------------------------
    def check_session(self, session: Session) -> None:
        if session.model_type != self.model_type or session.model_identity != self.identity:
            raise SessionStateError(
                f"session {session.id} was made by a {session.model_type} model {session.model_identity}; "
                f"this engine runs a {self.model_type} model {self.identity}"
            )

    def stream(self, session: Session, query: str, sampling: SamplingConfig | None = None) -> Iterator[Event]:
        """Answer one message: yields TokenEvents, an AnswerEvent and (RxT) a MemoryUpdatedEvent."""
        yield from self.stream_batch([session], [query], sampling, single=True)

    def interact(self, session: Session, query: str, sampling: SamplingConfig | None = None) -> AnswerEvent:
        """Answer one message and return as soon as the answer is complete (memory keeps updating)."""
        return self.interact_batch([session], [query], sampling)[0]

    def interact_batch(
        self,
        sessions: Sequence[Session],
        queries: Sequence[str],
        sampling: SamplingConfig | None = None,
        remember: bool = True,
    ) -> list[AnswerEvent]:
        answers = []
        for event in self.stream_batch(sessions, queries, sampling, remember=remember):
            if isinstance(event, AnswerEvent):
                answers.append(event)
                if len(answers) == len(sessions):
                    return answers
        return answers

    def stream_batch(
        self,
        sessions: Sequence[Session],
        queries: Sequence[str],
        sampling: SamplingConfig | None = None,
        single: bool = False,
        remember: bool = True,
    ) -> Iterator[Event]:
        """One turn for several sessions in one batched forward (left padding, per-row positions).

        Yields TokenEvents only when ``single``; AnswerEvents in session order; MemoryUpdatedEvent
        once per session when the background update ends (RxT). ``remember=False`` answers without
        keeping the turn (evaluation: the reference answer is then given to ``observe``).
        """
        if not remember and not self.pure_plans:
            raise ValueError(f"{type(self).__name__} cannot answer without remembering the turn")
        if len(sessions) != len(queries) or not sessions:
            raise ValueError(
                f"need one query per session, got {len(queries)} queries for {len(sessions)} sessions"
            )
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session may appear only once in a batch")
        sampling = sampling or SamplingConfig()
        for session in sessions:
            session.wait()  # the previous turn's memory update; its error surfaces here
            self.check_session(session)
        start = time.perf_counter()
        plan = self.plan(sessions, [self.turn_prompt(q) for q in queries], max_new_tokens=sampling.max_new_tokens)
        answers, first_token_s, shown = [[] for _ in sessions], None, 0  # shown: characters streamed so far
        for token in decode_tokens(
            plan.step, plan.prompt, plan.key_mask, plan.positions, sampling, self.tokenizer.end_id
        ):
            first_token_s = first_token_s or time.perf_counter() - start
            for row, t in enumerate(token.tolist()):
                if not answers[row] or answers[row][-1] != self.tokenizer.end_id:
                    answers[row].append(t)
            if single and answers[0][-1] != self.tokenizer.end_id:
                text, shown = self._new_text(answers[0], shown)
                yield TokenEvent(answers[0][-1], text)
        answer_s = time.perf_counter() - start
        if single:  # text held back at an incomplete character goes out with the last token
            ids = [t for t in answers[0] if t != self.tokenizer.end_id]
            rest, shown = self._new_text(ids, shown, final=True)
            if rest:
                yield TokenEvent(ids[-1], rest)
        stats = [
            self._stats(s, n, a, first_token_s, answer_s)
            for s, n, a in zip(sessions, plan.prompt_tokens, answers, strict=True)
        ]
        if remember:
            prompts = [self.turn_prompt(q) for q in queries]
            kept = plan.recorder.turn(answers, self.tokenizer.end_id) if plan.recorder is not None else None
            self.finish(
                sessions,
                [p + self.tokenizer.close(a) for p, a in zip(prompts, answers, strict=True)],
                stats,
                kept,
            )
        for session, answer, stat in zip(sessions, answers, stats, strict=True):
            if remember:
                session.stats.append(stat)
            ids = [t for t in answer if t != self.tokenizer.end_id]
            yield AnswerEvent(self.tokenizer.decode(ids).strip(), ids, stat)
        for session, stat in zip(sessions, stats, strict=True):
            if session.pending is not None:
                session.wait()
                yield MemoryUpdatedEvent(session.turns, stat.memory_update_s or 0.0)

    def observe(self, sessions: Sequence[Session], queries: Sequence[str], answers: Sequence[str]) -> None:
        """Keep turns whose answers are given, not generated (teacher-forced history)."""
        for session in sessions:
            session.wait()
            self.check_session(session)
        interactions = [
            self.turn_prompt(q) + self.tokenizer.answer(a) + self.tokenizer.closing()
            for q, a in zip(queries, answers, strict=True)
        ]
        stats = [self._stats(s, len(i), [], None, 0.0) for s, i in zip(sessions, interactions, strict=True)]
        self.finish(sessions, interactions, stats)

    @torch.no_grad()
    def score(
        self, sessions: Sequence[Session], queries: Sequence[str], answers: Sequence[str]
    ) -> list[tuple[float, int]]:
        """Teacher-forced (sum of negative log-likelihood, token count) of each answer + [EOT]."""
        if not self.pure_plans:
            raise ValueError(f"{type(self).__name__} cannot score without remembering the turn")
        for session in sessions:
            session.wait()
        targets = [self.tokenizer.answer(a) + [self.tokenizer.end_id] for a in answers]
        plan = self.plan(
            sessions, [self.turn_prompt(q) + t[:-1] for q, t in zip(queries, targets, strict=True)], all_logits=True
        )
        logprobs = plan.step(plan.prompt, plan.key_mask, plan.positions).float().log_softmax(-1)  # (B, T, V)
        results = []
        for row, target in enumerate(targets):
            predicted = logprobs[row, -len(target) :]  # positions that predict the answer tokens
            nll = -predicted.gather(1, torch.tensor(target, device=predicted.device)[:, None]).sum()
            results.append((float(nll), len(target)))
        return results

    @property
    def pure_plans(self) -> bool:
        """Whether plan() leaves the sessions untouched (false for a persistent KV cache)."""
        return True

    def _new_text(self, answer: list[int], shown: int, final: bool = False) -> tuple[str, int]:
        """The text not streamed yet, and the new count of streamed characters.

        Byte-level BPE may split a character across tokens: an incomplete one decodes as a trailing
        U+FFFD and is held back until a later token completes it (or, ``final``, the answer ends).
        """
        text = self.tokenizer.decode(answer)
        if not final:
            text = text.rstrip("\ufffd")
        return text[shown:], max(shown, len(text))

    def _stats(
        self, session: Session, prompt_tokens: int, answer: list[int], ttft: float | None, answer_s: float
    ):
        return TurnStats(
            turn=session.turns + 1,
            prompt_tokens=prompt_tokens,
            answer_tokens=len(answer),
            time_to_first_token_s=ttft or answer_s,
            answer_s=answer_s,
            tokens_processed=prompt_tokens + len(answer),
        )


class ReactiveEngine(ChatEngine):
    """RxT inference: the decoder reads the STM through cross-attention K/V projected once per turn;
    the memory update (encode + consolidate) runs on a background thread after the answer.

    For a model whose memory encoder is its decoder (``ed_from_generation``: ReactivePretrained), the
    eager path keeps the memory layers' states as it generates and the update runs only the closing
    tokens generation never ran (rxt.turn_states); ``keep_states=False``, the fast path and turns given
    to ``observe`` re-run the whole turn instead (the reference)."""

    model_type = "rxt"
    writes_memory = True

    def __init__(
        self,
        model: ReactiveTransformer,
        tokenizer: Tokenizer | None = None,
        device: str | None = None,
        update_delay_s: float = 0.0,
        inference: str = "eager",
        keep_states: bool = True,
    ):
        super().__init__(model, tokenizer, device, inference)
        self.update_delay_s = update_delay_s  # tests slow the update down on purpose
        self.keeps_states = keep_states and self.writes_memory and self.fast is None and ed_from_generation(model)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rxt-memory")
        self._lock = threading.Lock()  # one memory update at a time touches the model
        self._stm_shape: tuple[int, ...] | None = None

    def new_session(self) -> Session:
        stm = self.model.initial_memory(1).to(self.device)  # (L, 1, S, D)
        session = Session(self.model_type, self.identity, {"stm": stm})
        self._keep_memory_kv([session], stm)
        return session

    def _keep_memory_kv(self, sessions: Sequence[Session], stm: torch.Tensor) -> None:
        """Fast path: project the memory K/V of each session's new STM now, off the prompt path.

        Kept in ``session.runtime`` with the STM they belong to; a session whose STM was replaced
        since (loaded, reset) gets its K/V projected in the next prefill instead."""
        if self.fast is None:
            return
        keys, values = self.fast.project_memory(stm)
        for row, session in enumerate(sessions):
            session.runtime["memory_kv"] = (session.tensors["stm"], keys[:, row : row + 1], values[:, row : row + 1])

    def _kept_memory_kv(self, sessions: Sequence[Session]) -> tuple[torch.Tensor, torch.Tensor] | None:
        kept = [s.runtime.get("memory_kv") for s in sessions]
        if any(k is None or k[0] is not s.tensors["stm"] for k, s in zip(kept, sessions, strict=True)):
            return None
        if len(kept) == 1:
            return kept[0][1], kept[0][2]
        return torch.cat([k[1] for k in kept], dim=1), torch.cat([k[2] for k in kept], dim=1)

    def turn_prompt(self, query: str) -> list[int]:
        """Each turn is an event of its own, so it opens with the template's preamble: an imported chat
        model's system message, as every conversation it was trained on did (empty for rxt's template). A
        model that holds the preamble in its memory says so (``turn_preamble``: a kv memory)."""
        turn_preamble = getattr(self.model, "turn_preamble", None)
        preamble = turn_preamble() if turn_preamble is not None else self.tokenizer.preamble()
        return preamble + self.tokenizer.prompt(query)

    def check_session(self, session: Session) -> None:
        super().check_session(session)
        if self._stm_shape is None:  # fixed by the model's config: built once, not for every loaded session
            self._stm_shape = tuple(self.model.initial_memory(1).shape)
        expected = self._stm_shape
        if tuple(session.tensors["stm"].shape) != expected:
            raise SessionStateError(
                f"session STM shape {tuple(session.tensors['stm'].shape)} != model's {expected}"
            )

    def plan(
        self,
        sessions: Sequence[Session],
        prompts: list[list[int]],
        all_logits: bool = False,
        max_new_tokens: int = ANSWER_RESERVE,
    ) -> TurnPlan:
        ids, mask = left_pad(prompts, self.tokenizer.pad_id, self.device)
        stm = torch.cat([s.tensors["stm"] for s in sessions], dim=1)  # (L, B, S, D)
        positions = positions_from_mask(mask)
        if self.fast is not None:  # the memory K/V: kept from the last update, else projected in the prefill
            state = self.fast.new_state(len(sessions), ids.shape[1] + max_new_tokens)
            step = self.fast.step(state, stm, all_logits, memory=self._kept_memory_kv(sessions))
            return TurnPlan(ids, mask, positions, step, [len(p) for p in prompts])
        with torch.no_grad():
            memory_kv = self.model.project_memory(stm)  # once per turn, reused by every step
        caches = [KVCache() for _ in self.model.decoder.layers]
        if isinstance(memory_kv, KVRead):  # a kv memory is read as the front of each row's cache
            memory_kv, mask, positions = as_prefix(memory_kv, caches, mask, positions)
        recorder = StateRecorder(mask, caches, memory_kv) if self.keeps_states and not all_logits else None

        def step(tokens: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if recorder is None:
                return self.model.decode(
                    tokens, memory_kv=memory_kv, key_mask=key_mask, positions=positions, caches=caches
                )
            hidden, states = self.model.run(tokens, memory_kv, positions, key_mask, caches)
            logits = self.model.logits(hidden)
            if not recorder.calls and needs_surprisal(self.model):
                recorder.add_surprisal(logits, tokens)
            recorder.add(states)
            return logits

        return TurnPlan(ids, mask, positions, step, [len(p) for p in prompts], recorder)

    def finish(
        self,
        sessions: Sequence[Session],
        interactions: list[list[int]],
        stats: list[TurnStats],
        kept: TurnStates | None = None,
    ) -> None:
        for session, interaction, stat in zip(sessions, interactions, stats, strict=True):
            session.turns += 1
            if kept is None:
                stat.tokens_processed += len(interaction)  # the memory encoder reads the whole interaction
            else:  # generation ran the turn's first tokens, the update the rest: each token once
                stat.tokens_processed = len(interaction)
            stat.state_bytes = session.state_bytes()
        future = self._worker.submit(self.run_memory_update, list(sessions), interactions, stats, kept)
        for session in sessions:
            session.pending = future

    def run_memory_update(
        self,
        sessions: list[Session],
        interactions: list[list[int]],
        stats: list[TurnStats],
        kept: TurnStates | None = None,
    ) -> None:
        """Steps 2-3 of the turn cycle, batched: encode concat(X_t, Y_t) (or finish generation's kept
        states of it), consolidate into STM."""
        start = time.perf_counter()
        if self.update_delay_s:
            time.sleep(self.update_delay_s)
        with self._lock, torch.no_grad():  # grad mode is per thread
            stm = torch.cat([s.tensors["stm"] for s in sessions], dim=1)
            if kept is None:
                new_stm = self.model.update_memory(stm, *left_pad(interactions, self.tokenizer.pad_id, self.device))
            else:
                new_stm, _ = write_memory(self.model, stm, kept, interactions, self.tokenizer.pad_id)
            for row, session in enumerate(sessions):
                session.tensors = {**session.tensors, "stm": new_stm[:, row : row + 1].clone()}
            self._keep_memory_kv(sessions, new_stm)
        for stat in stats:
            stat.memory_update_s = time.perf_counter() - start

    def reset(self, session: Session) -> None:
        session.wait()
        session.tensors = {"stm": self.model.initial_memory(1).to(self.device)}
        session.turns, session.stats = 0, []
        self._keep_memory_kv([session], session.tensors["stm"])

    def close(self) -> None:
        self._worker.shutdown(wait=True)


class NoMemoryEngine(ReactiveEngine):
    """An RxT that never writes its memory: every turn reads STM_0. The control that separates what the
    memory carries from what the decoder makes of the current message alone (and the template's
    preamble); nothing is encoded, so a turn costs its prompt and answer only."""

    model_type = "rxt-no-memory"
    writes_memory = False

    def finish(
        self,
        sessions: Sequence[Session],
        interactions: list[list[int]],
        stats: list[TurnStats],
        kept: TurnStates | None = None,
    ) -> None:
        for session, stat in zip(sessions, stats, strict=True):
            session.turns += 1
            stat.state_bytes = session.state_bytes()
