"""`rxt eval gates`: how does a trained RxT write its memory?

Replays held-out dialogues turn by turn (the reference answers as the interactions) and records every
residual gate G of every memory update, STM_t = (1 - G) * STM_{t-1} + G * Update (with competitive
writes, G times the share of the turn the slot took). Per STM layer:

    mean          the average G: how much of a slot one turn replaces
    across slots  spread of the slots' average G: do slots write at different rates?
    across turns  spread of one slot's G from turn to turn (averaged over slots): does what a turn
                  says change how much it is written? Near zero: the gate is blind to content.
    told / other  average G on turns that state a fact asked about later, and on all other turns
    slots         (--json only) each slot's average G

A memory that keeps facts should write hard when one is told and barely when nothing is.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from rxt.config import QUEUE_WRITES
from rxt.data.dialogues import Dialogue, generate_dialogues
from rxt.model import ReactiveTransformer


@torch.no_grad()
def gate_statistics(model: ReactiveTransformer, dialogues: Sequence[Dialogue]) -> list[dict[str, float]]:
    """One dict per STM layer: mean, across_slots, across_turns, told, other (see the module doc)
    and slots, each slot's average G."""
    if model.config.memory_write in QUEUE_WRITES:
        raise ValueError(f"this model writes its memory as a queue (memory_write {model.config.memory_write!r}): "
                         "it has no gates on the whole memory")
    if model.config.gate_activation != "sigmoid":
        raise ValueError(f"gate statistics need sigmoid gates (G in 0..1); this model's are {model.config.gate_activation!r}")
    layers = model.memory_attention.layers
    seen: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer: (S,) mean over D, one per update
    told_flags: list[bool] = []

    def record(i: int, gate, inputs, kwargs, _output) -> None:
        g = torch.sigmoid(gate.gate_logits(*inputs[:2]))
        share = kwargs.get("share", inputs[2] if len(inputs) > 2 else None)  # competitive writes scale G
        seen[i].append((g if share is None else g * share).mean(-1)[0])

    hooks = [
        layer.gate.register_forward_hook(partial(record, i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        model.eval()
        for dialogue in dialogues:
            told = {t - turn.check["distance"] for t, turn in enumerate(dialogue.turns) if turn.check}
            stm = model.initial_memory(1)
            for t, turn in enumerate(dialogue.turns):
                ids = torch.tensor([model.tokenizer.interaction(turn.query, turn.answer)])
                stm = model.update_memory(stm, ids)
                told_flags.append(t in told)
    finally:
        for hook in hooks:
            hook.remove()
    flags = torch.tensor(told_flags)
    stats = []
    for per_turn in seen:
        g = torch.stack(per_turn)  # (updates, S)
        stats.append(
            {
                "mean": g.mean().item(),
                "across_slots": g.mean(0).std().item(),
                "across_turns": g.std(0).mean().item(),
                "told": g[flags].mean().item() if flags.any() else float("nan"),
                "other": g[~flags].mean().item() if (~flags).any() else float("nan"),
                "slots": [round(x, 4) for x in g.mean(0).tolist()],  # each slot's average G
            }
        )
    return stats


def print_table(stats: list[dict[str, float]]) -> None:
    print(f"{'layer':>5} {'mean G':>7} {'across slots':>13} {'across turns':>13} {'told':>7} {'other':>7}")
    for i, s in enumerate(stats):
        print(
            f"{i:>5} {s['mean']:>7.3f} {s['across_slots']:>13.3f} {s['across_turns']:>13.3f} "
            f"{s['told']:>7.3f} {s['other']:>7.3f}"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="RxT model directory")
    parser.add_argument("--dialogues", type=int, default=64, help="synthetic held-out dialogues to replay")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--json", help="write the statistics here")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ReactiveTransformer.from_pretrained(args.model)
    if model.tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer.json")
    stats = gate_statistics(model, generate_dialogues(args.dialogues, seed=args.seed, split=args.split))
    print_table(stats)
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
    return 0
