"""General conversational text: the English YAML files of the `chatterbot_corpus` package.

Each conversation ``[a, b, c, ...]`` becomes single-turn (query, answer) pairs (a, b), (b, c), ...
Without the package installed everything here yields nothing, so training still runs.
"""

from __future__ import annotations

import importlib.util
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import yaml

from rxt.data.dialogues import POOLS, DialogueGenerator, fresh_value

log = logging.getLogger(__name__)


def corpus_directory() -> Path | None:
    """Where the English chatterbot corpus lives, or None when the package is not installed."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    return directory if directory.is_dir() else None


def conversation_pairs(max_chars: int = 200) -> list[tuple[str, str]]:
    """(query, answer) pairs from the English chatterbot corpus, in a stable order."""
    directory = corpus_directory()
    if directory is None:
        log.info("chatterbot_corpus is not installed: no general conversational text")
        return []
    pairs = []
    for path in sorted(directory.glob("*.yml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            log.warning("skipping %s: %s", path, error)
            continue
        for conversation in data.get("conversations") or []:
            texts = [str(t).strip() for t in conversation if isinstance(t, (str, int, float))]
            for query, answer in zip(texts, texts[1:], strict=False):
                if query and answer and len(query) + len(answer) <= max_chars:
                    pairs.append((query, answer))
    return pairs


def default_tokenizer_texts(n_synthetic: int = 2000, seed: int = 0) -> Iterator[str]:
    """Texts to train the tokenizer on: the corpus plus synthetic training dialogues.

    Only the training split is used, and entity values are cut out of it: otherwise training values
    would become single tokens while held-out ones split into pieces, and a model could not learn
    one copying skill that serves both. Without them, every value splits into general sub-words.
    """
    for query, answer in conversation_pairs():
        yield query
        yield answer
    generator = DialogueGenerator(seed, "train")
    for i in range(n_synthetic):
        for turn in generator[i].turns:
            yield without_values(turn.query)
            yield without_values(turn.answer)
    # invented words made up for this (never a held-out value): the merges learn their syllables,
    # so any value, seen or held out, is a few syllable tokens rather than a string of letters
    rng = random.Random(f"rxt-tokenizer-words:{seed}")
    for _ in range(n_synthetic):
        yield " ".join(fresh_value(rng) for _ in range(8))


_VALUES = {value.lower() for pool in POOLS.values() for value in pool}


def without_values(text: str) -> str:
    """The text with every entity value (of any split) removed."""
    return " ".join(w for w in text.split() if w.strip(".,!?'").lower() not in _VALUES)


def text_chunks(paths: list[Path], words: int) -> list[str]:
    """Plain-text files (one paragraph a line) cut into pieces of ``words`` white-space words.

    Each file is one running text; a piece may span paragraphs, never files. The last, shorter piece of
    a file is kept.
    """
    chunks = []
    for path in paths:
        tokens = Path(path).read_text(encoding="utf-8").split()
        chunks.extend(" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words))
    return chunks

