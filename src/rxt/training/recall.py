"""The recall check at the end of a training run: the evaluation of `rxt eval recall`, RxT only."""

from __future__ import annotations

from rxt.data.dialogues import Dialogue
from rxt.engine import ReactiveEngine
from rxt.evaluation.recall import evaluate_recall
from rxt.model import ReactiveTransformer
from rxt.tokenizer import Tokenizer


def quick_recall(model: ReactiveTransformer, tokenizer: Tokenizer, dialogues: list[Dialogue],
                 max_new_tokens: int = 24, examples: list | None = None) -> dict:
    """Recall accuracy by distance on dialogues with ``check`` turns: {"overall", "by_distance", "by_slot", "counts", "n"}."""
    was_training = model.training
    engine = ReactiveEngine(model.eval(), tokenizer)
    try:
        report = evaluate_recall({"rxt": engine}, dialogues, max_new_tokens=max_new_tokens, progress=False)
    finally:
        engine.close()
        model.train(was_training)
    if examples is not None:
        examples.extend(report.examples)
    counts = dict(sorted(report.asked.items()))
    return {"overall": report.accuracy("rxt"), "by_distance": {d: report.accuracy("rxt", d) for d in counts},
            "by_slot": {s: row["rxt"] for s, row in report.by_group("slot", ["rxt"]).items()},
            "counts": counts, "n": sum(counts.values())}
