"""Data for training and evaluation: synthetic memory dialogues, the dialogue JSONL format, text corpora."""

from rxt.data.dialogues import Dialogue, DialogueGenerator, Turn, generate_dialogues

__all__ = ["Dialogue", "DialogueGenerator", "Turn", "generate_dialogues"]
