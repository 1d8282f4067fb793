"""The reactive SmolLM2's memory update from the states generation kept, against the second pass over the turn.

    python experiments/reactive_pretrained/kept_states.py runs/smollm2 [--turns 6] [--read-memory 0.02] \
        [--json out.json]

A fresh (untrained) ReactivePretrained around the base and two engines on it: one writes the memory from
the states generation computed (ReactiveEngine's default: the update runs only the closing), one re-runs
the whole turn (``keep_states=False``, the reference). One conversation of held-out chitchat messages,
greedy, each engine keeping its own answers, the two taking turns so that a slow spell of the shared
machine falls on both. Per turn: the background update's time, the tokens processed, and the max
|difference| between the memory the kept states wrote and the one the second pass writes from the same
STM_{t-1} and turn. ``--read-memory STD`` draws the memory cross-attention's output projection from
N(0, STD) (untrained it is zero), so the decoder's states depend on the memory, as a trained adapter's do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from turn_latency import messages  # (a script beside this one)

from rxt.bench.timing import describe_machine
from rxt.engine import ReactiveEngine
from rxt.generation import SamplingConfig, left_pad
from rxt.pretrained.reactive import ReactivePretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/chitchat/heldout.jsonl"))
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-chars", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--read-memory", type=float, default=0.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()  # the machine's other work: the figures are relative to each other
    torch.manual_seed(0)
    model = ReactivePretrained.from_base(args.base).eval()
    if args.read_memory:
        with torch.no_grad():
            for i in model.reactive.memory_layers:
                model.decoder.layers[i].memory_cross_attention.o_proj.weight.normal_(0.0, args.read_memory)
    engines = {"kept": ReactiveEngine(model), "recompute": ReactiveEngine(model, keep_states=False)}
    sessions = {name: engine.new_session() for name, engine in engines.items()}
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    rows: dict[str, list[dict]] = {name: [] for name in engines}
    for query in messages(args.data, args.turns, args.max_chars):
        for name, engine in engines.items():
            session = sessions[name]
            before = session.tensors["stm"]
            answer = engine.interact(session, query, sampling)
            session.wait()
            row = {"memory_update_s": answer.stats.memory_update_s, "answer_s": answer.stats.answer_s,
                   "answer_tokens": answer.stats.answer_tokens, "tokens_processed": answer.stats.tokens_processed}
            if name == "kept":  # the reference: the second pass from the same STM_{t-1} and turn (not timed)
                turn = engine.turn_prompt(query) + engine.tokenizer.close(answer.token_ids)
                with torch.no_grad():
                    reference = model.update_memory(before, *left_pad([turn], engine.tokenizer.pad_id))
                row["turn_tokens"] = len(turn)
                row["max_abs_difference"] = float((session.tensors["stm"] - reference).abs().max())
                row["max_abs_memory"] = float(reference.abs().max())
            rows[name].append(row)
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    for engine in engines.values():
        engine.close()
    summary = {name: {"median_memory_update_s": statistics.median(r["memory_update_s"] for r in rows[name]),
                      "tokens_processed": sum(r["tokens_processed"] for r in rows[name])} for name in engines}
    summary["kept"]["max_abs_difference"] = max(r["max_abs_difference"] for r in rows["kept"])
    print(json.dumps(summary, indent=2))
    if args.json:
        result = {"base": str(args.base), "turns": args.turns, "max_new_tokens": args.max_new_tokens,
                  "read_memory": args.read_memory, "machine": describe_machine(),
                  "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
                  "summary": summary, "by_turn": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
