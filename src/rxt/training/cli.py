"""`rxt train --recipe recipes/nano.yaml --out DIR`: every curriculum stage and the baseline, end to end.

A recipe with ``kind: reactive-pretrained`` (e.g. experiments/reactive_pretrained/smollm2-reactive.yaml) trains the adapter of
a pretrained decoder made reactive instead (rxt.pretrained.training); one with ``kind: stateless-pretrained``
trains its stateless baseline, LoRA on the same base reading the whole history (rxt.pretrained.history_training).

Multi-process: ``torchrun --nproc_per_node N -m rxt.cli train --recipe ... --out ...``.
"""

from __future__ import annotations

import argparse
import json

import torch

from rxt.training.pipeline import RecipeRun
from rxt.training.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    parser.add_argument("--out", required=True, help="output directory: OUT/rxt and OUT/baseline")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--only", choices=("rxt", "baseline"),
                        help="train one model only (the two are independent: run both at once, same --out)")
    parser.add_argument("--device", default="auto",
                        help="reactive- and stateless-pretrained recipes: cpu, cuda, cuda:N or auto (cuda when there is one); "
                        "the RxT recipes use cuda when there is one")


def run(args: argparse.Namespace) -> int:
    from rxt.pretrained.history_training import HistoryRun, is_history_recipe, load_history_recipe
    from rxt.pretrained.training import ReactiveRun, is_reactive_recipe, load_reactive_recipe

    pretrained = [(is_reactive_recipe, load_reactive_recipe, ReactiveRun),
                  (is_history_recipe, load_history_recipe, HistoryRun)]
    kind = next(((load, run) for is_kind, load, run in pretrained if is_kind(args.recipe)), None)
    if kind is not None:
        if args.only:
            raise ValueError("--only picks a model of an RxT recipe; a pretrained-base recipe trains one model")
        recipe = kind[0](args.recipe)
        torch.set_num_threads(recipe.threads)
        summary = kind[1](recipe, args.out, args.resume, args.device, not args.no_progress).run()
    else:
        if args.device != "auto":
            raise ValueError("--device is for pretrained-base recipes; an RxT recipe uses cuda when there is one")
        recipe = load_recipe(args.recipe)
        torch.set_num_threads(recipe.threads)
        summary = RecipeRun(recipe, args.out, resume=args.resume, progress=not args.no_progress).run(args.only)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0
