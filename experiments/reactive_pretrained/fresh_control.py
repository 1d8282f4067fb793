"""The held-out memory control of a reactive-pretrained recipe, on dialogues of the training kind: does
the memory carry a value it never saw when the phrasings are the training ones? Scores the recall
answers of new draws of the recipe's training dialogues (fresh values, when the recipe has them) and of
the same dialogues with values from the training pools, each read with its own memory, another
dialogue's and the memory wiped (`rxt.pretrained.training.memory_control`).

    python experiments/reactive_pretrained/fresh_control.py RECIPE ADAPTER_DIR [--dialogues 24] [--heldout] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from rxt.pretrained.reactive import ReactivePretrained
from rxt.pretrained.training import (
    TrainingDialogues,
    heldout_fact_dialogues,
    load_reactive_recipe,
    memory_control,
)

FAR = 10**12  # dialogue indices far beyond any a run draws (batch_indices draws below 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("adapter")
    parser.add_argument("--dialogues", type=int, default=24)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--heldout", action="store_true", help="also the run's held-out control, as its log has it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_reactive_recipe(args.recipe)
    model = ReactivePretrained.from_pretrained(args.adapter, recipe.base)
    report = {"recipe": args.recipe, "adapter": args.adapter}
    if args.heldout:  # the run's own held-out control (the generator's held-out values and phrasings)
        report["heldout"] = memory_control(model, heldout_fact_dialogues(recipe.data))
        print("heldout", report["heldout"], flush=True)
    for name, spec in (("training_kind", recipe.data), ("training_pool_values", dataclasses.replace(recipe.data, fresh_values=0.0))):
        data = TrainingDialogues(dataclasses.replace(spec, fact_share=1.0, chitchat_file=""))
        dialogues = [data[FAR + i] for i in range(args.dialogues)]
        report[name] = memory_control(model, dialogues)
        print(name, report[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
