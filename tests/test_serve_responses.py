"""The Responses API: previous_response_id continues (or branches from) any kept turn's memory, store:
false writes nothing, streaming events, retrieve and delete; the official openai client, unmodified, in
process (no network)."""

from __future__ import annotations

import concurrent.futures

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


def make_http(model_dir, update_delay_s: float = 0.0, **settings) -> TestClient:
    app = create_app(ReactiveEngine(load_model(model_dir), update_delay_s=update_delay_s),
                     SQLiteStore("sqlite:///:memory:"), ServeSettings("tiny-rxt", **settings), [KEY, OTHER_KEY])
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def http(model_dir):
    with make_http(model_dir) as http:
        yield http


@pytest.fixture(scope="module")
def client(http):
    """The official client; its HTTP client is the in-process test client (no sockets)."""
    return openai_client(http)


def openai_client(http: TestClient, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


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
    for id_ in (unstored.id, fresh.id):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(id_)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(id_)
    assert client.responses.retrieve(first.id).output_text == expected[0]


def test_snapshots_beyond_the_retention_limit_are_dropped(model_dir):
    with make_http(model_dir, responses_per_session=3) as http:
        client = openai_client(http)
        ids = [ask(client, "Hi, my name is Ada.").id]
        for text in ["I like tea.", "I like jazz.", "I like rain."]:
            ids.append(ask(client, text, previous_response_id=ids[-1]).id)
        with pytest.raises(openai.NotFoundError) as refused:
            ask(client, "And now?", previous_response_id=ids[0])  # 4 turns, 3 kept
        assert refused.value.body["code"] == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])
        assert [client.responses.retrieve(id_).id for id_ in ids[1:]] == ids[1:]
        assert ask(client, "And now?", previous_response_id=ids[3]).status in ("completed", "incomplete")
        session_id = ids[0].removeprefix("resp_").rsplit("_", 1)[0]
        store = http.app.state.service.store
        assert store.count() == 5  # the session, 3 snapshots, their index
        client.responses.delete(ids[2])
        assert store.count() == 4
        http.delete(f"/v1/sessions/{session_id}")
        assert store.count() == 0
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[3])  # deleted with its session


def test_another_key_cannot_continue_read_or_delete_a_response(client, http):
    first = ask(client, "Hi, my name is Bo.")
    other = openai_client(http, OTHER_KEY)
    for store in (True, False):
        with pytest.raises(openai.NotFoundError):
            ask(other, "What is my name?", previous_response_id=first.id, store=store)
    with pytest.raises(openai.NotFoundError):
        ask(client, "x", previous_response_id="resp_not-a-real-one_0123456789ab")
    # another key's response answers exactly as one that never existed: the reply tells nothing
    never = f"resp_{first.model_extra['session_id']}_0123456789ab"
    for id_ in (first.id, never, "resp_no-such-session_0123456789ab", "resp_x", "chatcmpl-1"):
        for method in ("GET", "DELETE"):
            refused = http.request(method, f"/v1/responses/{id_}", headers={"Authorization": f"Bearer {OTHER_KEY}"})
            assert (refused.status_code, refused.json()) == (404, {"error": {
                "message": f"no stored response {id_!r}", "type": "not_found_error", "param": None,
                "code": "response_not_found"}}), (method, id_)
    assert client.responses.retrieve(first.id).output_text == first.output_text  # the owner's is untouched


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
    assert client.responses.retrieve(final.id) == final  # kept as the stream ended it
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



def test_create_retrieve_continue_delete(client, http, model_dir):
    turns = queries(4, 3)
    (expected,), _ = reference_answers(model_dir, [turns])
    first = ask(client, turns[0], metadata={"topic": "names"})
    assert client.responses.retrieve(first.id) == first  # every field as the create call returned it
    second = ask(client, turns[1], previous_response_id=first.id)
    session_id = second.model_extra["session_id"]
    state = http.get(f"/v1/sessions/{session_id}/state").content
    deleted = http.delete(f"/v1/responses/{first.id}")
    assert deleted.json() == {"id": first.id, "object": "response", "deleted": True}
    for forgotten in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            forgotten()
        assert refused.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError) as refused:
        ask(client, turns[1], previous_response_id=first.id)
    assert refused.value.body["code"] == "previous_response_not_found"
    # the session's memory and the other response are as they were
    assert http.get(f"/v1/sessions/{session_id}/state").content == state
    assert client.responses.retrieve(second.id) == second
    third = ask(client, turns[2], previous_response_id=second.id)
    assert (first.output_text, second.output_text, third.output_text) == tuple(expected)
    client.responses.delete(third.id)  # the official call (its reply is not read)
    assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 3  # the session's latest memory stays
    metrics = http.get("/metrics").text
    for line in ('method="GET",route="/v1/responses/{response_id}",status="200"',
                 'method="DELETE",route="/v1/responses/{response_id}",status="200"',
                 'method="DELETE",route="/v1/responses/{response_id}",status="404"'):
        assert f"rxt_http_requests_total{{{line}}}" in metrics
    paths = http.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
    streamed = http.get(f"/v1/responses/{second.id}", params={"stream": "true"})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"


def test_delete_racing_a_turn_that_continues_from_it(model_dir):
    """Retrieve and delete wait for the session's turn in flight; a delete and a turn continuing from the
    same response run one after the other, in either order: never a 5xx, and the state stays consistent."""
    turns = queries(6, 3)
    (expected, after_sibling), _ = reference_answers(model_dir, [turns, [turns[0], turns[1], turns[1], turns[2]]])
    with make_http(model_dir, update_delay_s=0.4) as http:
        client, other = openai_client(http), openai_client(http, OTHER_KEY)
        store = http.app.state.service.store
        first = ask(client, turns[0])  # its memory update now holds the session's lock for 0.4 s
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(first.id)  # another key does not wait for the lock ...
        assert store.get(first.id) is None  # ... it was answered before the snapshot was written
        assert client.responses.retrieve(first.id) == first  # the owner waits for it
        second = ask(client, turns[1], previous_response_id=first.id)
        client.responses.delete(first.id)  # waits for the second turn's memory: that turn is kept whole
        assert client.responses.retrieve(second.id) == second and second.output_text == expected[1]
        session_id = second.model_extra["session_id"]
        for _ in range(2):  # now at the same moment
            racing = ask(client, turns[1], previous_response_id=second.id).id  # the second message again
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                turn = pool.submit(ask, client, turns[2], previous_response_id=racing)
                deletion = pool.submit(client.responses.delete, racing)
                deletion.result()  # the response existed until this delete: it succeeds in either order
                try:
                    answered = turn.result()
                except openai.NotFoundError as error:  # the delete came first
                    assert error.body["code"] == "previous_response_not_found"
                else:
                    assert answered.output_text == after_sibling[3]
                    assert client.responses.retrieve(answered.id) == answered
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(racing)
        assert client.responses.retrieve(second.id) == second
        assert http.get(f"/v1/sessions/{session_id}").status_code == 200
        assert 'status="5' not in http.get("/metrics").text
