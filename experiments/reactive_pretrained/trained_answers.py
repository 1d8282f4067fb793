"""How many of a stateless-pretrained recipe's training dialogues ask about a fact never told, and in how
many the answer to that question is in the loss (a memory view trains only a long dialogue's last
recall questions). Draws the run's batches again from the recipe alone; runs no model.

    python experiments/reactive_pretrained/trained_answers.py experiments/reactive_pretrained/smollm2-stateless-memview-abstain.yaml
"""

from __future__ import annotations

import json
import sys

from rxt.pretrained.history_training import load_history_recipe, memory_view_sequences
from rxt.pretrained.training import STAGE, TrainingDialogues
from rxt.tokenizer import Tokenizer
from rxt.training.batches import batch_indices


def main(path: str) -> None:
    recipe = load_history_recipe(path)
    tokenizer, data = Tokenizer.load(recipe.base), TrainingDialogues(recipe.data)
    asked = trained = 0
    for step in range(recipe.train.steps):
        for index in batch_indices(recipe.seed, STAGE, step, recipe.train.batch_size, 1 << 30):
            dialogue = data[index]
            untold = [turn for turn in dialogue.turns if turn.check and not turn.check.get("value")]
            if not untold:
                continue
            asked += 1
            first = untold[0]
            rows = memory_view_sequences(tokenizer, dialogue, recipe.view,
                                         lambda turn, first=first: 7.0 if turn is first else 1.0)  # 7: marks its answer
            trained += any(7.0 in weights for _, weights in rows)
    print(json.dumps({"recipe": path, "dialogues": recipe.train.steps * recipe.train.batch_size,
                      "asking_an_untold_fact": asked, "its_answer_trained": trained}))


if __name__ == "__main__":
    main(sys.argv[1])
