"""The HTTP API against a live server on 127.0.0.1: the official openai client, sessions, auth, bad input."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from rxt.cli import main as cli_main
from rxt.config import ModelConfig
from rxt.engine import ReactiveEngine
from rxt.model import StatelessLM, load_model
from rxt.serve.auth import fingerprint
from rxt.serve.store import SQLiteStore, StoreUnavailable
from rxt.session import Session
from rxt.tokenizer import Tokenizer
from test_serve_support import MAX_TOKENS, make_tiny_model, queries, reference_answers, serve_in_thread

KEY_A, KEY_B = "key-a-secret", "key-b-secret"
MODEL = "tiny-rxt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-rxt")


@pytest.fixture(scope="module")
def store():
    return SQLiteStore("sqlite:///:memory:")


@pytest.fixture(scope="module")
def server(model_dir, store):
    with serve_in_thread(model_dir, store, api_keys=[KEY_A, KEY_B],
                         max_tokens_limit=64, max_message_chars=500, max_body_bytes=4096) as url:
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY_A, max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as http:
        yield http


def chat(http: httpx.Client, message: str, session_id: str | None = None, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": message}], "max_tokens": MAX_TOKENS, **fields}
    if session_id:
        body["session_id"] = session_id
    return http.post("/v1/chat/completions", json=body)


def test_openai_client_multi_turn_matches_in_process_engine(client, model_dir):
    turns = queries(0, 4)
    (expected,), _ = reference_answers(model_dir, [turns])

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": turns[0]}], max_tokens=MAX_TOKENS, temperature=0)
    first = raw.parse()
    session_id = first.session_id
    assert raw.headers["x-session-id"] == session_id and len(session_id) >= 20
    assert first.object == "chat.completion" and first.choices[0].message.content == expected[0]
    assert first.usage.completion_tokens >= 1 and first.usage.total_tokens > first.usage.completion_tokens

    # earlier messages are ignored: the memory holds them; only the last user message is read
    second = client.chat.completions.create(
        model=MODEL, max_tokens=MAX_TOKENS, extra_body={"session_id": session_id},
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "ignored"},
                  {"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": turns[1]}])
    assert second.choices[0].message.content == expected[1]

    for turn, want in zip(turns[2:], expected[2:], strict=True):  # streaming, session chosen by header
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": turn}], max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}, extra_headers={"X-Session-Id": session_id})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() == want
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].usage.completion_tokens >= 1 and all(c.session_id == session_id for c in chunks)


def test_memory_is_used(http, model_dir):
    """The state changes every turn, and the same message is answered differently with another memory."""
    turns = queries(1, 3)
    session_id = chat(http, turns[0]).json()["session_id"]
    after_one = Session.from_bytes(http.get(f"/v1/sessions/{session_id}/state").content)
    answer_late = chat(http, turns[2], session_id).json()["choices"][0]["message"]["content"]
    after_two = Session.from_bytes(http.get(f"/v1/sessions/{session_id}/state").content)
    assert (after_one.turns, after_two.turns) == (1, 2)
    assert not torch.equal(after_one.tensors["stm"], after_two.tensors["stm"])

    answer_fresh = chat(http, turns[2]).json()["choices"][0]["message"]["content"]
    (with_memory, fresh), _ = reference_answers(model_dir, [[turns[0], turns[2]], [turns[2]]])
    assert (answer_late, answer_fresh) == (with_memory[1], fresh[0])
    assert answer_late != answer_fresh


def test_session_endpoints(http, model_dir):
    created = http.post("/v1/sessions")
    assert created.status_code == 201
    session_id = created.json()["id"]
    info = http.get(f"/v1/sessions/{session_id}").json()
    assert info["turns"] == 0 and info["model"] == MODEL and info["state_bytes"] > 0
    assert chat(http, "Hi, my name is Ada.", session_id).status_code == 200
    assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 1

    state = http.get(f"/v1/sessions/{session_id}/state")
    assert state.headers["content-type"] == "application/octet-stream"
    _, (stm,) = reference_answers(model_dir, [["Hi, my name is Ada."]])
    torch.testing.assert_close(Session.from_bytes(state.content).tensors["stm"], stm)

    imported = http.post("/v1/sessions/import", content=state.content)
    assert imported.status_code == 201 and imported.json()["turns"] == 1 and imported.json()["id"] != session_id
    reset = http.post(f"/v1/sessions/{session_id}/reset").json()
    assert reset["turns"] == 0 and reset["id"] == session_id
    assert http.put(f"/v1/sessions/{session_id}/state", content=state.content).json()["turns"] == 1
    assert http.get(f"/v1/sessions/{session_id}/state").content.startswith(state.content[:8])

    assert http.delete(f"/v1/sessions/{session_id}").json()["deleted"] is True
    assert http.get(f"/v1/sessions/{session_id}").status_code == 404
    assert chat(http, "hello", session_id).status_code == 404


def test_import_refuses_other_models_and_corrupt_state(http, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=1)
    foreign = ReactiveEngine(load_model(other)).new_session().to_bytes()
    refused = http.post("/v1/sessions/import", content=foreign)
    assert refused.status_code == 409
    assert "does not fit the model" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "model_mismatch"

    session_id = http.post("/v1/sessions").json()["id"]
    assert http.put(f"/v1/sessions/{session_id}/state", content=foreign).status_code == 409
    good = http.get(f"/v1/sessions/{session_id}/state").content
    for corrupt in (good[: len(good) // 2], b"not a session", b""):
        answer = http.post("/v1/sessions/import", content=corrupt)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_session_state"
    too_big = http.post("/v1/sessions/import", content=b"x" * 10_000_000)
    assert too_big.status_code == 413 and "--max-state-bytes" in too_big.json()["error"]["message"]


def test_stored_state_of_another_model_is_409_until_reset(http, store, tmp_path):
    """A store shared with (or left by) a server running another model: its sessions are refused clearly."""
    foreign = ReactiveEngine(load_model(make_tiny_model(tmp_path / "other", seed=2))).new_session()
    store.put(foreign.id, fingerprint(KEY_A), foreign.to_bytes())
    for answer in (chat(http, "hello", foreign.id), http.get(f"/v1/sessions/{foreign.id}")):
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "model_mismatch"
        assert foreign.model_identity in answer.json()["error"]["message"]
    assert http.post(f"/v1/sessions/{foreign.id}/reset").json()["turns"] == 0
    assert chat(http, "hello", foreign.id).status_code == 200


def test_api_keys_and_ownership(server, http):
    session_id = chat(http, "Hi, my name is Bob.").json()["session_id"]
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server + "/health").status_code == 200  # probes need no key
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY_B}"}) as other:
        assert other.get("/v1/models").status_code == 200
        for method, path in [("GET", ""), ("GET", "/state"), ("POST", "/reset"), ("DELETE", "")]:
            answer = other.request(method, f"/v1/sessions/{session_id}{path}")
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "session_not_found"
        assert chat(other, "steal", session_id).status_code == 404
    assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 1  # untouched


def raw_post(server: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server + "/v1/chat/completions", content=body, headers=headers, timeout=30)


def message(content, **fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}).encode()


BAD_REQUESTS = {
    "malformed json": (b'{"messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_json"),
    "invalid utf-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_utf8"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_text"),
    "nan": (message("hi", temperature=float("nan")), 400, "invalid_json"),
    "wrong type": (message("hi", max_tokens="8"), 400, "invalid_value"),
    "bool as int": (message("hi", max_tokens=True), 400, "invalid_value"),
    "unknown field": (message("hi", max_token=8), 400, "unknown_field"),
    "bad role": (b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "invalid_value"),
    "no messages": (b'{"messages": []}', 400, "invalid_value"),
    "no user message": (b'{"messages": [{"role": "system", "content": "hi"}]}', 400, "no_user_message"),
    "empty message": (message("   "), 400, "empty_message"),
    "image part": (message([{"type": "image_url", "image_url": {"url": "x"}}]), 400, "unsupported_content"),
    "negative max_tokens": (message("hi", max_tokens=-1), 400, "invalid_value"),
    "max_tokens over limit": (message("hi", max_tokens=65), 400, "max_tokens_too_large"),
    "message too long": (message("a " * 300), 400, "message_too_long"),
    "context exceeded": (message("ab " * 160, max_tokens=64), 400, "context_length_exceeded"),
    "temperature out of range": (message("hi", temperature=3), 400, "invalid_value"),
    "n > 1": (message("hi", n=2), 400, "invalid_value"),
    "unknown model": (message("hi", model="gpt-4"), 404, "model_not_found"),
    "unknown session": (message("hi", session_id="nope"), 404, "session_not_found"),
    "session id not an id": (message("hi", session_id="../etc"), 400, "invalid_value"),
    "body too large": (message("x" * 5000), 413, "request_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_clear_4xx(server, name):
    body, status, code = BAD_REQUESTS[name]
    answer = raw_post(server, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_more_bad_requests(server, http):
    assert raw_post(server, message("hi"), {"X-Session-Id": "a" * 30}).status_code == 404
    conflicting = raw_post(server, message("hi", session_id="a" * 30), {"X-Session-Id": "b" * 30})
    assert conflicting.status_code == 400 and conflicting.json()["error"]["code"] == "conflicting_session_id"
    assert http.get("/v1/nothing-here").json()["error"]["code"] == "not_found"
    assert http.put("/v1/chat/completions").status_code == 405
    assert http.get("/v1/sessions/" + "x" * 500).status_code == 404
    chunked = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                         content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
    assert chunked.status_code == 413  # no Content-Length: counted while reading


def test_concurrent_sessions_match_sequential_run(server, model_dir):
    """20 sessions x 10 turns at once answer exactly as one conversation after another (greedy)."""
    conversations = [queries(s, 10) for s in range(20)]
    expected, stms = reference_answers(model_dir, conversations)

    def converse(turns: list[str]) -> tuple[list[str], bytes]:
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120) as http:
            answers, session_id = [], None
            for turn in turns:
                body = chat(http, turn, session_id).json()
                session_id = body["session_id"]
                answers.append(body["choices"][0]["message"]["content"])
            return answers, http.get(f"/v1/sessions/{session_id}/state").content

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(converse, conversations))
    for (answers, state), want, stm in zip(results, expected, stms, strict=True):
        assert answers == want
        torch.testing.assert_close(Session.from_bytes(state).tensors["stm"], stm)


def test_requests_on_one_session_are_serialised(http, server):
    session_id = http.post("/v1/sessions").json()["id"]

    def one(i: int) -> int:
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as c:
            return chat(c, f"message {i}", session_id).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(6))) == [200] * 6
    assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 6  # no update lost


def test_metrics(http, server):
    chat(http, "Hi, my name is Eve.", stream=True)
    text = httpx.get(server + "/metrics").text
    assert 'rxt_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    for name in ("rxt_time_to_first_token_seconds_count", "rxt_answer_seconds_count",
                 "rxt_memory_update_seconds_count", "rxt_active_sessions", "rxt_stored_sessions"):
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert float(line.split()[-1]) >= (1 if "count" in name else 0)
    assert 'status="404"' in text
    http.get("/v1/models")  # nothing in flight now: every session lock was given back
    assert "\nrxt_active_sessions 0\n" in httpx.get(server + "/metrics").text


def test_store_outage_is_503_then_recovers(model_dir):
    """While the store is down every request is 503 with a clear message; afterwards nothing is lost."""

    class FlakyStore(SQLiteStore):
        down = False

        def _run(self, work, write=True):
            if self.down:
                raise StoreUnavailable("connection refused (simulated)")
            return super()._run(work, write)

    store = FlakyStore("sqlite:///:memory:")
    with serve_in_thread(model_dir, store) as url, httpx.Client(base_url=url, timeout=60) as http:
        turns = queries(3, 3)
        session_id = chat(http, turns[0]).json()["session_id"]
        assert chat(http, turns[1], session_id).status_code == 200
        assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 2
        store.down = True
        for answer in (chat(http, turns[2], session_id), chat(http, "new"), http.post("/v1/sessions"),
                       http.get("/health")):
            assert answer.status_code == 503
        error = chat(http, turns[2], session_id).json()["error"]
        assert error["code"] == "store_unavailable" and "store is unavailable" in error["message"]
        store.down = False
        answer = chat(http, turns[2], session_id).json()["choices"][0]["message"]["content"]
        (expected,), _ = reference_answers(model_dir, [turns])
        assert answer == expected[2]
        assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 3


def test_serve_refuses_bad_options_before_starting(tmp_path, model_dir, capsys):
    tokenizer = Tokenizer.train(["a b c d e f"] * 20, vocab_size=260)
    model = StatelessLM(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "stateless")
    assert cli_main(["serve", "--model", str(model_dir), "--baseline", "cached"]) == 2
    assert "--baseline applies only to a stateless model directory" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert cli_main(["serve", "--model", str(tmp_path / "stateless"), "--lock-ttl-s", "0"]) == 2
    assert "--lock-ttl-s must be > 0" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tmp_path / "stateless"), "--kv-cache-sessions", "-1"]) == 2
    assert "--kv-cache-sessions and --kv-cache-bytes must be >= 0" in capsys.readouterr().err


def test_client_leaving_mid_stream_frees_the_session(http, server):
    """A turn whose client disconnects is either not remembered or remembered whole; the lock is freed."""
    session_id = http.post("/v1/sessions").json()["id"]
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 64, "stream": True,
            "session_id": session_id}
    with http.stream("POST", "/v1/chat/completions", json=body) as stream:
        next(stream.iter_lines())  # the first chunk, then hang up
    assert http.get(f"/v1/sessions/{session_id}").json()["turns"] in (0, 1)
    assert chat(http, "hello again", session_id).status_code == 200


def test_the_example_in_docs_runs(model_dir, capsys):
    docs = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
    example = docs.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    with serve_in_thread(model_dir, SQLiteStore("sqlite:///:memory:"), model_name="rxt") as url:
        exec(compile(example.replace("http://127.0.0.1:8000", url), str(docs), "exec"), {})
    assert capsys.readouterr().out  # the streamed answer was printed
