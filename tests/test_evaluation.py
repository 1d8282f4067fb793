"""Recall evaluation: scoring rules, report schema, and the engines' teacher-forced helpers."""

import json
import re

import pytest
import torch

from rxt import ModelConfig, ReactiveTransformer, StatelessLM
from rxt.baselines import StatelessEngine
from rxt.data.dialogues import Dialogue, Turn, generate_dialogues
from rxt.data.jsonl import write_dialogues
from rxt.engine import ReactiveEngine
from rxt.evaluation.recall import evaluate_recall, is_correct
from rxt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engines():
    texts = [x for d in generate_dialogues(100) for t in d.turns for x in (t.query, t.answer)]
    tokenizer = Tokenizer.train(texts, vocab_size=400)
    config = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    rxt, base = ReactiveTransformer(config), StatelessLM(config)
    return {
        "rxt": ReactiveEngine(rxt, tokenizer),
        "stateless": StatelessEngine(base, tokenizer),
        "current_turn": StatelessEngine(base, tokenizer, mode="current"),
        "window": StatelessEngine(base, tokenizer, mode="window"),
    }


def test_is_correct_matches_whole_words_only():
    assert is_correct("Your name is Ada.", "ada")
    assert not is_correct("Your name is Adam.", "Ada")
    assert is_correct("You are 42 years old", "42") and not is_correct("You are 142", "42")


def test_report_counts_every_question_and_tokens_follow_the_cost_model(engines):
    dialogues = generate_dialogues(4, seed=3, split="heldout")
    report = evaluate_recall(engines, dialogues, batch_size=2, max_new_tokens=4, progress=False).to_dict()
    asked = sum(1 for d in dialogues for t in d.turns if t.check)
    assert sum(report["questions_by_distance"].values()) == asked
    slots = {t.check["slot"] for d in dialogues for t in d.turns if t.check}
    assert set(report["by_slot"]) == slots and sum(report["questions_by_slot"].values()) == asked
    for model in engines:  # the slots split the same hits as the distances do
        right = sum(report["by_slot"][s][model] * report["questions_by_slot"][s] for s in slots)
        assert right == pytest.approx(report["overall"][model] * asked)
    assert set(report["perplexity"]) == set(engines)
    tokens = report["tokens_processed"]
    assert tokens["current_turn"] < tokens["window"] < tokens["stateless"]  # history re-read costs
    assert tokens["rxt"] == 2 * tokens["current_turn"]  # decoder + memory encoder read each turn once
    json.dumps(report)


def test_distance_ranges_add_up_the_distances_in_them(capsys):
    from rxt.evaluation.recall import RecallReport, print_table

    report = RecallReport()
    for distance, asked, right in ((1, 10, 9), (4, 10, 5), (6, 5, 5), (12, 4, 0), (20, 2, 1), (70, 1, 0)):
        report.asked[distance], report.hits["rxt"][distance] = asked, right
    report.nll["rxt"], report.scored_tokens["rxt"], report.tokens_processed["rxt"] = 1.0, 1, 1
    data = report.to_dict()
    assert data["questions_by_distance_range"] == {"1-4": 20, "5-8": 5, "9-16": 4, "17-32": 2, "65+": 1}
    assert data["by_distance_range"] == {"1-4": {"rxt": 0.7}, "5-8": {"rxt": 1.0}, "9-16": {"rxt": 0.0},
                                         "17-32": {"rxt": 0.5}, "65+": {"rxt": 0.0}}
    print_table(report)
    assert re.search(r"^\s+1-4\s+20\s+70\.0%$", capsys.readouterr().out, flags=re.MULTILINE)
    del report.asked[20], report.hits["rxt"][20]
    assert "17-32" not in report.to_dict()["by_distance_range"]  # only spans some question falls in


def test_score_matches_a_manual_teacher_forced_loss(engines):
    engine = engines["rxt"]
    session = engine.new_session()
    (nll, count), = engine.score([session], ["What is my name?"], ["Your name is Ada."])
    tok = engine.tokenizer
    ids = tok.interaction("What is my name?", "Your name is Ada.")
    logits = engine.model.decode(torch.tensor([ids]), stm=session.tensors["stm"]).log_softmax(-1)[0]
    n_prompt = len(tok.prompt("What is my name?"))
    targets = torch.tensor(ids[n_prompt:])
    manual = -logits[n_prompt - 1 : -1].gather(1, targets[:, None]).sum()
    assert count == len(targets)
    torch.testing.assert_close(torch.tensor(nll), manual, rtol=1e-4, atol=1e-4)


def test_answering_without_remembering_leaves_the_session_as_it_was(engines):
    engine = engines["rxt"]
    session = engine.new_session()
    engine.observe([session], ["Hi, my name is Ada."], ["Nice to meet you, Ada."])
    session.wait()
    before = session.tensors["stm"].clone()
    engine.interact_batch([session], ["What is my name?"], remember=False)
    session.wait()
    assert session.turns == 1 and torch.equal(before, session.tensors["stm"])


@pytest.mark.parametrize("values", ["heldout", "fresh-syllables"])
def test_eval_cli_draws_the_values_asked_for(engines, tmp_path, values):
    from rxt.cli import main
    from rxt.data.dialogues import POOLS, split_pool

    engine = engines["rxt"]
    engine.model.tokenizer = engine.tokenizer
    engine.model.save_pretrained(tmp_path / "rxt")
    out = tmp_path / "report.json"
    argv = ["eval", "recall", "--model", str(tmp_path / "rxt"), "--split", "train", "--values", values,
            "--dialogues", "6", "--max-new-tokens", "2", "--json", str(out)]
    assert main(argv) == 0
    asked = [e["value"] for e in json.loads(out.read_text())["examples"]]
    held = {v for pool in POOLS.values() for v in split_pool(pool, "heldout")}
    train = {v for pool in POOLS.values() for v in split_pool(pool, "train")}
    assert asked
    if values == "heldout":  # training phrasings, held-out values
        assert set(asked) <= held
    else:  # invented words (ages still come from the training pool)
        assert not set(asked) & held and [v for v in asked if v not in train]


def test_eval_cli_writes_every_wrong_answer_with_the_statement_it_asks_about(engines, tmp_path):
    from rxt.cli import main

    engine = engines["rxt"]
    engine.model.tokenizer = engine.tokenizer
    engine.model.save_pretrained(tmp_path / "rxt")
    out, mistakes = tmp_path / "report.json", tmp_path / "wrong.jsonl"
    argv = ["eval", "recall", "--model", str(tmp_path / "rxt"), "--dialogues", "16", "--max-new-tokens", "3",
            "--json", str(out), "--mistakes", str(mistakes)]
    assert main(argv) == 0
    wrong = [json.loads(line) for line in mistakes.read_text().splitlines()]
    report = json.loads(out.read_text())
    assert len(wrong) == report["wrong_answers"]["rxt"]["wrong"] > 20  # all of them, not the 20 examples
    dialogues = generate_dialogues(16, seed=1234, split="heldout")
    told = {(t.query, t.check["value"]): d.turns[i - t.check["distance"]]
            for d in dialogues for i, t in enumerate(d.turns) if t.check}
    for m in wrong:
        assert not m["correct"] and m["model"] == "rxt" and not is_correct(m["answer"], m["value"])
        statement = told[m["query"], m["value"]]
        assert m["value"] in m["told"] and (m["told"], m["told_answer"]) == (statement.query, statement.answer)
    assert main(argv[:-1] + [str(tmp_path / "no" / "wrong.jsonl")]) == 2  # refused before the run


def test_eval_cli_makes_dialogues_of_the_length_asked_for(engines, tmp_path, capsys):
    from rxt.cli import main

    engine = engines["rxt"]
    engine.model.tokenizer = engine.tokenizer
    engine.model.save_pretrained(tmp_path / "rxt")
    out = tmp_path / "report.json"
    argv = ["eval", "recall", "--model", str(tmp_path / "rxt"), "--turns", "2", "2", "--dialogues", "5",
            "--max-new-tokens", "2", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["by_distance"] and set(report["by_distance"]) == {"1"}  # a fact, then its question
    assert len(report["examples"]) == 5
    assert main(argv[:4] + ["--turns", "5", "3"]) == 2
    assert "min_turns <= max_turns" in capsys.readouterr().err
    for option in ("--dialogues", "--batch-size"):
        assert main(argv[:4] + [option, "0"]) == 2
        assert f"{option} must be >= 1, got 0" in capsys.readouterr().err
    assert main(argv[:4] + ["--threads", "-1"]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err
    chat = tmp_path / "chat.jsonl"  # dialogues without a recall question: nothing to score
    write_dialogues(chat, [Dialogue("a", [Turn("Hi!", "Hello."), Turn("How are you?", "Fine.")])])
    assert main(argv[:4] + ["--data", str(chat)]) == 2
    assert "no turn asks a recall question" in capsys.readouterr().err


def test_gate_statistics_tell_content_blind_gates_from_content_gates(engines):
    from rxt.evaluation.gates import gate_statistics

    tokenizer, dialogues = engines["rxt"].tokenizer, generate_dialogues(3, split="heldout", max_turns=8)
    stats = {}
    for mode in ("static", "content"):
        torch.manual_seed(0)
        model = ReactiveTransformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, gate_mode=mode))
        with torch.no_grad():
            for parameter in model.memory_attention.parameters():
                parameter.normal_(0.0, 0.5)  # gates away from their start, so the slots differ
        model.tokenizer = tokenizer
        stats[mode] = gate_statistics(model, dialogues)
        assert len(stats[mode]) == model.config.n_layers
    for layer in stats["static"]:  # one G per slot, whatever the turn says
        assert 0 < layer["mean"] < 1 and layer["across_slots"] > 0.01
        assert layer["across_turns"] < 1e-6 and abs(layer["told"] - layer["other"]) < 1e-6
        assert len(layer["slots"]) == 8 and abs(sum(layer["slots"]) / 8 - layer["mean"]) < 1e-3
    assert all(layer["across_turns"] > 0.01 for layer in stats["content"])
    torch.manual_seed(0)  # competitive writes: a static gate, scaled by the share of the turn each slot took
    model = ReactiveTransformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, gate_mode="static",
                                                      memory_write="competitive"))
    model.tokenizer = tokenizer
    assert all(layer["across_turns"] > 0.01 for layer in gate_statistics(model, dialogues))
    queue = ReactiveTransformer(ModelConfig.from_name("tiny", memory_write="queue", write_slots=2))
    with pytest.raises(ValueError, match="no gates"):
        gate_statistics(queue, dialogues)


def test_eval_gates_cli(engines, tmp_path, capsys):
    from rxt.cli import main

    engine = engines["rxt"]
    engine.model.tokenizer = engine.tokenizer
    engine.model.save_pretrained(tmp_path / "rxt")
    out = tmp_path / "gates.json"
    assert main(["eval", "gates", "--model", str(tmp_path / "rxt"), "--dialogues", "2", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) == engine.model.config.n_layers
    assert "across turns" in capsys.readouterr().out
    assert main(["eval", "gates", "--model", str(tmp_path / "rxt"), "--dialogues", "0"]) == 2
    assert "--dialogues must be >= 1" in capsys.readouterr().err
    assert main(["eval", "gates", "--model", str(tmp_path / "nowhere")]) == 2


def test_wrong_answers_naming_another_fact_of_the_dialogue_are_counted_apart(engines):
    from types import SimpleNamespace

    from rxt.data.dialogues import Dialogue, Turn

    class Scripted:  # the tiny RxT, answering every question from a script
        def __init__(self, engine, script: dict[str, str]):
            self.engine, self.script = engine, script

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def interact_batch(self, sessions, queries, sampling=None, remember=True):
            return [SimpleNamespace(text=self.script[q]) for q in queries]

    dialogue = Dialogue("d", [
        Turn("My name is Ada.", "Hi Ada."),
        Turn("I live in Oslo.", "Oslo is lovely."),
        Turn("What is my name?", "You are Ada.", {"slot": "user_name", "value": "Ada", "distance": 2}),
        Turn("Where do I live?", "In Oslo.", {"slot": "city", "value": "Oslo", "distance": 2}),
    ])
    scripted = {
        "confused": Scripted(engines["rxt"], {"What is my name?": "You are Oslo.", "Where do I live?": "In Lima."}),
        "right": Scripted(engines["rxt"], {"What is my name?": "You are ada!", "Where do I live?": "In Oslo."}),
    }
    report = evaluate_recall(scripted, [dialogue], progress=False).to_dict()
    assert report["wrong_answers"] == {"confused": {"wrong": 2, "another_fact": 1}, "right": {"wrong": 0, "another_fact": 0}}


def test_recall_is_split_by_whether_the_fact_was_told_or_asked_in_a_new_phrasing(engines):
    from types import SimpleNamespace

    from rxt.data.dialogues import Dialogue, Turn, new_phrasing, new_template

    assert new_phrasing("My town is Oslo.") and new_phrasing("Who is my sister?")
    assert new_template("Bo is my little sister.") == "{v} is my little sister." and not new_template("I live in Oslo.")
    assert not new_phrasing("I live in Oslo.") and not new_phrasing("Where is my home?")

    class Knows:  # the tiny RxT, answering right only when the fact was told in a training phrasing
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def interact_batch(self, sessions, queries, sampling=None, remember=True):
            return [SimpleNamespace(text="You live in Oslo." if q == "Where do I live?" else "No idea.")
                    for q in queries]

    ask = {"slot": "city", "value": "Oslo", "distance": 1}
    dialogues = [Dialogue("seen", [Turn("I live in Oslo.", "Nice."), Turn("Where do I live?", "Oslo.", ask)]),
                 Dialogue("told", [Turn("My town is Oslo.", "Nice."), Turn("Where do I live?", "Oslo.", ask)]),
                 Dialogue("both", [Turn("My town is Oslo.", "Nice."),
                                   Turn("What city did I say I live in?", "Oslo.", ask)])]
    report = evaluate_recall({"rxt": Knows(engines["rxt"])}, dialogues, progress=False).to_dict()
    assert report["questions_by_phrasing"] == {"both seen": 1, "told new": 1, "both new": 1}
    assert report["by_phrasing"] == {"both seen": {"rxt": 1.0}, "told new": {"rxt": 1.0}, "both new": {"rxt": 0.0}}
    assert report["by_new_statement"] == {"My town is {v}.": {"rxt": 0.5}}  # told in it twice, right once
    assert report["questions_by_new_statement"] == {"My town is {v}.": 2}
    trained = evaluate_recall({"rxt": Knows(engines["rxt"])}, dialogues[:1], progress=False).to_dict()
    assert trained["by_phrasing"] == {} == trained["by_new_statement"]  # nothing new to tell apart
    held = generate_dialogues(6, seed=3, split="heldout")
    report = evaluate_recall({"rxt": engines["rxt"]}, held, max_new_tokens=2, progress=False).to_dict()
    assert sum(report["questions_by_phrasing"].values()) == sum(1 for d in held for t in d.turns if t.check)


def test_history_own_keeps_each_models_answers_instead_of_the_references(engines):
    from types import SimpleNamespace

    class Parrot:  # the tiny RxT, answering a question with the last answer its history kept
        def __init__(self, engine):
            self.engine, self.kept = engine, {}

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def interact_batch(self, sessions, queries, sampling=None, remember=True):
            return [SimpleNamespace(text=self.kept.get(id(s), "") if q.endswith("?") else "Noted.")
                    for s, q in zip(sessions, queries, strict=True)]

        def observe(self, sessions, queries, answers):
            self.kept.update({id(s): a for s, a in zip(sessions, answers, strict=True)})
            self.engine.observe(sessions, queries, answers)

    dialogue = Dialogue("d", [Turn("My name is Ada.", "Hi Ada."),
                              Turn("What is my name?", "You are Ada.", {"slot": "user_name", "value": "Ada", "distance": 1})])
    reference = evaluate_recall({"rxt": Parrot(engines["rxt"])}, [dialogue], progress=False).to_dict()
    own = evaluate_recall({"rxt": Parrot(engines["rxt"])}, [dialogue], progress=False, history="own").to_dict()
    assert (reference["overall"], reference["history"]) == ({"rxt": 1.0}, "reference")  # kept "Hi Ada."
    assert (own["overall"], own["history"]) == ({"rxt": 0.0}, "own")  # kept its own "Noted."
    assert [x["told_answer"] for x in reference["examples"] + own["examples"]] == ["Hi Ada.", "Noted."]
    held = generate_dialogues(3, seed=5, split="heldout")
    report = evaluate_recall(engines, held, max_new_tokens=2, progress=False, history="own").to_dict()
    assert sum(report["questions_by_distance"].values()) == sum(1 for d in held for t in d.turns if t.check)
    with pytest.raises(ValueError, match="history must be one of"):
        evaluate_recall(engines, held, progress=False, history="mine")
