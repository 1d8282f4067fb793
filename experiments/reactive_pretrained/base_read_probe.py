"""Can the untrained base read a memory of token states through its own heads?

A reactive model with a memory of tokens (``memory_write: tokens``: each memory layer keeps the last
``--slots`` turn states verbatim) read by each memory layer's own self-attention (``memory_read: base``),
with the read's output projection W_O set to ``scale`` times the layer's own (training starts it at
zero). No training: the held-out memory control of a recipe (its own memory, another dialogue's, the
memory wiped) says whether the base's heads, searching the kept states without positions, bring the
told word out, for each scale and set of memory layers. For scale: the base reading its whole history
has answer loss 1.82 (own) against 3.71 (none) on the fresh-values recipes' 24 held-out questions.

    python experiments/reactive_pretrained/base_read_probe.py \\
        experiments/reactive_pretrained/smollm2-reactive-fresh-tokens.yaml --json docs/results/reactive-base-read-probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from rxt.pretrained.reactive import ReactivePretrained
from rxt.pretrained.training import ReactiveRecipe, heldout_fact_dialogues, memory_control

LAYER_SETS = {"every 3rd (10)": list(range(2, 30, 3)), "all 30": list(range(30))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a reactive-pretrained recipe: its base and held-out dialogues")
    parser.add_argument("--slots", type=int, default=192)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = ReactiveRecipe.load(args.recipe)
    heldout = heldout_fact_dialogues(recipe.data)
    rows = []
    for name, layers in LAYER_SETS.items():
        config = dataclasses.replace(recipe.reactive, memory_layers=layers, memory_write="tokens",
                                     memory_read="base", stm_slots=args.slots)
        torch.manual_seed(0)
        model = ReactivePretrained.from_base(recipe.base, config).eval()
        for scale in args.scales:
            with torch.no_grad():
                for i in layers:
                    layer = model.decoder.layers[i]
                    layer.memory_cross_attention.o_proj.weight.copy_(layer.self_attention.o_proj.weight * scale)
            start = time.perf_counter()
            control = memory_control(model, heldout)
            rows.append({"layers": name, "scale": scale, **control, "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recipe": args.recipe, "slots": args.slots, "rows": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
