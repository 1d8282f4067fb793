"""What a kv memory's keep policy can tell apart, on the memory suite's dialogues (the dev half unless told):

1. surprise: each message's most surprising token (nats), read as a first turn, for the suite's small
   talk and its fact statements with a real and with an invented value;
2. the salience gate's verdicts on every message of the suite's dialogues, each read after the memory
   of the turns before it (facts told: should pass; small talk and questions: should not);
3. kept: whether the value asked about is still in the memory when the question comes, per keep policy
   and distance (the reference answers as history, so every policy sees the same turns).

    python experiments/reactive_pretrained/salience_check.py models/smollm2-kv --base runs/smollm2
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch

from rxt.evaluation.memory_tasks import HALVES, build_dialogues, load_suite
from rxt.generation import left_pad
from rxt.pretrained.kv_memory import kept_tokens
from rxt.pretrained.reactive import ReactivePretrained
from rxt.pretrained.salience import gate_features


@torch.no_grad()
def peak_surprisal(model: ReactivePretrained, query: str, answer: str) -> float:
    kv = model.kv_memory
    ids, _ = model.interaction(query, answer)
    everything = torch.ones_like(ids, dtype=torch.bool)
    _, surprisal = kv.turn_kv(kv.initial(1), ids, everything, True)
    return float(surprisal[0][kv.user_mask(ids, model.turn_mask(ids, everything))[0]].max())


def surprise_table(model: ReactivePretrained, suite, seed: int = 0) -> dict[str, list[float]]:
    rng, out = random.Random(seed), defaultdict(list)
    for query, answer in suite.words["small_talk"]:
        out["small talk"].append(peak_surprisal(model, query, answer))
    for fact in suite.facts.values():
        for statement in fact["statements"]:
            for kind in ("real", "invented"):
                value = rng.choice(suite.values[fact["kind"]][kind])
                out[f"fact, {kind}"].append(peak_surprisal(model, statement.format(v=value),
                                                           fact["acks"][0].format(v=value)))
    return out


def labelled(suite, dialogues) -> list[list[tuple[str, str, int]]]:
    talk = {query for query, _ in suite.words["small_talk"]}
    return [[(t.query, t.reference, int(t.question is None and t.query not in talk)) for t in d.turns]
            for d in dialogues]


@torch.no_grad()
def kept_at_question(model: ReactivePretrained, dialogues, keep: str) -> dict[int, list[bool]]:
    model.reactive.keep, tok = keep, model.tokenizer
    stm, out = model.kv_memory.initial(len(dialogues)), defaultdict(list)
    for turn in range(max(len(d.turns) for d in dialogues) - 1):
        rows = [r for r, d in enumerate(dialogues) if turn < len(d.turns) - 1]  # every turn before the question
        ids, mask = left_pad([tok.interaction(dialogues[r].turns[turn].query, dialogues[r].turns[turn].reference)
                              for r in rows], tok.pad_id)
        stm[:, rows] = model.update_memory(stm[:, rows], ids, mask)
    for r, d in enumerate(dialogues):
        out[d.distance].append(d.turns[-1].question.expected in tok.decode(kept_tokens(stm[:, r : r + 1])[0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a kv adapter with keep 'salience' (its gate is read)")
    parser.add_argument("--base")
    parser.add_argument("--half", choices=HALVES, default="dev")
    parser.add_argument("--per-task", type=int, default=4)
    parser.add_argument("--keeps", nargs="+", default=["user", "surprise", "salience"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ReactivePretrained.from_pretrained(args.adapter, args.base).eval()
    if model.salience is None:
        raise SystemExit(f"{args.adapter}: not a kv adapter with keep 'salience'")
    suite = load_suite(args.half)
    report: dict = {"half": args.half}
    peaks = surprise_table(model, suite)
    report["peak_surprisal"] = {k: {"n": len(v), "min": round(min(v), 1), "median": round(sorted(v)[len(v) // 2], 1),
                                    "max": round(max(v), 1)} for k, v in peaks.items()}
    dialogues = build_dialogues(suite, ("single",), args.per_task, 1234, 64)
    rows = labelled(suite, dialogues)
    logits = model.salience.proj(gate_features(model, rows))[:, 0]
    told = torch.tensor([label for d in rows for *_, label in d]).bool()
    report["gate_in_context"] = {"facts_told": int(told.sum()), "facts_passed": int((logits[told] > 0).sum()),
                                 "other_messages": int((~told).sum()), "others_passed": int((logits[~told] > 0).sum())}
    far = [d for d in dialogues if d.distance >= 16]
    report["kept_at_question"] = {keep: {str(k): f"{sum(v)}/{len(v)}" for k, v in sorted(kept_at_question(
        model, far, keep).items())} for keep in args.keeps}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
