"""LoRA on the frozen base of a reactive pretrained model (rxt.pretrained.lora): exact base logits before
training and a changed output once B moves, the base's weights and keys untouched, gradients to A and B
through the memory-aware loss, the adapter round trip (and old adapters without LoRA keys), bad configs
refused, the fast path and the engine honouring it. The kept-states memory write and the serving batcher
with LoRA on are tested in test_turn_states.py (its model fixture runs with and without LoRA)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from rxt.baselines import StatelessEngine
from rxt.engine import ReactiveEngine
from rxt.fast import FastDecoder
from rxt.generation import SamplingConfig
from rxt.model import StatelessLM
from rxt.pretrained.lora import LORA_TARGETS, LoRALinear
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained, base_sha256, dialogue_loss
from test_fast import TOL, eager_and_fast
from test_reactive_pretrained import BASE, PROMPTS, REACTIVE, batch, random_memory, reactive

pytestmark = pytest.mark.usefixtures("one_thread")

# every linear layer of the self-attention and the FFN, in three of the four layers
LORA = dataclasses.replace(REACTIVE, lora_rank=4, lora_alpha=8.0, lora_targets=list(LORA_TARGETS), lora_layers=[0, 2, 3])


@pytest.fixture
def base(make_tiny_model) -> StatelessLM:
    return make_tiny_model(StatelessLM, seed=1, **BASE)


def lora_modules(model: ReactivePretrained) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def move_lora_b(model: ReactivePretrained, std: float = 0.05) -> None:
    with torch.no_grad():
        for module in lora_modules(model):
            module.lora_b.normal_(0.0, std)


def test_lora_wraps_the_chosen_layers_and_leaves_the_base_untouched(base):
    model = reactive(base, LORA)
    assert len(lora_modules(model)) == 3 * len(LORA_TARGETS)
    default = reactive(base, dataclasses.replace(REACTIVE, lora_rank=8))  # q and v of every layer
    wrapped = {n for n, m in default.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"base.decoder.layers.{i}.self_attention.{p}" for i in range(4) for p in ("q_proj", "v_proj")}
    # the base's keys and weights are as they were; only lora_a / lora_b are new, and only they train
    assert model.base_keys == reactive(base).base_keys
    state = model.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(state[f"base.{name}"], tensor)
    lora_keys = {k for k in model.adapter_state_dict() if ".lora_" in k}
    assert len(lora_keys) == 2 * len(lora_modules(model))
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in model.base_keys)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_lora_logits_equal_the_base_exactly_before_training(base):
    model = reactive(base, LORA)
    tok = base.tokenizer
    for text in PROMPTS:
        ids = torch.tensor([tok.interaction(text, "Sure.")])
        assert torch.equal(model.decode(ids, stm=random_memory(model, 1)), base.decode(ids))
    ids, mask = batch(tok, PROMPTS)  # left-padded batch
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    stm = model.update_memory(model.initial_memory(3), ids, mask)
    assert torch.equal(
        model.decode(ids, stm=stm, key_mask=mask, positions=positions),
        base.decode(ids, key_mask=mask, positions=positions),
    )


def test_the_output_changes_once_b_moves(base):
    """The exactness above is not LoRA being ignored: B = 0 is the only thing that hides it (W_O stays 0)."""
    model = reactive(base, LORA)
    move_lora_b(model)
    ids = torch.tensor([base.tokenizer.interaction(PROMPTS[0], "Sure.")])
    stm = random_memory(model, 1)
    assert not torch.allclose(model.decode(ids, stm=stm), base.decode(ids), atol=1e-4)
    # and the memory is still not read: the change is LoRA's alone
    assert torch.equal(model.decode(ids, stm=stm), model.decode(ids, stm=random_memory(model, 1)))


def test_the_memory_aware_loss_trains_a_and_b_and_not_the_base(base):
    model = reactive(base, LORA).train()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    turns = [model.interaction(q, a) for q, a in [("My cat is Bo.", "Noted."), ("What is my cat called?", "Bo.")]]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    modules = lora_modules(model)
    before = [(m.lora_a.detach().clone(), m.lora_b.detach().clone()) for m in modules]
    for step in range(2):
        optimizer.zero_grad()
        dialogue_loss(model, turns).backward()
        if step == 0:  # from B = 0: B gets a gradient, A's is zero (it is B^T times the output's)
            assert all(m.lora_b.grad.abs().sum() > 0 and m.lora_a.grad.abs().sum() == 0 for m in modules)
        else:
            assert all(m.lora_a.grad.abs().sum() > 0 for m in modules)
        optimizer.step()
        after = [(m.lora_a.detach(), m.lora_b.detach()) for m in modules]
        assert all(not torch.equal(b0, b1) for (_, b0), (_, b1) in zip(before, after, strict=True))
    assert all(not torch.equal(a0, a1) for (a0, _), (a1, _) in zip(before, after, strict=True))
    state = model.state_dict()
    assert all(torch.equal(state[f"base.{name}"], tensor) for name, tensor in frozen.items())


def test_lora_adapter_round_trip(base, tmp_path):
    base_dir = base.save_pretrained(tmp_path / "base")
    model = reactive(base, LORA, sha=base_sha256(base_dir))
    move_lora_b(model)
    adapter_dir = model.save_adapter(tmp_path / "adapter")  # bf16, the default
    meta = json.loads((adapter_dir / "adapter.json").read_text())
    assert meta["reactive"]["lora_rank"] == 4
    without = reactive(base, REACTIVE).adapter_state_dict()
    lora = sum(m.lora_a.numel() + m.lora_b.numel() for m in lora_modules(model))
    assert meta["parameters"] == sum(t.numel() for t in without.values()) + lora
    loaded = ReactivePretrained.from_pretrained(adapter_dir, base_dir)
    for name, tensor in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[name], tensor.to(torch.bfloat16).float())
    assert len(lora_modules(loaded)) == len(lora_modules(model))
    ids, mask = batch(base.tokenizer, PROMPTS)
    stm = random_memory(model, 3)
    assert not torch.equal(loaded.decode(ids, stm=stm, key_mask=mask), base.decode(ids, key_mask=mask))
    # the identity covers the LoRA weights: a different B is a different model
    assert loaded.identity() != reactive(base, LORA, sha=base_sha256(base_dir)).identity()
    exact = ReactivePretrained.from_pretrained(model.save_adapter(tmp_path / "fp32", dtype=torch.float32), base_dir)
    assert exact.identity() == model.identity()
    assert torch.equal(exact.decode(ids, stm=stm, key_mask=mask), model.decode(ids, stm=stm, key_mask=mask))


def test_an_adapter_saved_without_lora_keys_loads_with_its_identity(base, tmp_path):
    """Adapters saved before the options existed have no lora_*, memory_read, keep or salience_layer keys in adapter.json: they
    load, LoRA off and the read new, and keep their identity (sessions they made stay valid)."""
    base_dir = base.save_pretrained(tmp_path / "base")
    model = reactive(base, REACTIVE, sha=base_sha256(base_dir))
    adapter_dir = model.save_adapter(tmp_path / "adapter", dtype=torch.float32)
    meta = json.loads((adapter_dir / "adapter.json").read_text())
    meta["reactive"] = {k: v for k, v in meta["reactive"].items() if not k.startswith("lora_") and k not in ("memory_read", "keep", "salience_layer")}
    (adapter_dir / "adapter.json").write_text(json.dumps(meta))
    loaded = ReactivePretrained.from_pretrained(adapter_dir, base_dir)
    assert loaded.reactive.lora_rank == 0 and not lora_modules(loaded) and loaded.reactive.memory_read == "new"
    assert loaded.identity() == model.identity()
    # the identity hashes the config as it was before the options existed
    assert json.dumps(model.reactive.identity_dict(), sort_keys=True) == json.dumps(meta["reactive"], sort_keys=True)


@pytest.mark.parametrize(("change", "match"), [
    (dict(lora_targets=["q_proj", "wq"]), "unknown or no targets \\['wq'\\]"),
    (dict(lora_targets=[]), "unknown or no targets"),
    (dict(lora_layers=[0, 4]), "lora_layers must be distinct layers in 0..3"),
    (dict(lora_layers=[-1]), "lora_layers"),
    (dict(lora_layers=[1, 1]), "lora_layers"),
    (dict(lora_rank=-2), "lora_rank must be >= 0"),
    (dict(lora_alpha=0.0), "lora_alpha positive"),
])
def test_bad_lora_configs_are_refused(base, change, match):
    with pytest.raises(ValueError, match=match):
        ReactivePretrained(copy.deepcopy(base), dataclasses.replace(LORA, **change))
    with pytest.raises(ValueError, match="unknown reactive config keys \\['lora_ranks'\\]"):
        ReactiveConfig.from_dict({"lora_ranks": 8})


@torch.no_grad()
def test_the_fast_path_runs_the_lora_layers(base):
    """rxt.fast calls the decoder's linear modules, so a LoRA model's static path equals its eager path;
    and it differs from the base's (LoRA is not dropped)."""
    model = reactive(base, LORA)
    move_lora_b(model, 0.2)
    stm = random_memory(model, 2)
    new_tokens = torch.randint(4, base.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    eager, static, mask = eager_and_fast(model, FastDecoder(model, min_capacity=8, span_step=4), prompts, new_tokens, stm)
    assert_close = torch.testing.assert_close
    assert_close(static[mask], eager[mask], **TOL)
    plain = reactive(base, REACTIVE)
    _, without, _ = eager_and_fast(plain, FastDecoder(plain, min_capacity=8, span_step=4), prompts, new_tokens, stm)
    assert not torch.allclose(static[mask], without[mask], atol=1e-3)


def test_the_engine_answers_as_the_base_before_training_and_like_eager_after(chat_base):
    """Untrained: the base's greedy answers to each message alone, token for token (KV cache and all).
    B moved: the static engine's answers are the eager engine's, and they differ from the base's."""
    sampling = SamplingConfig(max_new_tokens=6)
    config = dataclasses.replace(LORA, lora_layers=None)
    base_engine = StatelessEngine(chat_base, mode="current")
    engine = ReactiveEngine(reactive(chat_base, config))
    try:
        session, base_session = engine.new_session(), base_engine.new_session()
        for query in PROMPTS:
            ours = engine.interact(session, query, sampling).token_ids
            assert ours == base_engine.interact(base_session, query, sampling).token_ids
    finally:
        engine.close()
    model = reactive(chat_base, config)
    move_lora_b(model, 0.3)
    answers = {}
    for inference in ("eager", "static"):
        engine = ReactiveEngine(model, inference=inference)
        try:
            session = engine.new_session()
            answers[inference] = [engine.interact(session, q, sampling).token_ids for q in PROMPTS]
        finally:
            engine.close()
    assert answers["eager"] == answers["static"]
    base_session = base_engine.new_session()
    assert answers["eager"] != [base_engine.interact(base_session, q, sampling).token_ids for q in PROMPTS]
