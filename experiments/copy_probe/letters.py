"""How much of each code word does a probe model recall, token by token?

Replays the binding held-out dialogues (reference answers as history). At every question it reads the
reference answer with the memory as it stands and counts, per position in the code word, how often
the model's most likely next token is the right one given the right tokens before it (teacher forcing).
Greedy answers need every position right; this shows which ones the memory carries. It also counts
how often, where the code first parts from the dialogue's other codes, the token predicted is another
code's: a memory that keeps the codes but not which lock each belongs to.

    python experiments/copy_probe/letters.py runs/probe-binding/rxt runs/probe-binding-competitive-content/rxt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rxt.data.jsonl import read_dialogues
from rxt.model import ReactiveTransformer

DATA = Path(__file__).parent / "data" / "binding-heldout.jsonl"


@torch.no_grad()
def position_accuracy(model: ReactiveTransformer, dialogues) -> tuple[dict[int, float], float]:
    """Next-token accuracy by position in the code word, and the share of answers that, where the code
    first parts from the dialogue's other codes, go on as one of them."""
    tok, right, seen, swapped = model.tokenizer, {}, {}, 0
    for dialogue in dialogues:
        stm = model.initial_memory(1)
        codes = [tok.encode(" " + t.check["value"]) for t in dialogue.turns if t.check]
        for turn in dialogue.turns:
            ids = tok.interaction(turn.query, turn.answer)
            if turn.check:
                logits = model.decode(torch.tensor([ids]), stm=stm)[0]
                before = turn.answer.split(turn.check["value"])[0].rstrip()
                start = len(tok.interaction(turn.query, before)) - 1  # without the end token
                word = tok.encode(" " + turn.check["value"])
                if ids[start : start + len(word)] != word:
                    raise ValueError(f"{turn.answer!r}: the code word is not tokenized on its own")
                for j, token in enumerate(word):
                    right[j] = right.get(j, 0) + int(logits[start + j - 1].argmax().item() == token)
                    seen[j] = seen.get(j, 0) + 1
                # where this code first parts from another of the dialogue (all codes are six letters)
                fork = min(next(j for j, (a, b) in enumerate(zip(word, code, strict=True)) if a != b)
                           for code in codes if code != word)
                others = {code[fork] for code in codes if code[:fork] == word[:fork] and code[fork] != word[fork]}
                swapped += int(logits[start + fork - 1].argmax().item() in others)
            stm = model.update_memory(stm, torch.tensor([ids]))
    return {j: right[j] / seen[j] for j in sorted(seen)}, swapped / seen[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="RxT model directories")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--dialogues", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dialogues = read_dialogues(args.data)[: args.dialogues]
    for path in args.models:
        model = ReactiveTransformer.from_pretrained(path)
        pieces = [model.tokenizer.backend.id_to_token(i) for i in model.tokenizer.encode(" Duzasa")]
        accuracy, swapped = position_accuracy(model, dialogues)
        print(f"{path}: right next token by position of the code word (e.g. {pieces}):")
        print("  " + "  ".join(f"{j}: {a:.0%}" for j, a in accuracy.items()))
        print(f"  where the code parts from the dialogue's others, the next token is another code's: {swapped:.0%}")


if __name__ == "__main__":
    main()
