"""A quick greedy memory-recall check used during training (the full evaluation lives elsewhere).

Each dialogue is played turn by turn: the decoder answers [Q] query [A] reading the STM, greedily,
until [EOT]; then the memory is updated with the interaction it actually produced. A recall turn
counts as correct when its exact value appears (as a whole word) in the generated answer.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from rxt.data.dialogues import Dialogue
from rxt.model import ReactiveTransformer, positions_from_mask
from rxt.tokenizer import Tokenizer
from rxt.training.batches import pad


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids, mask = pad([[pad_id] * (length - len(s)) + s for s in sequences], pad_id)
    mask = torch.stack([torch.arange(length) >= length - len(s) for s in sequences])
    return ids, mask


@torch.no_grad()
def greedy_answers(model: ReactiveTransformer, tokenizer: Tokenizer, queries: list[str], stm: torch.Tensor,
                   max_new_tokens: int = 24) -> list[list[int]]:
    """Answer token ids (without [EOT]) for a batch of queries, reading memory stm (L, B, S, D)."""
    ids, mask = left_pad([tokenizer.prompt(q) for q in queries], tokenizer.pad_id)
    memory_kv = model.project_memory(stm)  # once per turn
    answers: list[list[int]] = [[] for _ in queries]
    done = torch.zeros(len(queries), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.decode(ids, memory_kv=memory_kv, key_mask=mask, positions=positions_from_mask(mask))
        next_ids = logits[:, -1].argmax(-1)
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                if token == tokenizer.end_id:
                    done[row] = True
                else:
                    answers[row].append(token)
        if bool(done.all()):
            break
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return answers


@torch.no_grad()
def quick_recall(model: ReactiveTransformer, tokenizer: Tokenizer, dialogues: list[Dialogue],
                 max_new_tokens: int = 24, examples: list | None = None) -> dict:
    """Recall accuracy by distance on dialogues with ``check`` turns: {"overall", "by_distance", "n"}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stm = model.initial_memory(len(dialogues)).to(device)
    hits: dict[int, list[bool]] = defaultdict(list)
    for t in range(max(len(d.turns) for d in dialogues)):
        rows = [i for i, d in enumerate(dialogues) if t < len(d.turns)]
        turns = [dialogues[i].turns[t] for i in rows]
        answers = greedy_answers(model, tokenizer, [turn.query for turn in turns], stm[:, rows], max_new_tokens)
        texts = [tokenizer.decode(a) for a in answers]
        for turn, text in zip(turns, texts, strict=True):
            if turn.check:
                ok = re.search(rf"(?<!\w){re.escape(turn.check['value'])}(?!\w)", text) is not None
                hits[turn.check["distance"]].append(ok)
                if examples is not None:
                    examples.append({"query": turn.query, "expected": turn.check["value"], "answer": text, "ok": ok})
        interactions = [tokenizer.prompt(turn.query) + a + [tokenizer.end_id] for turn, a in zip(turns, answers, strict=True)]
        ids, mask = pad(interactions, tokenizer.pad_id)
        stm[:, rows] = model.update_memory(stm[:, rows], ids.to(device), mask.to(device))
    model.train(was_training)
    by_distance = {d: sum(v) / len(v) for d, v in sorted(hits.items())}
    counts = {d: len(v) for d, v in sorted(hits.items())}
    total = [x for v in hits.values() for x in v]
    return {"overall": sum(total) / max(1, len(total)), "by_distance": by_distance, "counts": counts, "n": len(total)}
