"""RxT and the stateless baseline: caching, batching, memory, MoE, gradient flow, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rxt.attention import KVCache, RotaryEmbedding
from rxt.config import GATE_ACTIVATIONS, GATE_MODES, MEMORY_ATTENTION_VARIANTS, ModelConfig
from rxt.layers import MoEFeedForward
from rxt.memory import MemoryAttention, ResidualGate, competitive_write
from rxt.model import ReactiveTransformer, StatelessLM, load_model, positions_from_mask

TOL = dict(rtol=1e-4, atol=1e-5)


def tiny(**overrides: object) -> ModelConfig:
    return ModelConfig.from_name("tiny", **overrides)


def make_rxt(**overrides: object) -> ReactiveTransformer:
    torch.manual_seed(0)
    return ReactiveTransformer(tiny(**overrides)).eval()


def make_stateless(**overrides: object) -> StatelessLM:
    torch.manual_seed(0)
    return StatelessLM(tiny(**overrides)).eval()


def random_stm(config: ModelConfig, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(config.n_layers, batch, config.stm_slots, config.d_model, generator=generator)


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 2) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, key_mask), both (B, max_len), real tokens on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    key_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        key_mask[i, width - len(row) :] = True
    return ids, key_mask


# ---------------------------------------------------------------------------- cached decoding


def decode_with_cache(decode, ids: torch.Tensor, n_layers: int, prefill: int, **memory) -> torch.Tensor:
    """Prefill, then a 2-token chunk after the cache, then one token at a time."""
    caches = [KVCache() for _ in range(n_layers)]
    chunks = [
        decode(ids[:, :prefill], caches=caches, **memory),
        decode(ids[:, prefill : prefill + 2], caches=caches, **memory),
    ]
    for t in range(prefill + 2, ids.shape[1]):
        chunks.append(decode(ids[:, t : t + 1], caches=caches, **memory))
    assert caches[0].length == ids.shape[1]
    return torch.cat(chunks, dim=1)


@pytest.mark.parametrize("moe_experts", [0, 4])
def test_rxt_cached_decoding_equals_full(moe_experts: int) -> None:
    model = make_rxt(moe_experts=moe_experts)
    ids, stm = random_ids(2, 10), random_stm(model.config, 2)
    with torch.no_grad():
        full = model.decode(ids, stm=stm)
        memory_kv = model.project_memory(stm)
        cached = decode_with_cache(model.decode, ids, model.config.n_layers, prefill=4, memory_kv=memory_kv)
    assert_close(cached, full, **TOL)


@pytest.mark.parametrize("moe_experts", [0, 4])
def test_stateless_cached_decoding_equals_full(moe_experts: int) -> None:
    model = make_stateless(moe_experts=moe_experts)
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model.decode(ids)
        cached = decode_with_cache(model.decode, ids, model.config.n_layers, prefill=1)
    assert_close(cached, full, **TOL)


# ---------------------------------------------------------------------------- batched vs single


def test_stateless_left_padded_batch_equals_single_rows() -> None:
    model = make_stateless()
    rows = [random_ids(1, 9, seed=3)[0], random_ids(1, 4, seed=4)[0]]
    ids, key_mask = left_pad(rows)
    with torch.no_grad():
        batch = model.decode(ids, key_mask=key_mask, positions=positions_from_mask(key_mask))
        for i, row in enumerate(rows):
            assert_close(batch[i, key_mask[i]], model.decode(row[None])[0], **TOL)


@pytest.mark.parametrize("moe_experts", [0, 4])
def test_rxt_left_padded_batch_equals_single_rows(moe_experts: int) -> None:
    model = make_rxt(moe_experts=moe_experts)
    rows = [random_ids(1, 5, seed=3)[0], random_ids(1, 8, seed=4)[0], random_ids(1, 1, seed=5)[0]]
    ids, key_mask = left_pad(rows)
    stm = random_stm(model.config, len(rows))
    with torch.no_grad():
        batch = model.decode(ids, stm=stm, key_mask=key_mask, positions=positions_from_mask(key_mask))
        for i, row in enumerate(rows):
            alone = model.decode(row[None], stm=stm[:, i : i + 1])
            assert_close(batch[i, key_mask[i]], alone[0], **TOL)


def test_rxt_left_padded_cached_batch_equals_single_rows() -> None:
    """Prefill a left-padded batch, then decode token by token with the mask and positions extended."""
    model = make_rxt()
    prompts = [random_ids(1, 6, seed=3)[0], random_ids(1, 3, seed=4)[0]]
    ids, key_mask = left_pad(prompts)
    new_tokens = random_ids(2, 4, seed=6)
    stm = random_stm(model.config, 2)
    with torch.no_grad():
        memory_kv, caches = model.project_memory(stm), [KVCache() for _ in range(model.config.n_layers)]
        positions = positions_from_mask(key_mask)
        model.decode(ids, memory_kv=memory_kv, caches=caches, key_mask=key_mask, positions=positions)
        steps = []
        for t in range(new_tokens.shape[1]):
            key_mask = torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            positions = positions[:, -1:] + 1
            step = new_tokens[:, t : t + 1]
            steps.append(
                model.decode(step, memory_kv=memory_kv, caches=caches, key_mask=key_mask, positions=positions)
            )
        for i, prompt in enumerate(prompts):
            alone = model.decode(torch.cat([prompt, new_tokens[i]])[None], stm=stm[:, i : i + 1])
            assert_close(torch.cat(steps, dim=1)[i], alone[0, len(prompt) :], **TOL)


def test_left_padded_memory_update_equals_single_rows() -> None:
    model = make_rxt()
    rows = [random_ids(1, 7, seed=3)[0], random_ids(1, 3, seed=4)[0]]
    ids, key_mask = left_pad(rows)
    stm = random_stm(model.config, 2)
    with torch.no_grad():
        batch = model.update_memory(stm, ids, key_mask)
        for i, row in enumerate(rows):
            assert_close(batch[:, i], model.update_memory(stm[:, i : i + 1], row[None])[:, 0], **TOL)


def test_positions_from_mask() -> None:
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


# ---------------------------------------------------------------------------- memory


def test_memory_cross_attention_ignores_slot_order() -> None:
    model = make_rxt()
    ids, stm = random_ids(2, 7), random_stm(model.config, 2)
    permutation = torch.randperm(model.config.stm_slots, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.decode(ids, stm=stm)
        assert_close(model.decode(ids, stm=stm[:, :, permutation]), logits, **TOL)
        assert not torch.allclose(model.decode(ids, stm=stm.flip(-1)), logits, **TOL)  # the memory is read at all (its scale is not: slots are RMS-normalised)


def memory_attention_case(**overrides: object):
    """A tiny memory attention network, a batch of 2 memories, and ED for them (row 1 left-padded by 2)."""
    config = tiny(**overrides)
    torch.manual_seed(0)
    network = MemoryAttention(config, RotaryEmbedding(config.d_head, config.max_seq_len))
    encoded = [torch.randn(2, 6, config.d_model) for _ in range(config.n_layers)]
    return network, random_stm(config, 2), encoded, torch.tensor([[True] * 6, [False, False] + [True] * 4])


@pytest.mark.parametrize("activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("variant", MEMORY_ATTENTION_VARIANTS)
def test_memory_attention_variants(variant: str, gate_mode: str, activation: str) -> None:
    network, stm, encoded, ed_mask = memory_attention_case(
        memory_attention=variant, gate_mode=gate_mode, gate_activation=activation
    )
    new = network(stm, encoded, ed_mask)
    assert new.shape == stm.shape and torch.isfinite(new).all()
    # ED reaches memory (another ED, not a scaled one: ED is RMS-normalised before it is read)
    assert not torch.allclose(network(stm, [e.flip(1) for e in encoded], ed_mask), new, atol=1e-4)


@pytest.mark.parametrize("activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", MEMORY_ATTENTION_VARIANTS)
def test_competitive_writes_ignore_padding_and_share_out_every_token(variant: str, activation: str) -> None:
    network, stm, encoded, ed_mask = memory_attention_case(
        memory_attention=variant, gate_activation=activation, memory_write="competitive"
    )
    new = network(stm, encoded, ed_mask)
    alone = network(stm[:, 1:], [e[1:, 2:] for e in encoded])  # the padded row without its padding
    assert_close(new[:, 1:], alone, **TOL)
    assert not torch.allclose(network(stm, [e.flip(1) for e in encoded], ed_mask), new, atol=1e-4)  # ED is read
    layer = network.layers[0]
    _, taken = competitive_write(layer.attention, stm[0], encoded[0], None, ed_mask)
    assert_close(taken.sum(dim=(1, 2)), ed_mask.sum(-1).float(), **TOL)  # all slots together take every token


@pytest.mark.parametrize("variant", MEMORY_ATTENTION_VARIANTS)
def test_queue_writes_append_the_turn_and_drop_the_oldest_slots(variant: str) -> None:
    network, stm, encoded, ed_mask = memory_attention_case(memory_attention=variant, memory_write="queue", write_slots=2)
    new = network(stm, encoded, ed_mask)
    assert torch.equal(new[:, :, :-2], stm[:, :, 2:])  # every other slot kept exactly, two places on
    flipped = network(stm, [e.flip(1) for e in encoded], ed_mask)
    assert not torch.allclose(flipped[:, :, -2:], new[:, :, -2:], atol=1e-4)  # the new slots read the turn
    assert_close(new[:, 1:], network(stm[:, 1:], [e[1:, 2:] for e in encoded]), **TOL)  # padding is ignored
    starts = (stm, random_stm(tiny(), 2, seed=5))
    ends = []
    for memory in starts:
        for _ in range(stm.shape[2] // 2):  # stm_slots / write_slots turns: every slot written anew
            memory = network(memory, encoded, ed_mask)
        ends.append(memory)
    for start, end in zip(starts, ends, strict=True):
        assert not (end[..., None, :] == start[..., None, :, :]).all(-1).any()  # no slot of the start is left
    if variant == "simple":  # nothing reads the old memory: after enough turns, the start is forgotten
        assert_close(ends[0], ends[1], **TOL)
    else:  # the pre-step reads it: the new slots carry what the memory held
        assert not torch.allclose(ends[0], ends[1], atol=1e-4)


def test_queue_writes_need_write_slots() -> None:
    with pytest.raises(ValueError, match="write_slots"):
        tiny(memory_write="queue")
    with pytest.raises(ValueError, match="stm_slots=8 - long_term_slots=0\\), got write_slots=20"):
        tiny(memory_write="queue", write_slots=20)
    with pytest.raises(ValueError, match="write_slots=2 is for memory_write 'queue'"):
        tiny(write_slots=2)


@pytest.mark.parametrize("activation", GATE_ACTIVATIONS)
def test_a_slot_that_takes_nothing_keeps_its_memory(activation: str) -> None:
    gate = randomized_gate("elementwise", activation)
    old, update = torch.randn(3, 8, 16), torch.randn(3, 8, 16)
    assert_close(gate(old, update, share=torch.ones(3, 8, 1)), gate(old, update))
    assert torch.equal(gate(old, update, share=torch.zeros(3, 8, 1)), old)
    half = gate(old, update, share=torch.full((3, 8, 1), 0.5))
    assert_close(half, (old + gate(old, update)) / 2, **TOL)  # the write scales with the share
    assert not torch.allclose(half, old)


def randomized_gate(mode: str, activation: str, slots: int = 8, dim: int = 16) -> ResidualGate:
    torch.manual_seed(0)
    gate = ResidualGate(slots, mode, activation, dim)
    for parameter in gate.parameters():
        torch.nn.init.normal_(parameter, std=2.0)  # spread the gate over (0, 1)
    return gate


def assert_between(new: torch.Tensor, old: torch.Tensor, update: torch.Tensor) -> None:
    low, high = torch.minimum(old, update), torch.maximum(old, update)
    assert (new >= low - 1e-6).all() and (new <= high + 1e-6).all()


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_sigmoid_gate_is_a_convex_mix(gate_mode: str) -> None:
    gate = randomized_gate(gate_mode, "sigmoid")
    old, update = torch.randn(3, 8, 16), torch.randn(3, 8, 16)
    new = gate(old, update)
    assert_between(new, old, update)
    assert not torch.allclose(new, old) and not torch.allclose(new, update)


def test_gate_without_activation_adds() -> None:
    old, update = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    assert_close(ResidualGate(8, "static", "none")(old, update), old + update)


@pytest.mark.parametrize("variant", MEMORY_ATTENTION_VARIANTS)
def test_memory_update_in_model_is_a_convex_mix(variant: str) -> None:
    """Hook every residual gate during update_memory: each new STM layer lies between old and update."""
    model = make_rxt(memory_attention=variant)
    seen = []
    hooks = [
        layer.gate.register_forward_hook(lambda _module, inputs, output: seen.append((*inputs, output)))
        for layer in model.memory_attention.layers
    ]
    stm = random_stm(model.config, 2)
    with torch.no_grad():
        new_stm = model.update_memory(stm, random_ids(2, 9))
    for hook in hooks:
        hook.remove()
    assert len(seen) == model.config.n_layers
    for i, (old, update, new) in enumerate(seen):
        assert torch.equal(old, stm[i]) and torch.equal(new, new_stm[i])
        assert_between(new, old, update)


# ---------------------------------------------------------------------------- mixture of experts


def test_moe_matches_per_token_reference() -> None:
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 24, n_experts=4, top_k=2)
    x = torch.randn(2, 5, 16)
    out = moe(x)
    assert out.shape == x.shape
    tokens = x.reshape(-1, 16)
    expected = []
    for token in tokens:
        weights, chosen = moe.router(token).softmax(-1).topk(2)
        weights = weights / weights.sum()
        expected.append(sum(w * moe.experts[int(e)](token) for w, e in zip(weights, chosen, strict=True)))
    assert_close(out.reshape(-1, 16), torch.stack(expected), **TOL)


def test_moe_aux_loss_is_one_for_uniform_routing() -> None:
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 24, n_experts=4, top_k=2)
    torch.nn.init.zeros_(moe.router.weight)  # every expert equally likely
    moe(torch.randn(3, 7, 16))
    assert_close(moe.aux_loss, torch.tensor(1.0))
    torch.nn.init.normal_(moe.router.weight, std=0.01)  # nearly uniform, routing spread over experts
    moe(torch.randn(64, 8, 16))
    assert 1.0 <= moe.aux_loss.item() < 1.05


def test_moe_aux_loss_grows_when_routing_collapses() -> None:
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 24, n_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    moe(torch.ones(2, 5, 16))  # every token prefers expert 0
    assert moe.aux_loss.item() > 2.0 and torch.isfinite(moe.aux_loss)


def test_micro_preset_forward() -> None:
    torch.manual_seed(0)
    model = ReactiveTransformer(ModelConfig.from_name("micro")).eval()
    config = model.config
    ids = random_ids(1, 12, vocab=config.vocab_size)
    with torch.no_grad():
        stm = model.initial_memory(1)
        logits = model.decode(ids, stm=stm)
        new_stm = model.update_memory(stm, ids)
    assert logits.shape == (1, 12, config.vocab_size) and torch.isfinite(logits).all()
    assert new_stm.shape == (config.n_layers, 1, config.stm_slots, config.d_model)
    aux = model.aux_loss()
    assert torch.isfinite(aux) and aux.item() > 0


# ---------------------------------------------------------------------------- gradient flow


def joint_loss(model: ReactiveTransformer) -> torch.Tensor:
    """Decoder loss reading memory updated by encoder + memory attention, plus MLM and MoE losses."""
    vocab = model.config.vocab_size
    ids, ids2 = random_ids(2, 12, seed=7), random_ids(2, 12, seed=8)
    stm1 = model.update_memory(model.initial_memory(2), ids)
    logits = model.decode(ids2[:, :-1], stm=stm1)
    decoder_loss = F.cross_entropy(logits.reshape(-1, vocab), ids2[:, 1:].reshape(-1))
    mlm_loss = F.cross_entropy(model.mlm_logits(model.encode(ids)).reshape(-1, vocab), ids2.reshape(-1))
    return decoder_loss + mlm_loss + model.aux_loss()


@pytest.mark.parametrize(
    ("variant", "gate_mode", "activation"),
    [
        ("interlayer", "elementwise", "sigmoid"),
        ("simple", "static", "sigmoid"),
        ("self", "linear", "sigmoid"),
        ("gated_self_interlayer", "elementwise", "tanh"),
        ("interlayer", "linear", "none"),
        ("interlayer", "content", "sigmoid"),
        ("interlayer", "competitive", "sigmoid"),
        ("self", "competitive", "tanh"),
        ("interlayer", "queue", "sigmoid"),
        ("gated_self_interlayer", "queue", "sigmoid"),
    ],
)
def test_gradients_reach_every_parameter(variant: str, gate_mode: str, activation: str) -> None:
    """gate_mode "competitive" / "queue" stand for those writes (with elementwise gates / none)."""
    write = gate_mode if gate_mode in ("competitive", "queue") else "attention"
    gate_mode = "elementwise" if write != "attention" else gate_mode
    config = dict(memory_attention=variant, gate_mode=gate_mode, gate_activation=activation, memory_write=write,
                  write_slots=2 if write == "queue" else 0)
    model = make_rxt(stm_init="learned", moe_experts=4, **config).train()
    joint_loss(model).backward()
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero_grad = [
        name for name, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0
    ]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    assert not zero_grad, f"parameters with an all-zero gradient: {zero_grad}"


# ---------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("model_class", [ReactiveTransformer, StatelessLM])
def test_save_load_round_trip_is_bit_identical(model_class: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = model_class(tiny(stm_init="learned", moe_experts=4)).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is model_class
    assert loaded.identity() == model.identity()
    ids = random_ids(2, 9)
    with torch.no_grad():
        if model_class is StatelessLM:
            assert torch.equal(loaded.decode(ids), model.decode(ids))
            return
        stm = model.initial_memory(2)
        assert torch.equal(loaded.initial_memory(2), stm)
        assert torch.equal(loaded.decode(ids, stm=stm), model.decode(ids, stm=stm))
        assert torch.equal(loaded.update_memory(stm, ids), model.update_memory(stm, ids))


@pytest.fixture
def saved_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    ReactiveTransformer(tiny()).save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_load_fails_on_missing_file(saved_dir: Path, name: str) -> None:
    (saved_dir / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{name} is missing"):
        ReactiveTransformer.from_pretrained(saved_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            dict(ffn_dim=96),
            r"shape mismatch for decoder\.layers\.0\.ffn\.\w+\.weight: file has .*64.*config expects .*96",
        ),
        (dict(d_model=48), r"shape mismatch for .*32.*48"),
        (dict(n_layers=3), r"missing \['decoder\.layers\.2\."),
        (dict(bogus_key=1), r"unknown config keys \['bogus_key'\]"),
        (dict(model_type="stateless"), r"model_type='stateless'"),
    ],
)
def test_load_fails_on_mismatched_config(saved_dir: Path, changes: dict, message: str) -> None:
    edit_config(saved_dir, **changes)
    with pytest.raises(ValueError, match=message):
        ReactiveTransformer.from_pretrained(saved_dir)


def test_saved_records_round_trip_and_refuse_unknown_keys_by_name():
    from rxt.pretrained.reactive_config import ReactiveConfig
    from rxt.tokenizer import ChatTemplate

    for record, kind in ((ModelConfig(), "config"), (ChatTemplate(), "chat template"),
                         (ReactiveConfig(lora_rank=4), "reactive config")):
        assert type(record).from_dict(record.to_dict()) == record
        with pytest.raises(ValueError, match=rf"unknown {kind} keys \['bogus'\]"):
            type(record).from_dict({**record.to_dict(), "bogus": 1})
