"""A smoke run of memory-aware training on a reactive SmolLM2: a few steps on two-turn fact dialogues
(a fact told, then asked), with the loss on held-out dialogues' answers read with their own memory,
with another dialogue's and with the memory wiped, before and after. Minutes on one CPU thread; not a
training recipe.

    python experiments/reactive_pretrained/smoke_train.py models/smollm2 [--steps 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from rxt.pretrained.reactive import ReactivePretrained, answer_loss, dialogue_loss

PEOPLE = ["sister", "brother", "best friend", "cousin", "neighbour", "aunt", "uncle", "colleague"]
CITIES = ["Lisbon", "Oslo", "Lima", "Kyoto", "Accra", "Quito", "Tallinn", "Perth", "Bergen", "Cusco"]


def fact_dialogue(rng: random.Random) -> list[tuple[str, str]]:
    person, city = rng.choice(PEOPLE), rng.choice(CITIES)
    return [
        (f"My {person} moved to {city} last month.", f"How exciting! I hope your {person} likes {city}."),
        (f"Where does my {person} live now?", f"Your {person} lives in {city}."),
    ]


def as_turns(model: ReactivePretrained, dialogue: list[tuple[str, str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [model.interaction(query, answer) for query, answer in dialogue]  # preamble + turn, as the engine


@torch.no_grad()
def question_scores(model: ReactivePretrained, dialogues: list, memory: str) -> dict[str, float]:
    """On the last turn's answer: the mean loss, and the share of answers whose every token is the
    model's top-1 given the right tokens before it. The question reads the memory its own first turn
    wrote ("own"), the one another dialogue's first turn wrote ("other": a full memory holding the wrong
    fact), or STM_0 ("wiped")."""
    losses, exact = [], 0
    for n, turns in enumerate(dialogues):
        stm = model.initial_memory(1)
        told = {"own": turns, "other": dialogues[(n + 1) % len(dialogues)], "wiped": []}[memory]
        for ids, _ in told[:-1]:
            stm = model.update_memory(stm, ids)
        ids, mask = turns[-1]
        logits, _ = model.read_turn(ids, stm)
        losses.append(float(answer_loss(logits, ids, mask)))
        predicted, target = logits[0, :-1].argmax(-1), ids[0, 1:]
        exact += bool((predicted == target)[mask[0, 1:]].all())
    return {"answer_loss": round(sum(losses) / len(losses), 3), "answers_exact": round(exact / len(dialogues), 3)}


def scores(model: ReactivePretrained, dialogues: list) -> dict[str, dict[str, float]]:
    return {memory: question_scores(model, dialogues, memory) for memory in ("own", "other", "wiped")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    model = ReactivePretrained.from_base(args.base)
    train = [as_turns(model, fact_dialogue(rng)) for _ in range(args.steps)]
    heldout = [as_turns(model, fact_dialogue(rng)) for _ in range(args.heldout)]
    before = scores(model, heldout)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    curve, start = [], time.perf_counter()
    for step, turns in enumerate(train):
        optimizer.zero_grad()
        loss = dialogue_loss(model, turns)
        loss.backward()
        optimizer.step()
        curve.append(round(loss.item(), 3))
        print(f"step {step}: loss {curve[-1]}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    after = scores(model, heldout)
    tokens = sum(ids.shape[1] for turns in train for ids, _ in turns)
    results = {"steps": args.steps, "lr": args.lr, "train_tokens": tokens, "seconds": round(seconds, 1),
               "tokens_per_s": round(tokens / seconds, 1), "curve": curve,
               "heldout_before": before, "heldout_after": after}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
