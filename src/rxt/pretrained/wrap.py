"""`rxt wrap BASE --out DIR`: a stateless model directory with a memory of its own keys and values.

Nothing is trained: the adapter directory it writes holds the memory's settings and names its base by
sha256 (rxt.pretrained.kv_memory), and `rxt chat`, `rxt serve` and `rxt eval` take it like any reactive
adapter. LoRA-tune the base first (a recipe of ``kind: stateless-pretrained`` writes one) and wrap that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rxt.pretrained.kv_memory import KEEP_POLICIES
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained


def wrap(base_dir: str | Path, out_dir: str | Path, slots: int, keep: str = "user") -> ReactivePretrained:
    """Write the adapter directory of ``base_dir`` with a kv memory of ``slots`` tokens kept by ``keep``."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: the directory is not empty")
    if not (Path(base_dir) / "config.json").is_file():
        raise ValueError(f"{base_dir}: not a model directory (no config.json there)")
    model = ReactivePretrained.from_base(base_dir, ReactiveConfig(memory_write="kv", stm_slots=slots, keep=keep))
    model.save_adapter(out)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="a stateless model directory (e.g. an imported GGUF, or a LoRA-tuned one)")
    parser.add_argument("--out", required=True, help="the adapter directory to write (new or empty)")
    parser.add_argument("--slots", type=int, default=256, help="tokens the memory keeps, in every layer")
    parser.add_argument("--keep", choices=KEEP_POLICIES, default="user",
                        help="which tokens stay when it is full: the newest (recent), the user's messages first "
                        "(user), or the user's messages that surprised the model most (surprise)")


def run(args: argparse.Namespace) -> int:
    model = wrap(args.base, args.out, args.slots, args.keep)
    state = model.initial_memory(1)
    print(json.dumps({"out": args.out, "base": args.base, "slots": args.slots, "keep": args.keep,
                      "state_bytes": state.numel() * state.element_size()}))
    return 0
