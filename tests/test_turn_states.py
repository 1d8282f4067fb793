"""The reactive pretrained model writes its memory from the states generation computed (rxt.turn_states):
the memory equals the second pass's (``update_memory``, the reference) after every turn, greedy and
sampled, one session and a batch of sessions of different lengths, answers cut by the budget or
stopped at [EOT], in the engine and in the serving batcher; and it runs each turn token once.

Measured on these tiny fp32 models: max |difference| 3.7e-9 to 4.7e-9 (the tolerance below: 1e-6)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

import rxt.engine
from rxt.engine import NoMemoryEngine, ReactiveEngine
from rxt.generation import SamplingConfig, left_pad
from rxt.model import ReactiveTransformer
from rxt.pretrained.lora import LORA_TARGETS
from rxt.serve.batching import BatchScheduler
from rxt.serve.metrics import ServerMetrics
from rxt.serve.turn import Turn
from rxt.turn_states import write_memory
from test_reactive_pretrained import REACTIVE, reactive

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-5, atol=1e-6)
MESSAGES = ["Hi, my name is Ada and I live in Oslo.", "What?", "Remember: my favourite number is 7.",
            "I moved to Lima last year; the café there is good."]


@pytest.fixture(params=["frozen base", "lora"])
def model(chat_base, request):
    """The tiny ChatML model made reactive, its memory read (W_O != 0): the states depend on the memory.
    Its base frozen, or with LoRA on every linear layer of the self-attention and the FFN (B drawn
    non-zero, so the base's computation changes too)."""
    config = REACTIVE
    if request.param == "lora":
        config = dataclasses.replace(REACTIVE, lora_rank=4, lora_targets=list(LORA_TARGETS))
    model = reactive(chat_base, config)
    with torch.no_grad():
        for i in model.reactive.memory_layers:
            model.decoder.layers[i].memory_cross_attention.o_proj.weight.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.05)
    return model


def stop_rows_at(model, schedule: dict[int, list[int]]) -> None:
    """Make the model end rows' answers: at its n-th logits call, the rows in schedule[n] give [EOT]."""
    real, calls, end_id = model.logits, [0], model.tokenizer.end_id

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = real(hidden)
        for row in schedule.get(calls[0], []):
            last = out[row, -1] if out.dim() == 3 else out[row]  # (the batcher asks for the last position only)
            last[end_id] = last.max() + 1e4
        calls[0] += 1
        return out

    model.logits = logits


def stm_of(sessions) -> torch.Tensor:
    for session in sessions:
        session.wait()
    return torch.cat([s.tensors["stm"] for s in sessions], dim=1)


def reference(engine: ReactiveEngine, stm: torch.Tensor, interactions: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return engine.model.update_memory(stm, *left_pad(interactions, engine.tokenizer.pad_id))


def interaction(engine: ReactiveEngine, message: str, answer_ids: list[int]) -> list[int]:
    return engine.turn_prompt(message) + engine.tokenizer.close(answer_ids)


@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=7),
                                      SamplingConfig(max_new_tokens=7, temperature=1.0, top_k=20, seed=5)],
                         ids=["greedy", "sampled"])
def test_the_memory_from_kept_states_equals_the_second_pass(model, sampling):
    """Three sessions of different histories and prompt lengths, batched, three turns in a row: a row
    stops at [EOT] while the others go on (it is fed [EOT] until the batch ends), one answers nothing
    but [EOT], the rest are cut by the budget."""
    engine = ReactiveEngine(model)
    assert engine.keeps_states
    sessions = [engine.new_session() for _ in range(3)]
    for turn in range(2):  # histories of 2, 1 and 0 turns
        engine.interact_batch(sessions[: 2 - turn], MESSAGES[1 : 3 - turn], sampling)
    stop_rows_at(model, {3: [0], 0: [2]})  # in the first turn below: row 0 after 3 tokens, row 2 at once
    for turn in range(3):
        before = stm_of(sessions)
        messages = [f"{MESSAGES[(turn + row) % 4]} Turn {turn}." for row in range(3)]
        answers = engine.interact_batch(sessions, messages, sampling)
        interactions = [interaction(engine, m, a.token_ids) for m, a in zip(messages, answers, strict=True)]
        torch.testing.assert_close(stm_of(sessions), reference(engine, before, interactions), **TOL)
        assert not torch.allclose(stm_of(sessions), before)
        for answer, ids in zip(answers, interactions, strict=True):  # each token of the turn ran once
            assert answer.stats.tokens_processed == len(ids)
        if turn == 0:
            assert [len(a.token_ids) for a in answers] == [3, 7, 0]
    engine.close()


def test_one_session_cut_by_the_budget_and_stopped_at_eot(model):
    engine = ReactiveEngine(model)
    session = engine.new_session()
    stop_rows_at(model, {4: [0]})  # the second turn's answer: [EOT] after 3 tokens (its calls 2, 3, 4)
    for budget, expected_tokens in [(1, 1), (5, 3), (6, 6)]:
        before = stm_of([session])
        answer = engine.interact(session, MESSAGES[0], SamplingConfig(max_new_tokens=budget))
        assert len(answer.token_ids) == expected_tokens
        ids = interaction(engine, MESSAGES[0], answer.token_ids)
        torch.testing.assert_close(stm_of([session]), reference(engine, before, [ids]), **TOL)
        assert answer.stats.tokens_processed == len(ids)
    engine.close()


@pytest.mark.parametrize("drop", ["the closing's last token", "the first kept state"])
def test_a_dropped_token_breaks_the_equality(model, monkeypatch, drop):
    """The comparison above can fail: the same update with one token fewer is far from the reference."""
    real = write_memory

    def dropping(model, stm, kept, interactions, pad_id):
        if drop == "the first kept state":
            kept.states = [[layer[1:] for layer in row] for row in kept.states]
            kept.key_mask[0, kept.key_mask[0].long().argmax()] = False  # ... and its cache column
        else:
            interactions = [ids[:-1] for ids in interactions]
        return real(model, stm, kept, interactions, pad_id)

    monkeypatch.setattr(rxt.engine, "write_memory", dropping)
    engine = ReactiveEngine(model)
    session = engine.new_session()
    answer = engine.interact(session, MESSAGES[2], SamplingConfig(max_new_tokens=5))
    expected = reference(engine, engine.model.initial_memory(1), [interaction(engine, MESSAGES[2], answer.token_ids)])
    assert not torch.allclose(stm_of([session]), expected, **TOL)
    assert (stm_of([session]) - expected).abs().max() > 100 * TOL["atol"]  # (5e-4 and 9e-4 here, 3.7e-9 kept)
    engine.close()


def test_which_engines_keep_states(model, make_tiny_model):
    kept = ReactiveEngine(model)
    others = [ReactiveEngine(model, keep_states=False), ReactiveEngine(model, inference="static"),
              NoMemoryEngine(model), ReactiveEngine(make_tiny_model(ReactiveTransformer))]
    assert kept.keeps_states and not any(e.keeps_states for e in others)
    # the second pass stays the path where states are not kept, and writes the same memory
    sessions = [kept.new_session(), others[0].new_session(), others[1].new_session()]
    answers = [e.interact(s, MESSAGES[0], SamplingConfig(max_new_tokens=4))
               for e, s in zip([kept, *others[:2]], sessions, strict=True)]
    assert answers[0].token_ids == answers[1].token_ids == answers[2].token_ids
    for session in sessions[1:]:
        torch.testing.assert_close(stm_of([session]), stm_of(sessions[:1]), **TOL)
    turn = len(interaction(kept, MESSAGES[0], answers[0].token_ids))
    assert answers[0].stats.tokens_processed == turn  # read once
    stats = answers[1].stats
    assert stats.tokens_processed == stats.prompt_tokens + stats.answer_tokens + turn  # and again
    for engine in [kept, *others]:
        engine.close()


def test_the_serving_batcher_writes_the_memory_from_its_rows_states(model):
    """Rows join at different steps and leave at others (one at [EOT]); each finished group's memory
    update runs from the states its rows kept, with their cache."""
    engine = ReactiveEngine(model)
    sessions = [engine.new_session() for _ in range(4)]
    engine.interact_batch(sessions[:2], MESSAGES[:2], SamplingConfig(max_new_tokens=3))
    before = stm_of(sessions)
    budgets, arrive_at = [4, 9, 6, 5], [0, 0, 1, 3]
    stop_rows_at(model, {4: [0]})  # the scheduler's 5th forward: the first row's 3rd decode step

    async def scenario():
        scheduler = BatchScheduler(engine, ServerMetrics(), max_batch=3, start=False)
        futures = [None] * 4
        for step in range(40):
            for i in (i for i, at in enumerate(arrive_at) if at == step):
                futures[i] = scheduler.submit(Turn(sessions[i].id, 0), sessions[i], MESSAGES[i],
                                              SamplingConfig(max_new_tokens=budgets[i]), time.perf_counter())
            scheduler.step()
            await asyncio.sleep(0)
        return [await f for f in futures]

    answers = asyncio.run(scenario())
    assert len(answers[0].token_ids) < budgets[0] and any(len(a.token_ids) == b for a, b in zip(answers, budgets, strict=True))
    interactions = [interaction(engine, m, a.token_ids) for m, a in zip(MESSAGES, answers, strict=True)]
    torch.testing.assert_close(stm_of(sessions), reference(engine, before, interactions), **TOL)
    assert [a.stats.tokens_processed for a in answers] == [len(i) for i in interactions]
    engine.close()


def test_the_memory_written_from_token_embeddings_too(chat_base):
    """``ed_embeddings``: each layer's ED is the turn's states followed by its token embeddings. The
    memory then differs from the states-only write of the same weights, the kept-states path still
    equals the second pass, and a write without the token ids is refused."""
    models = {}
    for flag in (False, True):
        models[flag] = reactive(chat_base, dataclasses.replace(REACTIVE, ed_embeddings=flag))
        with torch.no_grad():
            for i in models[flag].reactive.memory_layers:
                models[flag].decoder.layers[i].memory_cross_attention.o_proj.weight.normal_(0.0, 0.2)
    assert models[True].adapter_state_dict().keys() == models[False].adapter_state_dict().keys()
    models[True].load_state_dict(models[False].state_dict())
    engine = ReactiveEngine(models[True])
    session = engine.new_session()
    for message in MESSAGES[:2]:
        before = stm_of([session])
        answer = engine.interact(session, message, SamplingConfig(max_new_tokens=5))
        turn = interaction(engine, message, answer.token_ids)
        torch.testing.assert_close(stm_of([session]), reference(engine, before, [turn]), **TOL)
        states_only = ReactiveEngine(models[False])
        assert not torch.allclose(stm_of([session]), reference(states_only, before, [turn]), atol=1e-4)
        states_only.close()
    ids = torch.tensor([turn])
    encoded = models[True].encode(ids, before)
    with pytest.raises(ValueError, match="input_ids"):
        models[True].consolidate(before, encoded, models[True].turn_mask(ids))
    engine.close()
