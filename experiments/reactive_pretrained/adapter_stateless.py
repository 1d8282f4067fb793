"""Write the stateless twin of a reactive adapter with LoRA: its base with the adapter's LoRA folded in,
as a plain stateless model directory. The same weights reading the whole history (or a window of it):
the baselines of `rxt eval memory` for a shipped kv adapter when the training run is not at hand.

    python experiments/reactive_pretrained/adapter_stateless.py models/smollm2-kv runs/smollm2 OUT_DIR
"""

from __future__ import annotations

import argparse
import json

from safetensors import safe_open

from rxt.pretrained.history_training import LoRASpec, lora_model, save_merged
from rxt.pretrained.reactive import ReactivePretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("base")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    reactive = ReactivePretrained.from_pretrained(args.adapter, args.base)  # checks the base's sha256
    config = reactive.reactive
    if not config.lora_rank:
        raise SystemExit(f"{args.adapter}: the adapter carries no LoRA")
    spec = LoRASpec(rank=config.lora_rank, alpha=config.lora_alpha, targets=list(config.lora_targets),
                    layers=config.lora_layers)
    model = lora_model(args.base, spec)
    with safe_open(f"{args.adapter}/adapter.safetensors", "pt") as f:
        weights = {k.removeprefix("base."): f.get_tensor(k).float() for k in f.keys() if ".lora_" in k}
    missing = set(weights) ^ {k for k in model.state_dict() if ".lora_" in k}
    if missing:
        raise SystemExit(f"{args.adapter}: its LoRA weights do not fit {spec}: {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)
    save_merged(model, args.out_dir)
    print(json.dumps({"adapter": args.adapter, "lora_weights": sum(w.numel() for w in weights.values()),
                      "out": args.out_dir}))


if __name__ == "__main__":
    main()
