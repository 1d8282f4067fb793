"""How much of each evicted turn a consolidating memory writes into its long-term slots, by the kind
of turn evicted: a fact told, small talk, or a question and its answer.

    PYTHONPATH=src python experiments/lasting/gate_probe.py --model runs/nano-lasting/rxt --dialogues 24

For every turn the queue evicts (its slots were written queue_slots / write_slots turns earlier), the
write is sum_k g_k over the long-term slots (mean over layers and dimensions) divided by write_slots:
1 when every evicted slot is moved whole into the long-term slots, 0 when all of it is dropped.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from rxt.data.dialogues import generate_dialogues
from rxt.data.phrasings import SMALL_TALK
from rxt.model import ReactiveTransformer


def turn_kind(turn, small_talk_answers: set[str]) -> str:
    if turn.check:
        return "question"
    return "small talk" if turn.answer in small_talk_answers else "fact told"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dialogues", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ReactiveTransformer.from_pretrained(args.model)
    c = model.config
    if c.memory_write != "consolidate":
        raise SystemExit(f"{args.model} has memory_write {c.memory_write!r}: no long-term slots to probe")
    lag = (c.stm_slots - c.long_term_slots) // c.write_slots  # turns a slot spends in the queue
    writes: list[float] = []

    def record(gate, inputs, kwargs, _output) -> None:
        old, update = inputs[:2]
        g = torch.sigmoid(gate.gate_logits(old, update)) * kwargs["share"]  # (B, K, D)
        writes.append(g.mean(-1).sum(-1).item() / c.write_slots)

    hooks = [layer.consolidation.gate.register_forward_hook(record, with_kwargs=True)
             for layer in model.memory_attention.layers]
    answers = {a for _, options in SMALL_TALK for a in options}
    by_kind: dict[str, list[float]] = defaultdict(list)
    dialogues = generate_dialogues(args.dialogues, seed=args.seed, split="heldout", min_turns=24, max_turns=72,
                                   max_distance=64)
    for dialogue in dialogues:
        stm = model.initial_memory(1)
        for t, turn in enumerate(dialogue.turns):
            writes.clear()
            stm = model.update_memory(stm, torch.tensor([model.tokenizer.interaction(turn.query, turn.answer)]))
            if t >= lag:  # the turn written `lag` turns ago is the one evicted now
                by_kind[turn_kind(dialogue.turns[t - lag], answers)].append(sum(writes) / len(writes))
    for hook in hooks:
        hook.remove()
    report = {kind: {"turns": len(v), "mean_write": sum(v) / len(v)} for kind, v in sorted(by_kind.items())}
    print(json.dumps({"model": args.model, "evicted": report}, indent=2))


if __name__ == "__main__":
    main()
