"""A memory of the decoder's own keys and values (reactive.memory_write: kv): with room for the whole
conversation it is the stateless model reading its history; with less, it keeps what its policy ranks
first, at a fixed size; batched rows write what each writes alone; ReactiveEngine and the adapter
round trip run it unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from rxt.engine import ReactiveEngine
from rxt.generation import SamplingConfig, left_pad
from rxt.model import StatelessLM
from rxt.pretrained.kv_memory import kept_tokens, merge, token_scores
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(n_layers=3, n_q_heads=4, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-5)
TURNS = [("My cat is called Pellvick.", "What a fine name."), ("I live in Oslo.", "Oslo is lovely."),
         ("What is my cat called?", "Pellvick.")]


def kv_model(base: StatelessLM, slots: int, keep: str = "recent") -> ReactivePretrained:
    """A kv memory on a copy of ``base``; with keep "salience", a random gate (some messages pass, some not)."""
    config = ReactiveConfig(memory_write="kv", stm_slots=slots, keep=keep)
    model = ReactivePretrained(copy.deepcopy(base), config).eval()
    if keep == "salience":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.salience.proj.weight.copy_(torch.randn(model.salience.proj.weight.shape, generator=generator))
            model.salience.proj.bias.fill_(6.5)  # near the middle of chat_base's logits
    return model


@pytest.fixture
def base(make_tiny_model) -> StatelessLM:
    return make_tiny_model(StatelessLM, seed=1, **BASE)


def told(model: ReactivePretrained, turns=TURNS) -> torch.Tensor:
    """The memory after the turns, written one turn at a time as the engine does."""
    stm = model.initial_memory(1)
    for query, answer in turns:
        stm = model.update_memory(stm, model.interaction(query, answer)[0])
    return stm


def test_an_empty_memory_is_the_base_exactly(base):
    model = kv_model(base, 16)
    ids = model.interaction(*TURNS[0])[0]
    assert torch.equal(model.decode(ids, stm=model.initial_memory(1)), base.decode(ids))


def test_with_room_for_everything_it_is_the_stateless_model_reading_the_history(base):
    """The memory's keys and values are the ones the base computes over the whole conversation: reading
    them, the next turn's logits are the stateless model's over history + turn."""
    model, tok = kv_model(base, 512), base.tokenizer
    stm = told(model, TURNS[:2])
    history = [t for q, a in TURNS[:2] for t in tok.interaction(q, a)]
    assert kept_tokens(stm)[0] == history
    ids, _ = model.interaction(*TURNS[2])
    stateless = base.decode(torch.tensor([history + ids[0].tolist()]))[:, len(history):]
    torch.testing.assert_close(model.decode(ids, stm=stm), stateless, atol=1e-5, rtol=1e-5)


def test_the_preamble_stands_at_the_front_and_the_model_is_the_stateless_one_exactly(chat_base):
    """With a template's system message: the memory starts with it, as the stateless conversation does,
    and the turns open with the message; reading it all, the logits are the stateless model's."""
    model, tok = kv_model(chat_base, 512), chat_base.tokenizer
    stm = told(model, TURNS[:2])
    history = tok.preamble() + [t for q, a in TURNS[:2] for t in tok.interaction(q, a)]
    assert kept_tokens(stm)[0] == history and kept_tokens(model.initial_memory(2)) == [tok.preamble()] * 2
    ids, _ = model.interaction(*TURNS[2])
    assert ids[0].tolist() == tok.interaction(*TURNS[2])  # no second system message
    stateless = chat_base.decode(torch.tensor([history + ids[0].tolist()]))[:, len(history):]
    torch.testing.assert_close(model.decode(ids, stm=stm), stateless, atol=1e-5, rtol=1e-5)


def test_a_small_memory_keeps_the_last_tokens_at_a_fixed_size(base):
    model, tok = kv_model(base, 12), base.tokenizer
    stm = told(model)
    assert stm.shape == model.initial_memory(1).shape
    everything = [t for q, a in TURNS for t in tok.interaction(q, a)]
    assert kept_tokens(stm)[0] == everything[-12:]


def test_user_keeps_the_users_messages_before_the_models_answers(chat_base):
    tok = chat_base.tokenizer
    turns = [*TURNS[:2], ("Thanks.", "You are welcome.")]
    memory = kv_model(chat_base, 512).kv_memory
    header, closing = memory.header, memory.closing  # "<|im_end|>\n<|im_start|>assistant\n", 2 of it the user's
    user = [len(tok.prompt(q)) - (len(header) - closing) for q, _ in turns[:2]]  # "<|im_start|>user\n...<|im_end|>\n"
    # the preamble (always kept), both older messages, and the whole last turn
    slots = len(tok.preamble()) + sum(user) + len(tok.interaction(*turns[2]))
    text = tok.decode(kept_tokens(told(kv_model(chat_base, slots, keep="user"), turns))[0], skip_special=False)
    assert "Pellvick" in text and "Oslo" in text and "welcome" in text  # the last answer stays too
    assert "fine name" not in text and "lovely" not in text  # the older answers went first
    assert text.count("system") == 1 and text.startswith(tok.decode(tok.preamble(), skip_special=False))
    recent = tok.decode(kept_tokens(told(kv_model(chat_base, slots), turns))[0], skip_special=False)
    assert "Pellvick" not in recent  # the window, at the same size, has lost the first message


def test_surprise_keeps_the_surprising_message_and_a_message_stays_whole():
    user = torch.tensor([[True, True, True, False], [True, True, False, False]])
    surprisal = torch.tensor([[1.0, 9.0, 2.0, 30.0], [0.5, 1.0, 4.0, 4.0]])
    scores = token_scores("surprise", user, surprisal)
    assert torch.equal(scores[0, :3], torch.full((3,), 1.09)) and scores[0, 3] == 0  # the answer ranks last
    assert scores[1, 0] == scores[1, 1] < scores[0, 0]
    with pytest.raises(ValueError, match="unknown keep policy"):
        token_scores("random", user)


def test_the_random_gate_of_these_tests_lets_some_messages_pass_and_not_others(chat_base):
    model = kv_model(chat_base, 160, keep="salience")
    verdicts = set()
    for query, answer in [*TURNS, ("Hi.", "Hello!"), ("I live in Oslo and I like tea.", "Tea is nice.")]:
        ids = model.interaction(query, answer)[0]
        everything = torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            turn, _ = model.kv_memory.turn_kv(model.initial_memory(1), ids, everything)
            verdicts.add(bool(model.salience(turn, model.kv_memory.closing_at(ids, everything))[0] > 0))
    assert verdicts == {True, False}


def test_merge_keeps_the_best_scores_in_order_ties_to_the_newer():
    stm = torch.zeros(1, 1, 3, 2 + 3)
    turn = torch.arange(5.0)[None, None, :, None].expand(1, 1, 5, 2).clone()
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    scores = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]])
    out = merge(stm, turn, ids, scores, torch.ones(1, 5, dtype=torch.bool))
    assert kept_tokens(out) == [[10, 12, 14]]  # both 1.0s, then the newest 0.0
    partial = merge(stm, turn, ids, scores, torch.tensor([[False, False, False, True, True]]))
    assert kept_tokens(partial) == [[13, 14]] and partial[0, 0, 0, -1] == 0  # right-aligned, one slot empty


@pytest.mark.parametrize("keep", ["user", "surprise", "salience"])
def test_a_batch_writes_what_each_row_writes_alone(chat_base, keep):
    model, tok = kv_model(chat_base, 160, keep=keep), chat_base.tokenizer
    stm = told(model, TURNS[:1]).expand(-1, 2, -1, -1).clone()
    stm[:, 1] = model.initial_memory(1)[:, 0]  # one row remembers a turn, the other nothing
    rows = [tok.interaction(*TURNS[1]), tok.interaction("Hi.", "Hello!")]
    ids, mask = left_pad(rows, tok.pad_id, torch.device("cpu"))
    batched = model.update_memory(stm, ids, mask)
    for r, row in enumerate(rows):
        alone = model.update_memory(stm[:, r : r + 1], torch.tensor([row]))
        assert kept_tokens(batched[:, r : r + 1]) == kept_tokens(alone)
        torch.testing.assert_close(batched[:, r : r + 1], alone, atol=1e-5, rtol=1e-5)


def test_the_engine_runs_it_and_its_state_never_grows(chat_base):
    model = kv_model(chat_base, 64, keep="user")
    engine = ReactiveEngine(model, keep_states=True)
    try:
        assert engine.keeps_states  # the write takes the turn's keys and values from generation's cache
        session = engine.new_session()
        sizes = []
        for query, _ in TURNS:
            engine.interact(session, query, SamplingConfig(temperature=0.0, max_new_tokens=6))
            session.wait()
            sizes.append(session.state_bytes())
        assert len(set(sizes)) == 1
        assert len(kept_tokens(session.tensors["stm"])[0]) == 64
    finally:
        engine.close()


def test_the_adapter_round_trip_and_bad_settings(chat_base, tmp_path):
    base_dir = tmp_path / "base"
    chat_base.save_pretrained(base_dir)
    model = ReactivePretrained.from_base(base_dir, ReactiveConfig(memory_write="kv", stm_slots=32, keep="user"))
    assert model.num_parameters(trainable_only=True) == 0 and not model.adapter_state_dict()
    model.save_adapter(tmp_path / "adapter")
    loaded = ReactivePretrained.from_pretrained(tmp_path / "adapter")
    assert loaded.reactive.keep == "user" and loaded.identity() == model.identity()
    other = ReactivePretrained.from_base(base_dir, ReactiveConfig(memory_write="kv", stm_slots=32))
    assert other.identity() != model.identity()  # the policy is part of what a saved session belongs to
    with pytest.raises(ValueError, match="keep must be one of"):
        ReactivePretrained(copy.deepcopy(chat_base), ReactiveConfig(memory_write="kv", keep="best"))
    with pytest.raises(ValueError, match="above the 29 tokens of the template's preamble"):
        ReactivePretrained(copy.deepcopy(chat_base), ReactiveConfig(memory_write="kv", stm_slots=29))


def test_rxt_wrap_writes_an_adapter_the_engines_take(chat_base, tmp_path, capsys):
    from rxt.cli import main

    chat_base.save_pretrained(tmp_path / "base")
    out = tmp_path / "kv"
    assert main(["wrap", str(tmp_path / "base"), "--out", str(out), "--slots", "40", "--keep", "surprise"]) == 0
    model = ReactivePretrained.from_pretrained(out)
    assert model.reactive.memory_write == "kv" and model.reactive.stm_slots == 40
    assert main(["wrap", str(tmp_path / "base"), "--out", str(out)]) == 2  # never over a saved adapter
    assert "not empty" in capsys.readouterr().err
    assert main(["wrap", str(tmp_path / "nothing"), "--out", str(tmp_path / "kv2")]) == 2


def test_a_reactive_recipe_with_a_kv_memory_is_refused():
    from rxt.pretrained.training import ReactiveRecipe

    with pytest.raises(ValueError, match="rxt wrap"):
        ReactiveRecipe(reactive=ReactiveConfig(memory_write="kv")).validate()


def test_chat_shows_what_the_memory_keeps(chat_base):
    import io

    from rxt.chat import ChatREPL

    engine = ReactiveEngine(kv_model(chat_base, 128, keep="user"))
    try:
        out = io.StringIO()
        script = io.StringIO("My cat is called Pellvick.\n/memory\n")
        ChatREPL(engine, SamplingConfig(temperature=0.0, max_new_tokens=4), stdin=script, stdout=out).run()
        shown = out.getvalue().split("slots kept:\n", 1)
        assert shown[0].endswith("of 128 ") and "<|im_start|>user\nMy cat is called Pellvick.<|im_end|>" in shown[1]
    finally:
        engine.close()


def test_the_finished_turn_stays_whatever_the_older_tokens_score():
    stm = torch.zeros(1, 1, 4, 2 + 3)
    first = merge(stm, torch.zeros(1, 1, 4, 2), torch.tensor([[1, 2, 3, 4]]), torch.full((1, 4), 5.0),
                  torch.ones(1, 4, dtype=torch.bool))
    second = merge(first, torch.zeros(1, 1, 2, 2), torch.tensor([[8, 9]]), torch.zeros(1, 2),
                   torch.ones(1, 2, dtype=torch.bool))
    assert kept_tokens(second) == [[3, 4, 8, 9]]  # low-scored, but just said; the best of the rest after it


def test_the_demo_conversation_asks_what_it_told_and_counts_back_right():
    from rxt.demo import CONVERSATION, handwritten_dialogue

    dialogue = handwritten_dialogue()
    asked = [(n, t) for n, t in enumerate(dialogue.turns) if t.check]
    assert len(asked) == 4
    for number, turn in asked:
        told = CONVERSATION[number - turn.check["distance"]][0]
        assert turn.check["value"].lower() in told.lower() and turn.check["distance"] >= 4


@pytest.mark.parametrize("keep", ["user", "surprise", "salience"])
def test_the_serving_batcher_reads_and_writes_a_kv_memory(chat_base, keep):
    """Rows with memories of different fills join at different steps; each answers as the engine alone
    does, and each session's memory is the one the engine writes."""
    import asyncio
    import time

    from rxt.serve.batching import BatchScheduler
    from rxt.serve.metrics import ServerMetrics
    from rxt.serve.turn import Turn

    model = kv_model(chat_base, 96, keep=keep)
    engine = ReactiveEngine(model)
    messages = ["My cat is called Pellvick.", "Hi.", "I live in Oslo and I like tea."]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=5)
    try:
        sessions = [engine.new_session() for _ in messages]
        alone = [engine.new_session() for _ in messages]
        for group in (sessions, alone):  # different histories: one turn, two turns, none
            engine.interact(group[0], TURNS[0][0], greedy)
            for query, _ in TURNS[:2]:
                engine.interact(group[1], query, greedy)
        expected = [engine.interact(s, m, greedy).token_ids for s, m in zip(alone, messages, strict=True)]

        async def scenario():
            scheduler = BatchScheduler(engine, ServerMetrics(), max_batch=3, start=False)
            futures = [None] * 3
            for step in range(30):
                for i in (i for i, at in enumerate([0, 1, 1]) if at == step):
                    futures[i] = scheduler.submit(Turn(sessions[i].id, 0), sessions[i], messages[i], greedy,
                                                  time.perf_counter())
                scheduler.step()
                await asyncio.sleep(0)
            return [await f for f in futures]

        answers = asyncio.run(scenario())
        assert [a.token_ids for a in answers] == expected
        for served, reference in zip(sessions, alone, strict=True):
            served.wait()
            reference.wait()
            assert kept_tokens(served.tensors["stm"]) == kept_tokens(reference.tensors["stm"])
            torch.testing.assert_close(served.tensors["stm"], reference.tensors["stm"], atol=1e-5, rtol=1e-5)
    finally:
        engine.close()


@pytest.mark.parametrize("keep", ["user", "surprise", "salience"])
@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0.0, max_new_tokens=6),
                                      SamplingConfig(temperature=1.0, top_k=20, seed=5, max_new_tokens=6)],
                         ids=["greedy", "sampled"])
def test_the_memory_from_generations_cache_equals_the_second_pass(chat_base, sampling, keep):
    """Sessions of different fills answer together, some rows stopping early, some cut by the budget; the
    memory each writes from the cache is the one a second pass over its finished turn writes, and each
    turn's tokens are read once."""
    model = kv_model(chat_base, 80, keep=keep)
    kept, second = ReactiveEngine(model), ReactiveEngine(model, keep_states=False)
    assert kept.keeps_states and not second.keeps_states
    from test_turn_states import stop_rows_at

    stop_rows_at(model, {8: [0], 16: [1]})  # turn 2's row 0 and turn 3's row 1 end early at [EOT]
    try:
        sessions, lengths = [kept.new_session() for _ in range(3)], []
        for turn in range(3):
            queries = [TURNS[(turn + r) % 3][0] for r in range(3)][: 1 + turn]  # 1, 2, then 3 rows
            before = torch.cat([s.tensors["stm"] for s in sessions[: len(queries)]], dim=1)
            answers = kept.interact_batch(sessions[: len(queries)], queries, sampling)
            interactions = [kept.turn_prompt(q) + kept.tokenizer.close(a.token_ids)
                            for q, a in zip(queries, answers, strict=True)]
            with torch.no_grad():
                reference = model.update_memory(before, *left_pad(interactions, kept.tokenizer.pad_id))
            for r, session in enumerate(sessions[: len(queries)]):
                session.wait()
                assert kept_tokens(session.tensors["stm"]) == kept_tokens(reference[:, r : r + 1])
                torch.testing.assert_close(session.tensors["stm"], reference[:, r : r + 1], atol=1e-5, rtol=1e-5)
            assert [a.stats.tokens_processed for a in answers] == [len(i) for i in interactions]
            lengths.append([len(a.token_ids) for a in answers])
        assert any(n < 6 for n in lengths[1]) and any(n < 6 for n in lengths[2]) and 6 in lengths[2]
        assert len(kept_tokens(sessions[0].tensors["stm"])[0]) == 80  # full: the ranking chose what stayed
    finally:
        kept.close()
        second.close()
