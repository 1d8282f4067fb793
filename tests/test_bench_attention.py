"""`rxt bench attention` end to end on a toy size, and the shared timing helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rxt.attention import ATTENTION_VARIANTS
from rxt.bench.timing import single_threaded, summarize, time_call, time_round_robin
from rxt.cli import main

RECORD_KEYS = {
    "variant", "n_q_heads", "n_kv_heads", "seq_len", "pass", "median_s", "min_s", "max_s",
    "speedup_vs_mha", "flops_ratio_vs_mha", "threads", "device", "d_model", "n_heads",
}  # fmt: skip


def run_bench(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "bench.json"
    argv = ["bench", "attention", "--seq-lens", "64", "--repeats", "1", "--warmup", "0",
            "--d-model", "64", "--n-heads", "8", "--json", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_bench_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = run_bench(tmp_path)
    default_variants = ["mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa"]
    assert [r["variant"] for r in records] == default_variants * 2  # fwd, then fwdbwd
    assert [r["pass"] for r in records] == ["fwd"] * 7 + ["fwdbwd"] * 7
    by_key = {(r["variant"], r["pass"]): r for r in records}
    for record in records:
        assert RECORD_KEYS <= set(record)
        assert record["seq_len"] == 64 and record["d_model"] == 64 and record["n_heads"] == 8
        assert record["threads"] == 1 and record["device"] == "cpu"
        assert 0 < record["min_s"] <= record["median_s"] <= record["max_s"]
        assert (record["n_q_heads"], record["n_kv_heads"]) == ATTENTION_VARIANTS[record["variant"]](8)
        mha = by_key["mha", record["pass"]]
        assert record["speedup_vs_mha"] == pytest.approx(mha["median_s"] / record["median_s"])
    for pass_ in ("fwd", "fwdbwd"):
        assert by_key["mha", pass_]["speedup_vs_mha"] == 1.0
        assert by_key["mha", pass_]["flops_ratio_vs_mha"] == 1.0
        assert by_key["xsqa", pass_]["flops_ratio_vs_mha"] == pytest.approx(4.0)
        assert by_key["xsqa", pass_]["core_flops_ratio_vs_mha"] == 4.0
        assert by_key["sqa", pass_]["core_flops_ratio_vs_mha"] == 2.0
        assert 1.0 < by_key["gqa", pass_]["flops_ratio_vs_mha"] < 2.0  # only K/V projections shrink
    table = capsys.readouterr().out
    assert "xsmqa" in table and "speed-up" in table and "FLOPs ratio" in table


def test_bench_adds_mha_baseline_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "speedup.png"
    records = run_bench(tmp_path, "--variants", "xsqa", "--passes", "fwd", "--causal", "--rope", "qk",
                        "--plot", str(plot))  # fmt: skip
    assert [(r["variant"], r["pass"]) for r in records] == [("mha", "fwd"), ("xsqa", "fwd")]
    assert records[0]["causal"] is True
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_heads(tmp_path: Path) -> None:
    argv = [
        "bench",
        "attention",
        "--seq-lens",
        "8",
        "--d-model",
        "60",
        "--n-heads",
        "8",
        "--json",
        str(tmp_path / "x"),
    ]
    assert main(argv) == 2
    assert not (tmp_path / "x").exists()


def test_summarize() -> None:
    assert summarize([3.0, 1.0, 2.0, 10.0, 2.5]) == {"median_s": 2.5, "min_s": 1.0, "max_s": 10.0}
    with pytest.raises(ValueError):
        summarize([])


def test_time_call_counts_warmup_and_repeats() -> None:
    calls = []
    times = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)


def test_round_robin_interleaves() -> None:
    order: list[str] = []
    ticks: list[int] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    times = time_round_robin(fns, repeats=2, warmup=1, tick=lambda: ticks.append(1))
    assert order == ["a", "b", "c"] * 3
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert len(ticks) == 9


def test_single_threaded_restores_threads() -> None:
    before = torch.get_num_threads()
    with single_threaded(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
