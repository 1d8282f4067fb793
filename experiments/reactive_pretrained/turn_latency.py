"""Per-turn latency of a reactive adapter against its base as a stateless model, in a real chat: one
conversation of held-out chitchat messages, each model answering greedily and keeping its own answers,
the models taking turns round-robin (a slow spell of a shared machine falls on all of them alike).

    python experiments/reactive_pretrained/turn_latency.py ADAPTER_DIR --base BASE_DIR \
        --data data/chitchat/heldout.jsonl [--turns 12] [--repeats 3] [--json out.json]

Per turn and model: time to first token (the prompt phase: the message and the memory, or the whole
history), seconds per answer token, the memory update (RxT, in the background after the answer) and
the tokens processed. Answers differ in length from model to model, so the time to the first token
and the time per answer token are the figures to compare, not the time to the last token.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from rxt.baselines import StatelessEngine
from rxt.bench.timing import describe_machine
from rxt.data.jsonl import DialogueList
from rxt.engine import ChatEngine, ReactiveEngine
from rxt.generation import SamplingConfig
from rxt.model import StatelessLM, load_model


def messages(path: Path, turns: int, max_chars: int) -> list[str]:
    """The user messages of the first held-out dialogue with at least ``turns`` turns."""
    for dialogue in DialogueList.read(path, 0, max_chars).dialogues:
        if len(dialogue.turns) >= turns:
            return [t.query for t in dialogue.turns[:turns]]
    raise ValueError(f"{path}: no dialogue has {turns} turns")


def converse(engines: dict[str, ChatEngine], queries: list[str], sampling: SamplingConfig) -> dict[str, list[dict]]:
    sessions = {name: engine.new_session() for name, engine in engines.items()}
    rows: dict[str, list[dict]] = {name: [] for name in engines}
    for query in queries:
        for name, engine in engines.items():
            session = sessions[name]
            stats = engine.interact(session, query, sampling).stats
            session.wait()  # outside the clock, as a user reading the answer
            rows[name].append({"ttft_s": stats.time_to_first_token_s,
                               "s_per_answer_token": (stats.answer_s - stats.time_to_first_token_s)
                               / max(1, stats.answer_tokens - 1),
                               "answer_tokens": stats.answer_tokens, "prompt_tokens": stats.prompt_tokens,
                               "memory_update_s": stats.memory_update_s,
                               "tokens_processed": stats.tokens_processed, "state_bytes": engine.state_bytes(session)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/chitchat/heldout.jsonl"))
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--max-chars", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = StatelessLM.from_pretrained(args.base)  # (the adapter's copy of it has memory layers now)
    engines: dict[str, ChatEngine] = {
        "rxt": ReactiveEngine(load_model(args.adapter, base=args.base)),
        "stateless": StatelessEngine(base, mode="full"),
        "current_turn": StatelessEngine(base, mode="current"),
    }
    queries = messages(args.data, args.turns, args.max_chars)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    runs = [converse(engines, queries, sampling) for _ in range(args.repeats)]
    table = {}
    for name in engines:
        table[name] = []
        for t in range(args.turns):
            turn = [run[name][t] for run in runs]
            table[name].append({key: (statistics.median(r[key] for r in turn) if turn[0][key] is not None else None)
                                for key in turn[0]})
    print(f"{'turn':>4} " + " ".join(f"{n + ' ttft':>20}" for n in engines) + f" {'rxt update':>11}")
    for t in range(args.turns):
        print(f"{t + 1:>4} " + " ".join(f"{table[n][t]['ttft_s']:>20.3f}" for n in engines)
              + f" {table['rxt'][t]['memory_update_s']:>11.3f}")
    for name in engines:
        per_token = statistics.median(row["s_per_answer_token"] for row in table[name])
        tokens = sum(row["tokens_processed"] for row in table[name])
        print(f"{name}: {per_token * 1000:.0f} ms per answer token, {tokens:,} tokens processed over "
              f"{args.turns} turns, state after the last turn {table[name][-1]['state_bytes']:,} bytes")
    for engine in engines.values():
        if isinstance(engine, ReactiveEngine):
            engine.close()
    if args.json:
        result = {"adapter": str(args.adapter), "base": str(args.base), "turns": args.turns,
                  "repeats": args.repeats, "max_new_tokens": args.max_new_tokens, "queries": queries,
                  "machine": describe_machine(), "median_by_turn": table}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
