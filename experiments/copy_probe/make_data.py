"""Dialogues for the memory copy probe: a made-up code word is told once and asked 1-3 turns later.

Nothing but the memory can answer: every code word is new (three random consonant-vowel syllables),
the answer repeats it exactly, and the turns between are small talk.

    python experiments/copy_probe/make_data.py      # writes experiments/copy_probe/data/{train,heldout}.jsonl
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


def main(out: Path = Path(__file__).parent / "data") -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", 20000, 0), ("heldout", 300, 1)):
        rng = random.Random(seed)
        lines = [json.dumps(dialogue(rng, f"{split}-{i}")) for i in range(count)]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{out / split}.jsonl: {count} dialogues")


if __name__ == "__main__":
    main()
