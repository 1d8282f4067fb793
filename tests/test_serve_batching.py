"""Continuous batching in the server: batched answers equal lone answers, rows join and leave, limits hold."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from rxt.engine import ReactiveEngine, TokenEvent
from rxt.generation import SamplingConfig
from rxt.model import load_model
from rxt.serve.batching import BatchScheduler
from rxt.serve.metrics import ServerMetrics
from rxt.serve.service import Turn
from rxt.serve.store import SQLiteStore
from rxt.session import Session
from test_serve_support import MAX_TOKENS, make_tiny_model, queries, reference_answers, serve_in_thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("batching") / "tiny-rxt")


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = ReactiveEngine(load_model(model_dir))
    yield engine
    engine.close()


def sessions_with_history(engine: ReactiveEngine, lengths: list[int]) -> list[Session]:
    """One session per length, each after that many turns of its own."""
    sessions = []
    for index, length in enumerate(lengths):
        session = engine.new_session()
        for query in queries(index, length):
            engine.interact(session, query, SamplingConfig(max_new_tokens=6))
        session.wait()
        sessions.append(session)
    return sessions


def copy(session: Session) -> Session:
    session.wait()
    return Session.from_bytes(session.to_bytes())


def answered_alone(engine: ReactiveEngine, session: Session, query: str, sampling: SamplingConfig):
    """(token ids, final STM) of the turn answered on its own by the engine."""
    answer = engine.interact(session, query, sampling)
    session.wait()
    return answer.token_ids, session.tensors["stm"]


async def drive(scheduler: BatchScheduler, arrivals: dict[int, list], steps: int = 200) -> None:
    """Step the scheduler by hand; ``arrivals[k]`` are submitted just before step k."""
    for index in range(steps):
        for submit in arrivals.get(index, []):
            submit()
        scheduler.step()
        await asyncio.sleep(0)  # let the scheduler's callbacks (tokens, results) run
        if not scheduler.rows and all(k <= index for k in arrivals):
            return


def test_greedy_batched_answers_equal_lone_answers(engine):
    """Sessions of different history lengths and budgets, joining at different steps, leaving at others."""
    histories, budgets, arrive_at = [0, 3, 1, 5, 2], [7, 3, 10, 5, 8], [0, 0, 2, 4, 9]
    sessions = sessions_with_history(engine, histories)
    message = ["Hi.", "Turn 1: my name is Bob and I like snow.", "What do I like?",
               "Hi, my name is Cleo and I like jazz. What do I like?", "Snow."]  # prompts of different lengths
    expected = [answered_alone(engine, copy(s), m, SamplingConfig(max_new_tokens=b))
                for s, m, b in zip(sessions, message, budgets, strict=True)]

    async def scenario():
        scheduler = BatchScheduler(engine, ServerMetrics(), max_batch=4, start=False)
        turns = [Turn(s.id, 0) for s in sessions]
        results: dict[int, asyncio.Future] = {}

        def submitter(i):
            return lambda: results.__setitem__(i, scheduler.submit(
                turns[i], sessions[i], message[i], SamplingConfig(max_new_tokens=budgets[i]), time.perf_counter()))

        arrivals: dict[int, list] = {}
        for i, step in enumerate(arrive_at):
            arrivals.setdefault(step, []).append(submitter(i))
        await drive(scheduler, arrivals)
        streamed = []
        for turn in turns:
            pieces = []
            while not turn.queue.empty():
                event = turn.queue.get_nowait()
                assert isinstance(event, TokenEvent)
                pieces.append(event.text)
            streamed.append("".join(pieces))
        return [await results[i] for i in range(len(sessions))], streamed

    answers, streamed = asyncio.run(scenario())
    for session, answer, text, (ids, stm) in zip(sessions, answers, streamed, expected, strict=True):
        assert answer.token_ids == ids
        assert text.strip() == answer.text
        session.wait()  # the batched memory update of the rows that finished together
        torch.testing.assert_close(session.tensors["stm"], stm)


def test_max_batch_caps_the_rows_and_a_cancelled_row_frees_its_place(engine):
    sessions = sessions_with_history(engine, [1, 2, 0])
    message = [f"Hi, my name is {n} and I like tea." for n in ("Ada", "Eve", "Jun")]
    expected = [answered_alone(engine, copy(s), m, SamplingConfig(max_new_tokens=MAX_TOKENS))
                for s, m in zip(sessions, message, strict=True)]

    async def scenario():
        scheduler = BatchScheduler(engine, ServerMetrics(), max_batch=2, start=False)
        turns = [Turn(s.id, 0) for s in sessions]
        results = [scheduler.submit(t, s, m, SamplingConfig(max_new_tokens=MAX_TOKENS), time.perf_counter())
                   for t, s, m in zip(turns, sessions, message, strict=True)]
        scheduler.step()
        scheduler.step()
        assert scheduler.rows == 2  # the third turn waits for a row
        turns[0].cancelled.set()  # its client left
        scheduler.step()
        await asyncio.sleep(0)
        assert results[0].done() and results[0].result() is None
        assert scheduler.rows == 1  # the row is free; the waiting turn joins at the next step
        scheduler.step()
        assert scheduler.rows == 2
        await drive(scheduler, {})
        return [await r for r in results]

    turns_before = sessions[0].turns
    left, second, third = asyncio.run(scenario())
    assert left is None and sessions[0].turns == turns_before  # a cancelled turn is not remembered
    assert second.token_ids == expected[1][0] and third.token_ids == expected[2][0]


def test_sampled_rows_keep_their_own_seeded_generator(engine):
    (session,) = sessions_with_history(engine, [1])
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=7)
    expected_ids, _ = answered_alone(engine, copy(session), "I like rain.", sampling)

    async def scenario():
        scheduler = BatchScheduler(engine, ServerMetrics(), max_batch=4, start=False)
        other = engine.new_session()
        greedy = scheduler.submit(Turn(other.id, 0), other, "Hello there.", SamplingConfig(max_new_tokens=9), 0.0)
        sampled = scheduler.submit(Turn(session.id, 0), session, "I like rain.", sampling, 0.0)
        await drive(scheduler, {})
        await greedy
        return await sampled

    assert asyncio.run(scenario()).token_ids == expected_ids


@pytest.mark.parametrize("max_batch", [1, 8])
def test_server_answers_match_sequential_run_with_and_without_batching(model_dir, max_batch):
    conversations = [queries(i, 3) for i in range(4)]
    expected, _ = reference_answers(model_dir, conversations)
    with serve_in_thread(model_dir, SQLiteStore("sqlite:///:memory:"), max_batch=max_batch) as url, \
            httpx.Client(base_url=url, timeout=60) as http:

        def conversation(turns: list[str]) -> list[str]:
            session_id, answers = None, []
            for query in turns:
                body = {"messages": [{"role": "user", "content": query}], "max_tokens": MAX_TOKENS,
                        "session_id": session_id}
                reply = http.post("/v1/chat/completions", json=body).raise_for_status()
                session_id = reply.headers["x-session-id"]
                answers.append(reply.json()["choices"][0]["message"]["content"])
            return answers

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(conversation, conversations)) == expected


def test_a_full_queue_is_429_with_retry_after(model_dir):
    from fastapi.testclient import TestClient

    from rxt.serve.app import create_app
    from rxt.serve.service import ServeSettings

    engine = ReactiveEngine(load_model(model_dir))
    app = create_app(engine, SQLiteStore("sqlite:///:memory:"), ServeSettings("tiny-rxt", max_batch=2, max_queue=3))
    service = app.state.service
    with TestClient(app) as client:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        service.answering = service.capacity + service.settings.max_queue  # every row busy, the queue full
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        metrics = client.get("/metrics").text
        assert "rxt_queue_rejections_total 1" in metrics and "rxt_queued_turns 5" in metrics  # no row is busy
        assert "rxt_stored_sessions 0" in metrics  # refused before a new session was stored
        service.answering = 0
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert service.answering == 0 and "rxt_queued_turns 0" in client.get("/metrics").text
    engine.close()


def test_serve_refuses_bad_batching_options(model_dir, capsys):
    from rxt.cli import main as cli_main

    assert cli_main(["serve", "--model", str(model_dir), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(model_dir), "--max-queue", "-1"]) == 2
    assert "--max-queue must be >= 0" in capsys.readouterr().err


def test_a_stream_writes_what_is_already_queued_in_one_go():
    """Tokens of several steps waiting for a slow client go out in one write, as the same SSE events."""
    import asyncio
    import json
    from types import SimpleNamespace

    from rxt.engine import AnswerEvent, TokenEvent
    from rxt.serve.app import stream_answer
    from rxt.serve.schemas import ChatCompletionRequest
    from rxt.serve.service import Turn
    from rxt.session import TurnStats

    async def writes() -> list[bytes]:
        turn = Turn("s" * 32, 5)
        for i, text in enumerate([" Hello", ",", " Ada"]):
            turn.queue.put_nowait(TokenEvent(i, text))
        turn.queue.put_nowait(AnswerEvent("Hello, Ada", [0, 1, 2], TurnStats(1, 5, 4, 0.1, 0.2)))
        chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "stream": True})
        service = SimpleNamespace(settings=SimpleNamespace(model_name="m"), engine=SimpleNamespace(identity="i"))
        return [part async for part in stream_answer(turn, chat, service)]

    parts = asyncio.run(writes())
    assert len(parts) == 3  # the role chunk, everything queued, [DONE]
    events = [json.loads(line[6:]) for line in parts[1].decode().split("\n\n") if line]
    assert [e["choices"][0]["delta"].get("content") for e in events] == ["Hello", ",", " Ada", None]
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and parts[2] == b"data: [DONE]\n\n"
