"""Dialogues for the memory copy probe: a made-up code word is told once and asked 1-3 turns later.

Nothing but the memory can answer: every code word is new (three random consonant-vowel syllables),
the answer repeats it exactly, and the turns between are small talk.

The binding variant tells three code words, each for a named lock ("The door code is Novedo."),
with small talk between, then asks for all three in a random order: the memory must keep three new
words apart and know which lock each opens.

    python experiments/copy_probe/make_data.py      # writes experiments/copy_probe/data/{train,heldout}.jsonl
                                                    # and {binding-train,binding-heldout}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ONSETS, VOWELS = "bdfgklmnprstvz", "aeiou"
SMALL_TALK = [
    ("How are you?", "I am fine, thanks."),
    ("Nice weather today.", "Yes, it is sunny."),
    ("Tell me a joke.", "Why did the cat sit on the mouse? To keep an eye on it."),
    ("Thanks!", "You are welcome."),
]


def code_word(rng: random.Random) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(3)).capitalize()


def dialogue(rng: random.Random, name: str) -> dict:
    word, gap = code_word(rng), rng.randint(0, 2)
    turns = [{"query": f"Remember the code word {word}.", "answer": "Done, I will remember it."}]
    turns += [{"query": q, "answer": a} for q, a in (rng.choice(SMALL_TALK) for _ in range(gap))]
    turns.append({"query": "What is the code word?", "answer": f"The code word is {word}.",
                  "check": {"slot": "code", "value": word, "distance": gap + 1}})
    return {"id": name, "turns": turns}


LOCKS = ("door", "safe", "bike", "locker", "phone", "garage")


def binding_dialogue(rng: random.Random, name: str) -> dict:
    codes = {lock: code_word(rng) for lock in rng.sample(LOCKS, 3)}
    turns, told = [], {}
    for lock, word in codes.items():
        told[lock] = len(turns)
        turns.append({"query": f"The {lock} code is {word}.", "answer": f"Noted, the {lock} code."})
        turns += [{"query": q, "answer": a} for q, a in (rng.choice(SMALL_TALK) for _ in range(rng.randint(0, 1)))]
    for lock in rng.sample(list(codes), len(codes)):
        turns.append({"query": f"What is the {lock} code?", "answer": f"The {lock} code is {codes[lock]}.",
                      "check": {"slot": lock, "value": codes[lock], "distance": len(turns) - told[lock]}})
    return {"id": name, "turns": turns}


def main(out: Path = Path(__file__).parent / "data") -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind, make in (("", dialogue), ("binding-", binding_dialogue)):
        for split, count, seed in (("train", 20000, 0), ("heldout", 300, 1)):
            rng = random.Random(f"{kind}{seed}" if kind else seed)
            lines = [json.dumps(make(rng, f"{kind}{split}-{i}")) for i in range(count)]
            (out / f"{kind}{split}.jsonl").write_text("\n".join(lines) + "\n")
            print(f"{out / f'{kind}{split}.jsonl'}: {count} dialogues")


if __name__ == "__main__":
    main()
