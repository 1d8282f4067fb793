"""The fast inference path (rxt.fast) against the eager reference: logits, greedy answers, growing caches,
and the compiled graphs (slow: they compile)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rxt.attention import KVCache
from rxt.fast import DecodeState, FastDecoder, capacity_for
from rxt.generation import SamplingConfig, left_pad
from rxt.model import ReactiveTransformer, StatelessLM, positions_from_mask

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=2e-5, rtol=2e-5)  # float32: the static path attends over masked empty slots too
GREEDY = SamplingConfig(max_new_tokens=12)
QUERIES = ["Hi, my name is Ada and I live in Oslo.", "What is my name?", "Remember: my favourite number is 42."]


def eager_and_fast(model, fast: FastDecoder, prompts: list[list[int]], new_tokens: torch.Tensor, stm=None):
    """Logits of a left-padded prefill (all positions) and of token-by-token steps, both ways."""
    ids, mask = left_pad(prompts, 0)
    positions = positions_from_mask(mask)
    memory = {} if stm is None else {"memory_kv": model.project_memory(stm)}
    caches = [KVCache() for _ in model.decoder.layers]
    state = fast.new_state(len(prompts), ids.shape[1] + 1)  # too small on purpose: decode must grow it
    eager = [model.decode(ids, key_mask=mask, positions=positions, caches=caches, **memory)]
    static = [fast.prefill(state, ids, positions, mask, stm, all_logits=True)]
    for t in range(new_tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        step = new_tokens[:, t : t + 1]
        eager.append(model.decode(step, key_mask=mask, positions=positions, caches=caches, **memory))
        state = fast.reserve(state, 1)
        static.append(fast.decode(state, step, positions))
    return torch.cat(eager, dim=1), torch.cat(static, dim=1), mask


@pytest.mark.parametrize("model_class", [ReactiveTransformer, StatelessLM])
@torch.no_grad()
def test_static_path_logits_equal_eager(make_tiny_model, model_class: type) -> None:
    model = make_tiny_model(model_class)
    stm = torch.randn(model.config.n_layers, 2, model.config.stm_slots, model.config.d_model)
    stm = stm if model_class is ReactiveTransformer else None
    fast = FastDecoder(model, min_capacity=8, span_step=4)  # spans short of the capacity, growing
    new_tokens = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    eager, static, mask = eager_and_fast(model, fast, [[5, 6, 7, 8, 9, 10], [11, 12, 13]], new_tokens, stm)
    assert static.shape == eager.shape
    assert_close(static[mask], eager[mask], **TOL)  # real tokens; padding rows are never read


def test_prefill_returns_the_last_position_only(make_tiny_model) -> None:
    model = make_tiny_model(StatelessLM)
    fast = FastDecoder(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = fast.prefill(fast.new_state(1, 4), ids, torch.arange(4)[None], torch.ones_like(ids, dtype=torch.bool))
    assert logits.shape == (1, 1, model.config.vocab_size)
    with torch.no_grad():
        assert_close(logits[0, -1], model.decode(ids)[0, -1], **TOL)


def test_capacity_buckets_and_growth(make_tiny_model) -> None:
    assert [capacity_for(n) for n in (1, 64, 65, 300)] == [64, 64, 128, 512]
    fast = FastDecoder(make_tiny_model(StatelessLM), min_capacity=4)
    state = fast.new_state(1, 3)
    assert state.capacity == 4
    state.keys[1][:, :, :3] = 1.0
    state.length = 3
    grown = fast.reserve(state, 2)
    assert grown.capacity == 8 and grown.length == 3 and bool((grown.keys[1][:, :, :3] == 1).all())
    assert fast.reserve(grown, 5) is grown
    with pytest.raises(ValueError, match="no room"):  # 3 used + 6 new > 8
        fast.prefill(grown, torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long),
                     torch.ones(1, 6, dtype=torch.bool))


def test_memory_projection_follows_new_weights(make_tiny_model) -> None:
    """The stacked memory K/V weights are rebuilt when the model's weights change (training, loading)."""
    model = make_tiny_model(ReactiveTransformer)
    fast = FastDecoder(model, min_capacity=8)
    stm = torch.randn(model.config.n_layers, 1, model.config.stm_slots, model.config.d_model)
    ids = torch.tensor([[5, 6, 7]])
    ones = torch.ones_like(ids, dtype=torch.bool)
    fast.prefill(fast.new_state(1, 3), ids, torch.arange(3)[None], ones, stm)
    with torch.no_grad():
        model.decoder.layers[1].memory_cross_attention.v_proj.weight.mul_(3.0)
        after = fast.prefill(fast.new_state(1, 3), ids, torch.arange(3)[None], ones, stm)
        assert_close(after[0, -1], model.decode(ids, stm=stm)[0, -1], **TOL)


@pytest.mark.parametrize("kind", ["rxt", "full", "cached", "window"])
def test_static_engine_answers_like_eager(engine_factory, make_tiny_model, kind: str) -> None:
    """Three turns, greedy: the same tokens and the same state bytes, turn after turn."""
    model_class = ReactiveTransformer if kind == "rxt" else StatelessLM
    model = make_tiny_model(model_class)
    eager, static = engine_factory(kind, model=model), engine_factory(kind, model=model, inference="static")
    sessions = [eager.new_session(), static.new_session()]
    for query in QUERIES:
        reference, fast = (e.interact(s, query, GREEDY) for e, s in zip((eager, static), sessions, strict=True))
        assert fast.token_ids == reference.token_ids
        assert fast.stats.prompt_tokens == reference.stats.prompt_tokens
        for session in sessions:
            session.wait()
    if kind == "cached":
        assert isinstance(sessions[1].runtime["state"], DecodeState)
        assert static.state_bytes(sessions[1]) == eager.state_bytes(sessions[0])


def test_static_engine_batches_and_scores_like_eager(engine_factory, make_tiny_model) -> None:
    model = make_tiny_model(ReactiveTransformer)
    eager, static = engine_factory("rxt", model=model), engine_factory("rxt", model=model, inference="static")
    answers = {}
    for name, engine in (("eager", eager), ("static", static)):
        sessions = [engine.new_session() for _ in QUERIES]
        answers[name] = [a.token_ids for a in engine.interact_batch(sessions, QUERIES, GREEDY)]
        for session in sessions:
            session.wait()
        answers[name + "_score"] = engine.score(sessions, QUERIES, ["Ada.", "Oslo", "42"])
    assert answers["static"] == answers["eager"]
    for (nll_s, n_s), (nll_e, n_e) in zip(answers["static_score"], answers["eager_score"], strict=True):
        assert n_s == n_e and nll_s == pytest.approx(nll_e, rel=1e-4)


def test_unknown_inference_mode_is_refused(engine_factory) -> None:
    with pytest.raises(ValueError, match="inference must be one of"):
        engine_factory("rxt", inference="fastest")


@pytest.mark.slow
@pytest.mark.parametrize("model_class", [ReactiveTransformer, StatelessLM])
@torch.no_grad()
def test_compiled_logits_equal_eager(make_tiny_model, model_class: type) -> None:
    """torch.compile'd prefill and decode, whole graphs (fullgraph: a graph break fails the test)."""
    torch._dynamo.reset()
    model = make_tiny_model(model_class)
    stm = torch.randn(model.config.n_layers, 2, model.config.stm_slots, model.config.d_model)
    stm = stm if model_class is ReactiveTransformer else None
    fast = FastDecoder(model, compile=True, min_capacity=8, span_step=4)
    new_tokens = torch.randint(4, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    eager, compiled, mask = eager_and_fast(model, fast, [[5, 6, 7, 8], [9, 10]], new_tokens, stm)
    assert_close(compiled[mask], eager[mask], **TOL)


@pytest.mark.slow
def test_compiled_engine_answers_like_eager(engine_factory, make_tiny_model) -> None:
    torch._dynamo.reset()
    model = make_tiny_model(ReactiveTransformer)
    eager, compiled = engine_factory("rxt", model=model), engine_factory("rxt", model=model, inference="compiled")
    sessions = [eager.new_session(), compiled.new_session()]
    for query in QUERIES[:2]:
        answers = [e.interact(s, query, GREEDY).token_ids for e, s in zip((eager, compiled), sessions, strict=True)]
        assert answers[1] == answers[0]
        for session in sessions:
            session.wait()


def test_memory_kv_kept_from_the_update_or_projected_when_the_stm_was_replaced(engine_factory, make_tiny_model):
    """The fast engine projects the new STM's K/V right after the update; a session whose STM was
    replaced since (loaded from a store) has them projected in the prefill, with the same answer."""
    model = make_tiny_model(ReactiveTransformer)
    eager, static = engine_factory("rxt", model=model), engine_factory("rxt", model=model, inference="static")
    session = static.new_session()
    static.interact(session, QUERIES[0], GREEDY)
    session.wait()
    kept_stm, keys, _ = session.runtime["memory_kv"]
    assert kept_stm is session.tensors["stm"]
    with torch.no_grad():
        assert_close(keys[0], model.decoder.layers[0].project_memory(kept_stm[0])[0], **TOL)
    loaded = static.new_session()
    loaded.tensors = {"stm": session.tensors["stm"].clone()}  # as a store would give it back
    reference = eager.new_session()
    reference.tensors = {"stm": session.tensors["stm"].clone()}
    expected = eager.interact_batch([reference], [QUERIES[1]], GREEDY, remember=False)[0].token_ids
    for fresh in (session, loaded):
        assert static.interact_batch([fresh], [QUERIES[1]], GREEDY, remember=False)[0].token_ids == expected


def test_a_server_counts_the_fast_paths_kept_cache(engine_factory) -> None:
    from rxt.serve.kv_caches import KVCacheKeeper

    engine = engine_factory("cached", inference="static")
    session = engine.new_session()
    engine.interact(session, QUERIES[0], GREEDY)
    keeper = KVCacheKeeper(capacity=2)
    keeper.keep(session)
    state = session.runtime["state"]
    assert keeper.nbytes == state.allocated_bytes() >= state.nbytes() > 0
