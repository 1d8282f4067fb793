"""`rxt bench quality`: train the same small decoder-only model with each attention variant on real prose.

The SQA paper's quality table (arXiv 2510.01817) trains one 10-12M-parameter dense model per
variant and compares validation loss (MHA 1.198, GQA 1.218, sSQA 1.220, SQA 1.227, xSQA 1.243,
MQA 1.250) and training time. This bench repeats that experiment at a size a CPU trains in minutes:
``rxt.model.StatelessLM`` with H_q / H_kv set by ``variant_heads``, and for one seed every variant
gets the same initial weights wherever the shapes match, the same batches in the same order and the
same learning-rate schedule (AdamW, linear warm-up, cosine decay). Only the attention heads differ.

Per run, one record in --json "runs": variant, seed, n_q_heads/n_kv_heads, params, tokens, val_loss
(on a fixed set of held-out sequences), train_s and train_cpu_s (wall and CPU seconds of the
optimiser steps; evaluation is not counted), tokens_per_s, flops_vs_mha (the whole model's FLOPs
relative to MHA's), attention_flop_share, and the curve (step, train_s, train_cpu_s, train_loss,
val_loss at every evaluation). "summary" holds one row per variant: means over seeds, loss and
time relative to MHA, next to the FLOP ratio and the paper's loss. The --json file is rewritten
after every finished run, and a rerun with the same settings skips the runs it already holds.

The defaults (d_model 128, 4 layers, H = 8 so d_head = 16 as in the paper, SwiGLU 384, a 4096-token
BPE, 1024-token sequences, 240 steps of 4 sequences: ~1M tokens per run) train MHA in about four
CPU-minutes on one thread of a 2-core Xeon; attention is 54 % of MHA's FLOPs at that length
(scores counted over the whole T x T square; 23 % of xSQA's). The full table, 8 variants x 2 seeds,
two runs at a time:
    rxt bench quality --jobs 2 --threads 1 --json docs/results/sqa-quality.json \\
        --plot docs/images/sqa-quality.png

A toy run on your own text (seconds):
    rxt bench quality --train my.txt --valid my.txt --variants mha xsqa --seeds 0 \\
        --d-model 32 --layers 1 --heads 4 --ffn 64 --seq-len 64 --batch-size 2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rxt.attention import ATTENTION_VARIANTS, variant_heads
from rxt.bench.prose import find_shards, prepare_streams
from rxt.bench.quality_run import RunSpec, Settings, flops_per_token, train_run
from rxt.bench.timing import describe_machine, single_threaded
from rxt.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "lsqa")
BASELINE = "mha"
PAPER_VAL_LOSS = {"mha": 1.198, "gqa": 1.218, "ssqa": 1.220, "sqa": 1.227, "xsqa": 1.243, "mqa": 1.250}

Record = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train", default="data/prose/train", help="train shards: a directory of .txt files or a glob")
    data.add_argument("--valid", default="data/prose/valid", help="validation shards: a directory or a glob")
    data.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the train shards")
    data.add_argument("--tokenizer", type=Path, help="use this tokenizer directory instead of training one")
    data.add_argument("--cache", type=Path, default=Path("runs/bench-quality"), help="token streams cached here")
    data.add_argument("--val-seqs", type=int, default=32, help="held-out sequences the validation loss is taken on")

    model = parser.add_argument_group("model (one size for every variant)")
    model.add_argument("--d-model", type=int, default=128, help="model width D")
    model.add_argument("--layers", type=int, default=4, help="decoder layers")
    model.add_argument("--heads", type=int, default=8, help="H of the MHA baseline; d_head = D / H")
    model.add_argument("--ffn", type=int, default=384, help="SwiGLU hidden size")
    model.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence")

    train = parser.add_argument_group("training (the same for every variant)")
    train.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    train.add_argument("--steps", type=int, default=240, help="optimiser steps")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    train.add_argument("--warmup", type=int, default=24, help="linear warm-up steps before the cosine decay")
    train.add_argument("--eval-every", type=int, default=40, help="steps between validation losses")
    train.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per variant and seed")
    train.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(ATTENTION_VARIANTS),
        default=list(DEFAULT_VARIANTS),
        help="variants to train; mha is always added as the baseline",
    )

    machine = parser.add_argument_group("machine and output")
    machine.add_argument("--threads", type=int, default=1, help="torch threads per run (0 = PyTorch's default)")
    machine.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    machine.add_argument("--json", type=Path, help="runs and summary; finished runs found here are skipped")
    machine.add_argument("--plot", type=Path, help="draw validation loss against training time to this PNG")


def run(args: argparse.Namespace) -> int:
    problem = check_arguments(args)
    if problem:
        raise ValueError(problem)  # the CLI prints it as one line and exits with 2
    train_shards, valid_shards = find_shards(args.train, "train"), find_shards(args.valid, "valid")
    streams = prepare_streams(train_shards, valid_shards, args.cache, args.vocab_size, args.tokenizer)
    settings = settings_of(args, streams.key, streams.vocab_size)
    with single_threaded(args.threads):
        machine = describe_machine()
    header = {
        "bench": "quality",
        "settings": settings.to_dict(),
        "data": {"train": str(args.train), "valid": str(args.valid), "train_tokens": streams.train_tokens,
                 "valid_tokens": streams.valid_tokens, "cache": str(streams.directory)},
        "machine": machine,
        "torch": torch.__version__,
    }  # fmt: skip
    records = load_finished(args.json, settings) if args.json else []
    done = {(r["variant"], r["seed"]) for r in records}
    seeds = list(dict.fromkeys(args.seeds))
    todo = [RunSpec(v, s, settings, str(streams.directory), args.jobs) for s in seeds for v in variants_of(args)]
    asked = len(todo)
    todo = [spec for spec in todo if (spec.variant, spec.seed) not in done]
    if len(todo) < asked:
        log.info("%s already holds %d of these runs; training the other %d", args.json, asked - len(todo), len(todo))
    print(format_header(settings, streams.train_tokens, streams.valid_tokens, machine))
    for record in run_all(todo, args.jobs, args.threads):
        records.append(record)
        if args.json:
            write_json(args.json, {**header, "runs": sort_runs(records), "summary": summarize(records)})
    print(format_table(summarize(records)))
    if args.json:
        log.info("wrote %s", args.json)
    if args.plot:
        plot_curves(records, args.plot, title=f"{format_model(settings)}\n{machine}")
        log.info("wrote %s", args.plot)
    return 0


def check_arguments(args: argparse.Namespace) -> str | None:
    """The first problem with the options, found before any data is read or model trained."""
    for name in ("steps", "seq_len", "eval_every", "val_seqs", "jobs", "vocab_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.warmup < 0 or args.lr <= 0:
        return f"--warmup must be >= 0 and --lr > 0, got {args.warmup} and {args.lr}"
    if args.json and not args.json.resolve().parent.is_dir():
        return f"--json {args.json}: the directory {args.json.resolve().parent} does not exist"
    if args.plot and not args.plot.resolve().parent.is_dir():
        return f"--plot {args.plot}: the directory {args.plot.resolve().parent} does not exist"
    try:
        for variant in variants_of(args):
            n_q, n_kv = variant_heads(variant, args.heads)
            ModelConfig(d_model=args.d_model, n_heads=args.heads, n_q_heads=n_q, n_kv_heads=n_kv,
                        cross_n_q_heads=n_q, cross_n_kv_heads=n_kv)  # fmt: skip
    except ValueError as error:
        return str(error)
    return None


def variants_of(args: argparse.Namespace) -> list[str]:
    """The chosen variants in order, MHA first: every ratio is taken against it."""
    return [BASELINE] + [v for v in dict.fromkeys(args.variants) if v != BASELINE]


def settings_of(args: argparse.Namespace, data_key: str, vocab_size: int) -> Settings:
    return Settings(
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn,
        seq_len=args.seq_len, vocab_size=vocab_size, batch_size=args.batch_size, steps=args.steps,
        lr=args.lr, warmup=args.warmup, eval_every=args.eval_every, val_seqs=args.val_seqs,
        threads=args.threads, data_key=data_key,
    )  # fmt: skip


def run_all(specs: list[RunSpec], jobs: int, threads: int) -> Iterator[Record]:
    """Train every run, yielding each record as it finishes: in this process, or in ``jobs`` at once."""
    if jobs == 1:
        with single_threaded(threads):
            for i, spec in enumerate(specs):
                yield _finished(train_run(spec, progress=True), i, len(specs))
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with this one
    level = logging.getLogger().getEffectiveLevel()
    with (
        context.Pool(jobs, initializer=_start_worker, initargs=(threads, level), maxtasksperchild=1) as pool,
        tqdm(total=len(specs), desc=f"bench quality, {jobs} at once", unit="run") as bar,
    ):
        for i, record in enumerate(pool.imap_unordered(train_run, specs)):
            bar.update()
            yield _finished(record, i, len(specs))


def _start_worker(threads: int, level: int) -> None:
    logging.basicConfig(level=level, format=f"%(levelname)s [{os.getpid()}] %(message)s")
    if threads:
        torch.set_num_threads(threads)


def _finished(record: Record, index: int, total: int) -> Record:
    log.info(
        "run %d/%d done: %s seed %d, val loss %.4f, %.0f s of training",
        index + 1, total, record["variant"], record["seed"], record["val_loss"], record["train_s"],
    )  # fmt: skip
    return record


def load_finished(path: Path, settings: Settings) -> list[Record]:
    """The runs an earlier, interrupted bench with the same settings wrote to ``path``."""
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text())
        runs, their_settings = previous["runs"], previous["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a `rxt bench quality` result ({error}); choose another --json") from error
    if their_settings != settings.to_dict():
        changed = sorted(k for k in settings.to_dict() if their_settings.get(k) != settings.to_dict()[k])
        raise ValueError(
            f"{path} holds runs with other settings ({', '.join(changed)} differ); "
            f"choose another --json, or delete the file to start over"
        )
    return list(runs)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` in one step, so an interrupted bench never leaves half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def sort_runs(records: list[Record]) -> list[Record]:
    order = {v: i for i, v in enumerate(ATTENTION_VARIANTS)}
    return sorted(records, key=lambda r: (r["seed"], order[r["variant"]]))


def summarize(records: list[Record]) -> list[Record]:
    """One row per variant: means over seeds, and loss, time and FLOPs relative to MHA."""
    by_variant: dict[str, list[Record]] = {}
    for record in sort_runs(records):
        by_variant.setdefault(record["variant"], []).append(record)
    baseline = by_variant.get(BASELINE)
    rows = []
    for variant in sorted(by_variant, key=list(ATTENTION_VARIANTS).index):
        runs = by_variant[variant]
        losses = [r["val_loss"] for r in runs]
        row = {
            "variant": variant,
            "n_q_heads": runs[0]["n_q_heads"],
            "n_kv_heads": runs[0]["n_kv_heads"],
            "params": runs[0]["params"],
            "seeds": [r["seed"] for r in runs],
            "val_loss_mean": statistics.fmean(losses),
            "val_loss_min": min(losses),
            "val_loss_max": max(losses),
            "train_s_mean": statistics.fmean(r["train_s"] for r in runs),
            "train_cpu_s_mean": statistics.fmean(r["train_cpu_s"] for r in runs),
            "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in runs),
            "flops_vs_mha": runs[0]["flops_vs_mha"],
            "attention_flop_share": runs[0]["attention_flop_share"],
            "paper_val_loss": PAPER_VAL_LOSS.get(variant),
        }
        if baseline:
            row["val_loss_vs_mha"] = row["val_loss_mean"] / statistics.fmean(r["val_loss"] for r in baseline)
            row["train_time_vs_mha"] = row["train_s_mean"] / statistics.fmean(r["train_s"] for r in baseline)
            row["cpu_time_vs_mha"] = row["train_cpu_s_mean"] / statistics.fmean(r["train_cpu_s"] for r in baseline)
        rows.append(row)
    return rows


def format_model(settings: Settings) -> str:
    s = settings
    return (
        f"decoder-only d_model={s.d_model}, {s.n_layers} layers, H={s.n_heads}, ffn={s.ffn_dim}, "
        f"vocab={s.vocab_size}, seq_len={s.seq_len}; {s.steps} steps x {s.batch_size} seqs, lr={s.lr:g}"
    )


def format_header(settings: Settings, train_tokens: int, valid_tokens: int, machine: str) -> str:
    tokens = settings.steps * settings.batch_size * settings.seq_len
    return (
        f"{format_model(settings)}\n"
        f"{tokens:,} training tokens per run ({tokens / max(1, train_tokens):.2f} passes over {train_tokens:,}); "
        f"validation: {settings.val_seqs} sequences from {valid_tokens:,} held-out tokens\n"
        f"training FLOPs per token, MHA: {flops_per_token(settings, settings.n_heads, settings.n_heads):,.0f}\n"
        f"device: cpu, {machine}; torch {torch.__version__}"
    )


def format_table(rows: list[Record]) -> str:
    """Plain-text summary: loss next to the paper's, time ratio next to the FLOP ratio."""
    header = ("variant", "H_q/H_kv", "params", "val loss", "vs MHA", "paper", "time vs MHA",
              "CPU time vs MHA", "FLOPs vs MHA", "attn FLOPs", "tokens/s")  # fmt: skip
    table = [header]
    for r in rows:
        spread = (r["val_loss_max"] - r["val_loss_min"]) / 2
        table.append((
            r["variant"],
            f"{r['n_q_heads']}/{r['n_kv_heads']}",
            f"{r['params'] / 1e6:.2f}M",
            f"{r['val_loss_mean']:.4f} ± {spread:.4f}" if len(r["seeds"]) > 1 else f"{r['val_loss_mean']:.4f}",
            f"{(r['val_loss_vs_mha'] - 1) * 100:+.2f}%" if "val_loss_vs_mha" in r else "-",
            f"{r['paper_val_loss']:.3f}" if r["paper_val_loss"] else "-",
            f"{r['train_time_vs_mha']:.2f}" if "train_time_vs_mha" in r else "-",
            f"{r['cpu_time_vs_mha']:.2f}" if "cpu_time_vs_mha" in r else "-",
            f"{r['flops_vs_mha']:.2f}",
            f"{r['attention_flop_share'] * 100:.0f}%",
            f"{r['tokens_per_s_mean']:,.0f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    lines.append("val loss: mean over seeds ± half their range; attn FLOPs: attention's share of the model's FLOPs")
    lines.append("time: wall seconds of the training steps; CPU time: the seconds they computed (less when other "
                 "work shares the CPUs)")  # fmt: skip
    return "\n".join(lines)


def plot_curves(records: list[Record], path: Path, title: str = "") -> None:
    """Validation loss against training time, wall (left) and CPU (right): one colour per variant,
    one line per seed. The two panels agree on an idle machine with one thread per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colours = plt.get_cmap("tab10")
    variants = [v for v in ATTENTION_VARIANTS if any(r["variant"] == v for r in records)]
    for ax, clock, label in zip(axes, ("train_s", "train_cpu_s"), ("wall", "CPU"), strict=True):
        for i, variant in enumerate(variants):
            for j, record in enumerate(r for r in sort_runs(records) if r["variant"] == variant):
                points = [p for p in record["curve"] if p["step"] > 0]  # step 0 (ln V) would flatten the rest
                ax.plot([p[clock] for p in points], [p["val_loss"] for p in points], color=colours(i),
                        marker=".", linewidth=1, label=variant if j == 0 else None)  # fmt: skip
        ax.set_xlabel(f"training time, {label} seconds of the optimiser steps")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
