"""`rxt eval perplexity` and the recipe options for real data: prose in stage 1, dialogue files cut
to size, and a stateless baseline with its own size."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from rxt import ModelConfig, ReactiveTransformer, StatelessLM
from rxt.baselines import StatelessEngine
from rxt.cli import main
from rxt.data.corpus import text_chunks
from rxt.data.dialogues import Dialogue, Turn, generate_dialogues
from rxt.data.jsonl import DialogueList, clip, write_dialogues
from rxt.engine import ReactiveEngine
from rxt.evaluation.perplexity import evaluate_perplexity
from rxt.tokenizer import Tokenizer
from rxt.training.recipe import load_recipe


@pytest.fixture(scope="module")
def tokenizer():
    texts = [x for d in generate_dialogues(60) for t in d.turns for x in (t.query, t.answer)]
    return Tokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope="module")
def engines(tokenizer):
    config = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    rxt, base = ReactiveTransformer(config), StatelessLM(config)
    return {"rxt": ReactiveEngine(rxt, tokenizer), "stateless": StatelessEngine(base, tokenizer),
            "current_turn": StatelessEngine(base, tokenizer, mode="current"),
            "window": StatelessEngine(base, tokenizer, mode="window")}


def test_perplexity_by_turn_matches_a_manual_teacher_forced_loss(engines, tokenizer):
    dialogues = generate_dialogues(3, seed=5, split="heldout")
    report = evaluate_perplexity(engines, dialogues, batch_size=2, progress=False).to_dict()
    turns = max(len(d.turns) for d in dialogues)
    assert set(report["by_turn"]) == {str(t) for t in range(1, turns + 1)}
    assert report["dialogues_by_turn"]["1"] == 3
    # turn 1 of the full-history model: nothing before it, so it equals the current-turn model
    assert report["by_turn"]["1"]["stateless"] == pytest.approx(report["by_turn"]["1"]["current_turn"], rel=1e-5)
    # the stateless model's turn-2 perplexity, recomputed by hand from one sequence per dialogue
    model = engines["stateless"].model
    nll, count = 0.0, 0
    for d in dialogues:
        first = tokenizer.interaction(d.turns[0].query, d.turns[0].answer)
        prompt = tokenizer.prompt(d.turns[1].query)
        target = tokenizer.answer(d.turns[1].answer) + [tokenizer.end_id]
        ids = torch.tensor([tokenizer.preamble() + first + prompt + target])
        with torch.no_grad():
            logprobs = model.decode(ids).float().log_softmax(-1)[0]
        picked = logprobs[-len(target) - 1 : -1].gather(1, torch.tensor(target)[:, None])
        nll -= float(picked.sum())
        count += len(target)
    assert report["by_turn"]["2"]["stateless"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # costs: the re-reading model reads the most, the RxT's state stays one size
    tokens = report["tokens_processed"]
    assert tokens["current_turn"] < tokens["window"] < tokens["stateless"]
    assert tokens["rxt"] == 2 * tokens["current_turn"]
    sizes = {sizes["rxt"] for sizes in report["state_bytes_by_turn"].values()}
    assert len(sizes) == 1 and report["state_bytes"]["stateless"] > report["state_bytes"]["window"]
    through = report["tokens_processed_through_turn"]
    assert through[str(turns)]["stateless"] == tokens["stateless"]
    json.dumps(report)


def test_eval_perplexity_cli(tmp_path, engines, capsys):
    engines["rxt"].model.tokenizer = engines["stateless"].model.tokenizer = engines["rxt"].tokenizer
    engines["rxt"].model.save_pretrained(tmp_path / "rxt")
    engines["stateless"].model.save_pretrained(tmp_path / "baseline")
    data = tmp_path / "dialogues.jsonl"
    write_dialogues(data, generate_dialogues(4, seed=2, split="heldout"))
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", str(tmp_path / "rxt"), "--baseline", str(tmp_path / "baseline"),
                 "--data", str(data), "--max-turns", "3", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert set(report["by_turn"]) == {"1", "2", "3"}
    assert set(report["params"]) == {"rxt", "stateless", "current_turn", "window", "rxt_no_memory"}
    # wiping the memory before each turn: turn 1 is the same, the encoder's reading is not counted
    assert report["by_turn"]["1"]["rxt_no_memory"] == pytest.approx(report["by_turn"]["1"]["rxt"], rel=1e-5)
    assert report["by_turn"]["3"]["rxt_no_memory"] != pytest.approx(report["by_turn"]["3"]["rxt"], rel=1e-5)
    assert report["tokens_processed"]["rxt"] == 2 * report["tokens_processed"]["rxt_no_memory"]
    assert "8+" in capsys.readouterr().out
    assert main(["eval", "perplexity", "--model", str(tmp_path / "rxt"), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert main(["eval", "perplexity", "--model", str(tmp_path / "rxt"), "--data", str(data),
                 "--json", str(tmp_path / "no" / "dir.json")]) == 2


def test_clip_cuts_turns_and_messages_and_drops_checks_whose_value_was_cut():
    dialogue = Dialogue("d", [Turn("My name is Ada.", "Hi Ada!"), Turn("What is my name?", "Your name is Ada.",
                                                                         {"slot": "name", "value": "Ada", "distance": 1}),
                              Turn("third", "turn")])
    (cut,) = clip([dialogue], max_turns=2, max_chars=8)
    assert [(t.query, t.answer) for t in cut.turns] == [("My name", "Hi Ada!"), ("What is", "Your nam")]
    assert cut.turns[1].check is None
    assert clip([dialogue]) == [dialogue]


def test_text_chunks_cut_each_file_into_word_windows(tmp_path):
    (tmp_path / "a.txt").write_text("one two three\nfour five\n")
    (tmp_path / "b.txt").write_text("six\n")
    assert text_chunks([tmp_path / "a.txt", tmp_path / "b.txt"], 2) == ["one two", "three four", "five", "six"]


def test_recipe_trains_on_prose_and_dialogue_files_with_a_larger_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "book.txt").write_text("It was a bright cold day in April, and the clocks were striking.\n" * 30)
    long_turns = [Turn(f"message number {i} " * 20, f"reply {i}") for i in range(12)]
    write_dialogues(tmp_path / "train.jsonl", [Dialogue(f"c{i}", long_turns) for i in range(6)])
    recipe = yaml.safe_load(open(_tiny_recipe()).read())
    recipe["data"].update(train_file="train.jsonl", heldout_file="train.jsonl", file_max_turns=4, file_max_chars=60,
                          text_files=["prose/*.txt"], text_chunk_words=8)
    recipe["model"]["baseline_overrides"] = {"n_layers": 4}
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(recipe))
    from rxt.training.pipeline import RecipeRun

    run = RecipeRun(load_recipe(tmp_path / "real.yaml"), tmp_path / "out", progress=False)
    assert all(len(d.turns) == 4 and len(d.turns[0].query) <= 60 for d in run.train_dialogues.dialogues)
    assert run.texts[0] == "It was a bright cold day in April,"
    trainer = run.trainer("joint_lm", run.build_models()[0])
    rows = []
    for step in range(6):
        batch = trainer.make_batch(step, 0, 0, 1).data
        rows += [run.tokenizer.decode(ids[mask].tolist()) for ids, mask in zip(batch["ids"], batch["mask"], strict=True)]
    assert any(row.strip() in run.texts for row in rows)  # stage 1 reads prose ...
    assert any("message number" in row for row in rows)  # ... and dialogue turns
    rxt, baseline = run.build_models()
    assert baseline.config.n_layers == 4 and rxt.config.n_layers == 2
    lm = run.trainer("baseline_lm", baseline).make_batch(0, 0, 0, 1).data  # the baseline reads the prose too
    rows = [run.tokenizer.decode(ids[mask].tolist()) for ids, mask in zip(lm["ids"], lm["mask"], strict=True)]
    assert any(row.strip() in run.texts for row in rows)
    assert bool(((lm["labels"] != -100) == lm["mask"]).all())  # every real token is a target
    recipe["data"]["text_files"] = ["missing/*.txt"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(FileNotFoundError, match="nothing matches 'missing/\\*.txt'"):
        load_recipe(tmp_path / "bad.yaml")


def _tiny_recipe():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def test_dialogue_list_read_applies_the_cut(tmp_path):
    write_dialogues(tmp_path / "d.jsonl", [Dialogue("x", [Turn("a b c d", "e")] * 5)])
    assert len(DialogueList.read(tmp_path / "d.jsonl", max_turns=3)[0].turns) == 3


def test_the_baseline_learns_the_text_in_its_own_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_text("the cat sat on the mat and the dog sat on the log\n" * 40)
    recipe = yaml.safe_load(open(_tiny_recipe()).read())
    recipe["data"].update(text_files=["book.txt"], text_chunk_words=12)
    recipe["stages"] = {"baseline_lm": {"steps": 60, "batch_size": 8, "lr": 1.0e-2, "warmup_steps": 1},
                        "baseline": {"steps": 2, "batch_size": 2, "lr": 1.0e-3, "warmup_steps": 1}}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(recipe))
    from rxt.training.pipeline import RecipeRun

    summary = RecipeRun(load_recipe(tmp_path / "lm.yaml"), tmp_path / "out", progress=False).run("baseline")
    log = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    lm = [r["loss"] for r in log if r["stage"] == "baseline_lm"]
    assert lm[-1] < 0.5 * lm[0]
    assert summary["tokens"]["baseline"] == sum(max(r["tokens_seen"] for r in log if r["stage"] == s)
                                                for s in ("baseline_lm", "baseline"))
