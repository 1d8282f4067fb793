import json
import random
import re

import pytest

from rxt.cli import main
from rxt.data.corpus import conversation_pairs, corpus_directory, default_tokenizer_texts
from rxt.data.dialogues import (
    FACTS,
    HELDOUT_WORDS,
    POOLS,
    Dialogue,
    DialogueGenerator,
    Turn,
    heldout_only_templates,
    split_pool,
)
from rxt.data.jsonl import read_dialogues, validate, write_dialogues


def test_generator_is_deterministic_and_random_access():
    a, b = DialogueGenerator(3, "train"), DialogueGenerator(3, "train")
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    assert a[7] == DialogueGenerator(3, "train").take(8)[7]
    assert a[0] != DialogueGenerator(4, "train")[0]


def test_recall_turns_are_exact_and_distances_cover_the_range():
    generator = DialogueGenerator(0, "heldout")
    distances = set()
    for dialogue in generator.take(400):
        for t, turn in enumerate(dialogue.turns):
            if turn.check:
                value, distance = turn.check["value"], turn.check["distance"]
                assert value in turn.answer
                assert value in dialogue.turns[t - distance].query  # the latest statement of the fact
                assert 1 <= distance <= 16
                distances.add(distance)
    assert distances == set(range(1, 17))


def test_heldout_values_never_appear_in_training():
    for name, values in POOLS.items():
        train, held = set(split_pool(values, "train")), set(split_pool(values, "heldout"))
        assert train and held and not train & held, name
    every_train = {v.lower() for values in POOLS.values() for v in split_pool(values, "train")}
    every_held = {v.lower() for values in POOLS.values() for v in split_pool(values, "heldout")}
    assert not every_train & every_held  # no word is a training value in one pool and held out in another
    train_values = {t.check["value"] for d in DialogueGenerator(0, "train").take(300) for t in d.turns if t.check}
    held_values = {t.check["value"] for d in DialogueGenerator(0, "heldout").take(300) for t in d.turns if t.check}
    assert held_values and not train_values & held_values


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{v}"), ".+") + "$")


def test_heldout_templates_never_appear_in_training():
    patterns = [_pattern(t) for t in heldout_only_templates()]
    assert len(patterns) >= len(FACTS)
    train_queries = {t.query for d in DialogueGenerator(0, "train").take(300) for t in d.turns}
    assert not [q for q in train_queries for p in patterns if p.match(q)]
    held_queries = {t.query for d in DialogueGenerator(0, "heldout").take(300) for t in d.turns}
    assert any(p.match(q) for q in held_queries for p in patterns)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        DialogueGenerator(0, "test")
    with pytest.raises(ValueError, match="values"):
        DialogueGenerator(0, "heldout", values="test")


def _asked(generator: DialogueGenerator, n: int = 200) -> list[dict]:
    return [t.check for d in generator.take(n) for t in d.turns if t.check]


def test_values_come_from_the_pools_asked_for_whatever_the_phrasing():
    patterns = [_pattern(t) for t in heldout_only_templates()]
    train_pools = {v for values in POOLS.values() for v in split_pool(values, "train")}
    held_pools = {v for values in POOLS.values() for v in split_pool(values, "heldout")}
    swapped = DialogueGenerator(0, "heldout", values="train")  # held-out phrasings, training values
    assert {c["value"] for c in _asked(swapped)} <= train_pools
    assert any(p.match(t.query) for d in swapped.take(200) for t in d.turns for p in patterns)
    other = DialogueGenerator(0, "train", values="heldout")  # training phrasings, held-out values
    assert {c["value"] for c in _asked(other)} <= held_pools
    assert not [t.query for d in other.take(200) for t in d.turns for p in patterns if p.match(t.query)]
    assert other.shorter(4).values == "heldout"
    assert DialogueGenerator(0, "heldout", values="heldout")[5] == DialogueGenerator(0, "heldout")[5]


def test_jsonl_round_trip(tmp_path):
    dialogues = DialogueGenerator(1, "train").take(5)
    path = tmp_path / "d.jsonl"
    assert write_dialogues(path, dialogues) == 5
    assert read_dialogues(path) == dialogues
    assert validate(path) == []
    told = [t for d in dialogues for t in d.turns if t.told]
    assert told and all(t.check is None for t in told)  # the facts told, never the questions
    assert '"told": true' in path.read_text() and '"told": false' not in path.read_text()


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "bad JSON"),
        ('{"turns": [{"query": "a", "answer": "b"}]}', "missing key 'id'"),
        ('{"id": "x", "turns": []}', "'turns' is empty"),
        ('{"id": "x", "turns": [{"query": 3, "answer": "b"}]}', "'query' must be a string"),
        ('{"id": "x", "turns": [{"query": "a"}]}', "missing key 'answer'"),
        ('{"id": "x", "turns": [{"query": "a", "answer": "b", "check": {"slot": "s", "value": "z", "distance": 1}}]}',
         "does not appear in the answer"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"id": "x", "turns": [{"query": "a", "answer": "b", "told": "yes"}]}', "'told' must be true or false"),
        ('{"id": "x", "turns": [{"query": "a", "answer": "b"}, {"query": "c", "answer": "z", "check": '
         '{"slot": "s", "value": "z", "distance": 2}}]}', "turn 1: 'check.distance' must name an earlier turn (1..1"),
    ],
)
def test_malformed_jsonl_is_rejected_with_its_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "ok", "turns": [{"query": "hi", "answer": "hello"}]})
    path.write_text(f"{good}\n\n{line}\n")
    problems = validate(path)
    assert problems and problems[0].startswith(f"{path}:3: ") and problem in problems[0]
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:3: "):
        read_dialogues(path)


def test_validate_command(tmp_path, capsys):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_dialogues(good, [Dialogue("a", [Turn("hi", "hello")])])
    bad.write_text('{"id": "a", "turns": "nope"}\n')
    assert main(["data", "validate", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["data", "validate", str(bad)]) == 1
    assert f"{bad}:1: 'turns' must be a list" in capsys.readouterr().out


def test_tokenizer_texts_leave_out_entity_values():
    texts = list(default_tokenizer_texts(30))
    words = {w.strip(".,!?'").lower() for text in texts for w in text.split()}
    held = {v.lower() for pool in POOLS.values() for v in split_pool(pool, "heldout")}
    synthetic = texts[2 * len(conversation_pairs()) :]  # the dialogue lines and the invented-word lines
    assert synthetic and not {w.strip(".,!?'") for t in synthetic for w in t.lower().split()} & held
    assert "my" in words


def test_fresh_values_are_new_words_and_never_held_out():
    def values(generator):
        return [t.check["value"] for d in generator.take(300) for t in d.turns if t.check]

    pooled = {v.lower() for pool in POOLS.values() for v in pool}
    fresh = [v for v in values(DialogueGenerator(0, "train", fresh_values=1.0)) if not v.isdigit()]
    assert fresh and not {v.lower() for v in fresh} & HELDOUT_WORDS
    assert sum(v.lower() not in pooled for v in fresh) / len(fresh) > 0.9  # invented, not drawn from a pool
    assert len(set(fresh)) > 0.9 * len(fresh)  # nearly every dialogue has its own
    half = values(DialogueGenerator(0, "train", fresh_values=0.5))
    share = sum(v.lower() not in pooled for v in half) / len(half)
    assert 0.25 < share < 0.6  # ages always come from their pool
    assert values(DialogueGenerator(0, "train", fresh_values=0.5)) == half  # still deterministic
    assert DialogueGenerator(0, "train")[3] == DialogueGenerator(0, "train", fresh_values=0.0)[3]


def test_english_fresh_values_take_their_pools_case():
    generator = DialogueGenerator(0, "train", fresh_values=1.0, fresh_words="english")
    lowercase = {f.slot for f in FACTS if POOLS[f.pool][0].islower()}
    asked = [t.check for d in generator.take(300) for t in d.turns if t.check and t.check["slot"] != "age"]
    assert {c["slot"] for c in asked} & lowercase and {c["slot"] for c in asked} - lowercase
    for check in asked:  # "bleanots" for a food, "Stook" for a name: same shape as the real words there
        value = check["value"]
        assert value == (value.lower() if check["slot"] in lowercase else value.capitalize()), check
    values = [c["value"] for c in asked]
    assert not {v.lower() for v in values} & HELDOUT_WORDS and len(set(values)) > 0.8 * len(values)
    syllables = DialogueGenerator(0, "train", fresh_values=1.0)  # the default keeps its old shape
    assert all(t.check["value"].istitle() for d in syllables.take(50) for t in d.turns if t.check
               and t.check["slot"] != "age")
    assert generator.shorter(4).fresh_words == "english"
    mixed = [c for c in _asked(DialogueGenerator(0, "train", fresh_values=1.0, fresh_words="mixed"), 300)
             if c["slot"] != "age"]
    assert all(c["value"] == (c["value"].lower() if c["slot"] in lowercase else c["value"].capitalize())
               for c in mixed)
    syllable_shaped = [bool(re.fullmatch(r"([bdfgklmnprstvz][aeiou]){2,4}", c["value"].lower())) for c in mixed]
    assert 0.3 < sum(syllable_shaped) / len(mixed) < 0.8  # both kinds (a few English words fit the pattern too)
    with pytest.raises(ValueError, match="fresh_words"):
        DialogueGenerator(0, "train", fresh_values=0.5, fresh_words="klingon")


def test_real_fresh_values_are_real_nouns_in_their_pools_case_and_never_held_out():
    from rxt.data.dialogues import real_words

    nouns = set(real_words())
    assert len(nouns) > 5000 and not nouns & HELDOUT_WORDS and "lantern" in nouns
    lowercase = {f.slot for f in FACTS if POOLS[f.pool][0].islower()}
    real = [c for c in _asked(DialogueGenerator(0, "train", fresh_values=1.0, fresh_words="real"), 300)
            if c["slot"] != "age"]
    assert all(c["value"].lower() in nouns for c in real)
    assert all(c["value"] == (c["value"].lower() if c["slot"] in lowercase else c["value"].capitalize()) for c in real)
    assert len({c["value"].lower() for c in real}) > 0.9 * len(real)  # drawn from thousands
    every = [c["value"].lower() for c in _asked(DialogueGenerator(0, "train", fresh_values=1.0, fresh_words="all"),
                                                600) if c["slot"] != "age"]
    share = sum(v in nouns for v in every) / len(every)
    assert 0.2 < share < 0.5  # a third real, the rest invented (a few invented words are real too)
    assert not set(every) & HELDOUT_WORDS


def test_frames_wrap_training_queries_and_keep_everything_else():
    from rxt.data.dialogues import CLOSERS, OPENERS, SMALL_TALK, split_templates

    assert DialogueGenerator(0, "train", frames=0.0).take(50) == DialogueGenerator(0, "train").take(50)
    templates = [t for f in FACTS for t in split_templates(f.statements + f.updates + f.questions, "train")]
    templates += [q for q, _ in SMALL_TALK if not q.startswith("*")]
    patterns = [_pattern(t) for t in templates]
    for d in DialogueGenerator(0, "train", frames=1.0).take(100):
        told = {}
        for turn in d.turns:  # every query is "Opener, query", "query Closer" or both, around a training query
            core = turn.query
            opener = next((o for o in OPENERS if core.startswith(o)), None)
            core = core[len(opener):] if opener else core
            closer = next((c for c in CLOSERS if core.endswith(c)), None)
            core = core[: -len(closer)] if closer else core
            assert opener or closer, turn.query
            if opener and core[:1].islower():  # the opener lower-cased the first word, never "I"
                core = core[:1].upper() + core[1:]
            assert any(p.match(core) for p in patterns), turn.query
            assert not (opener and core.split(" ", 1)[0] in ("I", "I'm") and turn.query[len(opener)] != "I")
            for slot, value in told.items():
                if turn.check and turn.check["slot"] == slot:
                    assert turn.check["value"] == value and value in turn.answer
            for f in FACTS:  # remember what each statement told
                for t in split_templates(f.statements + f.updates, "train"):
                    m = re.match("^" + re.escape(t).replace(re.escape("{v}"), "(.+)") + "$", core)
                    if m:
                        told[f.slot] = m.group(1)
    some = [t.query for d in DialogueGenerator(0, "train", frames=0.3).take(300) for t in d.turns]
    share = sum(q.startswith(OPENERS) or q.endswith(CLOSERS) for q in some) / len(some)
    assert 0.2 < share < 0.4
    assert DialogueGenerator(0, "train", frames=0.3).shorter(4).frames == 0.3
    with pytest.raises(ValueError, match="frames"):
        DialogueGenerator(0, "heldout", frames=0.3)  # held-out phrasings stay what they are
    with pytest.raises(ValueError, match="frames"):
        DialogueGenerator(0, "train", frames=1.5)


def test_distractors_put_one_unknown_word_in_a_statement_never_next_to_the_value():
    from rxt.data.dialogues import PARAPHRASES, SMALL_TALK, distract, split_templates

    assert DialogueGenerator(0, "train", distractors=0.0).take(50) == DialogueGenerator(0, "train").take(50)
    statements = {t for f in FACTS for t in split_templates(f.statements + f.updates, "train") + list(PARAPHRASES[f.slot])}
    heldout_words = {w.lower() for t in heldout_only_templates() for w in re.findall(r"[A-Za-z']+", t)}
    rng = random.Random(0)
    for template in sorted(statements):
        for _ in range(5):
            out = distract(rng, template)
            words, base = out.split(" "), template.split(" ")
            if out == template:  # only where every gap touches the value ("{v} here.")
                assert all("{v}" in base[k - 1] or "{v}" in base[k] for k in range(1, len(base)))
                continue
            assert len(words) == len(base) + 1
            k = next(i for i, (a, b) in enumerate(zip(words, base + [""], strict=True)) if a != b)
            assert words[:k] + words[k + 1:] == base and 0 < k < len(base)  # between two words
            assert "{v}" not in words[k - 1] + words[k + 1]  # never next to the value
            assert words[k].isalpha() and words[k].islower() and words[k] not in heldout_words
    plain = [_pattern(t) for t in statements]
    others = [_pattern(t) for f in FACTS for t in split_templates(f.questions, "train")]
    others += [_pattern(q) for q, _ in SMALL_TALK if not q.startswith("*")]
    queries = [t.query for d in DialogueGenerator(0, "train", distractors=1.0).take(100) for t in d.turns]
    said = [q for q in queries if not any(p.match(q) for p in others)]  # the statements
    as_templated = sum(any(p.match(q) for p in plain) for q in said)
    assert len(said) > 100 and as_templated < 0.15 * len(said)  # all but the gapless ones carry a distractor
    with pytest.raises(ValueError, match="distractors"):
        DialogueGenerator(0, "heldout", distractors=0.5)  # held-out phrasings stay what they are
    with pytest.raises(ValueError, match="distractors"):
        DialogueGenerator(0, "train", distractors=2.0)
    assert DialogueGenerator(0, "train", distractors=0.4).shorter(4).distractors == 0.4


def test_paraphrases_tell_facts_in_training_only_phrasings():
    from rxt.data.dialogues import PARAPHRASES, SMALL_TALK, split_templates

    assert DialogueGenerator(0, "train", paraphrases=0.0).take(50) == DialogueGenerator(0, "train").take(50)
    assert set(PARAPHRASES) == {f.slot for f in FACTS}
    heldout = heldout_only_templates()
    for f in FACTS:
        assert not set(PARAPHRASES[f.slot]) & (heldout | set(f.statements))  # new, and never a held-out one
    def capture(template: str) -> re.Pattern:
        return re.compile("^" + re.escape(template).replace(re.escape("{v}"), "(.+)") + "$")

    paraphrased = {f.slot: [capture(t) for t in PARAPHRASES[f.slot]] for f in FACTS}
    updates = {f.slot: [capture(t) for t in split_templates(f.updates, "train")] for f in FACTS}
    others = [_pattern(t) for f in FACTS for t in split_templates(f.questions, "train")]
    others += [_pattern(q) for q, _ in SMALL_TALK if not q.startswith("*")]
    seen: set[str] = set()
    for d in DialogueGenerator(0, "train", paraphrases=1.0).take(200):
        told: dict[str, str] = {}
        for turn in d.turns:
            assert turn.check or any(p.match(turn.query) for ps in [others, *paraphrased.values(), *updates.values()]
                                     for p in ps), turn.query  # a statement in a base phrasing: not paraphrased
            for f in FACTS:  # every statement is a paraphrase of its fact, every update an update
                for p in paraphrased[f.slot] + updates[f.slot]:
                    m = p.match(turn.query)
                    if m:
                        told[f.slot] = m.group(1)
                        seen.add(p.pattern)
            if turn.check:  # and the answer is the value told last
                assert told[turn.check["slot"]] == turn.check["value"] and turn.check["value"] in turn.answer
    assert len(seen & {p.pattern for ps in paraphrased.values() for p in ps}) > 60  # most of the 70 were drawn
    assert seen & {p.pattern for ps in updates.values() for p in ps}  # and updates keep their own phrasings
    some = [t.query for d in DialogueGenerator(0, "train", paraphrases=0.5).take(400) for t in d.turns]
    told = [q for q in some if any(p.match(q) for f in FACTS for p in [_pattern(t) for t in f.statements
                                                                          if not t.startswith("*")])]
    new = [q for q in some if any(p.match(q) for ps in paraphrased.values() for p in ps)]
    assert 0.4 < len(new) / (len(new) + len(told)) < 0.6
    assert DialogueGenerator(0, "train", paraphrases=0.5).shorter(4).paraphrases == 0.5
    with pytest.raises(ValueError, match="paraphrases"):
        DialogueGenerator(0, "heldout", paraphrases=0.5)  # held-out phrasings stay what they are
    with pytest.raises(ValueError, match="paraphrases"):
        DialogueGenerator(0, "train", paraphrases=-0.5)


@pytest.mark.parametrize("split, share", [("heldout", 0.5), ("train", 1.5), ("train", -0.1)])
def test_fresh_values_reject_bad_settings(split, share):
    with pytest.raises(ValueError, match="fresh_values"):
        DialogueGenerator(0, split, fresh_values=share)


def test_facts_per_dialogue_sets_how_many_facts_are_told_and_asked():
    def asked(generator: DialogueGenerator) -> list[int]:
        return [sum(1 for t in d.turns if t.check) for d in generator.take(200)]

    few, many = asked(DialogueGenerator(0, "train", facts_per_dialogue=(1, 1))), asked(DialogueGenerator(0, "train", facts_per_dialogue=(6, 8)))
    assert set(few) == {1} and max(many) >= 6 and sum(many) > 4 * sum(few)
    with pytest.raises(ValueError, match="facts_per_dialogue"):
        DialogueGenerator(0, "train", facts_per_dialogue=(0, 3))


@pytest.mark.skipif(corpus_directory() is None, reason="chatterbot-corpus not installed")
def test_corpus_pairs():
    pairs = conversation_pairs()
    assert len(pairs) > 500
    assert all(isinstance(q, str) and isinstance(a, str) and q and a for q, a in pairs)


def test_dialogue_list_wraps_and_truncates(tmp_path):
    from rxt.data.jsonl import DialogueList

    dialogues = DialogueGenerator(2, "train", min_turns=5, max_turns=8).take(3)
    write_dialogues(tmp_path / "d.jsonl", dialogues)
    listed = DialogueList.read(tmp_path / "d.jsonl")
    assert len(listed) == 3 and listed[4] == dialogues[1] and listed.take(2, start=2) == [dialogues[2], dialogues[0]]
    short = listed.shorter(2)
    assert [len(d.turns) for d in short.take(3)] == [2, 2, 2] and short[0].turns == dialogues[0].turns[:2]
    with pytest.raises(ValueError, match="no dialogues"):
        DialogueList([], name="empty.jsonl")


def test_shorter_dialogues_keep_the_generator_settings():
    generator = DialogueGenerator(0, "train", fresh_values=0.5)
    short = generator.shorter(4)
    same = DialogueGenerator(0, "train", min_turns=4, max_turns=4, max_distance=3, fresh_values=0.5)
    assert short.take(20) == same.take(20)
    assert all(len(d.turns) <= 4 and all(t.check["distance"] <= 3 for t in d.turns if t.check) for d in short.take(50))


def test_copy_turns_are_deterministic_unpredictable_and_never_held_out():
    from rxt.data.dialogues import copy_turn

    turns = [copy_turn(i) for i in range(300)]
    assert turns == [copy_turn(i) for i in range(300)] and copy_turn(5, seed=1) != copy_turn(5)
    words = [w.rstrip(".") for t in turns for w in t.query.split()]
    assert all(2 <= len(t.query.split()) <= 6 for t in turns)
    assert not {w.lower() for w in words} & HELDOUT_WORDS
    assert len({t.query for t in turns}) == len(turns)  # no two drills alike: only copying predicts them


def test_abstain_asks_about_a_fact_never_told():
    from rxt.data.dialogues import NOT_TOLD_ANSWERS, DialogueGenerator

    shape = dict(min_turns=6, max_turns=10, facts_per_dialogue=(1, 2))
    plain, asking = DialogueGenerator(seed=3, **shape), DialogueGenerator(seed=3, abstain=1.0, **shape)
    unknown = 0
    for i in range(40):
        a, b = plain[i], asking[i]
        extra = [t for t in b.turns if t.answer in NOT_TOLD_ANSWERS]
        assert len(extra) <= 1 and len(a.turns) == len(b.turns)
        for turn in extra:
            unknown += 1
            told = {t.check["slot"] for t in b.turns if t.check and t.check["value"]}
            assert turn.check["slot"] not in told and turn.check["value"] == ""
    assert unknown >= 30
    with pytest.raises(ValueError, match="abstain is a probability for the train split"):
        DialogueGenerator(split="heldout", abstain=0.5)
