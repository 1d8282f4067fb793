"""The Responses API: previous_response_id continues (or branches from) any kept turn's memory, store:
false writes nothing, streaming events; the official openai client, unmodified, in process (no network)."""

from __future__ import annotations

import openai
import pytest
from starlette.testclient import TestClient

from rxt.engine import ReactiveEngine
from rxt.model import load_model
from rxt.serve.app import create_app
from rxt.serve.service import ServeSettings
from rxt.serve.store import SQLiteStore
from test_serve_support import MAX_TOKENS, make_tiny_model, queries, reference_answers

KEY, OTHER_KEY = "key-responses", "key-other"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("responses") / "tiny-rxt")


def make_http(model_dir, **settings) -> TestClient:
    app = create_app(ReactiveEngine(load_model(model_dir)), SQLiteStore("sqlite:///:memory:"),
                     ServeSettings("tiny-rxt", **settings), [KEY, OTHER_KEY])
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def http(model_dir):
    with make_http(model_dir) as http:
        yield http


@pytest.fixture(scope="module")
def client(http):
    """The official client; its HTTP client is the in-process test client (no sockets)."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def ask(client: openai.OpenAI, text: str, **fields):
    return client.responses.create(model="tiny-rxt", input=text, max_output_tokens=MAX_TOKENS, **fields)


def test_previous_response_id_continues_and_branches(client, model_dir):
    turns, other = queries(0, 3), queries(5, 1)[0]
    (main_line, branch), _ = reference_answers(model_dir, [turns, [turns[0], other]])
    first = ask(client, turns[0])
    assert first.id.startswith("resp_") and first.object == "response" and first.output_text == main_line[0]
    second = ask(client, turns[1], previous_response_id=first.id)
    third = ask(client, turns[2], previous_response_id=second.id)
    assert (second.output_text, third.output_text) == (main_line[1], main_line[2])
    assert second.previous_response_id == first.id and second.usage.output_tokens >= 1
    # from the first response again: a branch, as if the later turns had never happened
    assert ask(client, other, previous_response_id=first.id).output_text == branch[1]
    assert ask(client, turns[1], previous_response_id=first.id).output_text == main_line[1]  # regenerated


def test_a_session_holds_the_latest_memory_for_chat_completions(client, http, model_dir):
    turns = queries(1, 3)
    (expected,), _ = reference_answers(model_dir, [turns])
    first = ask(client, turns[0])
    session_id = first.model_extra["session_id"]
    ask(client, turns[1], previous_response_id=first.id)
    chat = client.chat.completions.create(model="tiny-rxt", messages=[{"role": "user", "content": turns[2]}],
                                          max_tokens=MAX_TOKENS, extra_body={"session_id": session_id})
    assert chat.choices[0].message.content == expected[2]
    assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 3


def test_store_false_writes_nothing(client, http, model_dir):
    turns = queries(2, 2)
    (expected,), _ = reference_answers(model_dir, [turns])
    first = ask(client, turns[0])
    session_id = first.model_extra["session_id"]
    state = http.get(f"/v1/sessions/{session_id}/state").content
    stored = http.app.state.service.store.count()
    unstored = ask(client, turns[1], previous_response_id=first.id, store=False)
    assert unstored.output_text == expected[1] and unstored.store is False
    fresh = ask(client, turns[0], store=False)
    assert fresh.output_text == expected[0]
    assert http.app.state.service.store.count() == stored  # no session, no snapshot
    assert http.get(f"/v1/sessions/{session_id}/state").content == state  # the memory did not move
    with pytest.raises(openai.NotFoundError):
        ask(client, turns[1], previous_response_id=unstored.id)


def test_snapshots_beyond_the_retention_limit_are_dropped(model_dir):
    with make_http(model_dir, responses_per_session=3) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        ids = [ask(client, "Hi, my name is Ada.").id]
        for text in ["I like tea.", "I like jazz.", "I like rain."]:
            ids.append(ask(client, text, previous_response_id=ids[-1]).id)
        with pytest.raises(openai.NotFoundError) as refused:
            ask(client, "And now?", previous_response_id=ids[0])  # 4 turns, 3 kept
        assert refused.value.body["code"] == "previous_response_not_found"
        assert ask(client, "And now?", previous_response_id=ids[3]).status in ("completed", "incomplete")
        session_id = ids[0].removeprefix("resp_").rsplit("_", 1)[0]
        store = http.app.state.service.store
        assert store.count() == 5  # the session, 3 snapshots, their index
        http.delete(f"/v1/sessions/{session_id}")
        assert store.count() == 0


def test_another_key_cannot_continue_a_response(client, http):
    first = ask(client, "Hi, my name is Bo.")
    other = openai.OpenAI(base_url="http://testserver/v1", api_key=OTHER_KEY, http_client=http, max_retries=0)
    for store in (True, False):
        with pytest.raises(openai.NotFoundError):
            ask(other, "What is my name?", previous_response_id=first.id, store=store)
    with pytest.raises(openai.NotFoundError):
        ask(client, "x", previous_response_id="resp_not-a-real-one_0123456789ab")


def test_streaming_events_in_the_responses_format(client, model_dir):
    turns = queries(3, 2)
    (expected,), _ = reference_answers(model_dir, [turns])
    first = ask(client, turns[0])
    events = list(client.responses.create(model="tiny-rxt", input=[{"role": "user", "content": turns[1]}],
                                          max_output_tokens=MAX_TOKENS, previous_response_id=first.id,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    final = events[-1].response
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{final.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip() == final.output_text == expected[1] and final.previous_response_id == first.id
    assert ask(client, "Thanks.", previous_response_id=final.id).status in ("completed", "incomplete")


def test_a_cut_answer_is_incomplete_and_bad_requests_are_refused(client, http):
    cut = client.responses.create(model="tiny-rxt", input="Hi, my name is Ada and I like tea.", max_output_tokens=1)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    for body, code in [({"input": "hi", "instructions": "be brief"}, "invalid_value"),
                       ({"input": [{"role": "assistant", "content": "hi"}]}, "no_user_message"),
                       ({"input": "hi", "tools": []}, "unknown_field"),
                       ({"input": "hi", "previous_response_id": "chatcmpl-1"}, "invalid_value"),
                       ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                        "unsupported_content")]:
        answer = http.post("/v1/responses", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == code, (body, answer.text)
