"""The "salience" keep policy: a gate over the model's own keys and values picks the messages a kv memory
keeps longest; it is fitted by `rxt wrap --keep salience` and travels in the adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rxt.cli import main
from rxt.model import StatelessLM
from rxt.pretrained.kv_memory import kept_tokens, token_scores
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained
from rxt.pretrained.salience import fit_gate, gate_dialogues, gate_features

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = ["My name is Ada.", "I live in Oslo.", "My dog is called Rex.", "I work as a baker.",
         "My sister is Mia.", "I was born in Rome."]
TALK = ["How are you?", "Nice weather today.", "Tell me a joke.", "What time is it?", "Thanks a lot.",
        "Good morning!"]


def salience_model(base: StatelessLM, slots: int = 512) -> ReactivePretrained:
    return ReactivePretrained(copy.deepcopy(base), ReactiveConfig(memory_write="kv", stm_slots=slots,
                                                                  keep="salience")).eval()


def told(model: ReactivePretrained, turns: list[tuple[str, str]]) -> torch.Tensor:
    stm = model.initial_memory(1)
    for query, answer in turns:
        stm = model.update_memory(stm, model.interaction(query, answer)[0])
    return stm


def test_scores_a_salient_messages_tokens_above_the_others():
    user = torch.tensor([[True, True, False], [True, True, False]])
    scores = token_scores("salience", user, salient=torch.tensor([True, False]))
    assert scores.tolist() == [[2.0, 2.0, 0.0], [1.0, 1.0, 0.0]]  # answers last, whatever the verdict
    with pytest.raises(ValueError, match="needs the gate's verdict"):
        token_scores("salience", user)


def test_the_gate_reads_the_token_that_closes_the_message(chat_base):
    """Its feature is the key and value of <|im_end|> after the message: it differs between messages (a
    token before the message would be the same for all of them, and no gate could learn from it)."""
    model, tok = salience_model(chat_base), chat_base.tokenizer
    ids, mask = torch.tensor([tok.prompt(FACTS[0])]), torch.ones(1, len(tok.prompt(FACTS[0])), dtype=torch.bool)
    at = int(model.kv_memory.closing_at(ids, mask)[0])
    assert tok.decode([int(ids[0, at])], skip_special=False) == "<|im_end|>"
    assert model.reactive.salience_layer == 4 * chat_base.config.n_layers // 5  # the default: 4/5 of the depth
    dialogues = [[(FACTS[0], "Hi.", 1), (TALK[0], "Fine.", 0)], [(TALK[1], "Yes.", 0)], [(FACTS[1], "Oslo!", 1)]]
    features = gate_features(model, dialogues, batch_size=2)  # batched, rows ending at different turns
    assert features.shape == (4, model.salience.proj.in_features)
    assert torch.cdist(features, features)[~torch.eye(4, dtype=torch.bool)].min() > 1e-3
    # each message is read after the memory of the turns before it, as in a chat: the same as one at a time
    for i, alone in enumerate([*gate_features(model, dialogues[:1], 1), *gate_features(model, dialogues[1:], 1)]):
        torch.testing.assert_close(features[i], alone, atol=1e-4, rtol=1e-4)
    stm = model.update_memory(model.initial_memory(1), model.interaction(FACTS[0], "Hi.")[0])
    ids = model.interaction(TALK[0], "Fine.")[0]
    everything = torch.ones_like(ids, dtype=torch.bool)
    states, _ = model.kv_memory.turn_kv(stm, ids, everything)
    closing = int(model.kv_memory.closing_at(ids, everything)[0])
    torch.testing.assert_close(features[1], states[model.salience.layer, 0, closing], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(features[1], gate_features(model, [[(TALK[0], "Fine.", 0)]])[0], atol=1e-3)


def test_a_fitted_gate_keeps_the_facts_where_user_keeps_the_newest(chat_base):
    model = salience_model(chat_base)
    untrained = told(model, [(FACTS[0], "Hi Ada.")])  # zero weights: no message is salient, as keep "user"
    fit = fit_gate(model, [[(f, "Ok.", 1), (t, "Ok.", 0)] for f, t in zip(FACTS, TALK, strict=True)])
    assert fit.accuracy == 1.0 and fit.salient_recall == 1.0 and fit.salient == len(FACTS)
    assert ((model.salience(torch.zeros(chat_base.config.n_layers, 1, 3, model.salience.proj.in_features),
                            torch.tensor([-1]))) == float("-inf")).all()  # a row with no message: never salient
    tok = chat_base.tokenizer
    turns = [(FACTS[1], "Oslo!"), (TALK[0], "Fine."), (TALK[1], "Yes."), (TALK[2], "No."), (TALK[3], "Noon.")]
    room = len(tok.preamble()) + len(tok.prompt(FACTS[1])) + len(tok.interaction(*turns[-1])) + 6
    text = {}
    for keep in ("salience", "user"):
        kv = salience_model(chat_base, room) if keep == "salience" else ReactivePretrained(
            copy.deepcopy(chat_base), ReactiveConfig(memory_write="kv", stm_slots=room, keep="user")).eval()
        if keep == "salience":
            kv.salience.load_state_dict(model.salience.state_dict())
        text[keep] = tok.decode(kept_tokens(told(kv, turns))[0], skip_special=False)
    assert "Oslo" in text["salience"] and "Noon" in text["salience"]  # the fact, and the finished turn
    assert "Oslo" not in text["user"]  # at the same size, the newest messages pushed it out
    assert kept_tokens(untrained) == kept_tokens(told(ReactivePretrained(copy.deepcopy(chat_base), ReactiveConfig(
        memory_write="kv", stm_slots=512, keep="user")).eval(), [(FACTS[0], "Hi Ada.")]))
    with pytest.raises(ValueError, match="both labels"):
        fit_gate(model, [[(t, "Ok.", 0)] for t in TALK])


def test_gate_dialogues_label_the_generators_facts_and_take_real_users_as_others(tmp_path):
    chitchat = tmp_path / "chitchat.jsonl"
    rows = [{"id": f"c{i}", "turns": [{"query": f"I went out with friends, day {i}.", "answer": "Fun."}] * 12}
            for i in range(30)]
    chitchat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dialogues = gate_dialogues(chitchat, dialogues=20, chitchat=10, max_turns=8)
    assert len(dialogues) == 30 and all(0 < len(d) <= 8 for d in dialogues)
    people = [d for d in dialogues if d[0][0].startswith("I went out")]
    assert len(people) == 10 and all(label == 0 for d in people for *_, label in d)
    facts = {q for d in dialogues for q, _, label in d if label}
    assert facts and all(not q.endswith("?") for q in facts)  # statements, never the questions
    assert "How are you today?" not in facts
    with pytest.raises(FileNotFoundError, match="rxt data fetch"):
        gate_dialogues(tmp_path / "none.jsonl")


def test_rxt_wrap_fits_the_gate_and_the_adapter_carries_it(chat_base, tmp_path, capsys):
    chat_base.save_pretrained(tmp_path / "base")
    chitchat = tmp_path / "chitchat.jsonl"
    chitchat.write_text("".join(json.dumps({"id": f"c{i}", "turns": [{"query": q, "answer": "Ok."}]}) + "\n"
                                for i, q in enumerate(TALK * 3)))
    out = tmp_path / "kv"
    assert main(["wrap", str(tmp_path / "base"), "--out", str(out), "--slots", "64", "--keep", "salience",
                 "--chitchat", str(chitchat)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["gate"]["messages"] > len(TALK) and report["gate"]["accuracy"] > 0.5
    model = ReactivePretrained.from_pretrained(out)
    assert model.reactive.keep == "salience" and model.salience.proj.weight.abs().sum() > 0
    saved = load_file(str(out / "adapter.safetensors"))
    assert set(saved) == {"salience.proj.weight", "salience.proj.bias"}
    other = ReactivePretrained.from_base(tmp_path / "base", ReactiveConfig(memory_write="kv", stm_slots=64,
                                                                           keep="user"))
    assert other.identity() != model.identity()
    # an adapter without its gate is refused, not run with an empty one
    del saved["salience.proj.bias"]
    save_file(saved, str(out / "adapter.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        ReactivePretrained.from_pretrained(out)
    with pytest.raises(ValueError, match="salience_layer must be a layer"):
        ReactivePretrained(copy.deepcopy(chat_base), ReactiveConfig(memory_write="kv", keep="salience",
                                                                    salience_layer=99))
    assert main(["wrap", str(tmp_path / "base"), "--out", str(tmp_path / "kv2"), "--keep", "salience",
                 "--chitchat", str(tmp_path / "none.jsonl")]) == 2
    assert "rxt data fetch" in capsys.readouterr().err and not (tmp_path / "kv2").exists()


def test_wrap_takes_the_lora_of_an_adapter_directory_and_refuses_what_has_none(chat_base, tmp_path, capsys):
    """`--lora` may name another adapter: the new one carries the same LoRA weights and settings."""
    from rxt.pretrained.wrap import wrap

    base_dir = tmp_path / "base"
    chat_base.save_pretrained(base_dir)
    lora = ReactivePretrained.from_base(base_dir, ReactiveConfig(memory_write="kv", stm_slots=64, keep="user",
                                                                 lora_rank=4, lora_alpha=8.0))
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if ".lora_" in name:
                weight.normal_(0.0, 0.1)
    lora.save_adapter(tmp_path / "with-lora", dtype=torch.float32)
    model, fit = wrap(base_dir, tmp_path / "again", 48, "recent", tmp_path / "with-lora")
    assert fit is None and model.reactive.lora_rank == 4 and model.reactive.lora_alpha == 8.0
    ours, theirs = model.adapter_state_dict(), lora.adapter_state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ReactivePretrained.from_base(base_dir, ReactiveConfig(memory_write="kv", stm_slots=64)).save_adapter(
        tmp_path / "no-lora")
    for source, message in ((tmp_path / "no-lora", "carries no LoRA"), (base_dir, "a directory without")):
        assert main(["wrap", str(base_dir), "--out", str(tmp_path / "x"), "--lora", str(source)]) == 2
        assert message in capsys.readouterr().err
