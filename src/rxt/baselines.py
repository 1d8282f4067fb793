"""Stateless baselines with the same streaming API as RxT (DESIGN.md section 5).

full     re-read the whole history every turn (KV cache within the turn): quadratic cost
cached   keep the KV cache across turns (prefix caching): prefill only the new tokens, but attend
         to, and store, a cache that grows with the conversation
current  the current turn only: no memory at all (lower bound)
window   the history truncated to the RxT memory's footprint (equal state size)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rxt.attention import KVCache
from rxt.config import ModelConfig
from rxt.engine import ChatEngine, TurnPlan
from rxt.fast import ANSWER_RESERVE, DecodeState
from rxt.generation import left_pad
from rxt.model import StatelessLM, positions_from_mask
from rxt.session import Session, SessionStateError, TurnStats
from rxt.tokenizer import Tokenizer
from rxt.turn_states import TurnStates

MODES = ("full", "cached", "current", "window")


def window_tokens_for(config: ModelConfig, memory_numbers: int | None = None) -> int:
    """History tokens whose KV cache holds as many numbers as a memory: ``memory_numbers`` (one
    session's memory state, e.g. ``model.initial_memory(1).numel()``), by default an RxT STM of this
    config (L * S * D values). A KV cache holds L * 2 * H_kv * d_head values per token.
    """
    numbers = memory_numbers or config.n_layers * config.stm_slots * config.d_model
    return max(1, numbers // (2 * config.n_layers * config.n_kv_heads * config.d_head))


class StatelessEngine(ChatEngine):
    model_type = "stateless"

    def __init__(
        self,
        model: StatelessLM,
        tokenizer: Tokenizer | None = None,
        device: str | None = None,
        mode: str = "full",
        window_tokens: int | None = None,
        inference: str = "eager",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        super().__init__(model, tokenizer, device, inference)
        self.mode = mode
        self.window_tokens = window_tokens or window_tokens_for(model.config)
        self.preamble = self.tokenizer.preamble()  # opens every conversation (empty for rxt's template)

    @property
    def pure_plans(self) -> bool:
        return self.mode != "cached"

    def new_session(self) -> Session:
        return Session(self.model_type, self.identity, {"history": torch.zeros(0, dtype=torch.long)})

    def context(self, session: Session) -> list[int]:
        """History tokens re-read before the new prompt, after the template's preamble."""
        history = session.tensors["history"].tolist()
        if self.mode == "full":
            return self.preamble + history
        if self.mode == "window":
            return self.preamble + (history[-self.window_tokens :] if self.window_tokens else [])
        if self.mode == "cached":  # tokens the cache has not seen yet (the closing of the last answer)
            return (self.preamble + history)[self._cached_tokens(session) :]
        return list(self.preamble)

    def history_tokens(self, session: Session) -> int:
        """Tokens the model attends to before a new prompt (preamble included)."""
        if self.mode in ("full", "cached"):
            return len(self.preamble) + session.tensors["history"].numel()
        return len(self.context(session))

    def check_session(self, session: Session) -> None:
        super().check_session(session)
        history = session.tensors.get("history")
        if history is None or history.dim() != 1 or history.dtype != torch.long:
            raise SessionStateError("a stateless session's state is a 1-D int64 tensor 'history' of token ids")
        if history.numel() and not 0 <= int(history.min()) <= int(history.max()) < self.model.config.vocab_size:
            raise SessionStateError("the session history holds token ids outside the model's vocabulary")

    def _cached_tokens(self, session: Session) -> int:
        """Tokens the persistent cache holds (eager: KVCache per layer; fast path: one DecodeState)."""
        if "state" in session.runtime:
            return session.runtime["state"].length
        caches = session.runtime.get("caches")
        return caches[0].length if caches else 0

    def plan(
        self,
        sessions: Sequence[Session],
        prompts: list[list[int]],
        all_logits: bool = False,
        max_new_tokens: int = ANSWER_RESERVE,
    ) -> TurnPlan:
        if self.mode == "cached":
            if len(sessions) != 1:
                raise ValueError("the persistent-cache baseline answers one session at a time")
            return self._plan_cached(sessions[0], prompts[0], all_logits, max_new_tokens)
        inputs = [self.context(s) + p for s, p in zip(sessions, prompts, strict=True)]
        ids, mask = left_pad(inputs, self.tokenizer.pad_id, self.device)
        if self.fast is not None:
            state = self.fast.new_state(len(sessions), ids.shape[1] + max_new_tokens)
            step = self.fast.step(state, all_logits=all_logits)
            return TurnPlan(ids, mask, positions_from_mask(mask), step, [len(i) for i in inputs])
        caches = [KVCache() for _ in self.model.decoder.layers]

        def step(tokens, key_mask, positions):
            return self.model.decode(tokens, key_mask=key_mask, positions=positions, caches=caches)

        return TurnPlan(ids, mask, positions_from_mask(mask), step, [len(i) for i in inputs])

    def _plan_cached(self, session: Session, prompt: list[int], all_logits: bool, max_new_tokens: int) -> TurnPlan:
        new = self.context(session) + prompt
        start = self._cached_tokens(session)
        ids = torch.tensor([new], device=self.device)
        mask = torch.ones(1, start + len(new), dtype=torch.bool, device=self.device)
        positions = torch.arange(start, start + len(new), device=self.device)[None]
        if self.fast is not None:  # one preallocated state for the whole conversation, grown by buckets
            state = session.runtime.get("state") or self.fast.new_state(1, len(new) + max_new_tokens)
            state = session.runtime["state"] = self.fast.reserve(state, len(new) + max_new_tokens)

            def keep(grown: DecodeState) -> None:
                session.runtime["state"] = grown

            return TurnPlan(ids, mask, positions, self.fast.step(state, all_logits=all_logits, keep=keep), [len(new)])
        caches = session.runtime.setdefault("caches", [KVCache() for _ in self.model.decoder.layers])

        def step(tokens, key_mask, positions):
            return self.model.decode(tokens, positions=positions, caches=caches)

        return TurnPlan(ids, mask, positions, step, [len(new)])

    def finish(
        self,
        sessions: Sequence[Session],
        interactions: list[list[int]],
        stats: list[TurnStats],
        kept: TurnStates | None = None,
    ) -> None:
        for session, interaction, stat in zip(sessions, interactions, stats, strict=True):
            added = torch.tensor(interaction, dtype=torch.long)
            session.tensors = {"history": torch.cat([session.tensors["history"], added])}
            session.turns += 1
            stat.state_bytes = self.state_bytes(session)

    def state_bytes(self, session: Session) -> int:
        """KV cache bytes this mode holds between turns."""
        if self.mode == "cached":
            if "state" in session.runtime:
                return session.runtime["state"].nbytes()
            return sum(c.nbytes() for c in session.runtime.get("caches", []))
        tokens = len(self.context(session)) if self.mode != "current" else 0
        per_token = 2 * self.model.config.n_layers * self.model.config.n_kv_heads * self.model.config.d_head
        return tokens * per_token * next(self.model.parameters()).element_size()

    def reset(self, session: Session) -> None:
        session.tensors = {"history": torch.zeros(0, dtype=torch.long)}
        session.runtime, session.turns, session.stats = {}, 0, []
