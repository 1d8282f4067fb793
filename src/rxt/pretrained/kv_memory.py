"""A memory of the decoder's own keys and values: ``reactive.memory_write: kv``.

The STM is S token slots per decoder layer. Each slot holds one past token's self-attention key (before
RoPE) and value in that layer, as the decoder computed them when the token was read, plus the token's
id (so what the memory holds can be shown as text), its score and a fill flag. The decoder reads it
through its own self-attention: the filled slots stand before the turn in every layer's key/value
cache, re-numbered 0..n-1, and the turn follows at n, n+1, ... So a pretrained model reads its memory
the way it reads its context, with no new weights: with S at least the
conversation's length the model is the stateless model with its whole history, exactly; with a smaller S
it is that model reading the S past tokens its memory kept.

    read (per turn):    K_l, V_l = [rotate(K_mem_l, 0..n-1) ; K_turn_l], [V_mem_l ; V_turn_l]  (one softmax)
    write (after it):   STM_t = the S best of STM_{t-1}'s tokens and the finished turn's, in order

The write is a choice, not a learned summary: the finished turn always stays (what was just said is
kept whole), and ``keep`` ranks the older tokens: the S best stay, ties going to the newer. "recent" keeps the last S tokens (the window baseline at the same state size); "user" keeps the
user's messages before the model's own answers, which it can say again; "surprise" ranks the user's
messages by how surprising their most surprising token was to the model (a told name or number, not
small talk), a message's tokens staying or going together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rxt.attention import KVCache, RotaryEmbedding
from rxt.memory import positions_from_mask

__all__ = ["KEEP_POLICIES", "KVRead", "as_prefix", "kept_tokens", "merge", "read_memory", "token_scores", "unrotate"]

KEEP_POLICIES = ("recent", "user", "surprise")
RECENT_BONUS = 1e6  # added to the finished turn's scores while it is written: it is never the first to go
EXTRA = 3  # channels after each slot's key and value: its token id, its score, its fill flag (1.0 filled)


@dataclass
class KVRead:
    """The memory as the decoder reads it during one turn (projected once, like cross-attention's K/V)."""

    keys: list[torch.Tensor]  # per decoder layer: (B, H_kv, S, d_head), rotated at the slots' positions
    values: list[torch.Tensor]  # per decoder layer: (B, H_kv, S, d_head)
    mask: torch.Tensor  # (B, S) True on filled slots
    counts: torch.Tensor  # (B,) filled slots: the turn's first token sits at this position

    @property
    def slots(self) -> int:
        return self.mask.shape[1]

    def fill(self, caches: list[KVCache]) -> None:
        """Put the memory at the front of each layer's (empty) self-attention cache."""
        for cache, k, v in zip(caches, self.keys, self.values, strict=True):
            cache.k, cache.v = k, v


def as_prefix(
    read: KVRead, caches: list[KVCache], key_mask: torch.Tensor, positions: torch.Tensor
) -> tuple[list[None], torch.Tensor, torch.Tensor]:
    """Put the memory at the front of each layer's empty cache, for a loop that then decodes with no
    memory of its own: no memory K/V, the key mask with the memory's fill mask in front, the turn's
    positions after the filled slots. (The engine's turn and the serving batcher read it this way.)"""
    read.fill(caches)
    return [None] * len(caches), torch.cat([read.mask, key_mask.bool()], dim=1), positions + read.counts[:, None]


def slot_width(n_kv_heads: int, d_head: int) -> int:
    return 2 * n_kv_heads * d_head + EXTRA


def read_memory(stm: torch.Tensor, rotary: RotaryEmbedding, n_kv_heads: int) -> KVRead:
    """stm: (L, B, S, 2*H_kv*d_head + 3) -> the keys rotated at each row's positions 0..n-1 (filled slots
    are right-aligned, the newest last), the values, the fill mask and counts."""
    n_layers, batch, slots, width = stm.shape
    d_head = (width - EXTRA) // (2 * n_kv_heads)
    mask = stm[0, :, :, -1] > 0.5
    positions = positions_from_mask(mask)
    half = n_kv_heads * d_head

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, S, H_kv*d_head) -> (B, H_kv, S, d_head)
        return x.reshape(batch, slots, n_kv_heads, d_head).transpose(1, 2)

    keys = [rotary(heads(stm[layer, :, :, :half]), positions) for layer in range(n_layers)]
    values = [heads(stm[layer, :, :, half : 2 * half]) for layer in range(n_layers)]
    return KVRead(keys, values, mask, mask.sum(-1))


def unrotate(rotary: RotaryEmbedding, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rotary(x, positions)``: x (B, H, T, d_head) rotated back to position 0."""
    rotary.ensure(int(positions.max()) + 1 if positions.numel() else 1)
    cos, sin = rotary.cos[positions][:, None], rotary.sin[positions][:, None]  # (B, 1, T, d_head/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


def token_scores(
    policy: str, user: torch.Tensor, surprisal: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) scores of a turn's tokens under ``policy``; higher stays longer. user: (B, T) True on the
    tokens of the user's message; surprisal: (B, T) -log p of each token given what came before it."""
    if policy == "recent":
        return torch.zeros(user.shape, dtype=torch.float32, device=user.device)
    if policy == "user":
        return user.float()
    if policy == "surprise":
        if surprisal is None:
            raise ValueError("the 'surprise' policy needs each token's surprisal")
        # a message's tokens share its score: 1 + its most surprising token's -log p (in nats, over 100)
        peak = surprisal.masked_fill(~user, 0.0).amax(dim=-1, keepdim=True)  # (B, 1)
        return torch.where(user, 1.0 + peak / 100.0, torch.zeros_like(surprisal))
    raise ValueError(f"unknown keep policy {policy!r}; choose one of {KEEP_POLICIES}")


def kept_tokens(stm: torch.Tensor) -> list[list[int]]:
    """The token ids each row of a kv memory holds, oldest first: what it remembers, as text to decode."""
    return [[int(i) for i in row[row[:, -1] > 0.5, -3].round().tolist()] for row in stm[0]]


def merge(
    stm: torch.Tensor, turn: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, write_mask: torch.Tensor
) -> torch.Tensor:
    """STM_t: each row's filled slots followed by its turn tokens under ``write_mask``, the S best kept
    in their order and right-aligned. stm: (L, B, S, W); turn: (L, B, T, W - 3) keys and values;
    ids, scores, write_mask: (B, T)."""
    n_layers, batch, slots, width = stm.shape
    out = torch.zeros_like(stm)
    for b in range(batch):  # rows keep different numbers of tokens
        old = stm[:, b, stm[0, b, :, -1] > 0.5]  # (L, n, W)
        new_kv = turn[:, b, write_mask[b]]  # (L, k, W - 2)
        extra = torch.stack([ids[b, write_mask[b]].to(stm.dtype), scores[b, write_mask[b]].to(stm.dtype),
                             torch.ones_like(scores[b, write_mask[b]], dtype=stm.dtype)], dim=-1)  # (k, 3)
        new = torch.cat([new_kv, extra[None].expand(n_layers, -1, -1)], dim=-1)
        candidates = torch.cat([old, new], dim=1)  # (L, n + k, W), oldest first
        n = candidates.shape[1]
        if n > slots:
            # the finished turn first (what was just said stays), then the S highest scores; among equal
            # scores the newest (a stable sort of the reversed order)
            rank = candidates[0, :, -2].clone()
            rank[old.shape[1]:] += RECENT_BONUS
            order = torch.argsort(rank.flip(0), descending=True, stable=True)
            kept = torch.sort((n - 1 - order)[:slots]).values
            candidates = candidates[:, kept]
        out[:, b, slots - candidates.shape[1]:] = candidates
    return out
