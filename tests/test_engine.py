"""Inference engines: cached vs uncached decoding, batching, the background memory update, sampling,
streaming, and the stateless baseline modes."""

from __future__ import annotations

import time
from itertools import pairwise

import pytest
import torch
from torch.testing import assert_close

import rxt.engine
from rxt.baselines import MODES
from rxt.engine import AnswerEvent, ChatEngine, MemoryUpdatedEvent, TokenEvent
from rxt.generation import SamplingConfig, decode_tokens, sample_next
from rxt.model import ReactiveTransformer

GREEDY = SamplingConfig(max_new_tokens=10)
pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = ["Hi, my name is Ada and I live in Oslo.", "What is my name?", "Remember: my favourite number is 42."]


@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], max_new_tokens: int, end_id: int, **memory) -> list[int]:
    """Recompute the whole sequence every step, no KV cache: the reference for cached decoding."""
    ids, answer = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model.decode(torch.tensor([ids]), **memory)[0, -1].argmax())
        if token == end_id:
            break
        answer.append(token)
        ids.append(token)
    return answer


def interaction_ids(engine: ChatEngine, query: str, answer: AnswerEvent) -> list[int]:
    return engine.tokenizer.prompt(query) + answer.token_ids + [engine.tokenizer.end_id]


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("kind", ["rxt", "full"])
def test_greedy_with_cache_equals_recomputing_without_cache(engine_factory, kind: str) -> None:
    engine = engine_factory(kind)
    session = engine.new_session()
    engine.interact(session, QUERIES[0], GREEDY)
    session.wait()
    tokenizer = engine.tokenizer
    if kind == "rxt":
        prompt, memory = tokenizer.prompt(QUERIES[1]), {"stm": session.tensors["stm"].clone()}
    else:
        prompt, memory = session.tensors["history"].tolist() + tokenizer.prompt(QUERIES[1]), {}
    answer = engine.interact(session, QUERIES[1], GREEDY)
    expected = greedy_without_cache(engine.model, prompt, GREEDY.max_new_tokens, tokenizer.end_id, **memory)
    assert len(answer.token_ids) > 3
    assert answer.token_ids == expected


def test_decode_runs_one_step_per_token_needed() -> None:
    """Prefill + one step per answer token but the last: nothing computes logits no one reads."""
    calls = []

    def step(tokens: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape[1])
        return torch.randn(tokens.shape[0], tokens.shape[1], 11)

    prompt = torch.ones(1, 4, dtype=torch.long)
    tokens = list(decode_tokens(step, prompt, torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None],
                                SamplingConfig(max_new_tokens=5), stop_id=None))
    assert len(tokens) == 5
    assert calls == [4, 1, 1, 1, 1]


@torch.no_grad()
def test_precomputed_memory_kv_equals_recomputed_every_step(make_tiny_model) -> None:
    model = make_tiny_model(ReactiveTransformer)
    stm = model.initial_memory(2) + 0.5 * torch.randn(model.config.n_layers, 2, model.config.stm_slots,
                                                        model.config.d_model)
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    assert_close(model.decode(ids, stm=stm), model.decode(ids, memory_kv=model.project_memory(stm)))
    # token by token with a KV cache: one projection for the turn vs a fresh one at every step
    from rxt.attention import KVCache

    once, every = [KVCache() for _ in range(2)], [KVCache() for _ in range(2)]
    memory_kv = model.project_memory(stm)
    for t in range(ids.shape[1]):
        position = torch.tensor([t])
        reused = model.decode(ids[:, t : t + 1], memory_kv=memory_kv, positions=position, caches=once)
        fresh = model.decode(ids[:, t : t + 1], stm=stm, positions=position, caches=every)
        assert_close(reused, fresh)
    assert_close(reused[:, -1], model.decode(ids, stm=stm)[:, -1], rtol=1e-4, atol=1e-5)


def test_batched_equals_single_with_different_prompt_lengths(engine_factory) -> None:
    """Left padding and per-row positions: answers and the updated STM match one-at-a-time turns."""
    engine = engine_factory("rxt")
    batch = [engine.new_session() for _ in range(3)]
    singles = [engine.new_session() for _ in range(3)]
    for turn in range(2):
        queries = [QUERIES[(row + turn) % 3] * (row + 1) for row in range(3)]  # lengths differ a lot
        batched = engine.interact_batch(batch, queries, GREEDY)
        for session, query, answer in zip(singles, queries, batched, strict=True):
            single = engine.interact(session, query, GREEDY)
            assert single.token_ids == answer.token_ids
            session.wait()
    for session, single in zip(batch, singles, strict=True):
        session.wait()
        assert_close(session.tensors["stm"], single.tensors["stm"], rtol=1e-4, atol=1e-5)
    # greedy tokens are robust to small errors; the logits are not (e.g. a query rotated at a padded position)
    prompts = [engine.tokenizer.prompt(QUERIES[row] * (row + 1)) for row in range(3)]
    batched_logits = prefill_logits(engine, batch, prompts)
    for row, session in enumerate(singles):
        assert_close(batched_logits[row], prefill_logits(engine, [session], prompts[row : row + 1])[0],
                     rtol=1e-4, atol=1e-5)


@torch.no_grad()
def prefill_logits(engine: ChatEngine, sessions: list, prompts: list[list[int]]) -> torch.Tensor:
    """Next-token logits after the prompt pass, (B, V): the last column is real in every left-padded row."""
    plan = engine.plan(sessions, prompts)
    return plan.step(plan.prompt, plan.key_mask, plan.positions)[:, -1]


@pytest.mark.parametrize("mode", ["full", "window", "current"])
def test_batched_equals_single_for_baselines(engine_factory, mode: str) -> None:
    engine = engine_factory(mode)
    batch, singles = [engine.new_session() for _ in range(2)], [engine.new_session() for _ in range(2)]
    for turn in range(2):
        queries = [QUERIES[turn], QUERIES[2] * 2]
        batched = engine.interact_batch(batch, queries, GREEDY)
        assert [engine.interact(s, q, GREEDY).token_ids for s, q in zip(singles, queries, strict=True)] == [
            a.token_ids for a in batched
        ]


# ---------------------------------------------------------------------------- the memory update


def test_background_update_equals_synchronous_update_memory(engine_factory) -> None:
    engine = engine_factory("rxt")
    session = engine.new_session()
    expected = session.tensors["stm"].clone()
    for query in QUERIES:
        answer = engine.interact(session, query, GREEDY)
        with torch.no_grad():
            expected = engine.model.update_memory(expected, torch.tensor([interaction_ids(engine, query, answer)]))
        session.wait()
        assert_close(session.tensors["stm"], expected)
    assert session.turns == 3
    assert all(stat.memory_update_s is not None for stat in session.stats)


def test_answer_returns_before_a_slow_memory_update(engine_factory) -> None:
    engine = engine_factory("rxt", update_delay_s=0.5)
    warm = engine_factory("rxt")
    warm.interact(warm.new_session(), QUERIES[0], GREEDY)  # first-call costs stay out of the timing
    session = engine.new_session()
    start = time.perf_counter()
    engine.interact(session, QUERIES[0], GREEDY)
    assert time.perf_counter() - start < 0.5
    assert session.pending is not None and not session.pending.done()
    assert session.stats[0].memory_update_s is None
    engine.interact(session, QUERIES[1], GREEDY)  # must wait for the first update before reading memory
    assert time.perf_counter() - start >= 0.5
    assert session.stats[0].memory_update_s >= 0.5


def test_stream_yields_memory_updated_after_the_answer(engine_factory) -> None:
    engine = engine_factory("rxt")
    session = engine.new_session()
    events = list(engine.stream(session, QUERIES[0], GREEDY))
    kinds = [type(event) for event in events]
    assert kinds[-2:] == [AnswerEvent, MemoryUpdatedEvent]
    assert set(kinds[:-2]) <= {TokenEvent}
    assert events[-1].turn == 1 and events[-1].seconds > 0


def test_background_error_is_raised_on_the_next_call(engine_factory, monkeypatch) -> None:
    engine = engine_factory("rxt")
    session = engine.new_session()
    before = session.tensors["stm"].clone()

    def broken(*args, **kwargs):
        raise RuntimeError("memory update exploded")

    monkeypatch.setattr(engine.model, "update_memory", broken)
    engine.interact(session, QUERIES[0], GREEDY)  # the answer itself is fine
    with pytest.raises(RuntimeError, match="memory update exploded"):
        engine.interact(session, QUERIES[1], GREEDY)
    assert torch.equal(session.tensors["stm"], before)  # the failed update wrote nothing
    monkeypatch.undo()
    engine.interact(session, QUERIES[1], GREEDY)  # the error is reported once; the session goes on
    session.wait()


# ---------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(engine_factory) -> None:
    engine = engine_factory("rxt")
    answers = {}
    for seed in (1, 1, 2, 3):
        config = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=seed)
        answers.setdefault(seed, []).append(engine.interact(engine.new_session(), QUERIES[0], config).token_ids)
    assert answers[1][0] == answers[1][1]
    assert len({tuple(a[0]) for a in answers.values()}) > 1  # and the seed matters


def expected_top_p_support(logits: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p (written independently)."""
    probs = logits.softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    support, total = set(), 0.0
    for index in order:
        support.add(index)
        total += probs[index]
        if total >= top_p:
            break
    return support


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_samples_only_the_k_most_likely(top_k: int) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 40, generator=generator) * 2
    config = SamplingConfig(temperature=1.0, top_k=top_k)
    draws = torch.stack([sample_next(logits, config, generator=generator) for _ in range(300)])  # (300, 4)
    for row in range(4):
        allowed = set(logits[row].topk(top_k).indices.tolist())
        seen = set(draws[:, row].tolist())
        assert seen <= allowed
        if top_k > 1:
            assert len(seen) > 1  # still sampling, not greedy


@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.9])
def test_top_p_samples_only_the_nucleus(top_p: float) -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 40, generator=generator) * 2
    config = SamplingConfig(temperature=1.0, top_p=top_p)
    draws = torch.stack([sample_next(logits, config, generator=generator) for _ in range(300)])
    for row in range(4):
        support = expected_top_p_support(logits[row], top_p)
        seen = set(draws[:, row].tolist())
        assert seen <= support
        assert int(logits[row].argmax()) in seen
        assert len(seen) > 1 or len(support) == 1


def test_greedy_ignores_top_k_and_top_p() -> None:
    logits = torch.randn(3, 20)
    config = SamplingConfig(temperature=0.0, top_k=2, top_p=0.3)
    assert torch.equal(sample_next(logits, config), logits.argmax(-1))


# ---------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("kind", ["rxt", *MODES])
def test_token_events_concatenate_to_the_answer(engine_factory, kind: str) -> None:
    engine = engine_factory(kind)
    session = engine.new_session()
    for query in QUERIES[:2]:
        events = list(engine.stream(session, query, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=5)))
        answer = next(e for e in events if isinstance(e, AnswerEvent))
        streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert answer.token_ids
        assert streamed.strip() == answer.text


def test_streaming_keeps_characters_split_across_tokens(engine_factory, monkeypatch) -> None:
    """Byte-level BPE splits é, ü, ✓ into byte tokens: the stream must hold them back, not drop them."""
    engine = engine_factory("rxt")
    script = engine.tokenizer.encode(" café naïve über ✓") + [engine.tokenizer.end_id]
    assert any(engine.tokenizer.decode([t]).endswith("\ufffd") for t in script)  # really split

    def scripted(step, prompt, key_mask, positions, config, stop_id):
        for token in script:
            yield torch.tensor([token])

    monkeypatch.setattr(rxt.engine, "decode_tokens", scripted)
    events = list(engine.stream(engine.new_session(), "hi", GREEDY))
    texts = [e.text for e in events if isinstance(e, TokenEvent)]
    assert "".join(texts) == " café naïve über ✓"
    assert all("\ufffd" not in text for text in texts)


# ---------------------------------------------------------------------------- baseline modes


def prompt_tokens_per_turn(engine: ChatEngine, queries: list[str]) -> list[int]:
    session = engine.new_session()
    for query in queries:
        engine.interact(session, query, GREEDY)
    return [stat.prompt_tokens for stat in session.stats]


def test_baseline_prompt_tokens_follow_the_mode(engine_factory) -> None:
    queries = [QUERIES[0]] * 5
    prompt = len(engine_factory("full").tokenizer.prompt(QUERIES[0]))
    full = prompt_tokens_per_turn(engine_factory("full"), queries)
    assert all(later - earlier >= prompt + 1 for earlier, later in pairwise(full))  # re-reads it all
    cached = prompt_tokens_per_turn(engine_factory("cached"), queries)
    assert cached[0] == prompt
    assert all(prompt + 1 <= n <= prompt + 2 for n in cached[1:])  # the new tokens (+ last answer/[EOT])
    assert prompt_tokens_per_turn(engine_factory("current"), queries) == [prompt] * 5
    window_engine = engine_factory("window", window_tokens=20)
    window = prompt_tokens_per_turn(window_engine, queries)
    assert window[0] == prompt and max(window) == prompt + 20  # bounded, and the bound is reached


def test_stateless_turn_reads_the_history(engine_factory) -> None:
    engine = engine_factory("full")
    session = engine.new_session()
    answers = [engine.interact(session, q, GREEDY) for q in QUERIES]
    turns = [interaction_ids(engine, q, a) for q, a in zip(QUERIES, answers, strict=True)]
    assert session.tensors["history"].tolist() == [token for turn in turns for token in turn]
    read_before_last = len(turns[0]) + len(turns[1])
    assert session.stats[-1].prompt_tokens == read_before_last + len(engine.tokenizer.prompt(QUERIES[2]))


def test_cached_baseline_answers_like_full_rereading(engine_factory) -> None:
    full, cached = engine_factory("full"), engine_factory("cached")
    full_session, cached_session = full.new_session(), cached.new_session()
    for query in QUERIES * 2:
        assert cached.interact(cached_session, query, GREEDY).token_ids == full.interact(
            full_session, query, GREEDY).token_ids
    assert full_session.tensors["history"].tolist() == cached_session.tensors["history"].tolist()
    assert cached.state_bytes(cached_session) > 0


def test_persistent_cache_baseline_refuses_batches(engine_factory) -> None:
    engine = engine_factory("cached")
    with pytest.raises(ValueError, match="one session at a time"):
        engine.interact_batch([engine.new_session(), engine.new_session()], QUERIES[:2], GREEDY)
