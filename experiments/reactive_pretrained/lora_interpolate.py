"""Weight-space interpolation of two LoRAs trained on one base, one continued from the other
(WiSE-FT, arXiv 2109.01903): ``(1 - t) * first + t * second``, factor by factor, so the rank stays.

A reader trained further on what the memory holds far into a conversation
(smollm2-stateless-memview-gentle.yaml, init_from models/smollm2-kv-mix) answers far facts that
reader misses and misses near ones it answers. Interpolating the two is the standard way to keep
the starting model's strengths and most of the fine-tuned one's gain; ``t`` is fixed before any
evaluation (0.5), never chosen on the memory suite's held-out half.

Interpolating the factors A and B (not the products B A) leaves a cross term t (1 - t) (B2 - B1)(A2 - A1);
it is small when the second run started from the first, and the result is a LoRA of the same rank
that `rxt wrap --lora` ships as it is.

    python experiments/reactive_pretrained/lora_interpolate.py runs/smollm2 models/smollm2-kv-mix \
        runs/smollm2-stateless-memview-gentle/model/lora.safetensors --t 0.5 --out runs/lora-wise-0.5.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from rxt.pretrained.history_training import read_lora, save_lora


def interpolate(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    if set(first) != set(second):
        raise ValueError(f"the two LoRAs hold different tensors ({len(first)} against {len(second)})")
    for key in first:
        if first[key].shape != second[key].shape:
            raise ValueError(f"{key}: shapes {tuple(first[key].shape)} and {tuple(second[key].shape)} differ")
    return {k: ((1.0 - t) * first[k] + t * second[k]).contiguous() for k in first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the base model directory both LoRAs were trained on")
    parser.add_argument("first", help="a run's lora.safetensors or an adapter directory (t = 0)")
    parser.add_argument("second", help="the same, continued from the first (t = 1)")
    parser.add_argument("--t", type=float, default=0.5, help="the share of the second (default 0.5)")
    parser.add_argument("--out", required=True, help="the interpolated lora.safetensors to write")
    args = parser.parse_args()
    if not 0.0 <= args.t <= 1.0:
        parser.error(f"--t is a share in [0, 1], got {args.t}")
    spec1, first = read_lora(args.base, args.first, "first")
    spec2, second = read_lora(args.base, args.second, "second")
    if dataclasses.astuple(spec1) != dataclasses.astuple(spec2):
        raise SystemExit(f"the two LoRAs have different settings: {spec1} against {spec2}")
    weights = interpolate(first, second, args.t)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_lora(weights, spec1, args.base, args.out)
    moved = sum(float((second[k] - first[k]).norm() ** 2) for k in first) ** 0.5
    print(json.dumps({"out": args.out, "t": args.t, "tensors": len(weights), "distance": round(moved, 4)}))


if __name__ == "__main__":
    main()
