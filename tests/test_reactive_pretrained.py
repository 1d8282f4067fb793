"""A pretrained decoder made reactive: exact base logits before training, gradient to the new weights
only, the adapter round trip and its base check, the STM over turns, ReactiveEngine driving it; and,
slow, the exact-logits check and the adapter size on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from rxt.baselines import StatelessEngine
from rxt.engine import ReactiveEngine
from rxt.generation import SamplingConfig, left_pad
from rxt.model import StatelessLM
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained, base_sha256, dialogue_loss

pytestmark = pytest.mark.usefixtures("one_thread")

# llama layout: GQA self-attention (4 query heads, 2 KV heads); memory in layers 1 and 3 of 4
BASE = dict(n_layers=4, n_q_heads=4, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-5)
REACTIVE = ReactiveConfig(memory_layers=[1, 3], cross_n_q_heads=2, cross_n_kv_heads=2, stm_slots=8, write_slots=2)
PROMPTS = ["Hi, my name is Ada and I live in Oslo.", "What is the name of my cat?", "Remember: 42."]


@pytest.fixture
def base(make_tiny_model) -> StatelessLM:
    return make_tiny_model(StatelessLM, seed=1, **BASE)


def reactive(base: StatelessLM, config: ReactiveConfig = REACTIVE, sha: str = "") -> ReactivePretrained:
    torch.manual_seed(0)
    return ReactivePretrained(copy.deepcopy(base), config, sha).eval()


def batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([tokenizer.interaction(t, "Yes, noted.") for t in texts], tokenizer.pad_id, torch.device("cpu"))


def random_memory(model: ReactivePretrained, batch_size: int) -> torch.Tensor:
    return torch.randn_like(model.initial_memory(batch_size))


def test_logits_equal_the_base_exactly_before_training(base):
    model = reactive(base)
    tok = base.tokenizer
    for text in PROMPTS:  # one prompt at a time, each with a memory that holds something
        ids = torch.tensor([tok.interaction(text, "Sure.")])
        assert torch.equal(model.decode(ids, stm=random_memory(model, 1)), base.decode(ids))
    ids, mask = batch(tok, PROMPTS)  # left-padded batch, per-row positions
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    stm = model.update_memory(model.initial_memory(3), ids, mask)  # a memory written by a turn
    assert torch.equal(
        model.decode(ids, stm=stm, key_mask=mask, positions=positions),
        base.decode(ids, key_mask=mask, positions=positions),
    )


def test_the_new_norms_start_as_the_layers_ffn_norm(base):
    with torch.no_grad():  # norms that differ from layer to layer (a fresh model's are all ones)
        for weight in (p for p in base.parameters() if p.dim() == 1):
            weight.uniform_(0.5, 1.5)
    model = reactive(base)
    layers = model.decoder.layers
    for slot, i in enumerate(REACTIVE.memory_layers):
        assert torch.equal(layers[i].memory_norm.weight, layers[i].ffn_norm.weight)
        assert torch.equal(model.memory_attention.layers[slot].ed_norm.weight, layers[i].ffn_norm.weight)


def test_the_memory_is_read_once_the_output_projection_moves(base):
    """The exactness above is not the memory being ignored: W_O = 0 is the only thing that hides it."""
    model = reactive(base)
    with torch.no_grad():
        for i in REACTIVE.memory_layers:
            model.decoder.layers[i].memory_cross_attention.o_proj.weight.normal_(0.0, 0.2)
    ids = torch.tensor([base.tokenizer.interaction(PROMPTS[0], "Sure.")])
    one, other = model.decode(ids, stm=random_memory(model, 1)), model.decode(ids, stm=random_memory(model, 1))
    assert not torch.allclose(one, other)
    assert not torch.allclose(one, base.decode(ids))


def test_only_the_new_weights_are_trainable_and_all_of_them_get_a_gradient(base):
    model = reactive(base)
    with torch.no_grad():  # from a zero W_O nothing upstream of it moves in the first step
        for i in REACTIVE.memory_layers:
            model.decoder.layers[i].memory_cross_attention.o_proj.weight.normal_(0.0, 0.02)
    model.train()
    turns = [model.interaction(q, a) for q, a in [("My cat is Bo.", "Noted."), ("What is my cat called?", "Bo.")]]
    dialogue_loss(model, turns).backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not name.startswith("base.") or "memory_" in name for name in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), [
        name for name, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0
    ]
    frozen = [p for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert model.num_parameters(trainable_only=True) == sum(p.numel() for p in trainable.values())


def test_the_memory_changes_with_each_turn_and_keeps_its_shape(base):
    model = reactive(base)
    stm = model.initial_memory(3)
    for turn in range(5):
        ids, mask = batch(base.tokenizer, [f"{p} Turn {turn}." for p in PROMPTS])
        with torch.no_grad():
            new = model.update_memory(stm, ids, mask)
        assert new.shape == stm.shape == (2, 3, REACTIVE.stm_slots, base.config.d_model)
        assert not torch.equal(new, stm)
        stm = new


def test_reactive_engine_runs_it_turn_by_turn(base):
    engine = ReactiveEngine(reactive(base))
    try:
        session = engine.new_session()
        first = session.tensors["stm"].clone()
        for query in PROMPTS:
            assert engine.interact(session, query, SamplingConfig(max_new_tokens=5)).stats.answer_tokens >= 1
        session.wait()
        assert session.turns == 3 and session.tensors["stm"].shape == first.shape
        assert not torch.equal(session.tensors["stm"], first)
    finally:
        engine.close()


def test_before_training_the_engine_answers_as_the_base_reading_the_current_turn(chat_base):
    """Every turn opens with the template's preamble (the system message), as the base's chats did: the
    answers are the base's own greedy answers to each message alone, whatever the memory holds."""
    engine = ReactiveEngine(reactive(chat_base))
    base = StatelessEngine(chat_base, mode="current")
    preamble = chat_base.tokenizer.preamble()
    assert preamble and engine.turn_prompt("Hi")[: len(preamble)] == preamble
    try:
        session, base_session = engine.new_session(), base.new_session()
        for query in PROMPTS:
            ours = engine.interact(session, query, SamplingConfig(max_new_tokens=6))
            theirs = base.interact(base_session, query, SamplingConfig(max_new_tokens=6))
            assert ours.token_ids == theirs.token_ids and ours.stats.prompt_tokens == theirs.stats.prompt_tokens
        session.wait()
        assert not torch.equal(session.tensors["stm"], engine.model.initial_memory(1))
    finally:
        engine.close()


def test_the_memory_is_written_from_the_turn_not_the_system_message(chat_base):
    model = reactive(chat_base)
    tok, preamble = chat_base.tokenizer, len(chat_base.tokenizer.preamble())
    rows = [tok.preamble() + tok.interaction(q, "Noted.") for q in PROMPTS]
    ids, mask = left_pad(rows, tok.pad_id, torch.device("cpu"))
    written = model.turn_mask(ids, mask)
    assert written.sum(1).tolist() == [len(r) - preamble for r in rows]
    for row, tokens in enumerate(rows):  # the last len - preamble tokens of each left-padded row
        assert written[row].tolist() == [False] * (ids.shape[1] - len(tokens) + preamble) + [True] * (
            len(tokens) - preamble
        )


def test_adapter_round_trip_holds_only_the_new_weights(base, tmp_path):
    base_dir = base.save_pretrained(tmp_path / "base")
    model = reactive(base, sha=base_sha256(base_dir))
    with torch.no_grad():  # "trained": every new weight differs from a fresh build's
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    adapter_dir = model.save_adapter(tmp_path / "adapter", dtype=torch.float32)
    meta = json.loads((adapter_dir / "adapter.json").read_text())
    assert meta["base_sha256"] == base_sha256(base_dir) and meta["reactive"]["memory_layers"] == [1, 3]
    saved = set(model.adapter_state_dict())
    assert saved and not saved & model.base_keys
    loaded = ReactivePretrained.from_pretrained(adapter_dir, base_dir)
    assert loaded.identity() == model.identity()
    ids, mask = batch(base.tokenizer, PROMPTS)
    stm = random_memory(model, 3)
    assert torch.equal(loaded.decode(ids, stm=stm, key_mask=mask), model.decode(ids, stm=stm, key_mask=mask))
    assert torch.equal(loaded.update_memory(stm, ids, mask), model.update_memory(stm, ids, mask))
    # the default bf16 file holds the same weights rounded to bf16, loaded back into fp32 parameters
    half = ReactivePretrained.from_pretrained(model.save_adapter(tmp_path / "bf16"), base_dir)
    for name, tensor in half.adapter_state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, model.adapter_state_dict()[name].to(torch.bfloat16).float())


def test_a_base_that_is_not_the_adapters_is_refused(base, make_tiny_model, tmp_path):
    base_dir = base.save_pretrained(tmp_path / "base")
    adapter_dir = reactive(base, sha=base_sha256(base_dir)).save_adapter(tmp_path / "adapter")
    other_dir = make_tiny_model(StatelessLM, seed=2, **BASE).save_pretrained(tmp_path / "other")
    expected, found = base_sha256(base_dir), base_sha256(other_dir)
    assert expected != found
    with pytest.raises(ValueError, match=f"names base sha256 {expected}.*has {found}"):
        ReactivePretrained.from_pretrained(adapter_dir, other_dir)
    # an imported base is named by the sha256 of the file it came from, as import.json records it
    (base_dir / "import.json").write_text(json.dumps({"format": "gguf", "sha256": "f" * 64}))
    assert base_sha256(base_dir) == "f" * 64
    with pytest.raises(ValueError, match="f" * 64):
        ReactivePretrained.from_pretrained(adapter_dir, base_dir)


def test_bad_memory_layers_are_refused(base):
    for layers in ([], [4], [3, 1], [1, 1]):
        with pytest.raises(ValueError, match="memory_layers"):
            ReactivePretrained(copy.deepcopy(base), dataclasses.replace(REACTIVE, memory_layers=layers))


def test_a_few_steps_on_fact_dialogues_lower_the_loss(base):
    model = reactive(base)
    names = ("Ada", "Bo", "Chen")
    dialogues = [[(f"My cat is {n}.", "Noted."), ("What is my cat called?", f"{n}.")] for n in names]
    data = [[model.interaction(q, a) for q, a in d] for d in dialogues]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()

    def total() -> float:
        with torch.no_grad():
            return sum(float(dialogue_loss(model, d)) for d in data)

    before = total()
    for _ in range(8):
        for d in data:
            optimizer.zero_grad()
            dialogue_loss(model, d).backward()
            optimizer.step()
    assert total() < before


SMOLLM2_GGUF = Path("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    ready = os.environ.get("RXT_SMOLLM2_DIR")  # an imported directory, to skip the 10 s import
    if ready and (Path(ready) / "model.safetensors").is_file():
        return Path(ready)
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is missing: rxt data fetch smollm2")
    from rxt.pretrained.gguf import import_gguf

    out = tmp_path_factory.mktemp("smollm2")
    import_gguf(SMOLLM2_GGUF, out)
    return out


@pytest.mark.slow
def test_smollm2_reactive_logits_equal_the_base_and_the_adapter_is_small(smollm2_dir, tmp_path):
    base = StatelessLM.from_pretrained(smollm2_dir)
    model = ReactivePretrained.from_base(smollm2_dir)  # memory in every 3rd layer: 2, 5, ..., 29
    tok = base.tokenizer
    prompts = ["What is the capital of France?", "My name is Ada and my cat is called Bo.", "Tell me a joke."]
    with torch.no_grad():
        ids, mask = left_pad([tok.prompt(p) for p in prompts], tok.pad_id, torch.device("cpu"))
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        stm = model.update_memory(model.initial_memory(3), *batch(tok, prompts))
        got = model.decode(ids, stm=stm, key_mask=mask, positions=positions)
        want = base.decode(ids, key_mask=mask, positions=positions)
    assert torch.equal(got, want)
    adapter = model.save_adapter(tmp_path / "adapter") / "adapter.safetensors"
    assert adapter.stat().st_size <= 20 * 10**6
    loaded = ReactivePretrained.from_pretrained(tmp_path / "adapter", smollm2_dir)
    with torch.no_grad():
        assert torch.equal(loaded.decode(ids, stm=stm, key_mask=mask, positions=positions), want)
    engine, stateless = ReactiveEngine(loaded), StatelessEngine(base, mode="current")
    try:  # turn by turn, with the system message: SmolLM2's own answers to each message alone
        session, base_session = engine.new_session(), stateless.new_session()
        for prompt in prompts[:2]:
            ours = engine.interact(session, prompt, SamplingConfig(max_new_tokens=8))
            assert ours.token_ids == stateless.interact(base_session, prompt, SamplingConfig(max_new_tokens=8)).token_ids
    finally:
        engine.close()


@pytest.mark.slow
def test_smollm2_with_lora_is_exactly_the_base_and_its_adapter_under_20_mb(smollm2_dir, tmp_path):
    """LoRA rank 8 on the self-attention's q and v projections of all 30 layers: 460,800 more adapter
    weights, the logits still the base's bit for bit, the bf16 adapter still under the 20 MB budget."""
    base = StatelessLM.from_pretrained(smollm2_dir)
    model = ReactivePretrained.from_base(smollm2_dir, ReactiveConfig(lora_rank=8))
    c = base.config
    d_head = c.d_model // c.n_heads
    per_layer = 8 * (c.d_model + c.n_q_heads * d_head) + 8 * (c.d_model + c.n_kv_heads * d_head)  # A + B of q, v
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    assert lora == c.n_layers * per_layer == 460_800
    tok = base.tokenizer
    prompts = ["What is the capital of France?", "My name is Ada and my cat is called Bo."]
    with torch.no_grad():
        ids, mask = left_pad([tok.prompt(p) for p in prompts], tok.pad_id, torch.device("cpu"))
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        stm = model.update_memory(model.initial_memory(2), *batch(tok, prompts))
        want = base.decode(ids, key_mask=mask, positions=positions)
        assert torch.equal(model.decode(ids, stm=stm, key_mask=mask, positions=positions), want)
    adapter = model.save_adapter(tmp_path / "adapter")
    assert (adapter / "adapter.safetensors").stat().st_size <= 20 * 10**6
    assert json.loads((adapter / "adapter.json").read_text())["parameters"] == 9_279_360 + lora


def test_a_read_started_from_the_base_searches_the_memory_as_the_layer_searches_its_context(base):
    """memory_read "base": each memory layer's cross-attention starts as that layer's own self-attention.
    Slots that hold the states entering the layer get the keys and values the self-attention gives those
    tokens (before RoPE); the model is still exactly the base until W_O moves; its identity differs."""
    with torch.no_grad():  # an input norm that is not all ones, so folding it in is tested
        for layer in base.decoder.layers:
            layer.self_norm.weight.uniform_(0.5, 1.5)
    heads = (base.config.n_q_heads, base.config.n_kv_heads)
    config = dataclasses.replace(REACTIVE, memory_read="base")  # the read takes the base's heads; the write keeps 2/2
    model = reactive(base, config)
    tok = base.tokenizer
    ids = torch.tensor([tok.interaction(PROMPTS[0], "Sure.")])
    assert torch.equal(model.decode(ids, stm=random_memory(model, 1)), base.decode(ids))
    states = base.embedding(ids)
    for i, layer in enumerate(base.decoder.layers):
        if i in config.memory_layers:
            read = model.decoder.layers[i]
            k, v = read.project_memory(states)
            own = layer.self_attention
            normed = layer.self_norm(states)
            torch.testing.assert_close(k, own._heads(own.k_proj(normed), heads[1]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, own._heads(own.v_proj(normed), heads[1]), rtol=1e-5, atol=1e-5)
            assert torch.equal(read.memory_norm.weight, layer.self_norm.weight)
            assert read.memory_cross_attention.rotary is None  # content only: the slots have no positions
        states = layer(states, torch.arange(ids.shape[1]))
    assert model.identity() != reactive(base).identity()
    assert model.memory_attention.layers[0].attention.n_q_heads == REACTIVE.cross_n_q_heads
    with pytest.raises(ValueError, match="memory_read must be one of"):
        ReactivePretrained(copy.deepcopy(base), dataclasses.replace(REACTIVE, memory_read="old"))
    assert "memory_read" not in REACTIVE.identity_dict()  # adapters saved before the option keep their identity


def test_a_tokens_memory_keeps_the_turns_states_verbatim_and_learns_nothing_on_the_write(base):
    """memory_write "tokens": no memory attention; after a turn each memory layer's last slots are the
    turn's states after that layer (the masked-out padding and preamble left out), older slots shift
    towards the front and the oldest drop; a left-padded batch writes what each row alone writes."""
    config = dataclasses.replace(REACTIVE, memory_write="tokens", stm_slots=12)
    model = reactive(base, config)
    assert model.memory_attention is None
    assert not any(k.startswith("memory_attention.") for k in model.adapter_state_dict())
    tok = base.tokenizer
    ids, mask = batch(tok, PROMPTS)
    stm0 = model.initial_memory(3)
    stm = model.update_memory(stm0, ids, mask)
    assert stm.shape == stm0.shape
    encoded = model.encode(ids, stm0, mask)
    kept = model.turn_mask(ids, mask)
    for row in range(3):
        n = int(kept[row].sum())
        for slot in range(len(config.memory_layers)):
            states = encoded[slot][row][kept[row]]
            if n >= 12:
                assert torch.equal(stm[slot, row], states[-12:])
            else:
                assert torch.equal(stm[slot, row, -n:], states) and torch.equal(stm[slot, row, :-n], stm0[slot, row, n:])
        alone = model.update_memory(stm0[:, row : row + 1], ids[row : row + 1, mask[row]], None)
        torch.testing.assert_close(alone[:, 0], stm[:, row], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="memory_write"):
        ReactivePretrained(copy.deepcopy(base), dataclasses.replace(REACTIVE, memory_write="token"))
