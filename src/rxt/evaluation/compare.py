"""`rxt eval compare A.jsonl B.jsonl`: two models' answers to the same memory-suite questions, paired.

Both files come from `rxt eval memory --answers FILE`. A question is the same question when its task,
dialogue, query and distance agree; only questions in both files count. Per task (and over all): how
many both answer right, only A, only B, neither, and the two-sided exact sign test over the questions
where exactly one is right: how likely so uneven a split is if the two models were equally good. A
difference of a few questions on a few dozen is usually not a difference."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from math import comb
from pathlib import Path

KEY_FIELDS = ("task", "dialogue", "query", "distance")


def sign_test(only_a: int, only_b: int) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) on the discordant pairs."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def read_answers(path: str, model: str | None) -> dict[tuple, bool]:
    """Question key -> right, for one model of an answers file (the file's only model unless named)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (write one with `rxt eval memory --answers FILE`)")
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        missing = [f for f in (*KEY_FIELDS, "model", "outcome") if f not in row] if isinstance(row, dict) else ["all"]
        if missing:
            raise ValueError(f"{path}:{number}: not an answer of `rxt eval memory --answers` (missing {missing})")
        rows.append(row)
    models = sorted({r["model"] for r in rows})
    if model is None:
        if len(models) != 1:
            raise ValueError(f"{path} holds the answers of {models or 'no model'}: name one with --models")
        model = models[0]
    elif model not in models:
        raise ValueError(f"{path} has no answers of model {model!r}; it has {models}")
    answers: dict[tuple, bool] = {}
    for r in rows:
        if r["model"] == model:
            key = tuple(r[f] for f in KEY_FIELDS)
            if key in answers:
                raise ValueError(f"{path}: the question {key} is answered twice by {model!r}")
            answers[key] = r["outcome"] == "right"
    return answers


def compare(a: dict[tuple, bool], b: dict[tuple, bool]) -> dict[str, dict[str, float]]:
    """Per task and ``all``: paired, both, only_a, only_b, neither, p."""
    counts: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(("paired", "both", "only_a", "only_b", "neither"), 0))
    for key in sorted(set(a) & set(b), key=str):
        cell = ("both" if a[key] else "only_b") if b[key] else ("only_a" if a[key] else "neither")
        for task in (key[0], "all"):
            counts[task]["paired"] += 1
            counts[task][cell] += 1
    for row in counts.values():
        row["p"] = round(sign_test(int(row["only_a"]), int(row["only_b"])), 4)
    return dict(counts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="answers file A (`rxt eval memory --answers FILE`)")
    parser.add_argument("b", help="answers file B, the same questions")
    parser.add_argument("--models", nargs=2, metavar=("A", "B"), default=None,
                        help="which model of each file (needed when a file holds several)")
    parser.add_argument("--json", default=None, help="write the counts here")


def run(args: argparse.Namespace) -> int:
    names = args.models or (None, None)
    result = compare(read_answers(args.a, names[0]), read_answers(args.b, names[1]))
    if not result:
        raise ValueError(f"{args.a} and {args.b} share no question (were they run with the same suite settings?)")
    print(f"A = {args.a}\nB = {args.b}")
    print(f"{'task':<10}{'paired':>8}{'both':>7}{'only A':>8}{'only B':>8}{'neither':>9}{'p':>8}")
    for task in [*sorted(t for t in result if t != "all"), "all"]:
        r = result[task]
        print(f"{task:<10}{r['paired']:>8}{r['both']:>7}{r['only_a']:>8}{r['only_b']:>8}{r['neither']:>9}{r['p']:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"a": args.a, "b": args.b, "tasks": result}, indent=2) + "\n")
    return 0
