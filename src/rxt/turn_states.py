"""Writing the memory from the states generation already computed, for models whose encoder is their decoder.

ReactivePretrained's ED_t is the decoder's hidden state after each memory layer over the finished turn
(preamble + prompt + answer + closing), reading STM_{t-1}. Generation computed exactly those states for
the prompt (the prefill) and for every answer token it fed back (one decode step each), reading the same
memory. What it never ran is the closing (``<|im_end|>\\n``), and an answer's last token when the budget
cut it. So the engine keeps the memory layers' states as it generates, runs only those few tokens with the
turn's KV cache, and writes the memory from the concatenation (``write_memory``) instead of a second pass
over the whole turn (``update_memory``, which stays the reference).

A model offers this with ``ed_from_generation = True`` and the methods ``run`` (the decoder over new
tokens: normed final states and the memory layers' states), ``logits`` and ``consolidate``/``turn_mask``.
rxt's own RxT encodes with a separate bidirectional encoder and keeps the second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rxt.attention import KVCache
from rxt.generation import left_pad
from rxt.memory import positions_from_mask

__all__ = ["MemoryKV", "StateRecorder", "TurnStates", "ed_from_generation", "write_memory"]

MemoryKV = list[tuple[torch.Tensor, torch.Tensor] | None]  # per decoder layer; None where it reads no memory


def needs_surprisal(model: torch.nn.Module) -> bool:
    """Whether ``model``'s memory write wants the prompt tokens' surprisal from the prefill."""
    return bool(getattr(model, "needs_surprisal", False))


def prompt_surprisal(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row, each real prompt token's -log p from the prefill's logits (B, T, V) over ids (B, T)
    under mask (B, T); the first token's is 0 (what came before it is the memory, not scored here)."""
    logprobs = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    surprisal = torch.nn.functional.pad(-logprobs, (1, 0))
    first = mask.long().argmax(-1)  # the first real token of each left-padded row
    surprisal[torch.arange(ids.shape[0]), first] = 0.0
    return [surprisal[r, mask[r].bool()] for r in range(ids.shape[0])]


def ed_from_generation(model: torch.nn.Module) -> bool:
    """Whether ``model``'s memory can be written from the states its generation computed."""
    return bool(getattr(model, "ed_from_generation", False))


@dataclass
class TurnStates:
    """A batch of turns as generation left them: what the memory write still needs."""

    states: list[list[torch.Tensor]]  # per row, per memory layer: (K_r, D), the row's first K_r turn tokens
    caches: list[KVCache]  # per decoder layer: the self-attention keys and values generation wrote, B rows
    key_mask: torch.Tensor  # (B, S): the cache columns that hold each row's turn tokens (not padding, not
    # tokens fed after a row had stopped)
    memory_kv: MemoryKV  # the memory the turn read: STM_{t-1}'s cross-attention K/V, B rows
    # per row, each prompt token's -log p given what came before it (the prefill's logits), for a model
    # that ranks what it keeps by surprise (``needs_surprisal``); None otherwise
    surprisal: list[torch.Tensor] | None = None

    def kept(self, row: int) -> int:
        """How many of the row's turn tokens generation ran (K_r); the next one sits at position K_r."""
        return self.states[row][0].shape[0]


class StateRecorder:
    """Collects the memory layers' states of a batch that the engine's eager step is generating: the
    prefill over the left-padded prompts first, then one (B, 1, D) per layer for each token fed back."""

    def __init__(self, prompt_mask: torch.Tensor, caches: list[KVCache], memory_kv: MemoryKV):
        self.prompt_mask, self.caches, self.memory_kv = prompt_mask, caches, memory_kv
        self.calls: list[list[torch.Tensor]] = []  # per forward call, per memory layer: (B, T, D)
        self.surprisal: list[torch.Tensor] | None = None

    def add(self, states: list[torch.Tensor]) -> None:
        self.calls.append(states)

    def add_surprisal(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """The prefill's logits over the prompt ``ids`` (B, T): keep each prompt token's surprisal."""
        self.surprisal = prompt_surprisal(logits, ids, self.prompt_mask[:, -ids.shape[1]:])

    def turn(self, answers: list[list[int]], end_id: int) -> TurnStates:
        """The kept states of the finished turns. ``answers``: each row's sampled tokens. Every decode
        step fed one token of every row; a row's fed tokens are its turn's as long as it had not stopped
        (rows that stopped keep being fed ``end_id`` until the whole batch is done)."""
        prefill, steps = self.calls[0], self.calls[1:]
        fed = len(steps)
        body = [len(a) - (1 if a and a[-1] == end_id else 0) for a in answers]  # the answer without [EOT]
        kept_steps = torch.tensor([min(fed, n) for n in body], device=self.prompt_mask.device)
        step_mask = torch.arange(fed, device=kept_steps.device)[None] < kept_steps[:, None]  # (B, fed)
        rows = []
        for r in range(len(answers)):
            per_layer = []
            for layer in range(len(prefill)):
                decoded = [step[layer][r, 0] for step in steps[: int(kept_steps[r])]]
                per_layer.append(torch.cat([prefill[layer][r, self.prompt_mask[r]], *[d[None] for d in decoded]]))
            rows.append(per_layer)
        return TurnStates(rows, self.caches, torch.cat([self.prompt_mask, step_mask], dim=1), self.memory_kv,
                          self.surprisal)


def write_memory(
    model: torch.nn.Module, stm: torch.Tensor, kept: TurnStates, interactions: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, list[int]]:
    """STM_t from the kept states: run each row's tokens that generation never ran (with the turn's KV
    cache, reading STM_{t-1} as generation did), then consolidate the concatenation, laid out as
    ``update_memory`` lays out the left-padded interactions. Returns the new STM (L_mem, B, S, D) and
    how many tokens each row ran here. A kv memory takes its turn's keys and values from the cache
    instead (``write_kept``)."""
    if getattr(model, "kv_memory", None) is not None:
        return model.kv_memory.write_kept(stm, kept, interactions, pad_id)
    tails = [ids[kept.kept(r):] for r, ids in enumerate(interactions)]
    if any(not tail for tail in tails):
        raise ValueError("every turn ends with a closing that generation never ran; a row has no tokens left")
    tail_ids, tail_mask = left_pad(tails, pad_id, stm.device)
    start = torch.tensor([kept.kept(r) for r in range(len(tails))], device=stm.device)
    positions = start[:, None] + positions_from_mask(tail_mask)  # (B, T_tail): padding's are never read
    key_mask = torch.cat([kept.key_mask, tail_mask], dim=1)
    _, tail_states = model.run(tail_ids, kept.memory_kv, positions, key_mask, kept.caches)
    n_layers = len(tail_states)
    rows = [[torch.cat([kept.states[r][i], tail_states[i][r, tail_mask[r]]]) for i in range(n_layers)]
            for r in range(len(tails))]
    ids, mask = left_pad(interactions, pad_id, stm.device)
    encoded = [_left_pad_rows([row[i] for row in rows], ids.shape[1]) for i in range(n_layers)]
    return model.consolidate(stm, encoded, model.turn_mask(ids, mask), ids), [len(t) for t in tails]


def _left_pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """(T_r, D) tensors -> (B, width, D), each row at the right end, zeros before it."""
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    for r, row in enumerate(rows):
        out[r, width - row.shape[0]:] = row
    return out
