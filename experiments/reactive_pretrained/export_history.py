"""Write the model a stateless-pretrained run holds at its last checkpoint, LoRA folded in, as a plain
stateless model directory: what a stopped run leaves to evaluate (a run that ends writes DIR/model itself).

    python experiments/reactive_pretrained/export_history.py RECIPE RUN_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json

from rxt.pretrained.history_training import STAGE, HistoryRecipe, lora_model, save_merged
from rxt.training.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    recipe = HistoryRecipe.load(args.recipe)
    state = load_checkpoint(f"{args.run_dir}/checkpoints/{STAGE}.safetensors", "cpu")
    model = lora_model(recipe.base, recipe.lora)
    missing = set(state["model"]) ^ {k for k in model.state_dict() if ".lora_" in k}
    if missing:
        raise SystemExit(f"the checkpoint does not hold this recipe's LoRA weights: {sorted(missing)[:5]}")
    model.load_state_dict(state["model"], strict=False)
    save_merged(model, args.out_dir, recipe.lora, recipe.base)
    print(json.dumps({"step": state["step"], "tokens_seen": state["tokens_seen"], "out": args.out_dir}))


if __name__ == "__main__":
    main()
