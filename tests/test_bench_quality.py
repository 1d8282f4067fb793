"""`rxt bench quality` end to end on a toy size: records, resume, parallel runs, and bad input."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from rxt.bench import quality
from rxt.bench.prose import find_shards, paragraphs, prepare_streams
from rxt.bench.quality_run import MIN_LR_RATIO, Settings, learning_rate, seeded_model, window_order
from rxt.cli import main
from rxt.tokenizer import SPECIAL_TOKENS

RECORD_KEYS = {
    "variant", "seed", "params", "tokens", "val_loss", "train_s", "tokens_per_s", "n_q_heads", "n_kv_heads",
    "attention_flop_share", "flops_vs_mha", "curve", "train_loss", "step_s_median", "train_cpu_s",
}  # fmt: skip
TINY = ["--d-model", "32", "--layers", "1", "--heads", "4", "--ffn", "64", "--seq-len", "32",
        "--batch-size", "4", "--steps", "12", "--warmup", "2", "--lr", "1e-2", "--eval-every", "6",
        "--val-seqs", "4", "--vocab-size", "300"]  # fmt: skip
WORDS = "the a river stone light old town keeps slow bright green hill wind over under near far".split()


def write_prose(directory: Path, n_paragraphs: int, seed: int) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    text = "\n\n".join(
        " ".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 9))).capitalize() + "." for _ in range(3))
        for _ in range(n_paragraphs)
    )
    (directory / "00000.txt").write_text(text + "\n", encoding="utf-8")


@pytest.fixture
def prose(tmp_path: Path) -> Path:
    write_prose(tmp_path / "prose" / "train", 120, seed=0)
    write_prose(tmp_path / "prose" / "valid", 20, seed=1)
    return tmp_path / "prose"


def bench(prose: Path, tmp_path: Path, *extra: str) -> int:
    return main(["bench", "quality", "--train", str(prose / "train"), "--valid", str(prose / "valid"),
                 "--cache", str(tmp_path / "cache"), *TINY, *extra])  # fmt: skip


def test_records_summary_and_plot(prose: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plot = tmp_path / "quality.json", tmp_path / "quality.png"
    assert bench(prose, tmp_path, "--variants", "xsqa", "--seeds", "3", "--json", str(out), "--plot", str(plot)) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [("mha", 3), ("xsqa", 3)]  # MHA always added
    for record in runs:
        assert RECORD_KEYS <= set(record)
        assert record["tokens"] == 12 * 4 * 32
        assert math.isfinite(record["val_loss"]) and record["train_s"] > 0
        assert [p["step"] for p in record["curve"]] == [0, 6, 12]
        for clock in ("train_s", "train_cpu_s"):
            times = [p[clock] for p in record["curve"]]
            assert times == sorted(times) and times[-1] == record[clock]
        assert record["curve"][-1]["val_loss"] < record["curve"][0]["val_loss"] - 0.5  # training lowers the loss
        assert record["val_loss"] == record["curve"][-1]["val_loss"]
    mha, xsqa = runs
    assert (mha["n_q_heads"], mha["n_kv_heads"], xsqa["n_q_heads"], xsqa["n_kv_heads"]) == (4, 4, 1, 1)
    assert mha["flops_vs_mha"] == 1.0 and xsqa["flops_vs_mha"] < 1.0
    assert 0 < xsqa["attention_flop_share"] < mha["attention_flop_share"] < 1
    summary = {row["variant"]: row for row in result["summary"]}
    assert summary["mha"]["val_loss_vs_mha"] == 1.0 and summary["mha"]["train_time_vs_mha"] == 1.0
    assert summary["xsqa"]["val_loss_vs_mha"] == pytest.approx(xsqa["val_loss"] / mha["val_loss"])
    assert summary["xsqa"]["paper_val_loss"] == 1.243
    assert result["settings"]["seq_len"] == 32 and result["data"]["valid_tokens"] > 0
    table = capsys.readouterr().out
    assert "time vs MHA" in table and "FLOPs vs MHA" in table and "xsqa" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_trains_only_missing_runs(
    prose: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "quality.json"
    assert bench(prose, tmp_path, "--variants", "mha", "--seeds", "0", "--json", str(out)) == 0
    first = json.loads(out.read_text())["runs"]
    trained = []
    real_train_run = quality.train_run

    def counting_train_run(spec, progress=False):  # noqa: ANN001, ANN202
        trained.append((spec.variant, spec.seed))
        return real_train_run(spec, progress)

    monkeypatch.setattr(quality, "train_run", counting_train_run)
    assert bench(prose, tmp_path, "--variants", "mha", "ssqa", "--seeds", "0", "--json", str(out)) == 0
    assert trained == [("ssqa", 0)]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [("mha", 0), ("ssqa", 0)]
    assert runs[0] == first[0]  # the finished run is kept as it was
    assert [row["variant"] for row in json.loads(out.read_text())["summary"]] == ["mha", "ssqa"]


def test_resume_refuses_other_settings(
    prose: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quality.json"
    assert bench(prose, tmp_path, "--variants", "mha", "--seeds", "0", "--json", str(out)) == 0
    before = out.read_text()
    assert bench(prose, tmp_path, "--variants", "mha", "--seeds", "0", "--json", str(out), "--steps", "13") == 2
    assert "other settings (steps differ)" in capsys.readouterr().err
    assert out.read_text() == before


def test_parallel_jobs_match_one_process(prose: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert bench(prose, tmp_path, "--variants", "sqa", "--seeds", "0", "--json", str(one)) == 0
    assert bench(prose, tmp_path, "--variants", "sqa", "--seeds", "0", "--json", str(two), "--jobs", "2") == 0
    losses = {path: [(r["variant"], r["val_loss"], r["jobs"]) for r in json.loads(path.read_text())["runs"]]
              for path in (one, two)}  # fmt: skip
    assert [loss[:2] for loss in losses[one]] == [loss[:2] for loss in losses[two]]  # same seed, same run
    assert {loss[2] for loss in losses[two]} == {2}


def test_same_seed_same_weights_where_shapes_match() -> None:
    settings = Settings(d_model=32, n_layers=1, n_heads=4, ffn_dim=64, seq_len=16, vocab_size=64, batch_size=2,
                        steps=1, lr=1e-3, warmup=0, eval_every=1, val_seqs=1, threads=1, data_key="x")  # fmt: skip
    mha, xsqa = seeded_model(settings, "mha", 0).state_dict(), seeded_model(settings, "xsqa", 0).state_dict()
    other_seed = seeded_model(settings, "mha", 1).state_dict()
    for name, tensor in mha.items():
        if xsqa[name].shape == tensor.shape:
            torch.testing.assert_close(xsqa[name], tensor)
    assert mha["decoder.layers.0.self_attention.q_proj.weight"].shape[0] == 4 * xsqa[
        "decoder.layers.0.self_attention.q_proj.weight"].shape[0]  # fmt: skip
    assert not torch.equal(mha["embedding.weight"], other_seed["embedding.weight"])
    order = window_order(10, 25, seed=0)
    assert sorted(order[:10]) == list(range(10)) and len(order) == 25  # every window once per pass
    assert list(order) == list(window_order(10, 25, seed=0)) != list(window_order(10, 25, seed=1))


def test_learning_rate_schedule() -> None:
    settings = Settings(d_model=32, n_layers=1, n_heads=4, ffn_dim=64, seq_len=16, vocab_size=64, batch_size=2,
                        steps=100, lr=1e-3, warmup=10, eval_every=1, val_seqs=1, threads=1, data_key="x")  # fmt: skip
    assert learning_rate(0, settings) == pytest.approx(1e-4)
    assert learning_rate(10, settings) == pytest.approx(1e-3)
    assert learning_rate(99, settings) == pytest.approx(1e-3 * MIN_LR_RATIO, rel=0.01)


def test_missing_shards_name_the_path_and_fetch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "train"
    argv = ["bench", "quality", "--train", str(missing), "--valid", str(tmp_path), "--cache", str(tmp_path / "c")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "rxt data fetch" in error
    with pytest.raises(FileNotFoundError, match="no valid shards"):
        find_shards(str(tmp_path / "*.txt"), "valid")


def test_bad_options_fail_before_any_work(prose: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench(prose, tmp_path, "--json", str(tmp_path / "no-such-dir" / "q.json")) == 2
    assert bench(prose, tmp_path, "--heads", "3") == 2  # d_model 32 is not divisible by 3
    assert not (tmp_path / "cache").exists()  # nothing was tokenized
    assert "no-such-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench(prose, tmp_path, "--variants", "msqa")
    assert "invalid choice: 'msqa'" in capsys.readouterr().err


def test_paragraphs_keep_their_break(tmp_path: Path) -> None:
    shard = tmp_path / "a.txt"
    shard.write_text("First one\nstill first.\n\n  \nSecond.\n\n\nThird.", encoding="utf-8")
    assert paragraphs(shard) == ["First one\nstill first.\n\n", "Second.\n\n", "Third.\n\n"]


def test_control_tokens_in_prose_are_text(tmp_path: Path) -> None:
    write_prose(tmp_path / "train", 40, seed=0)
    (tmp_path / "train" / "00001.txt").write_text("A line that says [EOT] and [PAD] in words.\n", encoding="utf-8")
    shards = find_shards(tmp_path / "train", "train")
    streams = prepare_streams(shards, shards, tmp_path / "cache", vocab_size=300)
    assert streams.train_tokens > 0 and streams.load("train").min() >= len(SPECIAL_TOKENS)
    again = prepare_streams(shards, shards, tmp_path / "cache", vocab_size=300)
    assert again == streams  # read from the cache, same key
    assert prepare_streams(shards, shards, tmp_path / "cache", vocab_size=290).key != streams.key
