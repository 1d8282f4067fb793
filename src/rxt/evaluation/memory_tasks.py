"""The memory suite's dialogues: six pass/fail tasks made from the hand-written words of memory_suite.yaml.

A dialogue is a list of turns, each a user message and a short hand-written reference answer; some
turns ask a question whose right answer is known exactly. The tasks, and what their ``distance``
counts (in turns):

=========  ===============================================================  ===============================
task       what is asked                                                    distance
=========  ===============================================================  ===============================
single     one fact, with small talk and other facts after it               since the fact was told
multi      two or three facts told in one message, each asked on its own    since the message, to the
           turn                                                             first question
update     a fact told, then changed: the newest value is right, the old    since the change
           one "stale"
abstain    something never told: right is saying so                         turns before the question
mqar       k key-value pairs told one a turn, then every key asked, in      since the last pair, to the
           another order (multi-query associative recall, as in Zoology)   first question
track      people moving between rooms (bAbI tasks 1 and 2): where is a     since the last supporting fact
           person (one supporting fact), where is the object a person
           picked up and carried (two)
=========  ===============================================================  ===============================

Values are real words or invented ones, alternately. Every dialogue is made from (half, seed, task,
distance, index) alone, so the same arguments give the same dialogues.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TASKS = ("single", "multi", "update", "abstain", "mqar", "track")
DISTANCES = {"single": (1, 2, 4, 8, 16, 24, 32, 48, 64), "multi": (1, 2, 4, 8), "update": (1, 2, 4, 8),
             "abstain": (1, 4, 8, 16), "mqar": (1, 4, 8), "track": (1, 2, 4, 8)}
HALVES = ("dev", "heldout")  # dev: training may look at it; heldout: frozen, what the evaluation uses
KINDS = ("real", "invented")
SUITE_FILE = Path(__file__).with_name("memory_suite.yaml")


@dataclass(frozen=True)
class Question:
    expected: str | None  # the value a right answer names; None when nothing was told (abstain)
    kind: str | None  # "real" or "invented" (KINDS); None for abstain
    true_distance: int  # turns since the fact that answers it was told
    about: str  # the fact asked for: a slot ("home"), a relation ("town") or "person" / "object"
    stale: tuple[str, ...] = ()  # values that were right once (update, track)


@dataclass
class SuiteTurn:
    query: str
    reference: str  # the hand-written answer a reference history keeps
    question: Question | None = None


@dataclass
class SuiteDialogue:
    task: str
    distance: int
    index: int
    variant: str  # "2 facts", "3 pairs", "1 supporting fact"; "" where the task has no variants
    turns: list[SuiteTurn]
    told: tuple[str, ...]  # every value told in the dialogue

    @property
    def id(self) -> str:
        return f"{self.task}-{self.distance}-{self.index}"


# -- the words ---------------------------------------------------------------------------------------
@functools.cache
def _raw() -> dict:
    return yaml.safe_load(SUITE_FILE.read_text(encoding="utf-8"))


def half_sha256(half: str) -> str:
    """sha256 of one half's content (its canonical JSON), blind to comments and layout of the file."""
    text = json.dumps(_raw()[half], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Suite:
    """One half of memory_suite.yaml, checked: see that file for what each part holds."""

    half: str
    words: dict = field(repr=False)

    @property
    def values(self) -> dict[str, dict[str, list[str]]]:
        return self.words["values"]

    @property
    def facts(self) -> dict[str, dict]:
        return self.words["facts"]

    @property
    def not_told(self) -> list[str]:
        return self.words["abstain"]["not_told"]

    def all_values(self) -> list[str]:
        return [v for pool in self.values.values() for kind in KINDS for v in pool[kind]]

    def kind_of(self, value: str) -> str:
        return next(k for pool in self.values.values() for k in KINDS if value in pool[k])


def load_suite(half: str = "heldout") -> Suite:
    if half not in HALVES:
        raise ValueError(f"the suite's halves are {HALVES}, got {half!r}")
    suite = Suite(half, _raw()[half])
    _check(suite)
    return suite


# placeholders each kind of sentence must have (exactly), by where it sits in a half
_FACT_FIELDS = {"statements": {"v"}, "updates": {"v"}, "clauses": {"v"}, "questions": set(), "answers": {"v"}}
_SECTION_FIELDS = {
    ("multi", "two"): {"a", "b"}, ("multi", "three"): {"a", "b", "c"}, ("multi", "acks"): set(),
    ("mqar", "acks"): set(), ("track", "openers"): set(), ("track", "opener_acks"): set(),
    ("track", "moves"): {"p", "v"}, ("track", "pickups"): {"p", "o"}, ("track", "where_person"): {"p"},
    ("track", "where_object"): {"o"}, ("track", "person_answers"): {"p", "v"},
    ("track", "object_answers"): {"o", "v"}, ("track", "acks"): set(), ("abstain", "answers"): set(),
}
_RELATION_FIELDS = {"statements": {"k", "v"}, "questions": {"k"}, "answers": {"k", "v"}}


def _fields(sentence: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(sentence) if name}


def _check_sentences(sentences: object, needs: set[str], where: str, may: set[str] = frozenset()) -> None:
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"memory suite {where}: expected a non-empty list of sentences")
    for s in sentences:
        if not isinstance(s, str) or not needs <= _fields(s) <= needs | may:
            raise ValueError(f"memory suite {where}: {s!r} must have the placeholders {sorted(needs)}"
                             + (f" (and may have {sorted(may)})" if may else ""))


def _check(suite: Suite) -> None:
    """Every sentence has its placeholders, every value is one word, no value is told twice."""
    where = suite.half
    values = suite.all_values()
    for value in values:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]+", value):
            raise ValueError(f"memory suite {where}: value {value!r} is not one word")
    if len({v.lower() for v in values}) != len(values):
        raise ValueError(f"memory suite {where}: a value appears twice")
    for slot, fact in suite.facts.items():
        if fact["kind"] not in suite.values:
            raise ValueError(f"memory suite {where}: fact {slot} has unknown kind {fact['kind']!r}")
        for part, needs in _FACT_FIELDS.items():
            _check_sentences(fact[part], needs, f"{where}.facts.{slot}.{part}")
        _check_sentences(fact["acks"], set(), f"{where}.facts.{slot}.acks", may={"v"})
    for (section, part), needs in _SECTION_FIELDS.items():
        _check_sentences(suite.words[section][part], needs, f"{where}.{section}.{part}")
    for relation in suite.words["mqar"]["relations"]:
        for part, needs in _RELATION_FIELDS.items():
            _check_sentences(relation[part], needs, f"{where}.mqar.relations.{relation['kind']}.{part}")
    for pair in suite.words["small_talk"]:
        _check_sentences(list(pair), set(), f"{where}.small_talk")
    _check_sentences(suite.not_told, set(), f"{where}.abstain.not_told")


def sentences(suite: Suite) -> list[str]:
    """Every sentence of a half, values aside: templates, answers, small talk, abstention forms, and the
    names of its keys, people and objects."""
    out: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, dict):
            for key, child in node.items():
                if key not in ("values", "kind"):  # values aside; a kind is the name of a value list
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(suite.words)
    return out


# -- the dialogues ---------------------------------------------------------------------------------------
def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Writer:
    """Draws the turns of one dialogue from the suite's words; a value is told at most once per dialogue."""

    def __init__(self, suite: Suite, rng: random.Random):
        self.suite, self.rng = suite, rng
        self.told: list[str] = []
        self.stated: set[str] = set()  # slots stated so far
        self.talked = ""  # the last small talk

    def value(self, pool: str, kind: str | None = None) -> str:
        kind = kind or self.rng.choice(KINDS)
        value = self.rng.choice([v for v in self.suite.values[pool][kind] if v not in self.told])
        self.told.append(value)
        return value

    def small_talk(self) -> SuiteTurn:
        """A small-talk turn, never the same one twice in a row."""
        pairs = [pair for pair in self.suite.words["small_talk"] if pair[0] != self.talked]
        query, answer = self.rng.choice(pairs)
        self.talked = query
        return SuiteTurn(query, answer)

    def statement(self, slot: str, value: str, part: str = "statements") -> SuiteTurn:
        fact = self.suite.facts[slot]
        self.stated.add(slot)
        return SuiteTurn(_sentence(self.rng.choice(fact[part]).format(v=value)),
                         _sentence(self.rng.choice(fact["acks"]).format(v=value)))

    def question(self, slot: str, value: str, kind: str, distance: int, stale: tuple[str, ...] = ()) -> SuiteTurn:
        fact = self.suite.facts[slot]
        answer = _sentence(self.rng.choice(fact["answers"]).format(v=value))
        return SuiteTurn(self.rng.choice(fact["questions"]), answer, Question(value, kind, distance, slot, stale))

    def fillers(self, n: int, facts: bool = True) -> list[SuiteTurn]:
        """n turns of small talk, a third of them (while slots are left) telling another fact."""
        turns = []
        for _ in range(n):
            free = [s for s in self.suite.facts if s not in self.stated]
            if facts and free and self.rng.random() < 1 / 3:
                slot = self.rng.choice(free)
                turns.append(self.statement(slot, self.value(self.suite.facts[slot]["kind"])))
            else:
                turns.append(self.small_talk())
        return turns

    def lead(self) -> list[SuiteTurn]:
        """Zero to two turns of small talk before the first fact, so that it is not always the first turn."""
        return [self.small_talk() for _ in range(self.rng.randint(0, 2))]

    def dialogue(self, task: str, distance: int, index: int, turns: list[SuiteTurn],
                 variant: str = "") -> SuiteDialogue:
        return SuiteDialogue(task, distance, index, variant, turns, tuple(self.told))


def _single(w: _Writer, distance: int, index: int) -> SuiteDialogue:
    slot, kind = w.rng.choice(list(w.suite.facts)), KINDS[index % 2]
    value = w.value(w.suite.facts[slot]["kind"], kind)
    turns = [*w.lead(), w.statement(slot, value), *w.fillers(distance - 1)]
    return w.dialogue("single", distance, index, [*turns, w.question(slot, value, kind, distance)])


def _multi(w: _Writer, distance: int, index: int) -> SuiteDialogue:
    n = (2, 3)[index % 2]
    slots = w.rng.sample(list(w.suite.facts), n)
    kinds = [KINDS[(index + j) % 2] for j in range(n)]
    values = [w.value(w.suite.facts[s]["kind"], k) for s, k in zip(slots, kinds, strict=True)]
    clauses = [w.rng.choice(w.suite.facts[s]["clauses"]).format(v=v) for s, v in zip(slots, values, strict=True)]
    join = w.rng.choice(w.suite.words["multi"]["two" if n == 2 else "three"])
    message = SuiteTurn(_sentence(join.format(**dict(zip("abc", clauses, strict=False)))),
                        w.rng.choice(w.suite.words["multi"]["acks"]))
    turns = [*w.lead(), message, *w.fillers(distance - 1, facts=False)]
    order = w.rng.sample(range(n), n)
    turns += [w.question(slots[j], values[j], kinds[j], distance + q) for q, j in enumerate(order)]
    return w.dialogue("multi", distance, index, turns, f"{n} facts")


def _update(w: _Writer, distance: int, index: int) -> SuiteDialogue:
    slot, kind = w.rng.choice(list(w.suite.facts)), KINDS[index % 2]
    pool = w.suite.facts[slot]["kind"]
    old, new = w.value(pool), w.value(pool, kind)
    turns = [*w.lead(), w.statement(slot, old), *w.fillers(w.rng.randint(1, 3)),
             w.statement(slot, new, "updates"), *w.fillers(distance - 1)]
    return w.dialogue("update", distance, index, [*turns, w.question(slot, new, kind, distance, stale=(old,))])


def _abstain(w: _Writer, distance: int, index: int) -> SuiteDialogue:
    slots = list(w.suite.facts)
    untold = w.rng.choice(slots)
    w.stated.add(untold)  # never stated: the fillers leave it alone
    told = w.rng.choice([s for s in slots if s != untold])
    turns = [w.statement(told, w.value(w.suite.facts[told]["kind"])), *w.fillers(distance - 1)]
    fact = w.suite.facts[untold]
    question = SuiteTurn(w.rng.choice(fact["questions"]), w.rng.choice(w.suite.words["abstain"]["answers"]),
                         Question(None, None, distance, untold))
    return w.dialogue("abstain", distance, index, [*turns, question])


def _mqar(w: _Writer, distance: int, index: int) -> SuiteDialogue:
    words = w.suite.words["mqar"]
    k = (2, 3, 4)[index % 3]
    relation = w.rng.choice(words["relations"])
    keys = w.rng.sample(words["keys"], k)
    kinds = [KINDS[(index + j) % 2] for j in range(k)]
    values = [w.value(relation["kind"], kind) for kind in kinds]
    turns = w.lead()
    told_at = {}
    for j, (key, value) in enumerate(zip(keys, values, strict=True)):
        told_at[j] = len(turns)
        statement = w.rng.choice(relation["statements"]).format(k=key, v=value)
        turns.append(SuiteTurn(statement, w.rng.choice(words["acks"])))
    turns += w.fillers(distance - 1, facts=False)
    order = list(range(k))
    while order == sorted(order):  # asked in another order than told
        w.rng.shuffle(order)
    for j in order:
        answer = w.rng.choice(relation["answers"]).format(k=keys[j], v=values[j])
        question = Question(values[j], kinds[j], len(turns) - told_at[j], relation["kind"])
        turns.append(SuiteTurn(w.rng.choice(relation["questions"]).format(k=keys[j]), answer, question))
    return w.dialogue("mqar", distance, index, turns, f"{k} pairs")


def _track(w: _Writer, distance: int, index: int) -> SuiteDialogue:
    """bAbI-style: the person moves twice; with two supporting facts they pick something up in between
    and the question is where that object is now."""
    words, supports, kind = w.suite.words["track"], (1, 2)[index % 2], KINDS[(index // 2) % 2]
    person, *others = w.rng.sample(words["people"], 3)
    first, last = w.value("place"), w.value("place", kind)

    def move(who: str, place: str) -> SuiteTurn:
        return SuiteTurn(w.rng.choice(words["moves"]).format(p=who, v=place), w.rng.choice(words["acks"]))

    def elsewhere() -> str:  # a room the person asked about never went to (rooms may repeat here)
        place = w.rng.choice([p for k in KINDS for p in w.suite.values["place"][k] if p not in (first, last)])
        if place not in w.told:
            w.told.append(place)
        return place

    def other_turns(n: int) -> list[SuiteTurn]:  # small talk, or someone else going somewhere else
        return [move(w.rng.choice(others), elsewhere()) if w.rng.random() < 0.5 else w.small_talk()
                for _ in range(n)]

    turns = [SuiteTurn(w.rng.choice(words["openers"]), w.rng.choice(words["opener_acks"])), move(person, first),
             *other_turns(w.rng.randint(0, 1))]
    if supports == 2:
        thing = w.rng.choice(words["objects"])
        pickup = w.rng.choice(words["pickups"]).format(p=person, o=thing)
        turns += [SuiteTurn(pickup, w.rng.choice(words["acks"])), *other_turns(w.rng.randint(0, 1))]
        ask = SuiteTurn(w.rng.choice(words["where_object"]).format(o=thing),
                        w.rng.choice(words["object_answers"]).format(o=thing, v=last))
    else:
        ask = SuiteTurn(w.rng.choice(words["where_person"]).format(p=person),
                        w.rng.choice(words["person_answers"]).format(p=person, v=last))
    turns += [move(person, last), *other_turns(distance - 1)]
    ask.question = Question(last, kind, distance, "object" if supports == 2 else "person", stale=(first,))
    variant = "1 supporting fact" if supports == 1 else "2 supporting facts"
    return w.dialogue("track", distance, index, [*turns, ask], variant)


BUILDERS = {"single": _single, "multi": _multi, "update": _update, "abstain": _abstain, "mqar": _mqar,
            "track": _track}


def build_dialogues(suite: Suite, tasks: tuple[str, ...] = TASKS, per_task: int = 8,
                    seed: int = 0, max_distance: int | None = None, min_distance: int = 1) -> list[SuiteDialogue]:
    """``per_task`` dialogues of every task and distance (``min_distance`` to ``max_distance``), each drawn
    from its own seeded generator: a dialogue is the same whichever others are built beside it."""
    unknown = [t for t in tasks if t not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are {list(TASKS)}")
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    if max_distance is not None and max_distance < 1:
        raise ValueError(f"max_distance must be >= 1, got {max_distance}")
    if min_distance > (max_distance or min_distance):
        raise ValueError(f"min_distance {min_distance} is above max_distance {max_distance}")
    return [BUILDERS[task](_Writer(suite, random.Random(f"rxt-memory:{suite.half}:{seed}:{task}:{d}:{i}")), d, i)
            for task in tasks for d in task_distances(task, max_distance, min_distance) for i in range(per_task)]


def task_distances(task: str, max_distance: int | None = None, min_distance: int = 1) -> tuple[int, ...]:
    return tuple(d for d in DISTANCES[task] if (max_distance is None or d <= max_distance) and d >= min_distance)


WORD = re.compile(r"[^\W_]+")  # a run of letters or digits: "haven't" is "haven" and "t"


@functools.cache
def known_words() -> frozenset[str]:
    """Lower-case words of every sentence of the suite (both halves, with the names of its people,
    keys and objects) and of the training generator: the words a dialogue is made of, values aside.
    An answer that names a word outside them (and outside its question) names a value from elsewhere,
    or one it made up."""
    from rxt.data.dialogues import CLOSERS, NOT_TOLD_ANSWERS, OPENERS
    from rxt.data.phrasings import FACTS, PARAPHRASES, SMALL_TALK

    suite = [s for half in HALVES for s in sentences(load_suite(half))]
    generator = [*(q for q, _ in SMALL_TALK), *(a for _, answers in SMALL_TALK for a in answers),
                 *(t for f in FACTS for part in (f.statements, f.updates, f.questions, f.answers, f.acks)
                   for t in part),
                 *(t for templates in PARAPHRASES.values() for t in templates), *OPENERS, *CLOSERS,
                 *NOT_TOLD_ANSWERS]
    return frozenset(w.lower() for s in suite + generator for w in WORD.findall(s.replace("{v}", "")))
