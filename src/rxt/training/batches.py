"""Batches for every stage, drawn deterministically from (seed, stage, step, micro-step, rank).

Because batch ``k`` is a pure function of its index, the data position of a run is just its step
count: resuming from a checkpoint replays exactly the batches an uninterrupted run would have seen,
and several processes split one global batch without coordinating.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rxt.data.dialogues import Dialogue, DialogueGenerator, Turn, copy_turn
from rxt.tokenizer import Tokenizer

IGNORE = -100  # label of positions without loss


@dataclass
class Batch:
    data: Any  # what the stage's loss function reads
    count: float  # loss terms in this batch (weighted targets, or vectors for cosine losses): the normaliser
    tokens: int  # real (non-pad) tokens the networks process


def pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (B, T) ids and a (B, T) bool mask, True on real tokens."""
    length = max(1, max((len(s) for s in sequences), default=1)) if length is None else length
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids, mask


def answer_labels(ids: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """Labels (B, T) for next-token loss on answer tokens only: ids after an [A] up to its [EOT].

    Works on single interactions and on whole dialogues (several [Q] ... [A] ... [EOT] in a row).
    """
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    inside = torch.zeros(ids.shape[0], dtype=torch.bool)
    for j in range(ids.shape[1]):
        token = ids[:, j]
        is_answer[:, j] = inside & (token != tokenizer.pad_id)
        inside = (inside | (token == tokenizer.answer_id)) & (token != tokenizer.end_id) & (token != tokenizer.query_id)
    return torch.where(is_answer, ids, torch.full_like(ids, IGNORE))


def rank_slice(items: list, micro: int, grad_accum: int, rank: int, world: int) -> list:
    """This process's share of one micro-step of a global batch."""
    per_micro = len(items) // grad_accum
    chunk = items[micro * per_micro : (micro + 1) * per_micro]
    per_rank = len(chunk) // world
    return chunk[rank * per_rank : (rank + 1) * per_rank]


def batch_indices(seed: int, stage: str, step: int, batch_size: int, population: int) -> list[int]:
    rng = random.Random(f"rxt-batch:{seed}:{stage}:{step}")
    return [rng.randrange(population) for _ in range(batch_size)]


class TextSource:
    """Single sequences for the language stages: dialogue turns, and corpus pairs or plain text.

    chat=False gives plain text ("query answer"); chat=True the template [Q] query [A] answer [EOT].
    Even indices are dialogue turns; odd ones are corpus pairs, or with ``texts`` (prose chunks) and
    chat=False, plain text. A share ``copy_share`` of the sequences are copy drills (`copy_turn`) instead.
    """

    def __init__(self, tokenizer: Tokenizer, generator: DialogueGenerator, pairs: list[tuple[str, str]],
                 chat: bool, max_len: int, copy_share: float = 0.0, seed: int = 0, texts: Sequence[str] = ()):
        self.tokenizer, self.generator, self.pairs, self.chat, self.max_len = tokenizer, generator, pairs, chat, max_len
        self.copy_share, self.seed, self.texts = copy_share, seed, texts

    def pair(self, index: int) -> tuple[str, str]:
        if self.copy_share and random.Random(f"rxt-copy-share:{self.seed}:{index}").random() < self.copy_share:
            drill = copy_turn(index, self.seed)
            return drill.query, drill.answer
        # even indices: synthetic turns; odd: corpus pairs (when there are any)
        if index % 2 and self.pairs:
            return self.pairs[(index // 2) % len(self.pairs)]
        dialogue = self.generator[index // 2]
        turn = dialogue.turns[(index // 2) % len(dialogue.turns)]
        return turn.query, turn.answer

    def encode(self, index: int) -> list[int]:
        if index % 2 and self.texts and not self.chat:
            return self.tokenizer.encode(self.texts[(index // 2) % len(self.texts)])[: self.max_len]
        query, answer = self.pair(index)
        tok = self.tokenizer
        ids = tok.interaction(query, answer) if self.chat else tok.encode(f"{query} {answer}")
        return ids[: self.max_len]

    def batch(self, indices: list[int]) -> Batch:
        ids, mask = pad([self.encode(i) for i in indices], self.tokenizer.pad_id)
        return Batch({"ids": ids, "mask": mask}, count=int(mask[:, 1:].sum()), tokens=int(mask.sum()))

    def lm_batch(self, indices: list[int]) -> Batch:
        """The same sequences for a stateless LM: next-token loss on every real token."""
        ids, mask = pad([self.encode(i) for i in indices], self.tokenizer.pad_id)
        labels = torch.where(mask, ids, torch.full_like(ids, IGNORE))
        return Batch({"ids": ids, "mask": mask, "labels": labels, "weights": torch.ones(ids.shape)},
                     count=int(mask[:, 1:].sum()), tokens=int(mask.sum()))


def answer_weight(turn: Turn, recall_weight: float) -> float:
    """Loss weight of a turn's answer tokens: ``recall_weight`` for answers to recall questions."""
    return recall_weight if turn.check else 1.0


def weighted_count(labels: torch.Tensor, weights: torch.Tensor) -> float:
    """The loss normaliser: the summed weights of the positions with a target."""
    return float(((labels[:, 1:] != IGNORE) * weights[:, 1:]).sum())


def turn_batches(dialogues: list[Dialogue], tokenizer: Tokenizer, max_turns: int | None = None,
                 recall_weight: float = 1.0) -> list[dict]:
    """Per turn t: interaction ids/mask (n_t, T_t), answer labels and their loss weights.

    Dialogues are ordered longest first, so the n_t dialogues still going at turn t are the first n_t
    rows of turn t - 1: a dialogue that has ended drops out of the batch and costs nothing.
    """
    dialogues = sorted(dialogues, key=lambda d: len(d.turns), reverse=True)
    n_turns = len(dialogues[0].turns) if max_turns is None else min(len(dialogues[0].turns), max_turns)
    turns = []
    for t in range(n_turns):
        live = [d.turns[t] for d in dialogues if t < len(d.turns)]
        ids, mask = pad([tokenizer.interaction(turn.query, turn.answer) for turn in live], tokenizer.pad_id)
        rows = torch.tensor([answer_weight(turn, recall_weight) for turn in live])
        turns.append({"ids": ids, "mask": mask, "labels": answer_labels(ids, tokenizer),
                      "weights": rows[:, None].expand(ids.shape)})
    return turns


class DialogueSource:
    """Whole dialogues: as turn sequences (RxT stages) or as one concatenated history (baseline)."""

    def __init__(self, tokenizer: Tokenizer, generator: DialogueGenerator, max_turns: int | None = None,
                 recall_weight: float = 1.0):
        self.tokenizer, self.generator, self.max_turns = tokenizer, generator, max_turns
        self.recall_weight = recall_weight

    def turns_batch(self, indices: list[int], count: str = "answers", slots: int = 1, layers: int = 1) -> Batch:
        """count="answers": answer tokens (SMAT); count="vectors": active turns x layers x slots (stage 3)."""
        turns = turn_batches([self.generator[i] for i in indices], self.tokenizer, self.max_turns, self.recall_weight)
        tokens = sum(int(t["mask"].sum()) for t in turns)
        if count == "answers":
            n = sum(weighted_count(t["labels"], t["weights"]) for t in turns)
        else:
            n = sum(t["ids"].shape[0] for t in turns) * slots * layers
        return Batch(turns, count=n, tokens=tokens)

    def history_batch(self, indices: list[int]) -> Batch:
        """Baseline: every turn of a dialogue in one sequence; loss on all answer tokens, weighted as in SMAT."""
        tok = self.tokenizer
        seqs, weights = [], []
        for i in indices:
            turns = [(tok.interaction(t.query, t.answer), answer_weight(t, self.recall_weight))
                     for t in self.generator[i].turns[: self.max_turns]]
            seqs.append([token for ids, _ in turns for token in ids])
            weights.append([w for ids, w in turns for _ in ids])
        ids, mask = pad(seqs, tok.pad_id)
        labels = answer_labels(ids, tok)
        weight = torch.ones(ids.shape)
        for row, w in enumerate(weights):
            weight[row, : len(w)] = torch.tensor(w)
        return Batch({"ids": ids, "mask": mask, "labels": labels, "weights": weight},
                     count=weighted_count(labels, weight), tokens=int(mask.sum()))
