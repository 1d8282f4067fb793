"""Consolidating writes (memory_write "consolidate"): a queue whose evicted slots are folded into
long-term slots. Shapes, a fixed state size, the gate's limits, what outlives the queue, save/load,
the engine's and the server's session state, and a queue model continued with long-term slots."""

from __future__ import annotations

import httpx
import pytest
import torch
from torch.testing import assert_close

from rxt.attention import RotaryEmbedding
from rxt.config import ModelConfig
from rxt.generation import SamplingConfig
from rxt.memory import Consolidation, MemoryAttention
from rxt.model import ReactiveTransformer, load_model
from rxt.serve.store import SQLiteStore
from rxt.session import Session
from rxt.training.pipeline import grow_long_term
from test_serve_support import make_tiny_model as make_model_dir
from test_serve_support import serve_in_thread

TOL = dict(rtol=1e-4, atol=1e-5)
LASTING = dict(memory_write="consolidate", stm_slots=12, long_term_slots=4, write_slots=2)  # queue: 8 slots, 4 turns


def tiny(**overrides: object) -> ModelConfig:
    return ModelConfig.from_name("tiny", **{**LASTING, **overrides})


def network_case(**overrides: object) -> tuple[MemoryAttention, torch.Tensor, list[torch.Tensor]]:
    """A tiny memory attention network, a memory of 2 rows, and one turn's ED for it."""
    config = tiny(**overrides)
    torch.manual_seed(0)
    network = MemoryAttention(config, RotaryEmbedding(config.d_head, config.max_seq_len))
    stm = torch.randn(config.n_layers, 2, config.stm_slots, config.d_model)
    return network, stm, [torch.randn(2, 6, config.d_model) for _ in range(config.n_layers)]


def set_gate(network: MemoryAttention, bias: float) -> None:
    """Every consolidation gate at sigmoid(bias), whatever it reads."""
    with torch.no_grad():
        for layer in network.layers:
            gate = layer.consolidation.gate
            gate.weight.zero_()
            gate.bias.fill_(bias)


def test_config_checks_the_long_term_slots() -> None:
    with pytest.raises(ValueError, match="1 <= long_term_slots < stm_slots=12, got long_term_slots=0"):
        tiny(long_term_slots=0)
    with pytest.raises(ValueError, match="long_term_slots < stm_slots=12, got long_term_slots=12"):
        tiny(long_term_slots=12)
    with pytest.raises(ValueError, match="write_slots <= 8 .* got write_slots=9"):
        tiny(write_slots=9)
    with pytest.raises(ValueError, match="long_term_slots=4 is for memory_write 'consolidate'"):
        tiny(memory_write="queue")
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()


def test_the_queue_moves_on_and_the_long_term_slots_take_what_it_evicts() -> None:
    network, stm, encoded = network_case()
    new = network(stm, encoded)
    assert new.shape == stm.shape
    assert torch.equal(new[:, :, 4:-2], stm[:, :, 6:])  # the queue: every slot kept, two places on
    assert not torch.allclose(new[:, :, :4], stm[:, :, :4], atol=1e-4)  # the long-term slots were written
    evicted_changed = stm.clone()
    evicted_changed[:, :, 4:6] = torch.randn_like(evicted_changed[:, :, 4:6])
    again = network(evicted_changed, encoded)
    assert not torch.allclose(again[:, :, :4], new[:, :, :4], atol=1e-4)  # what they take is the evicted slots
    assert torch.equal(again[:, :, 4:-2], new[:, :, 4:-2])  # the queue keeps its slots as they were


def test_a_shut_gate_keeps_the_long_term_slots_and_an_open_one_moves_a_slot_whole() -> None:
    network, stm, encoded = network_case(write_slots=1)
    set_gate(network, -60.0)
    assert_close(network(stm, encoded)[:, :, :4], stm[:, :, :4], rtol=0, atol=1e-6)
    set_gate(network, 60.0)
    with torch.no_grad():  # every evicted slot goes to long-term slot 0, and to it alone
        for layer in network.layers:
            layer.consolidation.address.zero_()
            layer.consolidation.address[0] = 1e4 * torch.ones(stm.shape[-1])
            layer.consolidation.route_query.weight.zero_()
            layer.consolidation.route_key.weight.copy_(torch.eye(stm.shape[-1]))
    evicted = stm[:, :, 4:5].clone()
    evicted[..., :] = evicted.abs()  # positive everywhere: its score with slot 0's address is huge
    stm[:, :, 4:5] = evicted
    new = network(stm, encoded)
    assert_close(new[:, :, :1], evicted, **TOL)  # moved, not rewritten
    assert torch.equal(new[:, :, 1:4], stm[:, :, 1:4])  # a slot that takes nothing keeps what it holds


def test_the_long_term_share_is_at_most_one_evicted_slot_per_slot_and_all_of_them_together() -> None:
    config = tiny()
    consolidation = Consolidation(config)
    long_term, evicted = torch.randn(3, 4, config.d_model), torch.randn(3, 2, config.d_model)
    query = consolidation.address + consolidation.route_query(consolidation.slot_norm(long_term))
    key = consolidation.route_key(consolidation.evicted_norm(evicted))
    weights = (query @ key.transpose(-2, -1) / config.d_model**0.5).softmax(dim=-2)  # (3, 4, 2)
    assert_close(weights.sum(dim=(1, 2)), torch.full((3,), 2.0), **TOL)  # two slots' worth is shared out
    assert (weights.max(dim=1).values > 0.5).float().mean() > 0.5  # the random addresses route sharply


def test_something_told_outlives_the_queue() -> None:
    """After 4 more turns a queue has dropped a turn; the long-term slots still hold what it wrote."""
    torch.manual_seed(0)
    for memory_write, outlives in (("queue", False), ("consolidate", True)):
        overrides = dict(memory_attention="simple", memory_write=memory_write, write_slots=2)
        if memory_write == "queue":
            overrides.update(stm_slots=8, long_term_slots=0)
        model = ReactiveTransformer(tiny(**overrides)).eval()
        ends = []
        for first in (torch.randint(5, 100, (1, 9)), torch.randint(5, 100, (1, 9))):
            stm = model.update_memory(model.initial_memory(1), first)
            for t in range(12):  # three times the 4 turns the queue holds
                stm = model.update_memory(stm, torch.randint(5, 100, (1, 7), generator=torch.Generator().manual_seed(t)))
            ends.append(stm)
        assert torch.allclose(ends[0], ends[1], atol=1e-6) != outlives, memory_write


def test_gradient_reaches_the_consolidation_from_an_answer_past_the_queue() -> None:
    model = ReactiveTransformer(tiny(memory_attention="simple"))
    stm = model.initial_memory(2)
    for t in range(7):  # the first turn has left the 4-turn queue by the answer
        stm = model.update_memory(stm, torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(t)))
    model.decode(torch.randint(5, 100, (2, 5)), stm=stm).logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        if ".consolidation." in name and not name.endswith(("read_old.weight", "read_update.weight")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_state_size_is_fixed_over_a_hundred_turns_and_survives_save_and_load(engine_factory, make_tiny_model,
                                                                               tmp_path) -> None:
    model = make_tiny_model(ReactiveTransformer, **LASTING)
    engine = engine_factory("rxt", model=model)
    session = engine.new_session()
    config = model.config
    expected = config.n_layers * config.stm_slots * config.d_model * 4  # float32
    sizes = []
    for t in range(100):
        engine.interact(session, f"Turn {t}: my name is Ada.", SamplingConfig(max_new_tokens=2))
        session.wait()
        sizes.append(engine.state_bytes(session))
    assert set(sizes) == {expected}
    assert tuple(session.tensors["stm"].shape) == (config.n_layers, 1, config.stm_slots, config.d_model)
    model.save_pretrained(tmp_path / "model")
    session.save(tmp_path / "session.safetensors")
    reloaded = load_model(tmp_path / "model")
    assert reloaded.config == config and reloaded.identity() == model.identity()
    later = ["Where do I live?", "What is my name?"]
    other = engine_factory("rxt", model=reloaded)
    resumed = Session.load(tmp_path / "session.safetensors")
    other.check_session(resumed)
    uninterrupted = [engine.interact(session, q, SamplingConfig(max_new_tokens=6)).token_ids for q in later]
    assert [other.interact(resumed, q, SamplingConfig(max_new_tokens=6)).token_ids for q in later] == uninterrupted


def test_the_server_exports_and_imports_the_whole_state(tmp_path) -> None:
    model_dir = make_model_dir(tmp_path / "lasting", **LASTING)
    config = load_model(model_dir).config
    with serve_in_thread(model_dir, SQLiteStore("sqlite:///:memory:")) as url, httpx.Client(base_url=url, timeout=60) as http:
        session_id = http.post("/v1/sessions").json()["id"]
        body = {"model": "tiny-rxt", "messages": [{"role": "user", "content": "Hi, my name is Ada."}],
                "max_tokens": 4, "session_id": session_id}
        sizes = []
        for _ in range(6):  # more turns than the queue holds
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            sizes.append(http.get(f"/v1/sessions/{session_id}").json()["state_bytes"])
        info = http.get(f"/v1/sessions/{session_id}").json()
        assert len(set(sizes)) == 1 and info["stm_shape"] == [config.n_layers, 1, 12, config.d_model]
        state = http.get(f"/v1/sessions/{session_id}/state").content
        assert len(state) == info["state_bytes"]
        assert Session.from_bytes(state).state_bytes() == config.n_layers * 12 * config.d_model * 4
        imported = http.post("/v1/sessions/import", content=state).json()
        assert imported["turns"] == 6 and imported["state_bytes"] == info["state_bytes"]


def test_a_queue_model_grows_long_term_slots_and_keeps_everything_else() -> None:
    torch.manual_seed(0)
    queue = ReactiveTransformer(tiny(memory_write="queue", stm_slots=8, long_term_slots=0))
    torch.manual_seed(1)
    fresh = ReactiveTransformer(tiny())
    grown = grow_long_term(queue, fresh, "queue-dir")
    old, new = queue.state_dict(), grown.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k != "stm.init")
    assert torch.equal(new["stm.init"][:, 4:], old["stm.init"])  # the queue starts as it did
    assert {k for k in new if k not in old} == {k for k in new if ".consolidation." in k}
    ids = torch.randint(5, 100, (1, 6))
    assert_close(grown.decode(ids, stm=grown.initial_memory(1)[:, :, 4:]), queue.decode(ids, stm=queue.initial_memory(1)))
    with pytest.raises(ValueError, match="long_term_slots added to stm_slots"):
        grow_long_term(queue, ReactiveTransformer(tiny(stm_slots=14)), "queue-dir")
