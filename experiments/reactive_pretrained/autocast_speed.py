"""Training tokens/s of a reactive SmolLM2 in fp32 and under bf16 autocast, interleaved (one thread):
a forward and backward of memory-aware training on the first four turns of training fact dialogues.

    python experiments/reactive_pretrained/autocast_speed.py models/smollm2 [--pairs 6]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from rxt.data.dialogues import DialogueGenerator
from rxt.pretrained.reactive import ReactivePretrained
from rxt.pretrained.training import dialogue_batch, memory_aware_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ReactivePretrained.from_base(args.base).train()
    generator = DialogueGenerator(0, "train", min_turns=4, max_turns=8, max_distance=7)
    speed: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(args.pairs):
        dialogue = generator[i]
        dialogue.turns = dialogue.turns[:4]
        batch = dialogue_batch([dialogue], model.tokenizer)
        for mode in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):  # alternate who goes first
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
            start = time.perf_counter()
            with autocast:
                loss, _ = memory_aware_loss(model, batch.data)
            loss.backward()
            model.zero_grad(set_to_none=True)
            speed[mode].append(batch.tokens / (time.perf_counter() - start))
    for mode, values in speed.items():
        print(f"{mode}: {statistics.median(values):.1f} tokens/s (median of {len(values)})")


if __name__ == "__main__":
    main()
