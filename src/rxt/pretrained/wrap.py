"""`rxt wrap BASE --out DIR`: a stateless model directory with a memory of its own keys and values.

Nothing new is trained: the adapter directory it writes holds the memory's settings and names its base
by sha256 (rxt.pretrained.kv_memory), and `rxt chat`, `rxt serve` and `rxt eval` take it like any
reactive adapter. With ``--lora FILE`` it also carries the LoRA weights a ``kind: stateless-pretrained``
run trained on that base (``DIR/model/lora.safetensors``): the base stays the imported one and the
adapter is the LoRA (SmolLM2, rank 32 on all seven targets: 19.6 MB in bf16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from rxt.pretrained.kv_memory import KEEP_POLICIES
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained, base_sha256


def wrap(
    base_dir: str | Path, out_dir: str | Path, slots: int, keep: str = "user", lora: str | Path | None = None
) -> ReactivePretrained:
    """Write the adapter directory of ``base_dir`` with a kv memory of ``slots`` tokens kept by ``keep``
    (and the LoRA weights of ``lora``, a run's lora.safetensors on this base, if given)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: the directory is not empty")
    if not (Path(base_dir) / "config.json").is_file():
        raise ValueError(f"{base_dir}: not a model directory (no config.json there)")
    config = ReactiveConfig(memory_write="kv", stm_slots=slots, keep=keep)
    weights = _lora_weights(base_dir, lora, config) if lora is not None else None
    model = ReactivePretrained.from_base(base_dir, config)
    if weights is not None:
        expected = {k for k in model.adapter_state_dict() if ".lora_" in k}
        if set(weights) != expected:
            raise ValueError(f"--lora {lora}: its weights do not fit its own LoRA settings")
        model.load_state_dict(weights, strict=False)
    model.save_adapter(out)
    return model


def _lora_weights(base_dir: str | Path, lora: str | Path, config: ReactiveConfig) -> dict:
    """The LoRA weights of a run's lora.safetensors, keyed as the reactive model holds them; its settings
    go into ``config``. A file trained on another base is refused."""
    if not Path(lora).is_file():
        raise FileNotFoundError(f"--lora {lora}: no such file (a stateless-pretrained run writes DIR/model/lora.safetensors)")
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata() or {}
        if "lora" not in meta:
            raise ValueError(f"--lora {lora}: not a LoRA file of a stateless-pretrained run (no settings in it)")
        weights = {f"base.{k}": f.get_tensor(k) for k in f.keys()}
    if meta.get("base_sha256") != base_sha256(base_dir):
        raise ValueError(f"--lora {lora}: trained on the base with sha256 {meta.get('base_sha256')}, "
                         f"not on {base_dir}")
    spec = json.loads(meta["lora"])
    config.lora_rank, config.lora_alpha = spec["rank"], spec["alpha"]
    config.lora_targets, config.lora_layers = list(spec["targets"]), spec["layers"]
    return weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="a stateless model directory (e.g. an imported GGUF)")
    parser.add_argument("--out", required=True, help="the adapter directory to write (new or empty)")
    parser.add_argument("--slots", type=int, default=256, help="tokens the memory keeps, in every layer")
    parser.add_argument("--keep", choices=KEEP_POLICIES, default="user",
                        help="which tokens stay when it is full: the newest (recent), the user's messages first "
                        "(user), or the user's messages that surprised the model most (surprise)")
    parser.add_argument("--lora", metavar="FILE", help="the lora.safetensors a 'kind: stateless-pretrained' run "
                        "wrote beside its model, trained on BASE: the adapter carries it")


def run(args: argparse.Namespace) -> int:
    model = wrap(args.base, args.out, args.slots, args.keep, args.lora)
    state = model.initial_memory(1)
    print(json.dumps({"out": args.out, "base": args.base, "slots": args.slots, "keep": args.keep,
                      "lora_weights": model.num_parameters(trainable_only=True) if args.lora else 0,
                      "state_bytes": state.numel() * state.element_size()}))
    return 0
