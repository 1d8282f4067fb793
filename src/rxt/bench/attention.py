"""`rxt bench attention`: time one attention layer of each SQA-family variant against MHA.

Each variant is one ``rxt.attention.Attention`` layer (Q/K/V/O projections included) doing
self-attention over a random sequence, forward only ("fwd") or forward + backward ("fwdbwd").
The variants are timed round-robin within every repeat, so that machine noise hits all of them
alike, and the speed-up is the ratio of medians against the MHA layer of the same run.

The theoretical column is the FLOP ratio from ``rxt.attention.attention_flops``: SQA's core
(scores and weighted values) shrinks by H / H_q, the projections by less, so the measured
speed-up approaches H / H_q as the sequence grows and the core dominates (DESIGN.md section 3).

Example (the demo setting, well under a minute on one CPU thread):
    rxt bench attention --seq-lens 512 1024 --repeats 3 --passes fwd
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rxt.attention import ATTENTION_VARIANTS, Attention, RotaryEmbedding, attention_flops, variant_heads
from rxt.bench.timing import describe_machine, single_threaded, summarize, time_round_robin

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa")
PASSES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASELINE = "mha"

Record = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(ATTENTION_VARIANTS),
        default=list(DEFAULT_VARIANTS),
        help="variants to time; mha is always added as the baseline",
    )
    parser.add_argument(
        "--seq-lens", nargs="+", type=int, default=[1024, 4096, 16384], help="sequence lengths T"
    )
    parser.add_argument(
        "--passes",
        nargs="+",
        choices=PASSES,
        default=list(PASSES),
        help="fwd: forward only (no autograd); fwdbwd: forward + backward",
    )
    parser.add_argument("--d-model", type=int, default=256, help="model width D")
    parser.add_argument("--n-heads", type=int, default=16, help="H of the MHA baseline; d_head = D / H")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per variant; the median is reported"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0 = PyTorch's default)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--causal", action="store_true", help="causal self-attention (default: bidirectional)"
    )
    parser.add_argument(
        "--rope",
        choices=("none", "qk"),
        default="none",
        help="rotate queries and keys (adds elementwise work the FLOP count leaves out)",
    )
    parser.add_argument(
        "--json", type=Path, help="write one record per (variant, seq_len, pass) to this file"
    )
    parser.add_argument("--plot", type=Path, help="draw measured speed-up vs MHA against T to this PNG")


def run(args: argparse.Namespace) -> int:
    problem = _check_arguments(args)
    if problem:
        log.error(problem)
        return 2
    torch.manual_seed(0)
    with single_threaded(args.threads):
        records = measure(args)
        machine = describe_machine(args.device)
    print(format_header(args, machine))
    print(format_table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
        log.info("wrote %s", args.json)
    if args.plot:
        plot_speedups(records, args.plot, title=f"attention layer speed-up vs MHA ({machine})")
        log.info("wrote %s", args.plot)
    return 0


def _check_arguments(args: argparse.Namespace) -> str | None:
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda was asked for, but no CUDA device is available"
    if min(args.seq_lens) < 1 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        return "--seq-lens, --batch and --repeats must be >= 1, --warmup >= 0"
    try:
        for variant in variants_of(args):
            variant_heads(variant, args.n_heads)
        attention_flops(args.d_model, args.n_heads, args.n_heads, args.n_heads, 1)
    except ValueError as error:
        return str(error)
    return None


def variants_of(args: argparse.Namespace) -> list[str]:
    """The chosen variants in order, MHA first: every speed-up is measured against it."""
    return [BASELINE] + [v for v in dict.fromkeys(args.variants) if v != BASELINE]


def build_layers(args: argparse.Namespace) -> dict[str, Attention]:
    """One Attention layer per variant, on the benchmark's device and dtype."""
    d_head = args.d_model // args.n_heads
    rotary = RotaryEmbedding(d_head, max(args.seq_lens)) if args.rope != "none" else None
    layers = {}
    for variant in variants_of(args):
        n_q, n_kv = variant_heads(variant, args.n_heads)
        layer = Attention(args.d_model, args.n_heads, n_q, n_kv, rope=args.rope, rotary=rotary)
        layers[variant] = layer.to(args.device, DTYPES[args.dtype])
    return layers


def make_step(layer: Attention, x: torch.Tensor, pass_: str, causal: bool) -> Callable[[], None]:
    """A no-argument call doing one timed pass of ``layer`` over x (B, T, D)."""
    if pass_ == "fwd":

        def forward() -> None:
            with torch.no_grad():
                layer(x, causal=causal)

        return forward

    x = x.detach().requires_grad_()  # inside a network the input needs its gradient too

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x, causal=causal).sum().backward()

    return forward_backward


def measure(args: argparse.Namespace) -> list[Record]:
    """Time every variant at every (seq_len, pass); one record per combination."""
    layers = build_layers(args)
    cases = [(seq_len, pass_) for seq_len in args.seq_lens for pass_ in args.passes]
    records: list[Record] = []
    total = len(cases) * len(layers) * (args.warmup + args.repeats)
    with tqdm(total=total, desc="bench attention", unit="call") as bar:
        for seq_len, pass_ in cases:
            bar.set_postfix_str(f"T={seq_len} {pass_}")
            x = torch.randn(args.batch, seq_len, args.d_model, device=args.device, dtype=DTYPES[args.dtype])
            steps = {variant: make_step(layer, x, pass_, args.causal) for variant, layer in layers.items()}
            times = time_round_robin(steps, args.repeats, args.warmup, args.device, tick=bar.update)
            records += case_records(args, times, seq_len, pass_)
    return records


def case_records(
    args: argparse.Namespace, times: dict[str, list[float]], seq_len: int, pass_: str
) -> list[Record]:
    """Records of one (seq_len, pass): timings, measured speed-up and FLOP ratios against MHA."""
    d, h = args.d_model, args.n_heads
    mha_flops = attention_flops(d, h, h, h, seq_len)
    mha_median = statistics.median(times[BASELINE])
    records = []
    for variant, seconds in times.items():
        n_q, n_kv = variant_heads(variant, h)
        flops = attention_flops(d, h, n_q, n_kv, seq_len)
        summary = summarize(seconds)
        records.append(
            {
                "variant": variant,
                "n_q_heads": n_q,
                "n_kv_heads": n_kv,
                "seq_len": seq_len,
                "pass": pass_,
                **summary,
                "speedup_vs_mha": mha_median / summary["median_s"],
                "flops_ratio_vs_mha": mha_flops["total"] / flops["total"],
                "core_flops_ratio_vs_mha": mha_flops["core"] / flops["core"],
                "threads": torch.get_num_threads(),
                "device": args.device,
                "dtype": args.dtype,
                "d_model": d,
                "n_heads": h,
                "batch": args.batch,
                "causal": args.causal,
                "rope": args.rope,
                "repeats": len(seconds),
            }
        )
    return records


def format_header(args: argparse.Namespace, machine: str) -> str:
    mask = "causal" if args.causal else "bidirectional"
    return (
        f"one attention layer, d_model={args.d_model}, H={args.n_heads}, batch={args.batch}, {mask}, "
        f"rope={args.rope}, {args.dtype}, median of {args.repeats} (warm-up {args.warmup})\n"
        f"device: {args.device}, {machine}; torch {torch.__version__}"
    )


def format_table(records: list[Record]) -> str:
    """A plain-text table: one row per record, speed-up next to the FLOP ratios."""
    header = (
        "variant",
        "H_q",
        "H_kv",
        "seq_len",
        "pass",
        "median ms",
        "min-max ms",
        "speed-up",
        "FLOPs ratio",
        "core ratio",
    )
    rows = [header]
    for r in records:
        rows.append(
            (
                r["variant"],
                str(r["n_q_heads"]),
                str(r["n_kv_heads"]),
                str(r["seq_len"]),
                r["pass"],
                f"{r['median_s'] * 1e3:.2f}",
                f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}",
                f"{r['speedup_vs_mha']:.2f}x",
                f"{r['flops_ratio_vs_mha']:.2f}x",
                f"{r['core_flops_ratio_vs_mha']:.2f}x",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_speedups(records: list[Record], path: Path, title: str = "attention speed-up vs MHA") -> None:
    """Measured speed-up against T, one line per variant and one panel per pass; dashed: H / H_q."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = list(dict.fromkeys(r["pass"] for r in records))
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False, sharey=True)
    for ax, pass_ in zip(axes[0], passes, strict=True):
        _plot_pass(ax, [r for r in records if r["pass"] == pass_], pass_)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pass(ax: Any, records: list[Record], pass_: str) -> None:
    for variant in dict.fromkeys(r["variant"] for r in records):
        rows = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seq_len"])
        ax.plot([r["seq_len"] for r in rows], [r["speedup_vs_mha"] for r in rows], marker="o", label=variant)
    for ratio in sorted({r["n_heads"] / r["n_q_heads"] for r in records}):
        ax.axhline(ratio, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            f"H/H_q = {ratio:g}",
            (0.01, ratio),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            color="grey",
            va="bottom",
        )
    ax.set_xscale("log")
    seq_lens = sorted({r["seq_len"] for r in records})
    ax.set_xticks(seq_lens, [str(t) for t in seq_lens])
    ax.minorticks_off()
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("speed-up vs MHA (median)")
    ax.set_title("forward + backward" if pass_ == "fwdbwd" else "forward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
