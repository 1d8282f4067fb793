"""A memory of the decoder's own keys and values: ``reactive.memory_write: kv``.

The STM is S token slots per decoder layer. Each slot holds one past token's self-attention key (before
RoPE) and value in that layer, as the decoder computed them when the token was read, plus the token's
id (so what the memory holds can be shown as text), its score and a fill flag. The decoder reads it
through its own self-attention: the filled slots stand before the turn in every layer's key/value
cache, re-numbered 0..n-1, and the turn follows at n, n+1, ... So a pretrained model reads its memory
the way it reads its context, with no new weights: with S at least the conversation's length the model
is the stateless model with its whole history, exactly; with a smaller S it is that model reading the
S past tokens its memory kept.

    read (per turn):    K_l, V_l = [rotate(K_mem_l, 0..n-1) ; K_turn_l], [V_mem_l ; V_turn_l]  (one softmax)
    write (after it):   STM_t = the S best of STM_{t-1}'s tokens and the finished turn's, in order

The write is a choice, not a learned summary. The template's preamble stands at the front and never
goes (``KVMemory.sink``); the finished turn always stays whole; ``keep`` ranks the older tokens and the
S best stay, ties going to the newer. "recent" keeps the last S tokens (the window baseline at the
same state size); "user" keeps the user's messages before the model's own answers, which it can say
again; "surprise" ranks the user's messages by how surprising their most surprising token was to the
model; "salience" keeps the messages a fitted gate over the model's own keys and values calls worth
remembering (a fact told, not small talk: rxt.pretrained.salience) before the other messages of the
user. A message's tokens stay or go together.

``KVMemory`` is this memory's side of a ReactivePretrained: its STM_0, its read, and its write, from the
keys and values generation left in its cache (``write_kept``) or from a second pass over a turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rxt.attention import KVCache, RotaryEmbedding
from rxt.generation import left_pad
from rxt.memory import positions_from_mask
from rxt.turn_states import TurnStates, prompt_surprisal

__all__ = ["KEEP_POLICIES", "KVMemory", "KVRead", "answer_header", "as_prefix", "held_before_turns", "kept_tokens",
           "merge", "read_memory", "token_scores", "unrotate"]

KEEP_POLICIES = ("recent", "user", "surprise", "salience")
SINK_SCORE = 1e9  # the preamble's slots: above any turn's score, never evicted
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
    """Put the memory at the front of each layer's cache (if it is not there yet), for a loop that then
    decodes with no memory of its own: no memory K/V, the key mask with the memory's fill mask in front,
    the turn's positions after the filled slots. (The engine's turn and the serving batcher read it so.)"""
    if caches[0].length == 0:
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
    policy: str, user: torch.Tensor, surprisal: torch.Tensor | None = None, salient: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) scores of a turn's tokens under ``policy``; higher stays longer. user: (B, T) True on the
    tokens of the user's message; surprisal: (B, T) -log p of each token given what came before it;
    salient: (B,) True where the salience gate (rxt.pretrained.salience) says the message tells something
    to remember."""
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
    if policy == "salience":
        if salient is None:
            raise ValueError("the 'salience' policy needs the gate's verdict on each message")
        return user.float() * (1.0 + salient.float()[:, None])  # a salient message's tokens: 2; others': 1
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
        new = with_extra(new_kv[:, None], ids[b, write_mask[b]][None], scores[b, write_mask[b]][None])[:, 0]
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


class KVMemory:
    """The kv memory of a ReactivePretrained ``model``: STM_0, the read, the write. Holds no weights; the
    preamble's keys and values (``sink``) are computed once, by the model's weights as they are then."""

    def __init__(self, model) -> None:
        self.model = model
        self.header, self.closing = self._answer_header()
        self._sink: torch.Tensor | None = None

    @property
    def layers(self):
        return self.model.decoder.layers

    def refresh(self) -> None:
        """Weights were loaded: the preamble's keys and values are computed again when next needed."""
        self._sink = None

    # -- STM_0 and the read --------------------------------------------------------------------------
    def sink(self) -> torch.Tensor:
        """The memory's first slots, never evicted: the preamble's keys and values at positions 0..p-1, as
        the base computes them at the start of a conversation, (L, 1, p, W). The base's attention leans on
        a conversation's first tokens (a sink); a memory whose front is some later token, which it never saw
        there, reads badly (docs/kv-memory.md: SmolLM2's perplexity on chitchat without it)."""
        weight = self.model.base.embedding.weight
        if self._sink is None or self._sink.device != weight.device:
            tokenizer = self.model.tokenizer
            attention = self.layers[0].self_attention
            empty = weight.new_zeros(len(self.layers), 1, 0, slot_width(attention.n_kv_heads, attention.d_head))
            ids = torch.tensor([tokenizer.preamble() if tokenizer is not None else []], dtype=torch.long,
                               device=weight.device)
            with torch.no_grad():
                turn, _ = self.turn_kv(empty, ids, torch.ones_like(ids, dtype=torch.bool))
            score = torch.full(ids.shape, SINK_SCORE, dtype=weight.dtype, device=weight.device)
            self._sink = with_extra(turn, ids, score)
        return self._sink

    def initial(self, batch_size: int) -> torch.Tensor:
        """STM_0: (L, B, S, 2*H_kv*d_head + 3), every slot empty but the preamble's, right-aligned."""
        sink = self.sink()
        memory = sink.new_zeros(sink.shape[0], batch_size, self.model.reactive.stm_slots, sink.shape[-1])
        memory[:, :, memory.shape[2] - sink.shape[2]:] = sink
        return memory

    def read(self, stm: torch.Tensor) -> KVRead:
        attention = self.layers[0].self_attention
        return read_memory(stm, attention.rotary, attention.n_kv_heads)

    def read_into(
        self, read: KVRead, x: torch.Tensor, positions: torch.Tensor | None, key_mask: torch.Tensor | None,
        caches: list[KVCache] | None,
    ) -> tuple[list[None], torch.Tensor, torch.Tensor, list[KVCache]]:
        """The decoder's inputs for reading the memory as context (``as_prefix``); ``key_mask`` and
        ``positions`` are the turn's own, None meaning all of its tokens in order."""
        if caches is None:
            caches = [KVCache() for _ in self.layers]
        batch, length = x.shape[0], x.shape[1]
        seen = max(caches[0].length - read.slots, 0)  # the turn's tokens already in the cache
        if key_mask is None:
            key_mask = torch.ones(batch, seen + length, dtype=torch.bool, device=x.device)
        if positions is None:
            positions = torch.arange(seen, seen + length, device=x.device)
        memory_kv, key_mask, positions = as_prefix(read, caches, key_mask, positions.expand(batch, -1))
        return memory_kv, positions, key_mask, caches

    # -- the write -----------------------------------------------------------------------------------
    def write(self, stm: torch.Tensor, ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """STM_t by a second pass over the finished turns ``ids`` (B, T), reading STM_{t-1} as generation
        did: the reference for ``write_kept``, and the path for turns not generated (``observe``)."""
        if key_mask is None:
            key_mask = torch.ones_like(ids, dtype=torch.bool)
        turn, surprisal = self.turn_kv(stm, ids, key_mask, self.model.needs_surprisal)
        return self.keep(stm, turn, ids, key_mask, surprisal)

    def write_kept(
        self, stm: torch.Tensor, kept: TurnStates, interactions: list[list[int]], pad_id: int
    ) -> tuple[torch.Tensor, list[int]]:
        """STM_t from what generation left: its cache holds the memory's slots and the turn's tokens it ran,
        under ``kept.key_mask``. Only the rest of each turn (the closing, a cut answer's last token) runs
        here; the turn's keys and values are taken from the cache, in order, and the prompt's surprisal from
        the prefill (``kept.surprisal``). Returns STM_t and how many tokens each row ran."""
        counts = (stm[0, :, :, -1] > 0.5).sum(-1)  # (B,) the memory's filled slots, at the front of the cache
        seen = kept.key_mask.long().sum(-1) - counts  # the turn's tokens generation ran
        tails = [ids[int(seen[r]):] for r, ids in enumerate(interactions)]
        if any(not tail for tail in tails):
            raise ValueError("every turn ends with a closing that generation never ran; a row has no tokens left")
        tail_ids, tail_mask = left_pad(tails, pad_id, stm.device)
        key_mask = torch.cat([kept.key_mask.bool(), tail_mask.bool()], dim=1)
        positions = (counts + seen)[:, None] + positions_from_mask(tail_mask)
        self.model.run(tail_ids, [None] * len(self.layers), positions, key_mask, kept.caches)
        ids, mask = left_pad(interactions, pad_id, stm.device)
        columns = [key_mask[r].nonzero()[:, 0][int(counts[r]):] for r in range(len(interactions))]
        turn = self._from_cache(kept.caches, columns, counts, ids.shape[1])
        surprisal = None
        if self.model.needs_surprisal:  # the prompt's tokens', from the prefill; the user's message is in it
            if kept.surprisal is None:
                raise ValueError("this memory ranks by surprise: the turn's prompt surprisal was not kept")
            surprisal = torch.zeros(ids.shape, device=stm.device)
            for r, values in enumerate(kept.surprisal):
                start = ids.shape[1] - len(interactions[r])
                surprisal[r, start : start + values.shape[0]] = values
        return self.keep(stm, turn, ids, mask, surprisal), [len(t) for t in tails]

    def turn_kv(
        self, stm: torch.Tensor, ids: torch.Tensor, key_mask: torch.Tensor, surprisal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The turns ``ids`` (B, T) read after the memory ``stm``: every layer's keys (before RoPE) and
        values of their tokens, (L, B, T, 2*H_kv*d_head), and, if asked, each token's -log p given what
        came before it (a row's first token has nothing of its turn before it: 0)."""
        read = self.read(stm)
        caches = [KVCache() for _ in self.layers]
        hidden, _ = self.model.run(ids, read, positions_from_mask(key_mask), key_mask, caches)
        surprise = None
        if surprisal:
            surprise = torch.zeros(ids.shape, device=ids.device)
            for r, values in enumerate(prompt_surprisal(self.model.logits(hidden), ids, key_mask)):
                surprise[r, key_mask[r].bool()] = values
        columns = [read.slots + key_mask[r].nonzero()[:, 0] for r in range(ids.shape[0])]
        return self._from_cache(caches, columns, read.counts, ids.shape[1]), surprise

    def _from_cache(
        self, caches: list[KVCache], columns: list[torch.Tensor], counts: torch.Tensor, width: int
    ) -> torch.Tensor:
        """(L, B, width, 2*H_kv*d_head): row r's tokens at cache columns ``columns[r]``, in order, keys
        rotated back from positions counts[r], counts[r] + 1, ...; right-aligned, zeros before them."""
        rotary = self.layers[0].self_attention.rotary
        out = caches[0].k.new_zeros(len(caches), len(columns), width, 2 * caches[0].k.shape[1] * caches[0].k.shape[-1])
        for r, cols in enumerate(columns):
            n = cols.shape[0]
            if n == 0:
                continue
            positions = (counts[r] + torch.arange(n, device=cols.device))[None]
            for layer, cache in enumerate(caches):
                keys = unrotate(rotary, cache.k[r : r + 1, :, cols], positions)[0]  # (H_kv, n, d_head)
                out[layer, r, width - n:] = torch.cat([keys.transpose(0, 1).reshape(n, -1),
                                                       cache.v[r, :, cols].transpose(0, 1).reshape(n, -1)], dim=-1)
        return out

    def keep(self, stm: torch.Tensor, turn: torch.Tensor, ids: torch.Tensor, key_mask: torch.Tensor,
              surprisal: torch.Tensor | None) -> torch.Tensor:
        write_mask = self.model.turn_mask(ids, key_mask)
        salient = None
        if self.model.reactive.keep == "salience":
            salient = self.model.salience(turn, self.closing_at(ids, write_mask)) > 0
        scores = token_scores(self.model.reactive.keep, self.user_mask(ids, write_mask), surprisal, salient)
        return merge(stm, turn, ids, scores, write_mask)

    # -- whose tokens --------------------------------------------------------------------------------
    def _answer_header(self) -> tuple[list[int], int]:
        return answer_header(self.model.tokenizer)

    def user_mask(self, ids: torch.Tensor, write_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) True on the written tokens of the user's message (with its template tokens), False from
        where the answer opens. A row without the template's answer header is all the user's."""
        user = write_mask.clone()
        for b, start in enumerate(self._header_at(ids, write_mask)):
            if start >= 0:
                user[b, start + self.closing :] = False
        return user

    def closing_at(self, ids: torch.Tensor, write_mask: torch.Tensor) -> torch.Tensor:
        """(B,) the column of the token right after each row's user message (ChatML: its ``<|im_end|>``),
        where the model has read the whole message; without the template's answer header, the row's last
        written token; -1 for a row with nothing written."""
        at = self._header_at(ids, write_mask)
        last = torch.where(write_mask.any(-1), write_mask.shape[1] - 1 - write_mask.flip(-1).long().argmax(-1), -1)
        return torch.tensor([a if a >= 0 else int(last[b]) for b, a in enumerate(at)], device=ids.device)

    def _header_at(self, ids: torch.Tensor, write_mask: torch.Tensor) -> list[int]:
        """Per row, the column where the template's answer header starts (-1: none)."""
        width, starts = len(self.header), []
        for b in range(ids.shape[0]):
            row, found = ids[b].tolist(), -1
            for start in range(len(row) - width + 1) if width else ():
                if write_mask[b, start] and row[start : start + width] == self.header:
                    found = start
                    break
            starts.append(found)
        return starts


def answer_header(tokenizer) -> tuple[list[int], int]:
    """The template's tokens between the user's message and the answer (ChatML: ``<|im_end|>\\n
    <|im_start|>assistant\\n``), and how many of them close the user's message (ChatML: 2) rather
    than open the answer. Where a turn's user part ends."""
    if tokenizer is None:
        return [], 0
    suffix = tokenizer.template.prompt.split("{query}", 1)[-1]
    closing = suffix[: suffix.rfind("<|im_start|>")] if "<|im_start|>" in suffix else ""
    return tokenizer.render(suffix), len(tokenizer.render(closing)) if closing else 0


def held_before_turns(
    sink: list[int], turns: list[tuple[list[int], int, bool]], slots: int, keep: str
) -> list[list[int]]:
    """What a kv memory of ``slots`` slots holds before each turn, as token ids, from the ids alone: the
    write's own ranking (``token_scores``, ``merge``) run on slots that carry no keys or values. ``turns``:
    per turn its written ids (prompt, answer, closing), how many of them are the user's message (with its
    template tokens) and whether the message is salient (for ``keep: salience``: here a label, such as a
    dialogue's ``told``, stands in for the fitted gate). A training data view: what the reader will read."""
    if keep not in ("recent", "user", "salience"):
        raise ValueError(f"keep {keep!r}: a memory held by ids alone ranks by 'recent', 'user' or 'salience' "
                         "('surprise' needs the model)")
    if len(sink) > slots:
        raise ValueError(f"the preamble's {len(sink)} tokens do not fit in {slots} slots")
    stm = torch.zeros(1, 1, slots, 1 + EXTRA)
    if sink:
        stm[0, 0, slots - len(sink):] = with_extra(torch.zeros(1, 1, len(sink), 1), torch.tensor([sink]),
                                                   torch.full((1, len(sink)), SINK_SCORE))[0, 0]
    held = []
    for ids, user_tokens, salient in turns:
        held.append(kept_tokens(stm)[0])
        user = torch.zeros(1, len(ids), dtype=torch.bool)
        user[0, :user_tokens] = True
        scores = token_scores(keep, user, salient=torch.tensor([salient]))
        stm = merge(stm, torch.zeros(1, 1, len(ids), 1), torch.tensor([ids]), scores, torch.ones_like(user))
    return held


def with_extra(turn: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Slots from keys and values (L, B, T, W - 3): each token's id, score and a fill flag appended."""
    extra = torch.stack([ids.to(turn.dtype), scores.to(turn.dtype), torch.ones_like(scores, dtype=turn.dtype)],
                        dim=-1)  # (B, T, 3)
    return torch.cat([turn, extra[None].expand(turn.shape[0], -1, -1, -1)], dim=-1)
