"""The memory suite (`rxt eval memory`): its dialogues, its scoring rules, its report, its frozen words."""

import json
import re

import pytest

from rxt.evaluation.memory import converse, outcome
from rxt.evaluation.memory_tasks import (
    DISTANCES,
    HALVES,
    TASKS,
    Question,
    Suite,
    _check,
    build_dialogues,
    half_sha256,
    load_suite,
    sentences,
)
from rxt.evaluation.recall import is_correct
from rxt.generation import SamplingConfig
from rxt.model import ReactiveTransformer, StatelessLM

# The held-out half as frozen on 2026-12-02. A failing test here means the frozen words were edited:
# that changes what every figure measured on it means. Leave the half as it is; if an edit is truly
# meant, change this hash in the same commit and say why.
HELDOUT_SHA256 = "49d222ebe9a8ce4549bda53adc8798bd7814d8aeb690a777c1c1bbdf73501b78"


@pytest.fixture(scope="module")
def suite() -> Suite:
    return load_suite("heldout")


def test_the_heldout_half_is_frozen():
    assert half_sha256("heldout") == HELDOUT_SHA256


def test_no_heldout_sentence_is_one_of_the_training_generators():
    from rxt.data.dialogues import CLOSERS, OPENERS
    from rxt.data.phrasings import FACTS, PARAPHRASES, SMALL_TALK

    def norm(text: str) -> str:
        return " ".join(text.lstrip("*").lower().split())

    generator = {norm(t) for f in FACTS for part in (f.statements, f.updates, f.questions, f.answers, f.acks)
                 for t in part}
    generator |= {norm(t) for templates in PARAPHRASES.values() for t in templates}
    generator |= {norm(q) for q, _ in SMALL_TALK} | {norm(a) for _, answers in SMALL_TALK for a in answers}
    generator |= {norm(x) for x in OPENERS + CLOSERS}
    for half in HALVES:
        shared = {s for s in sentences(load_suite(half)) if norm(s) in generator}
        assert not shared, f"{half} half uses the generator's sentences {shared}"


def test_the_halves_share_no_sentence_and_no_value_and_no_value_is_a_training_value():
    from rxt.data.dialogues import POOLS

    dev, heldout = load_suite("dev"), load_suite("heldout")
    assert set(sentences(dev)) & set(sentences(heldout)) <= set(heldout.not_told)  # the same forms score both
    assert not {v.lower() for v in dev.all_values()} & {v.lower() for v in heldout.all_values()}
    generator = {v.lower() for pool in POOLS.values() for v in pool}
    for half in (dev, heldout):
        assert not {v.lower() for v in half.all_values()} & generator


def test_no_sentence_names_a_value(suite):
    # a value in small talk or a template would be scored as told, or as the answer
    for half in HALVES:
        words = load_suite(half)
        for value in words.all_values():
            assert not [s for s in sentences(words) if is_correct(s, value)], value


def test_a_broken_suite_is_refused(suite):
    words = json.loads(json.dumps(suite.words))
    words["facts"]["home"]["statements"].append("I live somewhere.")
    with pytest.raises(ValueError, match=r"facts\.home\.statements.*placeholders \['v'\]"):
        _check(Suite("heldout", words))
    words = json.loads(json.dumps(suite.words))
    words["values"]["town"]["real"].append("New York")
    with pytest.raises(ValueError, match="not one word"):
        _check(Suite("heldout", words))


def test_dialogues_are_the_same_for_the_same_seed_and_have_every_task_and_distance(suite):
    dialogues = build_dialogues(suite, per_task=2, seed=7)
    assert dialogues == build_dialogues(suite, per_task=2, seed=7)
    far = build_dialogues(suite, ("single",), per_task=2, seed=7, min_distance=24)
    assert far and far == [d for d in dialogues if d.task == "single" and d.distance >= 24]  # the same, fewer
    with pytest.raises(ValueError, match="min_distance 32 is above"):
        build_dialogues(suite, ("single",), min_distance=32, max_distance=8)
    assert [d.turns for d in dialogues] != [d.turns for d in build_dialogues(suite, per_task=2, seed=8)]
    for task in TASKS:
        mine = [d for d in dialogues if d.task == task]
        assert sorted({d.distance for d in mine}) == list(DISTANCES[task])
        assert len(mine) == 2 * len(DISTANCES[task])
    for d in dialogues:
        asked = [(t, turn.question) for t, turn in enumerate(d.turns) if turn.question]
        assert asked and asked[-1][0] == len(d.turns) - 1
        for t, question in asked:
            if d.task in ("single", "update", "track"):  # one question, exactly `distance` turns on
                assert question.true_distance == d.distance
            if question.expected is None:  # abstain: nothing of the kind asked for was told
                assert d.task == "abstain" and d.told
                continue
            # the turn `true_distance` back is the one that told the value, and the value was told once
            assert is_correct(d.turns[t - question.true_distance].query, question.expected)
            assert sum(is_correct(x.query, question.expected) for x in d.turns) == 1
            assert question.expected in d.told and question.kind == suite.kind_of(question.expected)
            for old in question.stale:
                assert any(is_correct(x.query, old) for x in d.turns[: t - question.true_distance])


def test_the_tasks_mix_real_and_invented_values_and_their_variants(suite):
    dialogues = build_dialogues(suite, per_task=6)
    for task in ("single", "multi", "update", "mqar", "track"):
        kinds = {turn.question.kind for d in dialogues if d.task == task for turn in d.turns if turn.question}
        assert kinds == {"real", "invented"}, task
    variants = {(d.task, d.variant) for d in dialogues if d.variant}
    assert variants == {("multi", "2 facts"), ("multi", "3 facts"), ("mqar", "2 pairs"), ("mqar", "3 pairs"),
                        ("mqar", "4 pairs"), ("track", "1 supporting fact"), ("track", "2 supporting facts")}
    for d in dialogues:
        if d.task == "mqar":  # every key asked, in another order than told
            told = [v for turn in d.turns if not turn.question for v in d.told if is_correct(turn.query, v)]
            asked = [turn.question.expected for turn in d.turns if turn.question]
            assert sorted(asked) == sorted(told) and asked != told


@pytest.mark.parametrize("answer, expected, stale, told, result", [
    ("You live in Bruges.", "Bruges", (), ("Bruges",), "right"),
    ("you live in bruges", "Bruges", (), ("Bruges",), "right"),
    ("You live in Brugesville.", "Bruges", (), ("Bruges",), "invented"),
    ("You live in Toledo.", "Krakow", ("Toledo",), ("Toledo", "Krakow"), "stale"),
    ("Not Toledo any more: Krakow.", "Krakow", ("Toledo",), ("Toledo", "Krakow"), "right"),
    ("Your name is Agnes.", "Bruges", (), ("Bruges", "Agnes"), "another_fact"),
    ("You haven't told me where you live.", "Bruges", (), ("Bruges",), "abstained"),
    ("That sounds nice.", "Bruges", (), ("Bruges",), "wrong"),
    ("I don't know, you never told me.", None, (), ("Agnes",), "right"),
    ("You haven\u2019t told me that.", None, (), ("Agnes",), "right"),
    ("I'm not sure, maybe Zorblax?", None, (), ("Agnes",), "invented"),
    ("Your neighbour is Zorblax.", None, (), ("Agnes",), "invented"),
    ("Your neighbour is Agnes.", None, (), ("Agnes",), "another_fact"),
    ("That sounds nice.", None, (), ("Agnes",), "wrong"),
])
def test_scoring_rules(suite, answer, expected, stale, told, result):
    question = Question(expected, "real" if expected else None, 3, "home", stale)
    assert outcome(answer, question, "Where do I live now?", told, suite.not_told) == result


def test_a_word_of_the_question_is_not_an_invented_value(suite):
    question = Question("Antwerp", "real", 2, "town")
    assert outcome("Colin lives in Paris.", question, "Where does Colin live?", ("Antwerp",), suite.not_told) \
        == "invented"
    assert outcome("Colin lives there.", question, "Where does Colin live?", ("Antwerp",), suite.not_told) == "wrong"


@pytest.mark.parametrize("kind", ["rxt", "full"])
def test_own_history_keeps_the_models_answers_and_reference_history_the_suites(suite, engine_factory, one_thread,
                                                                               kind):
    engine = engine_factory(kind)
    dialogues = [d for d in build_dialogues(suite, ("update", "multi"), per_task=1) if d.distance == 2]
    sampling = SamplingConfig(max_new_tokens=3)
    own = converse(engine, dialogues, "own", sampling)
    reference = converse(engine, dialogues, "reference", sampling)
    for mine, given, d in zip(own, reference, dialogues, strict=True):
        assert given.kept == [turn.reference for turn in d.turns]
        assert sorted(given.replies) == [t for t, turn in enumerate(d.turns) if turn.question]
        assert sorted(mine.replies) == list(range(len(d.turns)))  # every turn answered ...
        assert mine.kept == [mine.replies[t] for t in range(len(d.turns))]  # ... and its answers kept
        assert mine.kept != given.kept and mine.tokens != given.tokens
        assert given.state_bytes > 0
        for t, read in given.read.items():  # the stateless model re-reads the history, RxT does not
            prompt = len(engine.tokenizer.prompt(d.turns[t].query))
            assert (read > prompt) == (kind == "full") and t in mine.read


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, make_tiny_model):
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(ReactiveTransformer, seed=1).save_pretrained(root / "rxt")
    make_tiny_model(StatelessLM, seed=2).save_pretrained(root / "baseline")
    return root


@pytest.fixture(scope="module")
def cli_report(model_dirs, tmp_path_factory):
    """One run of the command over every task (one dialogue each, two-token answers)."""
    import torch

    from rxt.cli import main

    out = tmp_path_factory.mktemp("report")
    argv = ["eval", "memory", "--model", str(model_dirs / "rxt"), "--baseline", str(model_dirs / "baseline"),
            "--per-task", "1", "--max-new-tokens", "2", "--json", str(out / "memory.json"),
            "--plot", str(out / "memory.png"), "--answers", str(out / "answers.jsonl")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_the_report_has_every_task_distance_and_model(cli_report, suite):
    report = json.loads((cli_report / "memory.json").read_text())
    models = ["rxt", "stateless", "current_turn", "window"]
    assert report["models"] == models and report["settings"]["history"] == "own"
    assert report["suite"] == {"half": "heldout", "sha256": HELDOUT_SHA256,
                               "file": "src/rxt/evaluation/memory_suite.yaml"}
    dialogues = build_dialogues(suite, per_task=1, seed=1234)
    for task in TASKS:
        assert list(report["tasks"][task]) == [str(d) for d in DISTANCES[task]]
        asked = {str(d.distance): sum(1 for t in d.turns if t.question) for d in dialogues if d.task == task}
        assert report["questions"][task] == asked
        for row in report["tasks"][task].values():
            assert set(row) == set(models) and all(0.0 <= x <= 1.0 for x in row.values())
        for model in models:  # every answer has exactly one outcome
            assert sum(report["outcomes"][task][model].values()) == report["questions_overall"][task]
    assert set(report["by_value_kind"]) == set(TASKS) - {"abstain"}
    assert set(report["by_variant"]) == {"multi", "mqar", "track"}
    assert set(report["tokens_processed"]) == set(report["state_bytes"]) == set(models)
    tokens, state = report["tokens_processed"], report["state_bytes"]
    assert tokens["current_turn"] < tokens["window"] < tokens["stateless"]
    assert state["current_turn"] == 0 < state["rxt"] == state["window"] < state["stateless"]
    # the tiny model's max_seq_len is 256: the stateless model reads past it, and says so, not crashing
    assert report["context"]["stateless"]["beyond_max_seq_len"]["single"][-1] == 64
    assert not report["context"]["rxt"]["beyond_max_seq_len"]
    answers = [json.loads(line) for line in (cli_report / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 * sum(report["questions_overall"].values())
    assert (cli_report / "memory.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("change, message", [
    (["--tasks", "single", "recall"], "unknown task"),
    (["--model", "no/such/dir"], "not a model directory"),
    (["--json", "no/such/dir/out.json"], "no such directory"),
    (["--per-task", "0"], "per_task must be >= 1"),
    (["--baseline", "BASE", "--model", "BASE"], "stateless model"),
])
def test_bad_input_is_a_clear_error(model_dirs, capsys, change, message):
    from rxt.cli import main

    argv = ["eval", "memory", "--model", str(model_dirs / "rxt"), *change]
    argv = [str(model_dirs / "baseline") if a == "BASE" else a for a in argv]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_every_sentence_the_training_generator_writes_is_known_to_the_scorer():
    """An answer made only of the training generator's words names no value: its not-told answers too."""
    from rxt.data.dialogues import NOT_TOLD_ANSWERS
    from rxt.evaluation.memory import names_a_value

    assert not any(names_a_value(answer, "How do I earn money?") for answer in NOT_TOLD_ANSWERS)
    assert names_a_value("You earn money as a quillwright.", "How do I earn money?")
