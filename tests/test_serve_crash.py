"""A server killed with SIGKILL leaves every session consistent: the old state or the new one, never torn."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from rxt.serve.app import DELAY_ENV
from rxt.serve.launch import ServerProcess
from rxt.session import Session
from test_serve_support import MAX_TOKENS, make_tiny_model, queries, reference_answers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("crash") / "tiny-rxt")


def ask(url: str, message: str, session_id: str | None = None) -> dict:
    body = {"messages": [{"role": "user", "content": message}], "max_tokens": MAX_TOKENS}
    if session_id:
        body["session_id"] = session_id
    answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def state(url: str, session_id: str) -> bytes:
    answer = httpx.get(f"{url}/v1/sessions/{session_id}/state", timeout=60)  # waits for a turn in flight
    assert answer.status_code == 200, answer.text
    return answer.content


def test_sigkill_during_memory_update_keeps_the_previous_state(model_dir, tmp_path):
    turns = queries(5, 2)
    (expected,), _ = reference_answers(model_dir, [turns])
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    args = ["--lock-ttl-s", "1"]  # the killed server's lock frees itself quickly

    slow = ServerProcess(model_dir, store, args=args, env={DELAY_ENV: "3"}, log_path=tmp_path / "slow.log").start()
    try:
        first = ask(slow.url, turns[0])
        session_id = first["session_id"]
        before = state(slow.url, session_id)  # turn 1 remembered
        assert ask(slow.url, turns[1], session_id)["choices"][0]["message"]["content"] == expected[1]
        # the answer is out; the memory update of turn 2 sleeps for 3 s: kill the server now
    finally:
        slow.kill()

    with sqlite3.connect(tmp_path / "sessions.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    with ServerProcess(model_dir, store, args=args, log_path=tmp_path / "restarted.log") as server:
        after = state(server.url, session_id)
        assert after == before and Session.from_bytes(after).turns == 1  # the old state, whole
        # the lost turn can be asked again and is answered exactly as the first time
        assert ask(server.url, turns[1], session_id)["choices"][0]["message"]["content"] == expected[1]
        remembered = state(server.url, session_id)
        assert Session.from_bytes(remembered).turns == 2
        server.kill()  # right after the write: the new state is durable

    with ServerProcess(model_dir, store, args=args, log_path=tmp_path / "again.log") as server:
        assert state(server.url, session_id) == remembered


def test_sigterm_lets_answered_turns_write_their_memory(model_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    slow = ServerProcess(model_dir, store, env={DELAY_ENV: "2"}, log_path=tmp_path / "slow.log").start()
    try:
        session_id = ask(slow.url, "Hi, my name is Ada.")["session_id"]
    finally:
        slow.stop()  # SIGTERM while the memory update sleeps: shutdown waits for it
    assert "Traceback" not in slow.log_tail()
    with ServerProcess(model_dir, store, log_path=tmp_path / "after.log") as server:
        assert Session.from_bytes(state(server.url, session_id)).turns == 1
