"""`rxt bench serve` against a live server, and its statistics."""

from __future__ import annotations

import json

import pytest

from rxt.bench.serve import percentile
from rxt.cli import main as cli_main
from rxt.serve.store import SQLiteStore
from test_serve_support import make_tiny_model, serve_in_thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("bench") / "tiny-rxt")


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 99) == 99.0


def test_bench_against_a_running_server(model_dir, tmp_path, capsys):
    with serve_in_thread(model_dir, SQLiteStore("sqlite:///:memory:"), api_keys=["bench-key"]) as url:
        code = cli_main(["bench", "serve", "--url", url, "--sessions", "3", "--turns", "2", "--max-tokens", "4",
                         "--api-key", "bench-key", "--json", str(tmp_path / "report.json")])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["turns_ok"] == 6 and report["turns_failed"] == 0 and report["tokens"] > 0
    assert 0 < report["first_token_p50_s"] <= report["first_token_p99_s"]
    assert report["first_token_p50_s"] <= report["answer_p50_s"] <= report["answer_p99_s"]
    assert {(t["session"], t["turn"]) for t in report["turn_results"]} == {(s, t) for s in range(3) for t in range(2)}
    assert "turns/s" in capsys.readouterr().out


def test_bench_reports_failures(model_dir, capsys):
    with serve_in_thread(model_dir, SQLiteStore("sqlite:///:memory:"), api_keys=["right"]) as url:
        code = cli_main(["bench", "serve", "--url", url, "--sessions", "2", "--turns", "2", "--api-key", "wrong"])
    assert code == 1
    assert "HTTP 401" in capsys.readouterr().out


def test_bench_spawns_its_own_server(model_dir, capsys):
    assert cli_main(["bench", "serve", "--spawn-model", str(model_dir), "--sessions", "2", "--turns", "2",
                     "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 ok, 0 failed" in out and "spawned" in out


def test_bench_compares_max_batch_settings_in_one_run(model_dir, tmp_path, capsys):
    assert cli_main(["bench", "serve", "--spawn-model", str(model_dir), "--sessions", "3", "--turns", "2",
                     "--max-tokens", "4", "--max-batch", "1,4", "--json", str(tmp_path / "runs.json")]) == 0
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [r["max_batch"] for r in runs] == [1, 4] and all(r["turns_ok"] == 6 for r in runs)
    assert "--max-batch 4" in runs[1]["server"] and "vs first" in capsys.readouterr().out
    assert cli_main(["bench", "serve", "--sessions", "1", "--max-batch", "4"]) == 2  # needs --spawn-model
