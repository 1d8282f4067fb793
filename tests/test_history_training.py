"""The stateless baseline of a reactive adapter (`kind: stateless-pretrained`): LoRA on the same base,
the whole history, the same dialogues; its batches, its control, the merged model it writes, exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rxt.baselines import StatelessEngine
from rxt.cli import main
from rxt.data.dialogues import Dialogue, Turn
from rxt.generation import SamplingConfig
from rxt.model import StatelessLM, load_model
from rxt.pretrained.history_training import (
    HistoryRecipe,
    HistoryRun,
    LoRASpec,
    history_batch,
    history_control,
    history_loss,
    load_history_recipe,
    lora_model,
    lora_state,
)
from rxt.pretrained.lora import merged_state_dict
from rxt.pretrained.training import ReactiveDataSpec, TrainingDialogues, heldout_fact_dialogues
from rxt.training.batches import batch_indices
from rxt.training.recipe import StageSpec

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = LoRASpec(rank=2, alpha=4.0, targets=["q_proj", "v_proj", "down"])


def recipe(base_dir: Path, steps: int = 4) -> HistoryRecipe:
    data = ReactiveDataSpec(fact_share=1.0, min_turns=2, max_turns=4, max_distance=3, heldout_dialogues=3)
    train = StageSpec(steps=steps, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, eval_every=2)
    return HistoryRecipe(base=str(base_dir), lora=LORA, data=data, train=train, checkpoint_every=2).validate()


def test_a_dialogue_is_one_sequence_as_the_stateless_engine_reads_it_scored_on_its_answers(chat_base):
    tok = chat_base.tokenizer
    dialogue = Dialogue("d", [Turn("My cat is Tom.", "Nice cat."), Turn("Who is my cat?", "Tom.", check=True)])
    batch = history_batch([dialogue, Dialogue("e", dialogue.turns[:1])], tok, recall_weight=3.0)
    ids, mask, weights = batch.data["ids"], batch.data["mask"], batch.data["weights"]
    expected = (tok.preamble() + tok.prompt("My cat is Tom.") + tok.answer("Nice cat.") + tok.closing()
                + tok.prompt("Who is my cat?") + tok.answer("Tom.") + tok.closing())
    assert ids[0].tolist() == expected and bool(mask[0].all())
    assert int(mask[1].sum()) < ids.shape[1] and not bool(weights[1][~mask[1]].any())  # padding is not scored
    scored = [(tok.decode([int(i)]), float(w)) for i, w in zip(ids[0], weights[0], strict=True) if w > 0]
    first = len(tok.answer("Nice cat.")) + len(tok.closing())
    assert tok.decode(tok.answer("Nice cat.")) in "".join(s for s, _ in scored[:first])
    assert {w for _, w in scored[:first]} == {1.0} and {w for _, w in scored[first:]} == {3.0}
    assert len(scored) == first + len(tok.answer("Tom.")) + len(tok.closing())  # the answers and closings only
    assert batch.count == float(weights[:, 1:].sum())


def test_before_training_it_is_the_base_and_the_merged_model_computes_what_lora_does(chat_base, tmp_path):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    model = lora_model(base_dir, LORA)
    ids = torch.tensor([chat_base.tokenizer.preamble() + chat_base.tokenizer.prompt("Hello there")])
    assert torch.equal(model.decode(ids), chat_base.decode(ids))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.5)
    moved = model.decode(ids)
    assert (moved - chat_base.decode(ids)).abs().max() > 1e-2
    merged = StatelessLM(model.config)
    merged.load_state_dict(merged_state_dict(model))  # strict: the base's keys exactly
    # fp32 rounding only: the sums are taken in another order
    assert (merged.decode(ids) - moved).abs().max() <= 1e-5 * moved.abs().max()


def test_the_control_reads_own_other_and_no_history(chat_base, tmp_path):
    """The answer is only predictable from the dialogue's own history when the model copies from it:
    a base that copies (LoRA trained on this one dialogue) scores own far below other and wiped."""
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    model = lora_model(base_dir, LORA)
    dialogues = [Dialogue(f"d{i}", [Turn(f"My code is {w}.", "Noted."), Turn("What is my code?", f"{w}.", check=True)])
                 for i, w in enumerate(["apple", "zebra"])]
    before = history_control(model, dialogues)
    assert before["recall_questions"] == 2
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = history_batch(dialogues, model.tokenizer)
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = history_loss(model, batch.data)
        (loss / batch.count).backward()
        optimizer.step()
    after = history_control(model, dialogues)
    assert after["recall_loss_own"] < before["recall_loss_own"]
    assert after["recall_loss_own"] < after["recall_loss_other"] - 0.5
    assert after["recall_loss_own"] < after["recall_loss_wiped"] - 0.5


def test_it_draws_the_reactive_runs_dialogues(chat_base, tmp_path):
    """Same seed, same step: the same dialogues as the reactive recipe, so the two logs compare step for step."""
    plan = recipe(chat_base.save_pretrained(tmp_path / "base"))
    run = HistoryRun(plan, tmp_path / "run", progress=False)
    trainer = run.trainer(run.build_model())
    batch = trainer.make_batch(3, 0, 0, 1)
    data = TrainingDialogues(plan.data)
    drawn = [data[i] for i in batch_indices(plan.seed, "reactive", 3, 2, 1 << 30)][:1]
    assert batch.data["ids"].tolist() == history_batch(drawn, run.build_model().tokenizer, 1.0).data["ids"].tolist()


def test_a_resumed_run_writes_the_same_model_which_loads_as_a_plain_stateless_model(chat_base, tmp_path):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**dataclasses.asdict(recipe(base_dir)), "kind": "stateless-pretrained"}))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    # the other run stops after its first checkpoint (step 2) and is resumed to the end
    cut = HistoryRun(load_history_recipe(path), tmp_path / "cut", progress=False)
    trainer = cut.trainer(cut.build_model())
    for _ in range(2):
        trainer.train_step()
    trainer.save_checkpoint()
    saved = [k for k in load_file(str(tmp_path / "cut" / "checkpoints" / "history.safetensors")) if "decoder." in k]
    assert saved and all(".lora_" in k for k in saved)  # of the model only what trains, none of the base
    with pytest.raises(FileExistsError, match="--resume"):
        HistoryRun(load_history_recipe(path), tmp_path / "cut", progress=False)
    HistoryRun(load_history_recipe(path), tmp_path / "cut", resume=True, progress=False).run()
    one = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert one.keys() == two.keys() == set(chat_base.state_dict())
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], v) for k, v in chat_base.state_dict().items())  # it trained
    summary = json.loads((tmp_path / "whole" / "model" / "control.json").read_text())
    assert summary["trained_parameters"] == sum(t.numel() for t in lora_state(lora_model(base_dir, LORA)).values())
    model = load_model(tmp_path / "whole" / "model")
    assert isinstance(model, StatelessLM)
    # the summary's control is the one the trainer ran at the last step, and it is the saved model's
    last = json.loads((tmp_path / "whole" / "model" / "training_log.jsonl").read_text().splitlines()[-1])
    assert summary["control"]["recall_loss_own"] == pytest.approx(last["recall_loss_own"], abs=1e-5)
    again = history_control(model, heldout_fact_dialogues(load_history_recipe(path).data))
    assert summary["control"]["recall_loss_own"] == pytest.approx(again["recall_loss_own"], abs=1e-3)
    engine = StatelessEngine(model)
    session = engine.new_session()
    engine.interact(session, "Hello", SamplingConfig(max_new_tokens=3))
    assert session.turns == 1 and session.tensors["history"].numel() > 0  # `rxt chat DIR/model` runs it
    assert not (tmp_path / "whole" / "checkpoints").exists()


def test_bad_recipes_are_refused(chat_base, tmp_path):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="lora.rank"):
        dataclasses.replace(recipe(base_dir), lora=LoRASpec(rank=0)).validate()
    with pytest.raises(ValueError, match="lora.targets.*q_prj"):
        dataclasses.replace(recipe(base_dir), lora=LoRASpec(targets=["q_prj"])).validate()
    with pytest.raises(FileNotFoundError, match="rxt import gguf"):
        HistoryRecipe(base=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ValueError, match="fact_share"):
        HistoryRecipe(base=str(base_dir), data=ReactiveDataSpec(fact_share=1.5)).validate()
    path = tmp_path / "r.yaml"
    path.write_text(f"kind: stateless-pretrained\nbase: {base_dir}\ndata: {{fact_share: 1.0}}\ntrain: {{steps: 2}}\n"
                    "lora: {rnk: 4}\n")
    with pytest.raises(ValueError, match="unknown keys \\['rnk'\\]"):
        load_history_recipe(path)
    assert heldout_fact_dialogues(recipe(base_dir).data)  # (the control's dialogues exist for this spec)


def test_its_lora_ships_as_a_kv_adapter_on_the_unchanged_base(chat_base, make_tiny_model, tmp_path, capsys):
    from rxt.pretrained.reactive import ReactivePretrained
    from rxt.pretrained.wrap import wrap

    base_dir = chat_base.save_pretrained(tmp_path / "base")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**dataclasses.asdict(recipe(base_dir, steps=2)), "kind": "stateless-pretrained"}))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    lora = tmp_path / "run" / "model" / "lora.safetensors"
    kv, _ = wrap(base_dir, tmp_path / "kv", 512, lora=lora)
    assert kv.num_parameters(trainable_only=True) == sum(t.numel() for t in load_file(str(lora)).values())
    # the memory holds the preamble; the turn read after it is the trained model's, LoRA merged or not
    tok, merged = chat_base.tokenizer, load_model(tmp_path / "run" / "model")
    ids = kv.interaction("Hello, I am Ada.", "Hi Ada.")[0]
    full = merged.decode(torch.tensor([tok.preamble() + ids[0].tolist()]))[:, len(tok.preamble()):]
    torch.testing.assert_close(kv.decode(ids, stm=kv.initial_memory(1)), full, atol=1e-4, rtol=1e-4)
    loaded = ReactivePretrained.from_pretrained(tmp_path / "kv")  # the adapter: the LoRA in bf16
    assert loaded.reactive.lora_rank == LORA.rank and loaded.reactive.memory_write == "kv"
    other = make_tiny_model(StatelessLM, seed=7, **{k: getattr(chat_base.config, k) for k in ("n_layers",)})
    other.tokenizer = tok
    other_dir = other.save_pretrained(tmp_path / "other")
    assert main(["wrap", str(other_dir), "--out", str(tmp_path / "kv2"), "--lora", str(lora)]) == 2
    assert "trained on the base with sha256" in capsys.readouterr().err


# -- reading what the memory holds (view: slots) -------------------------------------------------------
def _talk(n: int) -> list[Turn]:
    return [Turn(f"Small talk number {i} about the weather.", f"Reply {i}.") for i in range(n)]


@pytest.mark.parametrize("keep", ["user", "recent"])
def test_the_memory_held_by_ids_alone_is_what_the_kv_memory_writes(chat_base, tmp_path, keep):
    """held_before_turns runs the write's own ranking on empty slots: turn after turn it holds the very
    tokens a real kv memory of as many slots keeps."""
    from rxt.pretrained.kv_memory import answer_header, held_before_turns, kept_tokens
    from rxt.pretrained.wrap import wrap

    kv, _ = wrap(chat_base.save_pretrained(tmp_path / "base"), tmp_path / "kv", 40, keep=keep)
    tok = chat_base.tokenizer
    header, closing = answer_header(tok)
    turns = [Turn("My cat is Tom.", "Nice cat.", told=True), *_talk(3), Turn("My dog is Rex.", "Good dog.", told=True),
             *_talk(2)]
    written = [(tok.interaction(t.query, t.answer), len(tok.prompt(t.query)) - len(header) + closing, t.told)
               for t in turns]
    held = held_before_turns(tok.preamble(), written, 40, keep)
    stm = kv.initial_memory(1)
    with torch.no_grad():
        for t, (ids, _, _) in enumerate(written):
            assert kept_tokens(stm)[0] == held[t]
            stm = kv.kv_memory.write(stm, torch.tensor([ids]))
    assert len(held[-1]) == 40 and held[-1][: len(tok.preamble())] == tok.preamble()  # full, the sink in front


def test_salience_by_label_keeps_the_told_message_that_recent_drops(chat_base):
    from rxt.pretrained.kv_memory import held_before_turns

    tok = chat_base.tokenizer
    told = tok.prompt("My cat is Tom.")[:-2]
    written = [(tok.interaction("My cat is Tom.", "Nice."), len(told), True)]
    written += [(tok.interaction(t.query, t.answer), len(told), False) for t in _talk(6)]
    slots = len(tok.preamble()) + len(told) + len(written[-2][0]) + 4  # the sink, the fact, the last turn, a little
    for keep, kept in (("salience", True), ("recent", False)):
        last = held_before_turns(tok.preamble(), written, slots, keep)[-1]
        assert (tok.decode(last).count("Tom") == 1) is kept, keep
    with pytest.raises(ValueError, match="surprise"):
        held_before_turns(tok.preamble(), written, slots, "surprise")
    with pytest.raises(ValueError, match="do not fit"):
        held_before_turns(tok.preamble(), written, 2, "user")


def test_a_memory_view_reads_whole_while_it_fits_then_what_the_memory_holds(chat_base):
    from rxt.pretrained.history_training import ViewSpec, _contexts, history_sequence, memory_view_sequences

    tok = chat_base.tokenizer
    dialogue = Dialogue("d", [Turn("My cat is Tom.", "Nice cat.", told=True), *_talk(6),
                              Turn("Who is my cat?", "Your cat is Tom.", check={"slot": "pet_name", "value": "Tom",
                                                                               "distance": 7})])
    roomy = ViewSpec(slots=4096, keep="salience")
    assert memory_view_sequences(tok, dialogue, roomy) == [history_sequence(tok, dialogue)]
    fact, last = tok.prompt("My cat is Tom.")[:-2], tok.interaction(dialogue.turns[-2].query, dialogue.turns[-2].answer)
    view = ViewSpec(slots=len(tok.preamble()) + len(fact) + len(last) + 4, keep="salience")
    rows = memory_view_sequences(tok, dialogue, view, lambda turn: 2.0 if turn.check else 1.0)
    held = _contexts(tok, dialogue, view)
    whole = history_sequence(tok, dialogue)[0]
    assert len(rows) == 2 and whole[: len(rows[0][0])] == rows[0][0]  # the turns before anything is dropped
    ids, weights = rows[1]
    question = tok.interaction("Who is my cat?", "Your cat is Tom.")
    assert ids == held[-1] + question and len(held[-1]) <= view.slots and "Tom" in tok.decode(held[-1])
    assert "number 0" not in tok.decode(held[-1])  # the oldest small talk is gone
    scored = [i for i, w in zip(ids, weights, strict=True) if w]
    assert scored == question[len(tok.prompt("Who is my cat?")):] and set(weights) == {0.0, 2.0}
    batch = history_batch([dialogue, dialogue], tok, 2.0, view)
    assert batch.data["ids"].shape[0] == 4  # two rows a dialogue


def test_a_run_can_start_from_a_trained_lora(chat_base, tmp_path):
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**dataclasses.asdict(recipe(base_dir, steps=2)), "kind": "stateless-pretrained"}))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    lora = tmp_path / "run" / "model" / "lora.safetensors"
    started = HistoryRun(dataclasses.replace(recipe(base_dir), init_from=str(lora)).validate(), tmp_path / "next",
                         progress=False).build_model()
    trained = load_file(str(lora))
    assert set(lora_state(started)) == set(trained)
    assert all(torch.equal(lora_state(started)[k], trained[k]) for k in trained)
    other = dataclasses.replace(recipe(base_dir), init_from=str(lora), lora=LoRASpec(rank=4, alpha=4.0,
                                                                                     targets=LORA.targets))
    with pytest.raises(ValueError, match="its LoRA is"):
        HistoryRun(other.validate(), tmp_path / "other", progress=False).build_model()
    with pytest.raises(FileNotFoundError, match="init_from"):
        dataclasses.replace(recipe(base_dir), init_from=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ValueError, match="view.keep"):
        dataclasses.replace(recipe(base_dir), view=dataclasses.replace(recipe(base_dir).view, keep="surprise")).validate()
