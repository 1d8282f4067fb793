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
from rxt.pretrained.reactive import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    ReactiveConfig,
    ReactivePretrained,
    base_sha256,
)
from rxt.pretrained.salience import GateFit, fit_gate, gate_dialogues

DEFAULT_CHITCHAT = Path("data/chitchat/train.jsonl")


def wrap(
    base_dir: str | Path, out_dir: str | Path, slots: int, keep: str = "user", lora: str | Path | None = None,
    chitchat: str | Path = DEFAULT_CHITCHAT,
) -> tuple[ReactivePretrained, GateFit | None]:
    """Write the adapter directory of ``base_dir`` with a kv memory of ``slots`` tokens kept by ``keep``
    (and the LoRA weights of ``lora``, a run's lora.safetensors on this base or another adapter directory,
    if given). With keep "salience" its gate is fitted here, on the model as it will run (LoRA and all),
    to the training generator's messages and the ``chitchat`` corpus's users (rxt.pretrained.salience)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: the directory is not empty")
    if not (Path(base_dir) / "config.json").is_file():
        raise ValueError(f"{base_dir}: not a model directory (no config.json there)")
    config = ReactiveConfig(memory_write="kv", stm_slots=slots, keep=keep)
    weights = lora_weights(base_dir, lora, config) if lora is not None else None
    model = ReactivePretrained.from_base(base_dir, config)
    if weights is not None:
        expected = {k for k in model.adapter_state_dict() if ".lora_" in k}
        if set(weights) != expected:
            raise ValueError(f"--lora {lora}: its weights do not fit its own LoRA settings")
        model.load_state_dict(weights, strict=False)
    fit = fit_gate(model, gate_dialogues(chitchat)) if keep == "salience" else None
    model.save_adapter(out)
    return model, fit


def lora_weights(base_dir: str | Path, lora: str | Path, config: ReactiveConfig, option: str = "--lora") -> dict:
    """The LoRA weights of a run's lora.safetensors, or of an adapter directory (adapter.json beside it),
    keyed as the reactive model holds them; their settings go into ``config``. Weights trained on another
    base are refused (the message names ``option``, where the user gave the path)."""
    if (Path(lora) / ADAPTER_META).is_file():
        return _adapter_lora(base_dir, Path(lora), config, option)
    if Path(lora).is_dir():
        raise ValueError(f"{option} {lora}: a directory without {ADAPTER_META}: give a run's lora.safetensors "
                         "or a reactive adapter directory")
    if not Path(lora).is_file():
        raise FileNotFoundError(f"{option} {lora}: no such file (a stateless-pretrained run writes DIR/model/lora.safetensors)")
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata() or {}
        if "lora" not in meta:
            raise ValueError(f"{option} {lora}: not a LoRA file of a stateless-pretrained run (no settings in it)")
        weights = {f"base.{k}": f.get_tensor(k) for k in f.keys()}
    if meta.get("base_sha256") != base_sha256(base_dir):
        raise ValueError(f"{option} {lora}: trained on the base with sha256 {meta.get('base_sha256')}, "
                         f"not on {base_dir}")
    spec = json.loads(meta["lora"])
    config.lora_rank, config.lora_alpha = spec["rank"], spec["alpha"]
    config.lora_targets, config.lora_layers = list(spec["targets"]), spec["layers"]
    return weights


def _adapter_lora(base_dir: str | Path, adapter: Path, config: ReactiveConfig, option: str) -> dict:
    meta = json.loads((adapter / ADAPTER_META).read_text())
    if meta.get("base_sha256") != base_sha256(base_dir):
        raise ValueError(f"{option} {adapter}: an adapter of the base with sha256 {meta.get('base_sha256')}, "
                         f"not of {base_dir}")
    reactive = ReactiveConfig.from_dict(meta["reactive"])
    if not reactive.lora_rank:
        raise ValueError(f"{option} {adapter}: that adapter carries no LoRA weights")
    config.lora_rank, config.lora_alpha = reactive.lora_rank, reactive.lora_alpha
    config.lora_targets, config.lora_layers = list(reactive.lora_targets), reactive.lora_layers
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys() if ".lora_" in k}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="a stateless model directory (e.g. an imported GGUF)")
    parser.add_argument("--out", required=True, help="the adapter directory to write (new or empty)")
    parser.add_argument("--slots", type=int, default=256, help="tokens the memory keeps, in every layer")
    parser.add_argument("--keep", choices=KEEP_POLICIES, default="user",
                        help="which tokens stay when it is full: the newest (recent), the user's messages first "
                        "(user), the user's messages that surprised the model most (surprise), or the messages "
                        "a gate fitted here calls worth remembering, then the user's others (salience)")
    parser.add_argument("--lora", metavar="FILE", help="the lora.safetensors a 'kind: stateless-pretrained' run "
                        "wrote beside its model, trained on BASE, or an adapter directory that carries one: "
                        "the new adapter carries it")
    parser.add_argument("--chitchat", default=str(DEFAULT_CHITCHAT), metavar="FILE",
                        help="with --keep salience: the chitchat JSONL whose users' turns the gate learns to "
                        "pass over (`rxt data fetch` prepares it)")


def run(args: argparse.Namespace) -> int:
    model, fit = wrap(args.base, args.out, args.slots, args.keep, args.lora, args.chitchat)
    state = model.initial_memory(1)
    print(json.dumps({"out": args.out, "base": args.base, "slots": args.slots, "keep": args.keep,
                      "lora_weights": model.num_parameters(trainable_only=True) if args.lora else 0,
                      "state_bytes": state.numel() * state.element_size(),
                      **({"gate": fit.to_dict()} if fit else {})}))
    return 0
