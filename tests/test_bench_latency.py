"""`rxt bench latency` in its fast setting: valid JSON, exact linear/quadratic token counts, a plot."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from rxt.bench.flops import FlopClock
from rxt.bench.latency_report import breakeven_turn, token_closed_forms
from rxt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["bench", "latency", "--preset", "tiny", "--turns", "3", "--turn-tokens", "16", "--repeats", "1",
        "--no-progress"]
SYSTEMS = ("rxt", "baseline", "cached")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> tuple[dict, Path, int, str]:
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*FAST, "--json", str(out / "latency.json"), "--plot", str(out / "latency.png")])
    return json.loads((out / "latency.json").read_text()), out, code, printed.getvalue()


def test_fast_setting_writes_valid_json(fast_run) -> None:
    record, _, code, _ = fast_run
    assert code == 0
    assert set(record) >= {"turns", "summary", "config", "hardware"}
    assert [row["turn"] for row in record["turns"]] == [1, 2, 3]
    required = {"rxt_prompt_s", "baseline_prompt_s", "cached_prompt_s", "rxt_answer_s", "baseline_answer_s",
                "cached_answer_s", "rxt_tokens", "baseline_tokens", "cached_tokens", "rxt_memory_update_s",
                "rxt_state_bytes", "cached_state_bytes", "rxt_no_update_answer_s", "rxt_prompt_s_min",
                "rxt_prompt_s_max", "baseline_answer_s_max"}
    for row in record["turns"]:
        assert required <= set(row)
        for name in SYSTEMS:
            assert row[f"{name}_prompt_s_min"] <= row[f"{name}_prompt_s"] <= row[f"{name}_prompt_s_max"]
            assert 0 < row[f"{name}_prompt_s"] <= row[f"{name}_ttft_s"] <= row[f"{name}_answer_s"]
        assert row["rxt_memory_update_s"] > 0
    config = record["config"]
    assert (config["turns"], config["turn_tokens"], config["query_tokens"], config["answer_tokens"]) == (3, 16, 8, 8)
    assert record["hardware"]


def test_token_counts_are_linear_for_rxt_and_quadratic_for_the_baseline(fast_run) -> None:
    record, *_ = fast_run
    rows, summary, turn_tokens = record["turns"], record["summary"], 16
    assert [row["rxt_tokens"] for row in rows] == [2 * turn_tokens] * 3  # decoder + memory encoder
    assert [row["baseline_tokens"] for row in rows] == [turn_tokens * n for n in (1, 2, 3)]
    assert [row["baseline_cumulative_tokens"] for row in rows] == [16, 48, 96]
    assert [row["cached_tokens"] for row in rows] == [16, 17, 17]
    for name, expected in token_closed_forms(3, turn_tokens).items():
        assert [row[f"{name}_cumulative_tokens"] for row in rows] == expected
    assert summary["rxt_tokens_exactly_linear"] and summary["baseline_tokens_exactly_quadratic"]
    assert summary["cached_tokens_match_closed_form"]


def test_state_held_is_fixed_for_rxt_and_grows_for_the_cache(fast_run) -> None:
    rows = fast_run[0]["turns"]
    assert len({row["rxt_state_bytes"] for row in rows}) == 1
    assert rows[0]["rxt_state_bytes"] == 2 * 8 * 32 * 4  # tiny: layers x slots x d_model x float32
    assert rows[0]["cached_state_bytes"] < rows[1]["cached_state_bytes"] < rows[2]["cached_state_bytes"]


def test_summary_and_table_are_printed(fast_run) -> None:
    record, _, _, printed = fast_run
    summary = record["summary"]
    for key in ("rxt_prompt_ratio", "baseline_prompt_ratio", "cached_prompt_ratio", "async_update_answer_ratio"):
        assert summary[key] > 0
    assert "prompt phase, turn 3 / turn 1" in printed and "exactly quadratic" in printed
    assert len([line for line in printed.splitlines() if line.strip().startswith(("1 |", "2 |", "3 |"))]) == 3


def test_plot_is_written(fast_run) -> None:
    _, out, _, _ = fast_run
    png = (out / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_closed_forms() -> None:
    forms = token_closed_forms(4, 10)
    assert forms == {"rxt": [20, 40, 60, 80], "baseline": [10, 30, 60, 100], "cached": [10, 21, 32, 43]}


def test_bad_settings_are_refused(capsys) -> None:
    assert main(["bench", "latency", "--preset", "tiny", "--turn-tokens", "4", "--query-tokens", "4"]) == 2
    assert "rxt bench latency" in capsys.readouterr().err
    assert main([*FAST, "--set", "widht=512"]) == 2
    assert "--set widht: not a model config key" in capsys.readouterr().err
    assert main([*FAST, "--set", "d_model"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err


def test_breakeven_turn_is_where_rxt_stays_ahead() -> None:
    rows = [{"turn": t, "rxt": r, "cached": c} for t, (r, c) in enumerate([(3, 2), (2, 3), (3, 2), (1, 2), (1, 3)], 1)]
    assert breakeven_turn(rows, "rxt", "cached") == 4  # ahead at turn 2 too, but not for good
    assert breakeven_turn(rows[:3], "rxt", "cached") is None


def test_static_path_is_reported_beside_eager(tmp_path) -> None:
    """--static: the fast path's twins are timed in the same run, read the same tokens, and the summary
    says from which turn RxT stays ahead of the persistent cache in each mode."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main([*FAST, "--static", "--json", str(tmp_path / "latency.json")])
    assert code == 0
    record = json.loads((tmp_path / "latency.json").read_text())
    summary = record["summary"]
    for part in (summary, summary["static"]):
        assert {"breakeven_prompt_turn", "breakeven_answer_turn", "breakeven_targets"} <= set(part)
    assert summary["static"]["tokens_match_eager"]
    for row in record["turns"]:
        for name in SYSTEMS:
            assert 0 < row[f"{name}_static_prompt_s"] <= row[f"{name}_static_answer_s"]
            assert row[f"{name}_static_decode_tokens_per_s"] > 0
    assert set(summary["warmup_s"]) == {"rxt_static", "baseline_static", "cached_static"}
    assert "static: RxT stays faster than the persistent cache from" in printed.getvalue()


def test_flop_clock_counts_matmuls_and_cpu_attention() -> None:
    """Two FLOPs per multiply-add, for a matmul and for the CPU attention kernel (scores, then output)."""
    clock = FlopClock()
    with clock.counter:
        torch.ones(3, 4) @ torch.ones(4, 5)
        assert clock() == 2 * 3 * 4 * 5
        q, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
    assert clock() == 120 + 2 * (2 * 3 * 8 * 5) * 2
    torch.ones(3, 4) @ torch.ones(4, 5)  # outside the counter
    assert clock() == 120 + 960


def test_flops_are_counted_per_turn_and_system(tmp_path) -> None:
    """--flops: RxT's turn costs the same FLOPs at every turn; re-reading and the persistent cache cost more
    as the history grows; the break-even turns by count are in the summary, for eager and static."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main([*FAST, "--turns", "4", "--static", "--flops", "--json", str(tmp_path / "latency.json")])
    assert code == 0
    record = json.loads((tmp_path / "latency.json").read_text())
    rows = record["turns"]
    for mode in ("", "_static"):
        rxt = [(row[f"rxt{mode}_prompt_flops"], row[f"rxt{mode}_decode_flops_per_token"]) for row in rows]
        assert len(set(rxt)) == 1 and rxt[0][1] > 0  # a fixed memory: the same work every turn
        for row in rows:
            for name in SYSTEMS:
                assert 0 < row[f"{name}{mode}_prompt_flops"] <= row[f"{name}{mode}_first_token_flops"]
                assert row[f"{name}{mode}_first_token_flops"] < row[f"{name}{mode}_answer_flops"]
        cached = [row[f"cached{mode}_prompt_flops"] for row in rows]
        assert cached == sorted(cached)
    for name in ("baseline", "cached"):  # eager attention reads exactly the tokens so far: strictly more each turn
        prompt = [row[f"{name}_prompt_flops"] for row in rows]
        assert all(a < b for a, b in zip(prompt, prompt[1:], strict=False))
    summary = record["summary"]["flops"]
    assert set(summary) == {"eager", "static"}
    for part in summary.values():
        assert {"breakeven_prompt_turn", "breakeven_answer_turn", "decode_speed_ratio_per_turn"} <= set(part)
        assert part["decode_speed_ratio_per_turn"][0] < 1  # at turn 1 RxT has its memory read on top
    assert "by FLOPs (static): RxT does less than the persistent cache from" in printed.getvalue()
    assert "rxt_compiled_prompt_flops" not in rows[0]
