"""Write the stateless twin of a reactive adapter with LoRA: its base with the adapter's LoRA folded in,
as a plain stateless model directory. The same weights reading the whole history (or a window of it):
the baselines of `rxt eval memory` for a shipped kv adapter when the training run is not at hand.

    python experiments/reactive_pretrained/adapter_stateless.py models/smollm2-kv runs/smollm2 OUT_DIR
"""

from __future__ import annotations

import argparse
import json

from rxt.pretrained.history_training import load_lora, lora_model, read_lora, save_merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("base")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    spec, _ = read_lora(args.base, args.adapter, "adapter")  # checks the base's sha256
    model = lora_model(args.base, spec)
    count = load_lora(model, args.base, args.adapter, spec, "adapter")
    save_merged(model, args.out_dir)
    print(json.dumps({"adapter": args.adapter, "lora_weights": count,
                      "out": args.out_dir}))


if __name__ == "__main__":
    main()
