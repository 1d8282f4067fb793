"""Untrained memories of 64 slots made from the shipped nano RxT, for the distance probe of
docs/lasting-memory.md: the same weights, only the memory around them differs.

    queue64     a queue of 64 slots, 2 written a turn: keeps 32 turns, drops the 33rd
    queue128    a queue of 128 slots: keeps 64 turns (twice the state of the other two)
    lasting0    the 32-slot queue plus 32 long-term slots (memory_write: consolidate), before training

    PYTHONPATH=src python experiments/lasting/probe_models.py --model models/nano/rxt --out runs/probe
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from rxt.model import ReactiveTransformer
from rxt.training.pipeline import grow_long_term


def longer_queue(model: ReactiveTransformer, slots: int) -> ReactiveTransformer:
    """The same model with a queue of ``slots`` slots; the new slots start as the shipped start state does."""
    config = dataclasses.replace(model.config, stm_slots=slots)
    torch.manual_seed(0)
    longer = ReactiveTransformer(config)
    state = model.state_dict()
    state["stm.init"] = torch.cat([longer.stm.init[:, : slots - model.config.stm_slots], state["stm.init"]], dim=1)
    longer.load_state_dict(state)
    return longer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/nano/rxt")
    parser.add_argument("--out", default="runs/probe")
    args = parser.parse_args()
    shipped = ReactiveTransformer.from_pretrained(args.model)
    slots = 2 * shipped.config.stm_slots
    torch.manual_seed(0)
    fresh = ReactiveTransformer(dataclasses.replace(shipped.config, memory_write="consolidate", stm_slots=slots,
                                                    long_term_slots=shipped.config.stm_slots))
    made = {"queue64": longer_queue(shipped, slots), "queue128": longer_queue(shipped, 2 * slots),
            "lasting0": grow_long_term(shipped, fresh, Path(args.model))}
    for name, model in made.items():
        model.tokenizer = shipped.tokenizer
        print(name, model.save_pretrained(Path(args.out) / name), f"{model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
