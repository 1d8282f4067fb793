"""Property-based fuzzing over the server's own OpenAPI schema: whatever a client sends, never a 5xx.

Requests are drawn from /openapi.json: every route and method (about half of them turns), path
parameters, and bodies built from the documented request schemas, with numbers at and beyond their
bounds, now and then a field of any JSON type or an unknown field, and raw bytes. The number of cases is bounded and derandomised, so the suite stays
fast and a failure is reproducible.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_serve_hardening import KEY_A, make_client

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy:
    """Values of a JSON schema's types (the subset pydantic writes), at and beyond its bounds."""
    if "anyOf" in schema:
        return st.one_of([from_schema(option) for option in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        bounded = st.integers(schema.get("minimum"), _below(schema.get("maximum"), schema.get("exclusiveMaximum")))
        return bounded | st.integers() | st.sampled_from([0, -1, 2**63, 10**30])
    if kind == "number":  # extremes first: the tiniest positive numbers, the bounds, then anything
        extremes = st.sampled_from([5e-324, 1e-300, 1e-30, 0.0, 2.0, 1.0, 1e308])
        return extremes | st.floats(schema.get("minimum"), schema.get("maximum")) | st.floats(allow_nan=False)
    if kind == "string":
        text = st.text(max_size=40)
        return st.from_regex(schema["pattern"], fullmatch=True) | text if "pattern" in schema else text
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0), max_size=3)
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {name: from_schema(properties[name]) for name in required},
            optional={name: from_schema(s) for name, s in properties.items() if name not in required},
        )
    return JSON_VALUES


def _below(maximum: int | None, exclusive: int | None) -> int | None:
    return exclusive - 1 if exclusive is not None else maximum


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from test_serve_support import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny-rxt")
    with make_client(model_dir, max_tokens_limit=4, default_max_tokens=2) as client:
        yield client


def operations(schema: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, spec) for path, methods in schema["paths"].items() for method, spec in methods.items()]


@st.composite
def requests(draw, schema: dict, session_ids: list[str], response_ids: list[str]):
    chat = ("/v1/chat/completions", "post", schema["paths"]["/v1/chat/completions"]["post"])
    path, method, spec = draw(st.just(chat) | st.sampled_from(operations(schema)))  # about half are turns
    session_id = draw(st.sampled_from(session_ids) | st.text(min_size=1, max_size=30))
    response_id = draw(st.sampled_from(response_ids) | st.text(min_size=1, max_size=30))
    url = path.replace("{session_id}", quote(session_id, safe="")).replace("{model_id}", quote(session_id, safe=""))
    url = url.replace("{response_id}", quote(response_id, safe=""))
    content = spec.get("requestBody", {}).get("content", {})
    body: bytes = b""
    if "application/json" in content:
        value = draw(from_schema(content["application/json"]["schema"]))
        if isinstance(value, dict) and draw(st.booleans()):
            value["session_id"] = draw(st.sampled_from(session_ids))
        if isinstance(value, dict) and "input" in value and draw(st.booleans()):
            value["previous_response_id"] = response_id
        # (hypothesis leans to small integers: `== N` below marks the rarer branch)
        if isinstance(value, dict) and isinstance(value.get("messages"), list) and draw(st.integers(0, 4)) != 4:
            value["messages"].append({"role": "user", "content": draw(st.text(min_size=1, max_size=40))})
        if isinstance(value, dict) and draw(st.integers(0, 3)) == 3:  # one field of any type, or an unknown one
            value[draw(st.sampled_from([*value, "unknown_field"]))] = draw(JSON_VALUES)
        body = draw(st.binary(max_size=60)) if draw(st.integers(0, 9)) == 9 else json.dumps(value).encode()
    elif "application/octet-stream" in content:
        body = draw(st.binary(max_size=200))
    headers = {"Authorization": f"Bearer {KEY_A}"}
    if draw(st.integers(0, 5)) == 5:
        headers["X-Session-Id"] = draw(st.sampled_from(session_ids) | st.from_regex(r"[ -~]{0,20}", fullmatch=True))
    return method.upper(), url, body, headers


def test_no_request_drawn_from_the_openapi_schema_gets_a_5xx(client):
    schema = client.get("/openapi.json").json()
    session_id = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    session_ids = [session_id["session_id"], "no-such-session"]
    kept = client.post("/v1/responses", json={"input": "Hi", "session_id": session_ids[0]}).json()["id"]
    response_ids = [kept, kept.replace("resp_", "resp_x"), "resp_no-such-session_0123456789ab"]
    seen: dict[int, int] = {}

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=requests(schema, session_ids, response_ids))
    def check(request):
        method, url, body, headers = request
        answer = client.request(method, url, content=body, headers=headers)
        seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, (method, url, body[:300], answer.text[:300])
        if answer.headers.get("content-type", "").startswith("text/event-stream"):
            assert "server_error" not in answer.text, answer.text[-300:]  # an error inside the stream
        elif answer.status_code >= 400:
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert any(200 <= status < 300 for status in seen) and any(status >= 400 for status in seen), seen
    metrics = client.get("/metrics").text
    assert 'status="5' not in metrics
