"""Dialogue JSONL: one dialogue per line.

Schema of one line (a JSON object)::

    {"id": "train-0-17",                      # string, unique within the file
     "turns": [                               # non-empty list of turns, in order
        {"query": "My dog is called Bella.",  # non-empty string: the user's message
         "answer": "Aww, Bella sounds sweet.",  # string: the model's reply
         "told": true},                       # optional: the message tells a fact (a memory should keep it)
        {"query": "What is my pet called?",
         "answer": "Your pet is called Bella.",
         "check": {"slot": "pet_name", "value": "Bella", "distance": 1}}  # optional
     ]}

``check`` marks a recall question: ``value`` must appear in the answer, ``distance`` is the number
of turns since the fact was (last) stated, ``slot`` names the fact. Blank lines are ignored.

``rxt data validate FILE`` reports every problem as ``path:line: problem`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rxt.data.dialogues import Dialogue, Turn


def write_dialogues(path: str | Path, dialogues: Iterable[Dialogue]) -> int:
    """Write dialogues as JSONL; returns how many were written."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for dialogue in dialogues:
            record = {"id": dialogue.id, "turns": [_turn_record(t) for t in dialogue.turns]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _turn_record(turn: Turn) -> dict[str, Any]:
    record = asdict(turn)
    if record["check"] is None:
        del record["check"]
    if not record["told"]:
        del record["told"]
    return record


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """Read and validate a dialogue JSONL file. Raises ValueError listing every ``path:line: problem``."""
    dialogues, problems = _parse(Path(path))
    if problems:
        shown = "\n".join(problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{path} is not valid dialogue JSONL:\n{shown}{more}")
    return dialogues


def validate(path: str | Path) -> list[str]:
    """Every problem in a dialogue JSONL file as ``path:line: problem``; empty when the file is valid."""
    return _parse(Path(path))[1]


def _parse(path: Path) -> tuple[list[Dialogue], list[str]]:
    dialogues: list[Dialogue] = []
    problems: list[str] = []
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{path}:{number}: bad JSON: {error.msg} (column {error.colno})")
            continue
        issues = list(_check_dialogue(record))
        if issues:
            problems.extend(f"{path}:{number}: {issue}" for issue in issues)
            continue
        turns = [Turn(t["query"], t["answer"], t.get("check"), t.get("told", False)) for t in record["turns"]]
        dialogues.append(Dialogue(record["id"], turns))
    return dialogues, problems


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _check_dialogue(record: Any) -> Iterator[str]:
    if not isinstance(record, dict):
        yield f"expected a JSON object, got {type(record).__name__}"
        return
    unknown = sorted(set(record) - {"id", "turns"})
    if unknown:
        yield f"unknown keys {unknown}"
    if "id" not in record:
        yield "missing key 'id'"
    elif not isinstance(record["id"], str):
        yield f"'id' must be a string, got {type(record['id']).__name__}"
    turns = record.get("turns")
    if turns is None:
        yield "missing key 'turns'"
    elif not isinstance(turns, list):
        yield f"'turns' must be a list, got {type(turns).__name__}"
    elif not turns:
        yield "'turns' is empty"
    else:
        for i, turn in enumerate(turns):
            yield from (f"turn {i}: {issue}" for issue in _check_turn(turn, i))


def _check_turn(turn: Any, index: int) -> Iterator[str]:
    if not isinstance(turn, dict):
        yield f"expected an object, got {type(turn).__name__}"
        return
    unknown = sorted(set(turn) - {"query", "answer", "check", "told"})
    if unknown:
        yield f"unknown keys {unknown}"
    if "told" in turn and not isinstance(turn["told"], bool):
        yield f"'told' must be true or false, got {type(turn['told']).__name__}"
    for key in ("query", "answer"):
        if key not in turn:
            yield f"missing key {key!r}"
        elif not isinstance(turn[key], str):
            yield f"{key!r} must be a string, got {type(turn[key]).__name__}"
    if isinstance(turn.get("query"), str) and not turn["query"].strip():
        yield "'query' is empty"
    check = turn.get("check")
    if check is not None:
        yield from _check_check(check, turn.get("answer"), index)


def _check_check(check: Any, answer: Any, index: int) -> Iterator[str]:
    if not isinstance(check, dict):
        yield f"'check' must be an object, got {type(check).__name__}"
        return
    for key, kind in (("slot", str), ("value", str), ("distance", int)):
        if key not in check:
            yield f"'check' is missing {key!r}"
        elif not isinstance(check[key], kind) or isinstance(check[key], bool):
            yield f"'check.{key}' must be {kind.__name__}, got {type(check[key]).__name__}"
    if isinstance(check.get("value"), str) and isinstance(answer, str) and check["value"] not in answer:
        yield f"'check.value' {check['value']!r} does not appear in the answer"
    distance = check.get("distance")
    if isinstance(distance, int) and not isinstance(distance, bool) and not 1 <= distance <= index:
        yield f"'check.distance' must name an earlier turn (1..{index} on turn {index}), got {distance}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="dialogue JSONL file to check")


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"{path}: no such file")
        return 1
    problems = validate(path)
    if problems:
        print("\n".join(problems))
        return 1
    print(f"{path}: OK")
    return 0


def clip(dialogues: list[Dialogue], max_turns: int = 0, max_chars: int = 0) -> list[Dialogue]:
    """Dialogues cut to their first ``max_turns`` turns, messages to ``max_chars`` characters (0: all).

    A recall check survives only where its value is still in the cut answer."""
    def cut(text: str) -> str:
        return text[:max_chars].rstrip() if max_chars else text

    clipped = []
    for d in dialogues:
        turns = d.turns[:max_turns] if max_turns else d.turns
        turns = [Turn(cut(t.query), cut(t.answer), t.check if t.check is None or t.check["value"] in cut(t.answer)
                      else None, t.told) for t in turns]
        clipped.append(Dialogue(d.id, turns))
    return clipped


class DialogueList:
    """Dialogues from a file, indexed like a ``DialogueGenerator`` so training can use either.

    ``dialogues[i]`` wraps around (index ``len + 3`` is dialogue 3 again: a second epoch), and
    ``max_turns`` cuts every dialogue to its first turns (for the short-dialogue curriculum).
    """

    def __init__(self, dialogues: list[Dialogue], max_turns: int | None = None, name: str = "dialogues"):
        if not dialogues:
            raise ValueError(f"{name} holds no dialogues")
        self.dialogues, self.max_turns, self.name = dialogues, max_turns, name

    @classmethod
    def read(cls, path: str | Path, max_turns: int = 0, max_chars: int = 0) -> DialogueList:
        """The file's dialogues, each cut to its first ``max_turns`` turns and every message to its
        first ``max_chars`` characters (0: no limit)."""
        return cls(clip(read_dialogues(path), max_turns, max_chars), name=str(path))

    def __len__(self) -> int:
        return len(self.dialogues)

    def __getitem__(self, index: int) -> Dialogue:
        dialogue = self.dialogues[index % len(self.dialogues)]
        if self.max_turns is None or len(dialogue.turns) <= self.max_turns:
            return dialogue
        return Dialogue(dialogue.id, dialogue.turns[: self.max_turns])

    def take(self, n: int, start: int = 0) -> list[Dialogue]:
        return [self[i] for i in range(start, start + n)]

    def shorter(self, max_turns: int) -> DialogueList:
        return DialogueList(self.dialogues, max_turns, self.name)
