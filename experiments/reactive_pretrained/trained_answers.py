"""Which recall answers a stateless-pretrained recipe puts in the loss: by how many turns after the fact
the question comes, read with the whole history before it or through the memory view (a view trains only
a long dialogue's last ``view.questions`` recall questions), and how many questions about a fact never
told. Draws the run's batches again from the recipe alone; runs no model.

    python experiments/reactive_pretrained/trained_answers.py experiments/reactive_pretrained/smollm2-stateless-memview-abstain.yaml
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from rxt.pretrained.history_training import load_history_recipe, memory_view_sequences
from rxt.pretrained.training import STAGE, TrainingDialogues
from rxt.tokenizer import Tokenizer
from rxt.training.batches import batch_indices


def band(distance: int) -> str:
    return "1-8" if distance <= 8 else "9-16" if distance <= 16 else "17-64"


def main(path: str) -> None:
    recipe = load_history_recipe(path)
    tokenizer, data = Tokenizer.load(recipe.base), TrainingDialogues(recipe.data)
    whole, viewed = Counter(), Counter()
    asked_untold = 0
    for step in range(recipe.train.steps):
        for index in batch_indices(recipe.seed, STAGE, step, recipe.train.batch_size, 1 << 30):
            dialogue = data[index]
            questions = [turn for turn in dialogue.turns if turn.check]
            asked_untold += any(not q.check.get("value") for q in questions)
            marks = {id(q): 2.0 + n for n, q in enumerate(questions)}  # each question's own loss weight
            rows = memory_view_sequences(tokenizer, dialogue, recipe.view, lambda turn, m=marks: m.get(id(turn), 1.0))
            # the first row is the history read whole when it holds any plain turn (weight 1); the rest are views
            for n, (_, weights) in enumerate(rows):
                read_whole = len(rows) == 1 or (n == 0 and 1.0 in weights)
                for question in questions:
                    if marks[id(question)] in weights:
                        kind = band(question.check["distance"]) if question.check.get("value") else "not told"
                        (whole if read_whole else viewed)[kind] += 1
    print(json.dumps({"recipe": path, "dialogues": recipe.train.steps * recipe.train.batch_size,
                      "asking_an_untold_fact": asked_untold, "answers_read_whole": dict(sorted(whole.items())),
                      "answers_through_the_view": dict(sorted(viewed.items()))}))


if __name__ == "__main__":
    main(sys.argv[1])
