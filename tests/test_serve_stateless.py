"""A stateless model behind `rxt serve`: KV caches under a byte budget, evicted and rebuilt; and
`rxt bench serve` running one workload against an RxT server and a stateless one."""

from __future__ import annotations

import math

import pytest
from starlette.testclient import TestClient

from rxt.baselines import StatelessEngine
from rxt.bench.serve import format_per_turn, run_load, wins_from
from rxt.generation import SamplingConfig
from rxt.model import StatelessLM, load_model
from rxt.serve.app import create_app
from rxt.serve.kv_caches import KVCacheKeeper
from rxt.serve.service import ServeSettings
from rxt.serve.store import SQLiteStore
from test_serve_support import MAX_TOKENS, make_tiny_model, queries, serve_in_thread


@pytest.fixture(scope="module")
def stateless_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("stateless") / "tiny-stateless", model_class=StatelessLM)


@pytest.fixture(scope="module")
def rxt_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("rxt") / "tiny-rxt")


def cache_bytes(session) -> int:
    return sum(cache.nbytes() for cache in session.runtime["caches"])


def test_kv_cache_keeper_holds_to_its_byte_budget(stateless_dir):
    engine = StatelessEngine(load_model(stateless_dir), mode="cached")
    sessions = [engine.new_session() for _ in range(3)]
    for session in sessions:
        engine.interact(session, "Hello there", SamplingConfig(max_new_tokens=4))
    sizes = [cache_bytes(s) for s in sessions]
    keeper = KVCacheKeeper(capacity=10, max_bytes=sizes[0] + sizes[1])
    for session in sessions:
        keeper.keep(session)
    assert keeper.nbytes <= keeper.max_bytes and keeper.evictions >= 1
    assert keeper.nbytes == sum(cache_bytes(s) for s in sessions[-len(keeper):])  # the most recent ones
    assert not keeper.attach(sessions[0]) and keeper.attach(sessions[2])  # the oldest was evicted
    assert keeper.nbytes == sum(cache_bytes(s) for s in sessions[-len(keeper) - 1:-1])  # attached: taken out
    tiny = KVCacheKeeper(capacity=10, max_bytes=min(sizes) - 1)
    tiny.keep(sessions[1])
    assert len(tiny) == 0 and tiny.nbytes == 0  # bigger than the whole budget: not kept


def test_an_evicted_session_rereads_its_history_and_answers_the_same(stateless_dir):
    """Two sessions, and after their first turns a budget too small for both: returns re-read their
    history, and the answers do not change."""
    conversations = [queries(0, 3), queries(1, 3)]
    reference = StatelessEngine(load_model(stateless_dir), mode="full")
    expected = []
    for turns in conversations:
        session = reference.new_session()
        expected.append([reference.interact(session, q, SamplingConfig(max_new_tokens=MAX_TOKENS)).text
                         for q in turns])
    engine = StatelessEngine(load_model(stateless_dir), mode="cached")
    settings = ServeSettings("tiny", kv_cache_bytes=None)
    with TestClient(create_app(engine, SQLiteStore("sqlite:///:memory:"), settings)) as client:
        ids, rereads = [None, None], []
        for turn in range(3):
            for index, turns in enumerate(conversations):  # interleaved: each evicts the other
                body = {"messages": [{"role": "user", "content": turns[turn]}], "max_tokens": MAX_TOKENS,
                        **({"session_id": ids[index]} if ids[index] else {})}
                answer = client.post("/v1/chat/completions", json=body).json()
                ids[index] = answer["session_id"]
                assert answer["choices"][0]["message"]["content"] == expected[index][turn]
                assert answer["usage"]["state_bytes"] > 0
                rereads.append(answer["usage"]["history_reread"])
            if turn == 0:  # room for 2.5 first-turn caches: a later turn's bigger cache evicts the other one
                keeper = client.app.state.service.kv_caches
                keeper.max_bytes = int(2.5 * answer["usage"]["state_bytes"])
        assert rereads[:2] == [False, False] and any(rereads[2:])
        assert keeper.evictions >= 1 and keeper.nbytes <= keeper.max_bytes
        metrics = client.get("/metrics").text
        assert f"rxt_history_rereads_total {sum(rereads)}" in metrics and "rxt_kv_cache_bytes" in metrics


def test_bench_runs_one_workload_against_rxt_and_a_stateless_server(rxt_dir, stateless_dir):
    reports = []
    for model_dir in (rxt_dir, stateless_dir):
        with serve_in_thread(model_dir, SQLiteStore("sqlite:///:memory:"), kv_cache_bytes=0) as url:
            report = run_load(url, sessions=2, turns=3, max_tokens=4, think_s=0.01)
            reports.append({**report, "model": str(model_dir)})
    for report in reports:
        for field in ("turns_per_s", "ttft_p50_s", "ttft_p99_s", "answer_p99_s", "state_bytes_per_session", "failed",
                      "sessions_per_gb", "decode_ms_per_token", "tokens_per_s"):
            assert isinstance(report[field], (int, float)) and not math.isnan(report[field]), field
        assert report["failed"] == 0 and [row["turn"] for row in report["per_turn"]] == [0, 1, 2]
    rxt, stateless = (r["per_turn"] for r in reports)
    assert len({row["state_bytes"] for row in rxt}) == 1  # the STM: the same size every turn
    assert stateless[0]["state_bytes"] < stateless[1]["state_bytes"] < stateless[2]["state_bytes"]  # the KV cache
    assert reports[1]["history_reread_turns"] == 4  # no cache kept: every later turn re-reads
    assert "state bytes per session" in format_per_turn(reports)


def test_wins_from_is_the_start_of_the_last_winning_streak():
    rows = lambda values: [{"turn": t, "x": v} for t, v in enumerate(values)]  # noqa: E731
    assert wins_from(rows([1, 1, 1]), rows([2, 2, 2]), "x") == 0
    assert wins_from(rows([3, 1, 3, 1, 1]), rows([2, 2, 2, 2, 2]), "x") == 3
    assert wins_from(rows([3, 3]), rows([2, 2]), "x") is None
    assert wins_from(rows([1, 3]), rows([2, 2]), "x") is None
