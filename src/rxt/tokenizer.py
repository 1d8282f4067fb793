"""Byte-level BPE tokenizer (the `tokenizers` library) with the special tokens of the chat template.

One turn (interaction) is ``[Q] query [A] answer [EOT]``. The decoder is prompted with
``[Q] query [A]`` and stops at ``[EOT]``; the memory encoder reads the whole interaction.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

PAD, QUERY, ANSWER, END, MASK = "[PAD]", "[Q]", "[A]", "[EOT]", "[MASK]"
SPECIAL_TOKENS = [PAD, QUERY, ANSWER, END, MASK]  # ids 0..4, in this order


class Tokenizer:
    """Text <-> token ids, plus the chat template of one turn."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"tokenizer special tokens must be {SPECIAL_TOKENS} with ids 0..4, got ids {ids}")
        self.pad_id, self.query_id, self.answer_id, self.end_id, self.mask_id = ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def prompt(self, query: str) -> list[int]:
        """Decoder prompt for one turn: [Q] query [A]."""
        return [self.query_id, *self.encode(" " + query.strip()), self.answer_id]

    def interaction(self, query: str, answer: str) -> list[int]:
        """A full turn: [Q] query [A] answer [EOT]."""
        return self.prompt(query) + self.encode(" " + answer.strip()) + [self.end_id]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.backend.save(str(partial))
        os.replace(partial, path)  # atomic: a reader never sees half a file
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        return cls(HFTokenizer.from_file(str(path)))


def read_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Lines of text files, or the query/answer strings of dialogue JSONL files."""
    from rxt.data.jsonl import read_dialogues

    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            for dialogue in read_dialogues(path):
                for turn in dialogue.turns:
                    yield turn.query
                    yield turn.answer
        else:
            yield from path.read_text(encoding="utf-8").splitlines()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="text or dialogue .jsonl files (default: built-in corpora)")
    parser.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--synthetic-dialogues", type=int, default=2000, help="when no inputs: how many to sample")


def run(args: argparse.Namespace) -> int:
    if args.inputs:
        texts: Iterable[str] = read_texts(args.inputs)
    else:
        from rxt.data.corpus import default_tokenizer_texts

        texts = default_tokenizer_texts(args.synthetic_dialogues)
    tokenizer = Tokenizer.train(texts, vocab_size=args.vocab_size)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = tokenizer.save(args.out)
    print(f"wrote {path} (vocab {tokenizer.vocab_size})")
    return 0
