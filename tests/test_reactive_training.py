"""Training a pretrained decoder made reactive: the recipe, the batches, the memory control, and exact
resume (a run killed after a checkpoint and resumed ends with the same adapter as one left alone)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rxt.data.dialogues import HELDOUT_WORDS, POOLS, Dialogue, Turn
from rxt.data.jsonl import write_dialogues
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained
from rxt.pretrained.training import (
    ReactiveDataSpec,
    ReactiveRecipe,
    ReactiveRun,
    ShortFacts,
    TrainingDialogues,
    dialogue_batch,
    heldout_fact_dialogues,
    load_reactive_recipe,
    memory_aware_loss,
    memory_control,
    validate_data,
)
from rxt.training.recipe import StageSpec
from rxt.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

REACTIVE = ReactiveConfig(memory_layers=[1, 3], cross_n_q_heads=2, cross_n_kv_heads=2, stm_slots=8, write_slots=2)


def chitchat(path: Path) -> Path:
    write_dialogues(path, [Dialogue(f"c{i}", [Turn("Hi there, how are you?", "Fine, and you?"),
                                              Turn("I cooked pasta today.", f"Nice, I ate {i} apples."),
                                              Turn("Cool.", "Yes.")]) for i in range(5)])
    return path


def recipe(tmp_path: Path, base_dir: Path, steps: int = 4) -> ReactiveRecipe:
    data = ReactiveDataSpec(fact_share=0.5, min_turns=2, max_turns=4, max_distance=3,
                            chitchat_file=str(chitchat(tmp_path / "chat.jsonl")), heldout_dialogues=3)
    train = StageSpec(steps=steps, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1, eval_every=2)
    return ReactiveRecipe(base=str(base_dir), reactive=REACTIVE, data=data, train=train, checkpoint_every=2).validate()


@pytest.mark.parametrize("ed_embeddings", [False, True], ids=["states", "states+embeddings"])
def test_a_batch_of_dialogues_of_different_lengths_scores_as_each_alone(chat_base, ed_embeddings):
    torch.manual_seed(0)
    model = ReactivePretrained(copy.deepcopy(chat_base), dataclasses.replace(REACTIVE, ed_embeddings=ed_embeddings))
    with torch.no_grad():  # a memory that is read, so the padding and dropped rows would show
        for i in REACTIVE.memory_layers:
            model.decoder.layers[i].memory_cross_attention.o_proj.weight.normal_(0.0, 0.2)
    spec = ReactiveDataSpec(min_turns=2, max_turns=5, max_distance=3)
    dialogues = heldout_fact_dialogues(dataclasses.replace(spec, heldout_dialogues=3))
    assert len({len(d.turns) for d in dialogues}) > 1
    together = memory_aware_loss(model, dialogue_batch(dialogues, model.tokenizer).data)[0]
    alone = sum(memory_aware_loss(model, dialogue_batch([d], model.tokenizer).data)[0] for d in dialogues)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    batch = dialogue_batch(dialogues, model.tokenizer, recall_weight=3.0)
    recall_rows = sum(t.check is not None for d in dialogues for t in d.turns)
    assert recall_rows and batch.count > dialogue_batch(dialogues, model.tokenizer).count


def test_the_answer_mask_covers_the_answer_and_closing_not_the_system_message_or_prompt(chat_base):
    tok = chat_base.tokenizer
    turn = dialogue_batch([Dialogue("d", [Turn("Where do I live?", "In Oslo.")])], tok).data[0]
    ids, answer = turn["ids"][0], turn["answer"][0]
    assert tok.decode(ids[answer].tolist()).strip() == "In Oslo."
    assert ids[: len(tok.preamble())].tolist() == tok.preamble()


def test_before_training_own_other_and_wiped_memory_score_alike(chat_base):
    model = ReactivePretrained(copy.deepcopy(chat_base), REACTIVE)
    control = memory_control(model, heldout_fact_dialogues(ReactiveDataSpec(min_turns=2, max_turns=4,
                                                                            max_distance=3, heldout_dialogues=3)))
    assert control["recall_questions"] > 0
    assert control["recall_loss_own"] == control["recall_loss_other"] == control["recall_loss_wiped"]
    assert control["recall_tokens_own"] == control["recall_tokens_other"] == control["recall_tokens_wiped"]
    assert 0.0 <= control["recall_tokens_own"] <= 1.0


def test_training_mixes_fact_dialogues_and_chitchat_by_index_alone(tmp_path, chat_base):
    spec = recipe(tmp_path, chat_base.save_pretrained(tmp_path / "base")).data
    first, again = TrainingDialogues(spec), TrainingDialogues(spec)
    kinds = [first[i].id.startswith("c") for i in range(40)]
    assert 5 < sum(kinds) < 35
    assert [again[i].id for i in range(40)] == [first[i].id for i in range(40)]


def test_short_share_draws_that_share_of_fact_dialogues_short_and_zero_leaves_the_mix_as_it_was():
    long = {"fact_share": 1.0, "min_turns": 20, "max_turns": 24, "max_distance": 16, "facts_per_dialogue": [3, 5]}
    plain = TrainingDialogues(ReactiveDataSpec(**long))
    same = TrainingDialogues(ReactiveDataSpec(short=ShortFacts(share=0.0, min_turns=2, max_turns=3), **long))
    assert [len(same[i].turns) for i in range(30)] == [len(plain[i].turns) for i in range(30)]
    mixed = TrainingDialogues(ReactiveDataSpec(short=ShortFacts(share=0.4, min_turns=2, max_turns=3,
                                                                max_distance=2, facts_per_dialogue=[1, 1]), **long))
    lengths = [len(mixed[i].turns) for i in range(200)]
    assert set(lengths) <= {2, 3} | set(range(20, 25))
    assert 50 < sum(n <= 3 for n in lengths) < 110  # about 0.4 of 200
    assert [len(mixed[i].turns) for i in range(200)] == lengths  # by index alone (exact resume)


def test_bad_short_mix_is_refused():
    for short in (ShortFacts(share=1.5), ShortFacts(min_turns=5, max_turns=4), ShortFacts(facts_per_dialogue=[2, 1]),
                  ShortFacts(abstain=1.2), ShortFacts(update_prob=-0.1)):
        with pytest.raises(ValueError, match="data.short"):
            validate_data(ReactiveDataSpec(fact_share=1.0, short=short), StageSpec())
    with pytest.raises(ValueError, match="data.update_prob"):
        validate_data(ReactiveDataSpec(fact_share=1.0, update_prob=2.0), StageSpec())


def test_short_dialogues_take_their_own_not_told_and_changed_fact_shares():
    def counts(data: TrainingDialogues, short: bool) -> tuple[int, int, int]:
        dialogues = [d for d in (data[i] for i in range(300)) if (len(d.turns) <= 4) == short]
        unknown = sum(t.check["value"] == "" for d in dialogues for t in d.turns if t.check)
        changed = sum(sum(bool(t.told) for t in d.turns) > sum(bool(t.check and t.check["value"]) for t in d.turns)
                      for d in dialogues)
        return len(dialogues), unknown, changed

    long = {"fact_share": 1.0, "min_turns": 12, "max_turns": 14, "max_distance": 4, "facts_per_dialogue": [2, 2]}
    short = {"share": 0.5, "min_turns": 3, "max_turns": 4, "max_distance": 2, "facts_per_dialogue": [1, 1]}
    inherit = TrainingDialogues(ReactiveDataSpec(**long, short=ShortFacts(**short)))
    own = TrainingDialogues(ReactiveDataSpec(**long, short=ShortFacts(**short, abstain=1.0, update_prob=1.0)))
    n_long, long_unknown, long_changed = counts(own, short=False)
    assert counts(inherit, short=False) == (n_long, long_unknown, long_changed)  # long dialogues unchanged
    assert long_unknown == 0
    n_short, unknown, changed = counts(own, short=True)
    _, inherit_unknown, inherit_changed = counts(inherit, short=True)
    assert inherit_unknown == 0 and inherit_changed < 0.4 * n_short  # data.abstain 0, data.update_prob 0.25
    assert n_short > 100 and unknown > 0.8 * n_short and changed > 2 * inherit_changed  # where the turns allow one


def test_fresh_values_give_every_training_dialogue_a_new_word_never_a_held_out_or_pool_value():
    def values(spec: ReactiveDataSpec) -> list[str]:
        data = TrainingDialogues(spec)
        return [t.check["value"] for i in range(200) for t in data[i].turns if t.check and t.check["slot"] != "age"]

    shape = {"fact_share": 1.0, "min_turns": 2, "max_turns": 3, "max_distance": 2, "facts_per_dialogue": [1, 1]}
    pooled = {v.lower() for pool in POOLS.values() for v in pool}
    fresh = values(ReactiveDataSpec(fresh_values=1.0, fresh_words="all", **shape))
    assert len(fresh) > 100 and not {v.lower() for v in fresh} & HELDOUT_WORDS
    assert len(set(fresh)) > 0.9 * len(fresh)  # nearly every dialogue its own value
    assert sum(v.lower() not in pooled for v in fresh) > 0.9 * len(fresh)
    repeated = values(ReactiveDataSpec(**shape))  # without: the few hundred training values, repeating
    assert all(v.lower() in pooled for v in repeated) and len(set(repeated)) < 0.9 * len(repeated)


def test_bad_fresh_values_are_refused(tmp_path, chat_base):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="fresh_values"):
        ReactiveRecipe(base=str(base_dir), data=ReactiveDataSpec(fact_share=1.0, fresh_values=2.0)).validate()
    with pytest.raises(ValueError, match="fresh_words must be one of"):
        ReactiveRecipe(base=str(base_dir), data=ReactiveDataSpec(fact_share=1.0, fresh_words="klingon")).validate()


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter" / "adapter.safetensors"))


def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_adapter(tmp_path, chat_base):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    plan = recipe(tmp_path, base_dir)
    whole = ReactiveRun(plan, tmp_path / "whole", progress=False)
    whole.run()
    assert (tmp_path / "whole" / "adapter" / "control.json").is_file()
    # the other run is stopped after its first checkpoint (step 2), then resumed to the end
    cut = ReactiveRun(plan, tmp_path / "cut", progress=False)
    model = cut.build_model()
    trainer = cut.trainer(model)
    for _ in range(2):
        trainer.train_step()
    trainer.save_checkpoint()
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "reactive.safetensors"))
    assert any("memory_cross_attention" in key for key in saved)  # the adapter, and none of the base
    assert not any("self_attention" in key or "embedding" in key or "ffn." in key for key in saved)
    with pytest.raises(FileExistsError, match="--resume"):
        ReactiveRun(plan, tmp_path / "cut", progress=False)
    ReactiveRun(plan, tmp_path / "cut", resume=True, progress=False).run()
    one, two = adapter(tmp_path / "whole"), adapter(tmp_path / "cut")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    fresh = ReactivePretrained.from_base(base_dir, REACTIVE).adapter_state_dict()
    assert any(not torch.equal(one[k], fresh[k].to(one[k].dtype)) for k in one)  # it did train
    loaded = ReactivePretrained.from_pretrained(tmp_path / "whole" / "adapter", base_dir)
    assert loaded.reactive == REACTIVE


def test_a_run_starts_from_an_earlier_stages_adapter(tmp_path, chat_base):
    """init_from: the next stage of a curriculum starts from the adapter an earlier run saved (bf16, as
    stored), not from a fresh one; an adapter of another reactive config, or no adapter, is refused."""
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    ReactiveRun(recipe(tmp_path, base_dir), tmp_path / "first", progress=False).run()
    saved = adapter(tmp_path / "first")
    stage = dataclasses.replace(recipe(tmp_path, base_dir), init_from=str(tmp_path / "first" / "adapter"))
    start = ReactiveRun(stage, tmp_path / "second", progress=False).build_model().adapter_state_dict()
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k].to(saved[k].dtype), saved[k]) for k in saved)
    fresh = ReactiveRun(recipe(tmp_path, base_dir), tmp_path / "fresh", progress=False).build_model()
    assert any(not torch.equal(start[k], v) for k, v in fresh.adapter_state_dict().items())
    other = dataclasses.replace(stage, reactive=dataclasses.replace(REACTIVE, write_slots=4))
    with pytest.raises(ValueError, match="write_slots"):
        ReactiveRun(other, tmp_path / "other", progress=False).build_model()
    with pytest.raises(FileNotFoundError, match="init_from"):
        dataclasses.replace(stage, init_from=str(tmp_path / "nowhere")).validate()


def test_a_checkpoint_of_another_model_is_refused(tmp_path, chat_base):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    run = ReactiveRun(recipe(tmp_path, base_dir), tmp_path / "out", progress=False)
    trainer = run.trainer(run.build_model())
    trainer.save_checkpoint()
    other = ReactivePretrained.from_base(base_dir, dataclasses.replace(REACTIVE, memory_layers=[0, 2]))
    stranger = Trainer(other, trainer.stage, trainer.spec, trainer.make_batch, trainer.loss_fn, trainer.work_dir,
                       model_state=lambda m: m.adapter_state_dict())
    with pytest.raises(ValueError, match="does not hold this model's trained weights"):
        stranger.load_checkpoint()


def test_bad_recipes_are_refused(tmp_path, chat_base):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="rxt import gguf"):
        ReactiveRecipe(base=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ValueError, match="chitchat_file"):
        ReactiveRecipe(base=str(base_dir), data=ReactiveDataSpec(fact_share=0.5)).validate()
    with pytest.raises(ValueError, match="fact_share"):
        ReactiveRecipe(base=str(base_dir), data=ReactiveDataSpec(fact_share=1.5)).validate()
    path = tmp_path / "r.yaml"
    path.write_text(f"kind: reactive-pretrained\nbase: {base_dir}\ndata: {{fact_share: 1.0}}\ntrain: {{steps: 2}}\n"
                    "reactive: {memory_layer: [1]}\n")
    with pytest.raises(ValueError, match="unknown keys \\['memory_layer'\\]"):
        load_reactive_recipe(path)


def test_a_recipe_turns_lora_on_and_the_run_trains_it(tmp_path, chat_base):
    """`reactive: {lora_rank: ...}` in a recipe: the run trains the LoRA weights with the memory path, saves
    them in the adapter (none of the base's weights), and the adapter loads back with LoRA on."""
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "kind": "reactive-pretrained", "base": str(base_dir), "data": {"fact_share": 1.0, "heldout_dialogues": 2},
        "train": {"steps": 2, "batch_size": 1, "lr": 1e-2, "warmup_steps": 1, "eval_every": 2},
        "reactive": {**{k: v for k, v in REACTIVE.to_dict().items() if not k.startswith("lora_")},
                     "lora_rank": 2, "lora_alpha": 4, "lora_targets": ["v_proj", "up"], "lora_layers": [0, 2]},
    }))
    plan = load_reactive_recipe(path)
    assert (plan.reactive.lora_rank, plan.reactive.lora_alpha, plan.reactive.lora_layers) == (2, 4.0, [0, 2])
    ReactiveRun(plan, tmp_path / "run", progress=False).run()
    saved = adapter(tmp_path / "run")
    lora = sorted(k for k in saved if ".lora_" in k)
    assert lora == sorted(f"base.decoder.layers.{i}.{block}.lora_{ab}" for i in (0, 2)
                          for block in ("self_attention.v_proj", "ffn.up") for ab in "ab")
    assert all(saved[k].abs().sum() > 0 for k in lora if k.endswith("lora_b"))  # B moved from zero
    assert not any(k.endswith(".weight") and ("self_attention." in k or "ffn." in k) for k in saved)
    loaded = ReactivePretrained.from_pretrained(tmp_path / "run" / "adapter", base_dir)
    assert loaded.reactive == plan.reactive
    path.write_text(path.read_text().replace("lora_rank: 2", "lora_rank: two"))
    with pytest.raises(ValueError, match="lora_rank: expected int"):
        load_reactive_recipe(path)
