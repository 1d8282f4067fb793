"""Synthetic multi-turn dialogues that test memory: state facts, chat, change facts, ask about them.

A user states facts about themself (name, pet, city, favourite colour, ...), makes small talk,
sometimes changes a fact ("Actually, I moved to Oslo."), and later asks about one ("Where do I
live?"). Every recall question has one exact answer, recorded on its turn as

    check = {"slot": "city", "value": "Oslo", "distance": k}

where ``distance`` counts the turns since the latest statement of that fact. Distances are drawn
uniformly from 1..max_distance, so an evaluation can report accuracy per distance.

Splits: ``"train"`` and ``"heldout"`` draw entity values from disjoint pools, and a share of the
statement/question templates (marked ``*`` in ``rxt.data.phrasings``) is used only in ``"heldout"``.
A model can answer a held-out question only by carrying the value through its memory. With ``fresh_values=p``
the train split draws a share p of its values as newly invented words (never a held-out one), so
that a model cannot get by on memorising the training values and has to learn to copy;
``fresh_words="english"`` makes them English-looking and lower case where the pool's words are, so
the copying also covers the sub-words real held-out words ("carrots", "painter") split into;
``fresh_words="mixed"`` draws either kind; ``"real"`` takes real English nouns (the ``wonderwords``
package's list, held-out values excluded), so copying also meets the sub-word sequences of real
words; ``"all"`` draws each of the three kinds a third of the time. With ``frames=p`` a share p of
the training queries is wrapped in a frame ("By the way, my name is Ann.", "Who am I? Just curious."),
so that a model meets each fact in more than its few bare templates and has to find the fact in
words around it, as in a phrasing it never saw. With ``distractors=p`` a share p of the training
statements carries one invented word that is not the value ("My pet vobrin is Rex."): a phrasing it
never saw has words the model does not know, and their sub-words must not leak into the value it recalls.

Generation is deterministic and random-access: dialogue ``i`` of (seed, split) is always the same.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from importlib import resources

from rxt.data.phrasings import FACTS, FACTS_BY_SLOT, PARAPHRASES, SMALL_TALK, Fact

SPLITS = ("train", "heldout")


@dataclass
class Turn:
    query: str
    answer: str
    check: dict | None = None  # {"slot", "value", "distance"} on recall questions
    told: bool = False  # the message tells (or changes) a fact: what a memory should keep


@dataclass
class Dialogue:
    id: str
    turns: list[Turn] = field(default_factory=list)


# Value pools. Every 4th value (sorted order) is held out; see `split_pool`.
NAMES = """Adam Alan Alex Alice Amy Anna Anne Ben Beth Bill Bob Brad Carl Chris Clara Dan Dave Dean
Diana Donna Ed Ella Ellen Emma Eric Eva Frank Fred Gary Grace Greg Hank Helen Holly Ian Ivan Jack Jake
James Jane Jason Jay Jean Jeff Jen Jill Jim Joan Joe John Josh Joy Julia June Karen Kate Keith Kelly
Ken Kim Kyle Laura Leo Lily Lisa Lucy Luke Lynn Marc Maria Mark Mary Matt Max Megan Mia Mike Molly
Nancy Nick Nina Noah Olga Oscar Owen Pam Paul Peter Phil Rita Rob Rose Roy Ruby Ruth Ryan Sam Sara
Scott Sean Sophie Steve Sue Ted Tina Tom Tony Troy Vera Victor Wade Walt Will Zoe Bella Coco Daisy Duke
Rex Rocky Buddy Milo Luna Oliver Charlie Lola Toby Rosie Oreo Pepper Ginger Bruno Zeus Shadow Simba
Nala Teddy Bear Dusty Murphy Buster Lucky Penny Sunny Maple Misty Ziggy""".split()
CITIES = """Paris London Berlin Madrid Rome Vienna Prague Oslo Dublin Lisbon Athens Warsaw Moscow Cairo
Tokyo Seoul Delhi Dubai Sydney Perth Boston Denver Austin Dallas Miami Seattle Chicago Houston Toronto
Ottawa Quebec Lima Bogota Quito Havana Nairobi Lagos Accra Tunis Rabat Milan Naples Venice Munich
Hamburg Zurich Geneva Bern Lyon Nice Porto Seville Malaga Bristol Leeds York Oxford Cardiff Glasgow
Belfast Bergen Riga Minsk Kiev Sofia Split Zagreb Helsinki Stockholm Amsterdam Brussels Phoenix Portland
Memphis Nashville Atlanta Orlando Tampa Detroit Omaha Reno Tulsa""".split()
COLOURS = """red blue green yellow orange purple pink brown black white grey gold silver beige cyan
teal navy maroon olive violet indigo coral amber ivory lilac mint peach plum rust tan""".split()
FOODS = """pizza pasta sushi tacos curry soup salad bread cheese rice noodles burgers steak chicken
pancakes waffles cake cookies chocolate apples bananas mangoes grapes oranges cherries lemons carrots
potatoes beans eggs fish shrimp ramen dumplings pie muffins bagels yogurt honey nuts popcorn""".split()
JOBS = """teacher nurse doctor baker pilot farmer lawyer writer painter singer dancer driver cook
banker plumber builder tailor barber dentist vet pharmacist librarian gardener miner sailor soldier
judge poet chemist coach designer mechanic florist jeweler potter ranger waiter cashier""".split()
SPORTS = """tennis golf soccer hockey cricket rugby chess boxing rowing skiing surfing cycling running
swimming bowling baseball fencing judo karate climbing sailing darts snooker squash polo""".split()
NUMBERS = [str(n) for n in range(18, 90)]



ONSETS, VOWELS = "bdfgklmnprstvz", "aeiou"  # 70 syllables: every invented word is a few of them


def invent_word(rng: random.Random, syllables: tuple[int, ...] = (2, 3), suffixes: tuple[str, ...] = ("",)) -> str:
    """One pronounceable made-up word ("Runeba", "Kotiport")."""
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice(syllables)))
    return (word + rng.choice(suffixes)).capitalize()


def invented_words(count: int, seed: str, syllables: tuple[int, ...] = (2, 3), suffixes: tuple[str, ...] = ("",)) -> list[str]:
    """Thousands of invented values, so recall has to copy the value out of memory, piece by piece."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        words.add(invent_word(rng, syllables, suffixes))
    return sorted(words)


NAMES = NAMES + invented_words(3000, "names")
CITIES = CITIES + invented_words(1500, "cities", (2,), ("", "ton", "burg", "ville", "port", "field"))
POOLS = {"name": NAMES, "city": CITIES, "colour": COLOURS, "food": FOODS, "job": JOBS, "sport": SPORTS,
         "age": NUMBERS}


def split_pool(values: list[str], split: str) -> list[str]:
    """Disjoint value pools: every 4th value (in sorted order) is held out, unless some pool uses the
    same word for training (an invented name can also be an invented city): then it is dropped."""
    ordered = sorted(set(values))
    if split == "heldout":
        return [v for i, v in enumerate(ordered) if i % 4 == 3 and v.lower() not in _TRAIN_WORDS]
    return [v for i, v in enumerate(ordered) if i % 4 != 3]


_TRAIN_WORDS = {v.lower() for pool in POOLS.values() for v in split_pool(pool, "train")}
HELDOUT_WORDS = {v.lower() for pool in POOLS.values() for v in split_pool(pool, "heldout")}
FRESH_SYLLABLES = (2, 3, 4)
FRESH_WORDS = ("syllables", "english", "mixed", "real", "all")

# English-looking pieces: consonant clusters, vowel pairs, codas and endings, so that invented words
# split into the same sub-words as real ones ("carrots" -> c ar r ots, "Lucky" -> L u ck y)
_EN_ONSETS = "b c d f g h j k l m n p r s t v w z bl br ch cl cr dr fl fr gl gr pl pr sc sh sl sn sp st tr".split()
_EN_VOWELS = "a e i o u a e i o u a e i o u ai ea ee oo ou".split()
_EN_CODAS = "- - - - - - - - b ck d ff g ll m n nd ng nk nt p r rd rn rt s sh ss st t x".split()
_EN_ENDINGS = "- - - - - - er ing s y le et on ots ie ard ton".split()


def english_word(rng: random.Random) -> str:
    """One invented English-looking word, lower case ("strouckle", "bleanots")."""
    pieces = [rng.choice(_EN_ONSETS) + rng.choice(_EN_VOWELS) + rng.choice(_EN_CODAS) for _ in range(rng.choice((1, 1, 2)))]
    return ("".join(pieces) + rng.choice(_EN_ENDINGS)).replace("-", "")


@functools.cache
def real_words() -> tuple[str, ...]:
    """Real English nouns, lower case, 3-12 letters, none of them a held-out value (wonderwords' list,
    less its profanity list)."""
    assets = resources.files("wonderwords.assets")
    profane = set(assets.joinpath("profanitylist.txt").read_text().lower().split())
    nouns = assets.joinpath("nounlist.txt").read_text().split()
    return tuple(sorted({w for w in nouns if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 12}
                        - profane - HELDOUT_WORDS))


def fresh_value(rng: random.Random, words: str = "syllables", lowercase: bool = False) -> str:
    """A newly drawn word that is no held-out value: training values nobody can memorise.

    words="syllables": capitalised consonant-vowel syllables ("Runeba"). words="english": English-looking
    words with clusters and endings, lower case where the pool's words are (colours, foods, jobs, sports),
    so that copying also learns the sub-words real held-out words split into. words="real": real English
    nouns ("lantern", "Harbor"), from thousands. words="mixed": syllables or english, half and half;
    words="all": syllables, english or real, a third each; all but "syllables" in the pool's case.
    """
    kinds = {"mixed": ("syllables", "english"), "all": ("syllables", "english", "real")}
    while True:
        kind = rng.choice(kinds[words]) if words in kinds else words
        if kind == "real":
            word = rng.choice(real_words())
        else:
            word = english_word(rng) if kind == "english" else invent_word(rng, FRESH_SYLLABLES)
        if words != "syllables":  # the pool's case; "syllables" alone keeps its capitals
            word = word.lower() if lowercase else word.capitalize()
        if len(word) > 2 and word.lower() not in HELDOUT_WORDS:
            return word


def copy_turn(index: int, seed: int = 0) -> Turn:
    """A turn whose query is a list of words no template predicts: 2-6 invented or pool values.

    In a stage whose decoder reads the interaction only through the memory slots (``memory: stm``),
    such a query can be predicted only by copying it out of memory, token by token, in order: a dense
    lesson in the skill recall needs, which template text (predictable without memory) does not give.
    """
    rng = random.Random(f"rxt-copy:{seed}:{index}")
    words = []
    for _ in range(rng.randint(2, 6)):
        pool = rng.choice(list(POOLS))
        if pool != "age" and rng.random() < 0.7:
            words.append(fresh_value(rng, "mixed", lowercase=rng.random() < 0.5))
        else:
            words.append(rng.choice(split_pool(POOLS[pool], "train")))
    return Turn(" ".join(words) + ".", "Noted.")


def split_templates(templates: tuple[str, ...], split: str) -> list[str]:
    """Training uses unmarked templates; the held-out split uses all of them."""
    if split == "heldout":
        return [t.lstrip("*") for t in templates]
    return [t for t in templates if not t.startswith("*")]


def heldout_only_templates() -> set[str]:
    """Every template that never appears in training (for disjointness checks)."""
    marked: set[str] = set()
    for fact in FACTS:
        marked.update(t[1:] for t in fact.statements + fact.questions if t.startswith("*"))
    marked.update(q[1:] for q, _ in SMALL_TALK if q.startswith("*"))
    return marked


# Frames around a training query (``frames=p``): openers before it, closers after it.
OPENERS = ("Oh, ", "By the way, ", "Okay, ", "So, ", "Well, ", "Hey, ", "Just so you know, ", "Also, ",
           "Right, ", "Hmm, ", "Quick one: ", "Listen, ", "Anyway, ", "Hi again. ", "One more thing: ")
CLOSERS = (" Thanks!", " Just curious.", " :)", " Okay?", " Cheers.", " Thank you.", " Ha.", " Please.")


def frame(rng: random.Random, template: str) -> str:
    """Wrap a query template in an opener, a closer or both. The opener lower-cases the template's
    first word unless that is "I" or the value ("{v} is my little sister.")."""
    where = rng.choice(("open", "close", "both"))
    if where != "close":
        first = template.split(" ", 1)[0]
        keep = first.startswith("{") or first in ("I", "I'm")
        template = rng.choice(OPENERS) + (template if keep else template[:1].lower() + template[1:])
    if where != "open":
        template += rng.choice(CLOSERS)
    return template


def distract(rng: random.Random, template: str) -> str:
    """Insert one invented lower-case word between two words of a statement template, never next to the
    value ("My pet is {v}." -> "My pet vobrin is {v}."); a template with no such gap stays as it is."""
    words = template.split(" ")
    gaps = [k for k in range(1, len(words)) if "{v}" not in words[k - 1] and "{v}" not in words[k]]
    if not gaps:
        return template
    while (word := fresh_value(rng, "mixed", lowercase=True)) in _heldout_template_words():
        pass
    k = rng.choice(gaps)
    return " ".join(words[:k] + [word] + words[k:])


@functools.cache
def _heldout_template_words() -> frozenset[str]:
    """Words of the held-out phrasings: a distractor is never one of them."""
    return frozenset(w.lower() for t in heldout_only_templates() for w in re.findall(r"[A-Za-z']+", t))


@functools.cache
def _heldout_patterns() -> dict[str, re.Pattern]:
    return {t: re.compile(re.escape(t).replace(re.escape("{v}"), ".+")) for t in sorted(heldout_only_templates())}


def new_template(query: str) -> str | None:
    """The template of a phrasing that only the held-out split uses ("My town is {v}."), else None."""
    return next((t for t, p in _heldout_patterns().items() if p.fullmatch(query)), None)


def new_phrasing(query: str) -> bool:
    """Whether a query is in a phrasing that only the held-out split uses."""
    return new_template(query) is not None


# Answers to a question about a fact never told (training only; the memory suite's own wordings differ).
NOT_TOLD_ANSWERS = ["You have not told me that yet.", "I don't know: you didn't tell me.",
                    "You never told me, so I can't say."]


@dataclass
class _Event:
    kind: str  # "state" | "update" | "ask" | "unknown" (a question about a fact never told)
    slot: str
    distance: int = 0


class DialogueGenerator:
    """Random-access generator: ``generator[i]`` is dialogue i of this (seed, split).

    ``values="train"`` or ``"heldout"`` takes the entity values from that split's pools instead of the
    split's own (held-out phrasings with training values, say): an evaluation can then tell a model
    that fails on new phrasings from one that fails to carry new values.
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        min_turns: int = 4,
        max_turns: int = 20,
        max_distance: int = 16,
        facts_per_dialogue: tuple[int, int] = (2, 5),
        update_prob: float = 0.25,
        fresh_values: float = 0.0,
        fresh_words: str = "syllables",
        values: str | None = None,
        frames: float = 0.0,
        paraphrases: float = 0.0,
        distractors: float = 0.0,
        abstain: float = 0.0,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if values is not None and values not in SPLITS:
            raise ValueError(f"values must be one of {SPLITS} (the pools to draw from), got {values!r}")
        if not 2 <= min_turns <= max_turns:
            raise ValueError(f"need 2 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
        self.seed, self.split = seed, split
        self.min_turns, self.max_turns, self.max_distance = min_turns, max_turns, max_distance
        if not 0.0 <= fresh_values <= 1.0 or (fresh_values and split != "train"):
            raise ValueError(f"fresh_values is a probability for the train split, got {fresh_values} for {split!r}")
        if not 1 <= facts_per_dialogue[0] <= facts_per_dialogue[1] <= len(FACTS):
            raise ValueError(f"facts_per_dialogue must be (min, max) with 1 <= min <= max <= {len(FACTS)}, "
                             f"got {facts_per_dialogue}")
        self.facts_per_dialogue, self.update_prob = tuple(facts_per_dialogue), update_prob
        if fresh_words not in FRESH_WORDS:
            raise ValueError(f"fresh_words must be one of {FRESH_WORDS}, got {fresh_words!r}")
        self.fresh_values, self.fresh_words = fresh_values, fresh_words
        if not 0.0 <= frames <= 1.0 or (frames and split != "train"):
            raise ValueError(f"frames is a probability for the train split, got {frames} for {split!r}")
        self.frames = frames
        if not 0.0 <= paraphrases <= 1.0 or (paraphrases and split != "train"):
            raise ValueError(f"paraphrases is a probability for the train split, got {paraphrases} for {split!r}")
        self.paraphrases = paraphrases
        if not 0.0 <= distractors <= 1.0 or (distractors and split != "train"):
            raise ValueError(f"distractors is a probability for the train split, got {distractors} for {split!r}")
        self.distractors = distractors
        # the share of dialogues that also ask about a fact they never told, answered that it was not told
        if not 0.0 <= abstain <= 1.0 or (abstain and split != "train"):
            raise ValueError(f"abstain is a probability for the train split, got {abstain} for {split!r}")
        self.abstain = abstain
        self.values = values or split  # which pools the values come from: the split's own unless told
        self.pools = {name: split_pool(pool, self.values) for name, pool in POOLS.items()}
        self.small_talk = [(q.lstrip("*"), a) for q, a in SMALL_TALK if split == "heldout" or q[0] != "*"]

    def __getitem__(self, index: int) -> Dialogue:
        rng = random.Random(f"rxt-dialogue:{self.split}:{self.seed}:{index}")
        n_turns = rng.randint(self.min_turns, self.max_turns)
        events = self._plan(rng, n_turns)
        values: dict[str, str] = {}
        used: set[str] = set()
        turns = []
        for t in range(n_turns):
            event = events.get(t)
            turns.append(self._small_talk(rng) if event is None else self._realise(rng, event, values, used))
        return Dialogue(id=f"{self.split}-{self.seed}-{index}", turns=turns)

    def take(self, n: int, start: int = 0) -> list[Dialogue]:
        return [self[i] for i in range(start, start + n)]

    def shorter(self, max_turns: int) -> DialogueGenerator:
        """The same kind of dialogues, at most ``max_turns`` long (recall distances < max_turns)."""
        return DialogueGenerator(self.seed, self.split, min(self.min_turns, max_turns), max_turns, max_turns - 1,
                                 self.facts_per_dialogue, self.update_prob, self.fresh_values, self.fresh_words,
                                 self.values, self.frames, self.paraphrases, self.distractors, self.abstain)

    def _plan(self, rng: random.Random, n_turns: int) -> dict[int, _Event]:
        """Place (state, [update], ask) triples on distinct turns; distances uniform in 1..max_distance."""
        events: dict[int, _Event] = {}
        n_facts = rng.randint(*self.facts_per_dialogue)
        for slot in rng.sample([f.slot for f in FACTS], n_facts):
            for _ in range(20):  # rejection sampling of free turns
                distance = rng.randint(1, min(self.max_distance, n_turns - 1))
                ask = rng.randint(distance, n_turns - 1)
                last = ask - distance  # turn of the latest statement
                first = last
                if last > 0 and rng.random() < self.update_prob:
                    first = rng.randint(0, last - 1)  # an earlier statement that `last` updates
                wanted = {first, last, ask}
                if wanted & events.keys():
                    continue
                events[first] = _Event("state", slot)
                if first != last:
                    events[last] = _Event("update", slot)
                events[ask] = _Event("ask", slot, distance)
                break
        # no draw at all without abstain: dialogues stay exactly what they were
        if self.abstain and rng.random() < self.abstain:
            told = {e.slot for e in events.values()}
            untold = [f.slot for f in FACTS if f.slot not in told]
            free = [t for t in range(1, n_turns) if t not in events]
            if untold and free:
                events[rng.choice(free)] = _Event("unknown", rng.choice(untold))
        return events

    def _value(self, rng: random.Random, fact: Fact, used: set[str]) -> str:
        if self.fresh_values and fact.pool != "age" and rng.random() < self.fresh_values:
            # a word no other dialogue needs to share: only copying recalls it
            value = fresh_value(rng, self.fresh_words, lowercase=self.pools[fact.pool][0].islower())
        else:
            value = rng.choice([v for v in self.pools[fact.pool] if v not in used])
        used.add(value)
        return value

    def _realise(self, rng: random.Random, event: _Event, values: dict[str, str], used: set[str]) -> Turn:
        fact = FACTS_BY_SLOT[event.slot]
        if event.kind == "unknown":
            query = self._framed(rng, rng.choice(split_templates(fact.questions, self.split)))
            return Turn(query, rng.choice(NOT_TOLD_ANSWERS), {"slot": fact.slot, "value": "", "distance": 0})
        if event.kind == "ask":
            value = values[fact.slot]
            query = self._framed(rng, rng.choice(split_templates(fact.questions, self.split)))
            answer = rng.choice(fact.answers).format(v=value)
            return Turn(query, answer, {"slot": fact.slot, "value": value, "distance": event.distance})
        value = self._value(rng, fact, used)
        values[fact.slot] = value
        templates = split_templates(fact.statements if event.kind == "state" else fact.updates, self.split)
        # no draw at all without paraphrases: dialogues stay exactly what they were
        if event.kind == "state" and self.paraphrases and rng.random() < self.paraphrases:
            templates = PARAPHRASES[fact.slot]
        template = rng.choice(templates)
        # no draw at all without distractors: dialogues stay exactly what they were
        if self.distractors and rng.random() < self.distractors:
            template = distract(rng, template)
        query = self._framed(rng, template).format(v=value)
        answer = _capitalise(rng.choice(fact.acks).format(v=value))
        return Turn(query, answer, told=True)

    def _small_talk(self, rng: random.Random) -> Turn:
        query, answers = rng.choice(self.small_talk)
        return Turn(self._framed(rng, query), rng.choice(answers))

    def _framed(self, rng: random.Random, template: str) -> str:
        # no draw at all without frames: dialogues stay exactly what they were
        return frame(rng, template) if self.frames and rng.random() < self.frames else template


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def generate_dialogues(n: int, seed: int = 0, split: str = "train", **options) -> list[Dialogue]:
    """The first ``n`` dialogues of a DialogueGenerator(seed, split, **options)."""
    return DialogueGenerator(seed, split, **options).take(n)
