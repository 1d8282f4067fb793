"""Byte-level BPE tokenizer (the `tokenizers` library) with the chat template of one turn.

rxt's own template writes one turn (interaction) as ``[Q] query [A] answer [EOT]``: the decoder is
prompted with ``[Q] query [A]`` and stops at ``[EOT]``; the memory encoder reads the whole interaction.
A model imported from elsewhere brings its own template (e.g. ChatML, see ``ChatTemplate``), kept in
``chat_template.json`` next to ``tokenizer.json``.

Text is text: a control token typed in a message (``[EOT]``, ``<|im_end|>``) is encoded as plain
characters, never as the control token; only the template places control tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rxt.records import DictRecord

log = logging.getLogger(__name__)

PAD, QUERY, ANSWER, END, MASK = "[PAD]", "[Q]", "[A]", "[EOT]", "[MASK]"
SPECIAL_TOKENS = [PAD, QUERY, ANSWER, END, MASK]  # ids 0..4, in this order
TEMPLATE_FILE = "chat_template.json"
_FIELD = re.compile(r"\{(query|answer)\}")


@dataclass(frozen=True)
class ChatTemplate(DictRecord):
    """How a conversation is written in tokens, one turn at a time.

    A conversation is ``preamble`` then, per turn, ``prompt`` (with ``{query}``), ``answer`` (with
    ``{answer}``), the ``end`` token and ``after_end``. The model is prompted up to the answer and
    stops when it writes ``end``. Control tokens in these strings are looked up by name; the rest,
    and the message itself, is encoded as text. ``source`` keeps the template a model came with.
    """

    KIND = "chat template"

    prompt: str = f"{QUERY} {{query}}{ANSWER}"
    answer: str = " {answer}"
    end: str = END
    after_end: str = ""
    preamble: str = ""
    pad: str = PAD
    source: str = ""



RXT_TEMPLATE = ChatTemplate()


def chatml_template(system: str = "", source: str = "", pad: str = "<|im_end|>") -> ChatTemplate:
    """ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message; an optional default system message."""
    preamble = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return ChatTemplate(
        prompt="<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
        answer="{answer}",
        end="<|im_end|>",
        after_end="\n",
        preamble=preamble,
        pad=pad,
        source=source,
    )


class Tokenizer:
    """Text <-> token ids, plus the chat template of one turn."""

    def __init__(self, backend: HFTokenizer, template: ChatTemplate = RXT_TEMPLATE):
        self.backend = backend
        self.template = template
        self.plain = HFTokenizer.from_str(backend.to_str())  # the same tokenizer, blind to control tokens
        self.plain.encode_special_tokens = True
        control = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        self._control = {name: backend.token_to_id(name) for name in control}
        pattern = "|".join(re.escape(name) for name in sorted(control, key=len, reverse=True))
        self._control_split = re.compile(f"({pattern})") if pattern else None
        self.query_id = self.answer_id = self.mask_id = None  # rxt's own template only (training)
        if template == RXT_TEMPLATE:
            ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
            if ids != list(range(len(SPECIAL_TOKENS))):
                raise ValueError(f"tokenizer special tokens must be {SPECIAL_TOKENS} with ids 0..4, got ids {ids}")
            self.query_id, self.answer_id, self.mask_id = ids[1], ids[2], ids[4]
        for name in (template.end, template.pad):
            if name not in self._control:
                raise ValueError(f"chat template token {name!r} is not a control token of this tokenizer")
        self.end_id, self.pad_id = self._control[template.end], self._control[template.pad]

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
        """Plain text -> ids; control tokens typed in the text stay text."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, text: str, **fields: str) -> list[int]:
        """Template text -> ids: its control tokens by id, the rest with ``{query}``/``{answer}`` filled in as text.

        Text between two control tokens is encoded in one piece, as a tokenizer reading the whole
        rendered string would; a field's value can never become a control token.
        """
        ids: list[int] = []
        pieces = self._control_split.split(text) if self._control_split else [text]
        for piece in pieces:
            if piece in self._control:
                ids.append(self._control[piece])
            elif piece:
                filled = _FIELD.sub(lambda m: fields[m.group(1)], piece)
                ids.extend(self.encode(filled))
        return ids

    def preamble(self) -> list[int]:
        """What opens a conversation (e.g. a default system message); empty for rxt's template."""
        return self.render(self.template.preamble)

    def prompt(self, query: str) -> list[int]:
        """Decoder prompt for one turn, e.g. ``[Q] query [A]``."""
        return self.render(self.template.prompt, query=query.strip())

    def answer(self, answer: str) -> list[int]:
        """The answer as the model writes it, before the end token."""
        return self.render(self.template.answer, answer=answer.strip())

    def closing(self) -> list[int]:
        """What follows an answer: the end token, then the template's text between turns."""
        return [self.end_id, *self.render(self.template.after_end)]

    def close(self, answer_ids: list[int]) -> list[int]:
        """A generated answer (ending in the end token or cut short) followed by ``closing()``."""
        body = answer_ids[:-1] if answer_ids and answer_ids[-1] == self.end_id else answer_ids
        return [*body, *self.closing()]

    def interaction(self, query: str, answer: str) -> list[int]:
        """A full turn, e.g. ``[Q] query [A] answer [EOT]``."""
        return self.prompt(query) + self.answer(answer) + self.closing()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.backend.save(str(partial))
        os.replace(partial, path)  # atomic: a reader never sees half a file
        if self.template != RXT_TEMPLATE:
            _write_atomic(path.with_name(TEMPLATE_FILE), json.dumps(self.template.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        template_path = path.with_name(TEMPLATE_FILE)
        template = RXT_TEMPLATE
        if template_path.is_file():
            template = ChatTemplate.from_dict(json.loads(template_path.read_text(encoding="utf-8")))
        return cls(HFTokenizer.from_file(str(path)), template)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


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
