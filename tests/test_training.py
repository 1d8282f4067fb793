import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from rxt.cli import main
from rxt.data.dialogues import DialogueGenerator
from rxt.model import ReactiveTransformer, StatelessLM
from rxt.tokenizer import Tokenizer
from rxt.training.batches import IGNORE, DialogueSource, answer_labels, pad
from rxt.training.pipeline import RecipeRun
from rxt.training.recall import quick_recall
from rxt.training.recipe import load_recipe
from rxt.training.stages import pool_to_slots, token_loss_sum

ROOT = Path(__file__).parent.parent
TINY = Path(__file__).parent.parent / "recipes" / "tiny.yaml"
DDP_STAGES = ("smat", "baseline")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A trained tiny-recipe tokenizer, copied into each run directory (saves re-training it)."""
    out = tmp_path_factory.mktemp("tok")
    RecipeRun(load_recipe(TINY), out, progress=False)
    return out / "tokenizer"


def tiny_run(out: Path, tokenizer_dir: Path, **stage_overrides) -> RecipeRun:
    recipe = load_recipe(TINY)
    for stage, values in stage_overrides.items():
        for key, value in values.items():
            setattr(getattr(recipe.stages, stage), key, value)
    if not (out / "tokenizer").is_dir():  # DDP workers share theirs, copied before they start
        shutil.copytree(tokenizer_dir, out / "tokenizer")
    return RecipeRun(recipe, out, resume=True, progress=False)



def test_answer_labels_cover_answers_only(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    first, second = tok.interaction("hi there", "hello you"), tok.interaction("bye", "see you")
    ids, _ = pad([first + second, first], tok.pad_id)
    labels = answer_labels(ids, tok)
    answer_len = len(tok.encode(" hello you")) + 1  # + [EOT]
    assert (labels[1] != IGNORE).sum() == answer_len
    assert labels[1, len(first) - 1] == tok.end_id and labels[1, len(first) - answer_len - 1] == IGNORE
    assert (labels[0] != IGNORE).sum() == answer_len + len(tok.encode(" see you")) + 1


def test_pool_to_slots_pools_each_row_alone():
    encoded = torch.randn(3, 7, 4)
    lengths = [7, 5, 2]  # fewer real tokens than slots too
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    pooled = pool_to_slots(encoded, mask, 3)
    assert pooled.shape == (3, 3, 4)
    for row, n in enumerate(lengths):  # as if the row had been pooled without any padding
        alone = torch.nn.functional.adaptive_avg_pool1d(encoded[row, :n].T[None], 3)[0].T
        torch.testing.assert_close(pooled[row], alone)


@pytest.mark.parametrize("stage", ["joint_lm", "sft", "memory_attention", "smat", "baseline"])
def test_each_stage_loss_falls(tmp_path, tokenizer_dir, stage):
    run = tiny_run(tmp_path, tokenizer_dir, **{stage: {"steps": 12, "lr": 1e-2, "warmup_steps": 1,
                                                        "unfreeze_step": 0} if stage == "smat" else
                                               {"steps": 12, "lr": 1e-2, "warmup_steps": 1}})
    torch.manual_seed(0)
    rxt, baseline = run.build_models()
    trainer = run.trainer(stage, baseline if stage == "baseline" else rxt)
    fixed = trainer.make_batch(0, 0, 0, 1)
    trainer.make_batch = lambda *args: fixed  # overfit one batch: the loss must fall
    trainer.checkpoint_every = 10**6
    losses = [trainer.train_step()["loss"] for _ in range(12)]
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses


@pytest.mark.parametrize("stage", ["memory_attention", "smat"])
def test_queue_writes_train_in_the_memory_stages(tmp_path, tokenizer_dir, stage):
    run = tiny_run(tmp_path, tokenizer_dir, **{stage: {"steps": 12, "lr": 1e-2, "warmup_steps": 1}})
    run.recipe.model.overrides.update(memory_write="queue", write_slots=2)
    torch.manual_seed(0)
    rxt, _ = run.build_models()
    assert rxt.config.memory_write == "queue"
    trainer = run.trainer(stage, rxt)
    fixed = trainer.make_batch(0, 0, 0, 1)
    trainer.make_batch = lambda *args: fixed
    trainer.checkpoint_every = 10**6
    before = [layer.write_queries.detach().clone() for layer in rxt.memory_attention.layers]
    losses = [trainer.train_step()["loss"] for _ in range(12)]
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses
    assert all(not torch.equal(b, layer.write_queries) for b, layer in zip(before, rxt.memory_attention.layers, strict=True))


def _smat_weights(out: Path, tokenizer_dir: Path, stop_after: int | None) -> dict:
    run = tiny_run(out, tokenizer_dir, smat={"steps": 6, "unfreeze_step": 2})
    torch.manual_seed(0)
    rxt, _ = run.build_models()
    trainer = run.trainer("smat", rxt)
    trainer.checkpoint_every = 3
    if stop_after is not None:  # interrupted run: stop after a checkpoint, then resume in a fresh trainer
        while trainer.step < stop_after:
            trainer.train_step()
        trainer.save_checkpoint()
        torch.manual_seed(123)
        rxt, _ = run.build_models()  # different fresh weights: everything must come from the checkpoint
        trainer = run.trainer("smat", rxt)
    trainer.train(resume=True)
    return {k: v.clone() for k, v in rxt.state_dict().items()}


def test_resume_gives_identical_weights(tmp_path, tokenizer_dir):
    straight = _smat_weights(tmp_path / "a", tokenizer_dir, None)
    resumed = _smat_weights(tmp_path / "b", tokenizer_dir, 3)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def _ddp_worker(rank: int, world: int, rendezvous: str, out: str, tokenizer_dir: str, result: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    # joined here, so the trainer's init_distributed (torchrun's env:// rendezvous) finds it joined
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    weights = {stage: _train_stage(Path(out) / stage, Path(tokenizer_dir), stage) for stage in DDP_STAGES}
    if rank == 0:
        torch.save(weights, result)
    torch.distributed.barrier()  # neither process tears gloo down while the other still talks to it
    torch.distributed.destroy_process_group()


def _train_stage(out: Path, tokenizer_dir: Path, stage: str) -> dict:
    run = tiny_run(out, tokenizer_dir, **{stage: {"steps": 3, "batch_size": 4, "grad_accum": 1}})
    torch.manual_seed(0)
    rxt, baseline = run.build_models()
    model = baseline if stage == "baseline" else rxt
    trainer = run.trainer(stage, model)
    trainer.checkpoint_every = 10**6
    for _ in range(3):
        trainer.train_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_process_ddp_matches_one_process(tmp_path, tokenizer_dir):
    """Two gloo processes with half the batch each end with the weights of one process (SMAT, baseline)."""
    result = tmp_path / "ddp.pt"
    rendezvous = tmp_path / "rendezvous"  # a file store: no TCP port to race another test run for
    for stage in DDP_STAGES:  # one copy both workers read: two copying at once could read a half-written file
        shutil.copytree(tokenizer_dir, tmp_path / "two" / stage / "tokenizer")
    mp.spawn(_ddp_worker, args=(2, str(rendezvous), str(tmp_path / "two"), str(tokenizer_dir), str(result)),
             nprocs=2, join=True)
    double = torch.load(result)
    for stage in DDP_STAGES:
        single = _train_stage(tmp_path / "one" / stage, tokenizer_dir, stage)
        for name, tensor in single.items():
            torch.testing.assert_close(double[stage][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{stage}: {name}")


def test_quick_recall_runs(tokenizer_dir):
    from rxt.data.dialogues import DialogueGenerator

    tok = Tokenizer.load(tokenizer_dir)
    recipe = load_recipe(TINY)
    model = ReactiveTransformer(recipe.model.build(tok.vocab_size))
    dialogues = DialogueGenerator(0, "heldout", min_turns=3, max_turns=6, max_distance=4).take(4)
    examples: list = []
    result = quick_recall(model, tok, dialogues, max_new_tokens=4, examples=examples)
    assert 0.0 <= result["overall"] <= 1.0 and result["n"] == len(examples) > 0


def test_train_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(TINY), "--out", str(out), "--no-progress"]) == 0
    for name in ("rxt", "baseline"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "training_log.jsonl"} <= files
    assert not (out / "checkpoints").exists()
    loaded = ReactiveTransformer.from_pretrained(out / "rxt")
    assert loaded.tokenizer is not None


def tiny_recipe_file(tmp_path: Path, data: dict | None = None, stages: dict | None = None, **top) -> Path:
    """The tiny recipe with some `data` keys, stage keys and top-level keys changed, written to a file."""
    recipe = yaml.safe_load(TINY.read_text())
    recipe["data"].update(data or {})
    for stage, values in (stages or {}).items():
        recipe["stages"][stage].update(values)
    recipe.update(top)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_only_one_model_each(tmp_path):
    """--only rxt and --only baseline into one directory give what one full run gives."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(TINY), "--out", str(out), "--no-progress", "--only", "rxt"]) == 0
    assert (out / "rxt" / "model.safetensors").is_file() and not (out / "baseline").exists()
    assert "baseline" not in json.loads((out / "rxt" / "recall.json").read_text())["tokens"]
    assert main(["train", "--recipe", str(TINY), "--out", str(out), "--no-progress", "--only", "baseline"]) == 0
    assert (out / "baseline" / "model.safetensors").is_file()
    full = tmp_path / "full"
    assert main(["train", "--recipe", str(TINY), "--out", str(full), "--no-progress"]) == 0
    for name, cls in (("rxt", ReactiveTransformer), ("baseline", StatelessLM)):
        split, whole = cls.from_pretrained(out / name).state_dict(), cls.from_pretrained(full / name).state_dict()
        assert all(torch.allclose(split[k], whole[k], atol=1e-5) for k in whole), name


def test_recall_answers_weigh_recall_weight_in_both_models_losses(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    generator, indices = DialogueGenerator(0, "train", max_turns=8), list(range(6))
    plain, heavy = DialogueSource(tok, generator), DialogueSource(tok, generator, recall_weight=3.0)
    history = heavy.history_batch(indices)
    labels, weights = history.data["labels"], history.data["weights"]
    recall_targets = 0
    for row, i in enumerate(indices):  # the heavy positions are exactly the answers to recall questions
        expected = [x for t in generator[i].turns if t.check
                    for x in tok.interaction(t.query, t.answer)[len(tok.prompt(t.query)):]]
        assert labels[row][(weights[row] == 3.0) & (labels[row] != IGNORE)].tolist() == expected
        recall_targets += len(expected)
    assert recall_targets > 0
    assert history.count - plain.history_batch(indices).count == 2 * recall_targets
    turns = heavy.turns_batch(indices)  # SMAT weighs the same answers: the two models train alike
    assert turns.count - plain.turns_batch(indices).count == 2 * recall_targets
    longest_first = sorted(indices, key=lambda i: len(generator[i].turns), reverse=True)
    for t, turn in enumerate(turns.data):
        asked = [generator[i].turns[t].check is not None for i in longest_first if t < len(generator[i].turns)]
        assert (turn["weights"][:, 0] == 3.0).tolist() == asked
    logits = torch.randn(*labels.shape, tok.vocab_size)
    assert torch.allclose(token_loss_sum(logits, labels, torch.ones(labels.shape)), token_loss_sum(logits, labels))
    recall_only = torch.where(weights == 3.0, labels, torch.full_like(labels, IGNORE))
    expected = token_loss_sum(logits, labels) + 2 * token_loss_sum(logits, recall_only)
    assert torch.allclose(token_loss_sum(logits, labels, weights), expected)


def test_recipe_rejects_a_bad_fresh_value_share(tmp_path):
    with pytest.raises(ValueError, match="fresh_values"):
        load_recipe(tiny_recipe_file(tmp_path, {"fresh_values": 2.0}))


def test_training_on_your_own_jsonl_dialogues(tmp_path, monkeypatch):
    from rxt.data.jsonl import write_dialogues

    own = DialogueGenerator(5, "train", min_turns=2, max_turns=5, max_distance=3).take(12)
    own[0].turns[0].query = "Zyxwvut is a word only my file has."
    held = DialogueGenerator(5, "heldout", min_turns=2, max_turns=5, max_distance=3).take(3)
    write_dialogues(tmp_path / "train.jsonl", own)
    write_dialogues(tmp_path / "held.jsonl", held)
    path = tiny_recipe_file(tmp_path, {"train_file": str(tmp_path / "train.jsonl"),
                                       "heldout_file": str(tmp_path / "held.jsonl")})
    learned_from: list[str] = []
    real_train = Tokenizer.train.__func__

    def train(cls, texts, **kwargs):
        texts = list(texts)
        learned_from.extend(texts)
        return real_train(cls, texts, **kwargs)

    monkeypatch.setattr(Tokenizer, "train", classmethod(train))
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(path), "--out", str(out), "--no-progress", "--only", "rxt"]) == 0
    assert own[0].turns[0].query in learned_from  # the tokenizer learned from the file
    recall = json.loads((out / "rxt" / "recall.json").read_text())["recall"]
    assert recall["n"] == sum(1 for d in held for t in d.turns if t.check)  # asked on the held-out file


@pytest.mark.parametrize("data, message", [
    ({"train_file": "missing.jsonl"}, "no such file"),
    ({"train_file": "RECIPE", "fresh_values": 0.5}, "fresh_values"),
    ({"fresh_values": 0.5, "fresh_words": "klingon"}, "fresh_words"),
    ({"frames": 2}, "frames"),
    ({"train_file": "RECIPE", "frames": 0.3}, "frames"),
    ({"paraphrases": 1.5}, "paraphrases"),
    ({"train_file": "RECIPE", "paraphrases": 0.3}, "paraphrases"),
    ({"distractors": -0.1}, "distractors"),
    ({"train_file": "RECIPE", "distractors": 0.3}, "distractors"),
    ({"recall_weight": 0}, "recall_weight"),
    ({"facts_per_dialogue": [5, 3]}, "facts_per_dialogue"),
    ({"facts_per_dialogue": [2, 11]}, "facts_per_dialogue"),
    ({"facts_per_dialogue": [3]}, "facts_per_dialogue"),
])
def test_recipe_rejects_bad_data_files(tmp_path, data, message):
    existing = str(TINY)  # any file that exists
    path = tiny_recipe_file(tmp_path, {k: existing if v == "RECIPE" else v for k, v in data.items()})
    with pytest.raises((ValueError, OSError), match=message):
        load_recipe(path)


def test_facts_per_dialogue_and_paraphrases_reach_the_training_dialogues_only(tmp_path, tokenizer_dir):
    shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
    recipe = load_recipe(tiny_recipe_file(tmp_path, {"facts_per_dialogue": [4, 4], "paraphrases": 0.5,
                                                     "distractors": 0.4}))
    run = RecipeRun(recipe, tmp_path, resume=True, progress=False)
    assert run.train_dialogues.facts_per_dialogue == (4, 4) and run.heldout_dialogues.facts_per_dialogue == (2, 5)
    assert run.train_dialogues.paraphrases == 0.5 and run.heldout_dialogues.paraphrases == 0
    assert run.train_dialogues.distractors == 0.4 and run.heldout_dialogues.distractors == 0


def test_malformed_training_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "turns": [{"query": "hi", "answer": "hello"}]}\n{"id": "b"}\n')
    path = tiny_recipe_file(tmp_path, {"train_file": str(bad)})
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_a_run_continues_from_an_earlier_one(tmp_path):
    first = tmp_path / "first"
    assert main(["train", "--recipe", str(TINY), "--out", str(first), "--no-progress"]) == 0
    recipe = yaml.safe_load(TINY.read_text())
    recipe["init_from"] = str(first)
    for stage in recipe["stages"].values():
        stage["steps"] = 0
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "same"), "--no-progress"]) == 0
    for name, cls in (("rxt", ReactiveTransformer), ("baseline", StatelessLM)):
        a, b = cls.from_pretrained(first / name).state_dict(), cls.from_pretrained(tmp_path / "same" / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)  # no steps: exactly the weights it started from
    assert (tmp_path / "same" / "tokenizer" / "tokenizer.json").read_text() == (first / "rxt" / "tokenizer.json").read_text()

    recipe["stages"]["smat"]["steps"] = 2
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "more"), "--no-progress", "--only", "rxt"]) == 0
    a, b = ReactiveTransformer.from_pretrained(first / "rxt").state_dict(), ReactiveTransformer.from_pretrained(tmp_path / "more" / "rxt").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)

    recipe["stages"]["smat"]["steps"] = 0
    recipe["model"]["overrides"]["gate_mode"] = "content"  # grows content gates, zero at first: same model
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "grown"), "--no-progress", "--only", "rxt"]) == 0
    old, grown = (ReactiveTransformer.from_pretrained(d / "rxt") for d in (first, tmp_path / "grown"))
    assert grown.config.gate_mode == "content" and old.config.gate_mode == "elementwise"
    stm, ids = old.initial_memory(2) + torch.randn(old.config.n_layers, 2, old.config.stm_slots, old.config.d_model), torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.allclose(grown.update_memory(stm, ids), old.update_memory(stm, ids), atol=1e-6)
    recipe["model"]["overrides"]["memory_write"] = "competitive"  # another write rule over the same weights
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "rewired"), "--no-progress", "--only", "rxt"]) == 0
    rewired = ReactiveTransformer.from_pretrained(tmp_path / "rewired" / "rxt")
    assert rewired.config.memory_write == "competitive"
    a, b = grown.state_dict(), rewired.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recipe["model"]["overrides"].update(memory_write="queue", write_slots=2)  # gates dropped, write queries new
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "queued"), "--no-progress", "--only", "rxt"]) == 0
    queued = ReactiveTransformer.from_pretrained(tmp_path / "queued" / "rxt").state_dict()
    assert {k for k in a if k not in queued} == {k for k in a if ".gate." in k and k.startswith("memory_attention.")}
    assert all(torch.equal(a[k], queued[k]) for k in a if k in queued)
    assert {k for k in queued if k not in a} == {f"memory_attention.layers.{i}.write_queries" for i in range(2)}
    del recipe["model"]["overrides"]["memory_write"], recipe["model"]["overrides"]["write_slots"]
    recipe["model"]["overrides"]["gate_mode"] = "linear"  # other gates are other models
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="gate_mode"):
        main(["-v", "train", "--recipe", str(path), "--out", str(tmp_path / "bad"), "--no-progress"])
    recipe["model"]["overrides"]["gate_mode"] = "elementwise"
    recipe["model"]["overrides"]["stm_slots"] = 4  # not the architecture it was trained with
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="stm_slots"):
        main(["-v", "train", "--recipe", str(path), "--out", str(tmp_path / "bad"), "--no-progress"])
    recipe["init_from"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(OSError, match="holds no rxt"):
        main(["-v", "train", "--recipe", str(path), "--out", str(tmp_path / "bad"), "--no-progress"])


def test_copy_share_mixes_copy_drills_into_the_language_stages(tokenizer_dir):
    from rxt.data.dialogues import copy_turn
    from rxt.training.batches import TextSource

    tok = Tokenizer.load(tokenizer_dir)
    generator = DialogueGenerator(0, "train")
    drills = {tok.interaction(copy_turn(i).query, copy_turn(i).answer)[:256] == TextSource(
        tok, generator, [], True, 256, copy_share=1.0).encode(i) for i in range(20)}
    assert drills == {True}
    half = TextSource(tok, generator, [], True, 256, copy_share=0.5)
    share = sum(half.pair(i) == (copy_turn(i).query, copy_turn(i).answer) for i in range(400)) / 400
    assert 0.4 < share < 0.6
    plain = TextSource(tok, generator, [], True, 256)
    assert not any(plain.pair(i)[1] == "Noted." for i in range(100))


def test_recipe_rejects_a_bad_copy_share(tmp_path):
    with pytest.raises(ValueError, match="copy_share"):
        load_recipe(tiny_recipe_file(tmp_path, stages={"sft": {"copy_share": 1.5}}))


def test_a_recipe_s_copy_share_reaches_its_stage_batches(tmp_path, tokenizer_dir):
    run = tiny_run(tmp_path, tokenizer_dir, sft={"copy_share": 1.0, "memory": "stm"})
    rxt, _ = run.build_models()
    train, held = run._sources("sft", rxt)
    assert all("Noted." in run.tokenizer.decode(row) for row in train([0, 1, 2]).data["ids"])
    assert not any("Noted." in run.tokenizer.decode(row) for row in held([0, 1, 2]).data["ids"])  # held-out: real turns


@pytest.mark.parametrize("stage", ["smat", "memory_attention"])
def test_a_batch_of_dialogues_costs_what_its_dialogues_cost_alone(tokenizer_dir, stage):
    """Dialogues of different lengths in one batch: each keeps its own memory chain, and rows of
    dialogues that have ended are dropped, not computed."""
    from rxt.training.recipe import MemoryAttentionSpec, SMATSpec
    from rxt.training.stages import memory_attention_loss, smat_loss

    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_dir)
    model = ReactiveTransformer(load_recipe(TINY).model.build(tok.vocab_size))
    generator = DialogueGenerator(0, "train", min_turns=2, max_turns=7)
    indices = [i for i in range(40) if len(generator[i].turns) in (2, 4, 7)][:5]
    source = DialogueSource(tok, generator)
    if stage == "smat":
        def loss(ids):
            return smat_loss(model, source.turns_batch(ids).data, SMATSpec(), torch.Generator().manual_seed(0))[0]
    else:  # noise-free, so that the random draws cannot differ between the batch and the single runs
        spec = MemoryAttentionSpec(input_noise=0.0, label_noise=0.0, new_weight_jitter=0.0)
        model.stm.init.zero_()
        model.config.stm_init_std = 0.0

        def loss(ids):
            return memory_attention_loss(model, source.turns_batch(ids).data, spec, torch.Generator().manual_seed(0))[0]
    batch = source.turns_batch(indices)
    assert [t["ids"].shape[0] for t in batch.data] == [sum(len(generator[i].turns) > t for i in indices)
                                                       for t in range(len(batch.data))]
    with torch.no_grad():
        alone = sum(loss([i]) for i in indices)
        together = loss(indices)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-3)


def test_frozen_parts_stay_as_they_are_while_the_rest_trains(tmp_path, tokenizer_dir):
    run = tiny_run(tmp_path, tokenizer_dir, sft={"steps": 3, "memory": "stm", "frozen": ["embedding", "decoder"]})
    torch.manual_seed(0)
    rxt, _ = run.build_models()
    before = {k: v.clone() for k, v in rxt.state_dict().items()}
    trainer = run.trainer("sft", rxt)
    trainer.checkpoint_every = 10**6
    for _ in range(3):
        trainer.train_step()
    changed = {k for k, v in rxt.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("encoder.", "memory_attention.")) for k in changed), sorted(changed)
    assert any(k.startswith("memory_attention.") for k in changed)


def test_recipe_rejects_an_unknown_frozen_part(tmp_path):
    with pytest.raises(ValueError, match="frozen.*head"):
        load_recipe(tiny_recipe_file(tmp_path, stages={"sft": {"frozen": ["decoder", "head"]}}))
