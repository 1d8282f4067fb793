"""Synthetic multi-turn dialogues that test memory: state facts, chat, change facts, ask about them.

A user states facts about themself (name, pet, city, favourite colour, ...), makes small talk,
sometimes changes a fact ("Actually, I moved to Oslo."), and later asks about one ("Where do I
live?"). Every recall question has one exact answer, recorded on its turn as

    check = {"slot": "city", "value": "Oslo", "distance": k}

where ``distance`` counts the turns since the latest statement of that fact. Distances are drawn
uniformly from 1..max_distance, so an evaluation can report accuracy per distance.

Splits: ``"train"`` and ``"heldout"`` draw entity values from disjoint pools, and a share of the
statement/question templates (marked ``*`` below) is used only in ``"heldout"``. A model can
answer a held-out question only by carrying the value through its memory. With ``fresh_values=p``
the train split draws a share p of its values as newly invented words (never a held-out one), so
that a model cannot get by on memorising the training values and has to learn to copy;
``fresh_words="english"`` makes them English-looking and lower case where the pool's words are, so
the copying also covers the sub-words real held-out words ("carrots", "painter") split into;
``fresh_words="mixed"`` draws either kind; ``"real"`` takes real English nouns (the ``wonderwords``
package's list, held-out values excluded), so copying also meets the sub-word sequences of real
words; ``"all"`` draws each of the three kinds a third of the time. With ``frames=p`` a share p of
the training queries is wrapped in a frame ("By the way, my name is Ann.", "Who am I? Just curious."),
so that a model meets each fact in more than its few bare templates and has to find the fact in
words around it, as in a phrasing it never saw.

Generation is deterministic and random-access: dialogue ``i`` of (seed, split) is always the same.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from importlib import resources

SPLITS = ("train", "heldout")


@dataclass
class Turn:
    query: str
    answer: str
    check: dict | None = None  # {"slot", "value", "distance"} on recall questions


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


@dataclass(frozen=True)
class Fact:
    """How one kind of fact is stated, changed, asked for and answered. ``*`` marks held-out templates."""

    slot: str
    pool: str
    statements: tuple[str, ...]
    updates: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    acks: tuple[str, ...]


FACTS = (
    Fact("user_name", "name",
         ("My name is {v}.", "I'm {v}, by the way.", "You can call me {v}.", "Hi, I am {v}.", "*People call me {v}."),
         ("Actually, please call me {v} instead.", "Sorry, my real name is {v}."),
         ("What is my name?", "Do you remember my name?", "Who am I?", "*What did I say my name was?"),
         ("Your name is {v}.", "You are {v}.", "You told me your name is {v}."),
         ("Nice to meet you, {v}!", "Hello {v}, good to meet you.", "Nice to meet you too.")),
    Fact("pet_name", "name",
         ("My dog is called {v}.", "I have a cat named {v}.", "My pet's name is {v}.", "*Our puppy is {v}."),
         ("Actually, we renamed our pet to {v}.", "I got a new pet, it is called {v}."),
         ("What is my pet called?", "What's my pet's name?", "Do you remember my pet's name?",
          "*What did I name my pet?"),
         ("Your pet is called {v}.", "Your pet's name is {v}.", "It is called {v}."),
         ("{v} is a lovely name for a pet.", "Aww, {v} sounds sweet.", "Pets are great company.")),
    Fact("city", "city",
         ("I live in {v}.", "I'm from {v}.", "My home is in {v}.", "*My town is {v}."),
         ("Actually, I moved to {v}.", "We just moved to {v}."),
         ("Where do I live?", "Which city do I live in?", "Where is my home?", "*What city did I say I live in?"),
         ("You live in {v}.", "Your home is in {v}.", "You are from {v}."),
         ("{v} is a nice place.", "I have heard good things about {v}.", "That sounds like a nice city.")),
    Fact("colour", "colour",
         ("My favourite colour is {v}.", "I love the colour {v}.", "I like {v} more than any other colour.",
          "*The best colour is {v}, I think."),
         ("Actually, my favourite colour is {v} now.", "I changed my mind, I like {v} best."),
         ("What is my favourite colour?", "Which colour do I like best?", "*Do you know my favourite colour?"),
         ("Your favourite colour is {v}.", "You like {v} best.", "It is {v}."),
         ("{v} is a great colour.", "Good choice, {v} is nice.", "Nice choice.")),
    Fact("food", "food",
         ("My favourite food is {v}.", "I could eat {v} every day.", "I really love {v}.",
          "*Nothing beats {v} for dinner."),
         ("Actually, these days I prefer {v}.", "My new favourite food is {v}."),
         ("What is my favourite food?", "What food do I love?", "*Which food did I say I like most?"),
         ("Your favourite food is {v}.", "You love {v}.", "It is {v}."),
         ("Yum, {v} is tasty.", "{v} sounds delicious.", "Good taste!")),
    Fact("age", "age",
         ("I am {v} years old.", "My age is {v}.", "I turned {v} this year.", "*I'm {v} now."),
         ("Actually, I just turned {v}.", "Sorry, I am really {v} years old."),
         ("How old am I?", "What is my age?", "*Do you remember how old I am?"),
         ("You are {v} years old.", "Your age is {v}.", "You are {v}."),
         ("{v} is a good age.", "Thanks for telling me.", "Nice, {v} years!")),
    Fact("job", "job",
         ("I work as a {v}.", "I am a {v} by trade.", "My job? I'm a {v}.", "*I earn my living as a {v}."),
         ("Actually, I am a {v} now.", "I changed jobs, I work as a {v} now."),
         ("What do I do for a living?", "What is my job?", "*What did I say my job was?"),
         ("You work as a {v}.", "You are a {v}.", "Your job is {v}."),
         ("Being a {v} sounds interesting.", "A {v}, how nice.", "That sounds like hard work.")),
    Fact("sister_name", "name",
         ("My sister is called {v}.", "I have a sister named {v}.", "My sister's name is {v}.",
          "*{v} is my little sister."),
         ("Actually, my sister's name is {v}, I misspoke.", "Sorry, my sister is called {v}."),
         ("What is my sister's name?", "What's my sister called?", "*Who is my sister?"),
         ("Your sister is called {v}.", "Your sister's name is {v}.", "Her name is {v}."),
         ("Say hi to {v} from me.", "{v} is a nice name.", "Family is important.")),
    Fact("friend_name", "name",
         ("My best friend is {v}.", "My best friend is called {v}.", "I hang out with my friend {v} a lot.",
          "*{v} has been my best friend for years."),
         ("Actually, my best friend now is {v}.", "These days my best friend is {v}."),
         ("Who is my best friend?", "What is my best friend's name?", "*Do you recall my best friend's name?"),
         ("Your best friend is {v}.", "Your best friend is called {v}.", "It is {v}."),
         ("{v} sounds like a good friend.", "Good friends are rare.", "Nice, say hi to {v}.")),
    Fact("sport", "sport",
         ("My favourite sport is {v}.", "I play {v} every weekend.", "I love watching {v}.",
          "*I am really into {v}."),
         ("Actually, I prefer {v} now.", "These days my favourite sport is {v}."),
         ("What is my favourite sport?", "Which sport do I like?", "*What sport did I say I love?"),
         ("Your favourite sport is {v}.", "You like {v}.", "It is {v}."),
         ("{v} is fun.", "{v} keeps you fit.", "Sports are fun.")),
)
FACTS_BY_SLOT = {fact.slot: fact for fact in FACTS}

# More ways to state each fact, for training only (``paraphrases=p``: a share p of the statements is
# drawn from these). They widen the phrasings a model learns to read a fact from, value-first ones
# included where the value is capitalised or a number; none is a held-out template, nor uses the words
# that make those new ("town", "puppy", "dinner", "really into", "little", "for years").
PARAPHRASES = {
    "user_name": ("{v} is my name.", "{v} here.", "The name's {v}.", "I go by {v}.", "Everyone knows me as {v}.",
                  "My first name is {v}.", "Hello, {v} speaking.", "Please call me {v}."),
    "pet_name": ("{v} is my dog.", "{v} is the name of my cat.", "We have a pet called {v}.", "Our cat is {v}.",
                 "My rabbit's name is {v}.", "I own a parrot called {v}.", "My kitten is named {v}.",
                 "I walk my dog {v} every morning."),
    "city": ("{v} is where I live.", "{v} is my home.", "My home city is {v}.", "I am based in {v}.",
             "These days I call {v} home.", "My address is in {v}.", "I grew up in {v} and still live there.",
             "I have lived in {v} all my life."),
    "colour": ("I always pick {v}.", "My favourite shade is {v}.", "Everything I own is {v}.",
               "If I had to choose one colour, it would be {v}.", "I paint everything {v}.",
               "My favourite colour? Definitely {v}.", "I wear {v} all the time."),
    "food": ("I eat {v} whenever I can.", "My favourite meal is {v}.", "I never get tired of {v}.",
             "I would eat {v} for every meal.", "My favourite dish is {v}.", "I am a huge fan of {v}.",
             "Give me {v} any day."),
    "age": ("{v} is my age.", "I'm {v} years old.", "I was born {v} years ago.", "I have been alive for {v} years.",
            "My age? {v}.", "Last birthday I turned {v}."),
    "job": ("I'm a {v}.", "My job is {v}.", "By profession I am a {v}.", "My work? I'm a {v}.",
            "I have worked as a {v} for a while.", "My profession is {v}.", "For work I am a {v}."),
    "sister_name": ("{v} is my sister.", "{v} is my sister's name.", "I have a sister, her name is {v}.",
                    "My only sister is {v}.", "My sister {v} lives nearby.", "My sister goes by {v}."),
    "friend_name": ("{v} is my best friend.", "My closest friend is {v}.", "My best mate is {v}.",
                    "{v} is the friend I trust most.", "I spend weekends with my best friend, {v}.",
                    "My best friend's name is {v}."),
    "sport": ("I'm a big fan of {v}.", "I do {v} in my free time.", "I enjoy playing {v}.", "My sport is {v}.",
              "Every Sunday I play {v}.", "I never miss a game of {v}.", "My favourite game is {v}."),
}

# Small talk: (query, possible answers). Queries marked * appear only in the held-out split.
SMALL_TALK = (
    ("How are you today?", ("I am fine, thank you.", "Very well, thanks for asking.")),
    ("What is the weather like?", ("It looks sunny today.", "I think it will rain later.")),
    ("Can you tell me a joke?", ("Why did the chicken cross the road? To get to the other side.",)),
    ("What time is it?", ("I do not have a clock, sorry.", "I am not sure what time it is.")),
    ("Do you like music?", ("Yes, I enjoy music a lot.", "I like most kinds of music.")),
    ("What should I cook tonight?", ("How about something simple, like soup?", "Maybe try a new recipe.")),
    ("I am tired.", ("You should get some rest.", "Maybe take a short break.")),
    ("I had a long day at work.", ("That sounds exhausting.", "I hope you can relax now.")),
    ("Do you read books?", ("I like stories of all kinds.", "Yes, books are wonderful.")),
    ("Any plans for the weekend?", ("I will be here to chat.", "Maybe you could go for a walk.")),
    ("Tell me something interesting.", ("Octopuses have three hearts.", "Honey never spoils.")),
    ("What is your name?", ("I am your chat assistant.", "I am a small reactive model.")),
    ("Thanks for listening.", ("You are welcome.", "Any time.")),
    ("I went for a walk today.", ("Walking is good for you.", "That sounds nice.")),
    ("What do you think about movies?", ("Movies are a great way to relax.", "I like a good comedy.")),
    ("It is cold outside.", ("Stay warm and wear a coat.", "A hot drink would help.")),
    ("I am learning to paint.", ("That is a lovely hobby.", "Keep practising, it gets easier.")),
    ("Do you like the sea?", ("The sea is beautiful.", "Yes, the sound of waves is calming.")),
    ("What is two plus two?", ("Two plus two is four.",)),
    ("I watched a film last night.", ("Was it any good?", "I hope you enjoyed it.")),
    ("Can you help me relax?", ("Take a deep breath and count to ten.", "Try to rest for a moment.")),
    ("I like rainy days.", ("Rainy days are cosy.", "Rain can be very calming.")),
    ("Do you sleep?", ("No, I do not need sleep.", "I never sleep.")),
    ("I baked some bread today.", ("Fresh bread is the best.", "That sounds delicious.")),
    ("What is your favourite season?", ("I like spring the most.", "Autumn is lovely.")),
    ("*How is your day going?", ("It is going well, thanks.", "Pretty good so far.")),
    ("*I just got back from the gym.", ("Well done, exercise is good.", "You must feel great.")),
    ("*Do you like coffee or tea?", ("Both are nice.", "I think tea is relaxing.")),
    ("*I feel a bit bored.", ("Maybe try a new hobby.", "How about a short walk?")),
)


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


@functools.cache
def _heldout_patterns() -> dict[str, re.Pattern]:
    return {t: re.compile(re.escape(t).replace(re.escape("{v}"), ".+")) for t in sorted(heldout_only_templates())}


def new_template(query: str) -> str | None:
    """The template of a phrasing that only the held-out split uses ("My town is {v}."), else None."""
    return next((t for t, p in _heldout_patterns().items() if p.fullmatch(query)), None)


def new_phrasing(query: str) -> bool:
    """Whether a query is in a phrasing that only the held-out split uses."""
    return new_template(query) is not None


@dataclass
class _Event:
    kind: str  # "state" | "update" | "ask"
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
                                 self.values, self.frames, self.paraphrases)

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
        query = self._framed(rng, rng.choice(templates)).format(v=value)
        answer = _capitalise(rng.choice(fact.acks).format(v=value))
        return Turn(query, answer)

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
