"""Several `rxt serve` processes sharing one real redis-server, and Redis restarting mid-conversation."""

from __future__ import annotations

import time

import httpx
import pytest

from rxt.serve.launch import ServerProcess
from test_serve_support import (
    MAX_TOKENS,
    RedisProcess,
    make_tiny_model,
    queries,
    redis_server_binary,
    reference_answers,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("redis") / "tiny-rxt")


@pytest.fixture(scope="module")
def redis_binary():
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed and could not be installed")
    return binary


@pytest.fixture(scope="module")
def redis_server(redis_binary, tmp_path_factory):
    server = RedisProcess(redis_binary, tmp_path_factory.mktemp("redis-data")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def replicas(model_dir, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replica-logs")
    servers = [ServerProcess(model_dir, redis_server.url, args=["--api-key", "k"], log_path=logs / f"{i}.log")
               for i in range(2)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def ask(url: str, message: str, session_id: str | None = None) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": message}], "max_tokens": MAX_TOKENS}
    headers = {"Authorization": "Bearer k", **({"X-Session-Id": session_id} if session_id else {})}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def answer_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_two_replicas_answer_alternate_turns_like_one_process(replicas, model_dir):
    turns = queries(7, 6)
    (expected,), _ = reference_answers(model_dir, [turns])
    first = ask(replicas[0].url, turns[0])
    session_id, answers = first.json()["session_id"], [answer_of(first)]
    for i, turn in enumerate(turns[1:], start=1):
        answers.append(answer_of(ask(replicas[i % 2].url, turn, session_id)))
    assert answers == expected
    info = httpx.get(f"{replicas[0].url}/v1/sessions/{session_id}", headers={"Authorization": "Bearer k"}).json()
    assert info["turns"] == 6


def test_a_response_made_on_one_replica_is_read_continued_and_deleted_on_the_other(replicas, model_dir):
    turns = queries(9, 2)
    (expected,), _ = reference_answers(model_dir, [turns])
    headers = {"Authorization": "Bearer k"}
    body = {"input": turns[0], "max_output_tokens": MAX_TOKENS}
    first = httpx.post(f"{replicas[0].url}/v1/responses", json=body, headers=headers, timeout=60).json()
    path = f"/v1/responses/{first['id']}"
    assert httpx.get(replicas[1].url + path, headers=headers, timeout=60).json() == first
    body = {"input": turns[1], "max_output_tokens": MAX_TOKENS, "previous_response_id": first["id"]}
    second = httpx.post(f"{replicas[1].url}/v1/responses", json=body, headers=headers, timeout=60).json()
    assert [first["output"][0]["content"][0]["text"], second["output"][0]["content"][0]["text"]] == expected
    assert httpx.delete(replicas[1].url + path, headers=headers, timeout=60).json()["deleted"] is True
    assert httpx.get(replicas[0].url + path, headers=headers, timeout=60).status_code == 404
    second_path = f"{replicas[0].url}/v1/responses/{second['id']}"
    assert httpx.get(second_path, headers=headers, timeout=60).json() == second


def test_redis_restart_is_503_then_nothing_is_lost(replicas, redis_server, model_dir):
    turns = queries(8, 3)
    (expected,), _ = reference_answers(model_dir, [turns])
    url = replicas[0].url
    first = ask(url, turns[0])
    session_id = first.json()["session_id"]
    answer_of(ask(replicas[1].url, turns[1], session_id))
    headers = {"Authorization": "Bearer k"}
    assert httpx.get(f"{url}/v1/sessions/{session_id}", headers=headers, timeout=60).json()["turns"] == 2

    redis_server.kill()  # SIGKILL: only what was fsynced survives
    down = ask(url, turns[2], session_id)
    assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
    assert httpx.get(url + "/health").status_code == 503

    redis_server.start()  # same port, same append-only file
    deadline = time.monotonic() + 20
    while httpx.get(url + "/health").status_code != 200:  # no server restart needed
        assert time.monotonic() < deadline, "the server did not reconnect to Redis"
        time.sleep(0.1)
    assert answer_of(ask(url, turns[2], session_id)) == expected[2]  # turns 1-2 are still in memory
    assert httpx.get(f"{url}/v1/sessions/{session_id}", headers=headers, timeout=60).json()["turns"] == 3
