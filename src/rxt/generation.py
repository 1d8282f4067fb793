"""Sampling and the model-agnostic token loop: prefill a prompt, then decode token by token.

The loop only needs a ``step(ids, key_mask, positions) -> logits`` closure, so RxT (reading its
memory through precomputed cross-attention K/V) and every stateless baseline share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or answer
    seed: int | None = None  # seeded sampling is reproducible

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample_next(
    logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None, generator=None
) -> torch.Tensor:
    """Pick the next token of each row. logits: (B, V); seen: (B, N) ids for the repetition penalty."""
    logits = logits.float()
    if config.repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits.gather(1, seen)
        penalised = torch.where(picked > 0, picked / config.repetition_penalty, picked * config.repetition_penalty)
        logits = logits.scatter(1, seen, penalised)
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    # shifted so the best logit is 0 before dividing, in float64 (whose range holds any temperature a
    # client can send): a tiny temperature sends the other logits to -inf and sampling becomes greedy,
    # instead of every logit overflowing to inf and the softmax to NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values).double() / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_tokens(
    step: Step,
    prompt: torch.Tensor,
    key_mask: torch.Tensor,
    positions: torch.Tensor,
    config: SamplingConfig,
    stop_id: int | None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), until each row hit ``stop_id`` or the budget.

    prompt: (B, T) left-padded; key_mask: (B, S) over cached + prompt tokens; positions: (B, T).
    Rows that already stopped keep producing ``stop_id`` so the batch stays rectangular.
    """
    generator = config.generator(prompt.device)
    logits = step(prompt, key_mask, positions)[:, -1]  # prefill: (B, V)
    seen, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    next_position = positions[:, -1] + 1
    for index in range(config.max_new_tokens):
        token = sample_next(logits, config, seen, generator)
        if stop_id is not None:
            token = torch.where(done, torch.full_like(token, stop_id), token)
            done = done | (token == stop_id)
        yield token
        if bool(done.all()) or index == config.max_new_tokens - 1:
            return  # the last token is not fed back: no one would read the logits it gives
        seen = torch.cat([seen, token[:, None]], dim=1)
        key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
        logits = step(token[:, None], key_mask, next_position[:, None])[:, -1]
        next_position = next_position + 1


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-pad token lists into (B, T) ids and a (B, T) bool mask of real tokens."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pad an empty token sequence")
    if len(sequences) == 1:  # nothing to pad: the common single-conversation turn, without the loop
        ids = torch.tensor(sequences, dtype=torch.long, device=device)
        return ids, torch.ones_like(ids, dtype=torch.bool)
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = True
    return ids.to(device), mask.to(device)
