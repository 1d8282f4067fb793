"""One run of `rxt bench quality`: train a StatelessLM with one attention variant and seed, and measure it.

Kept apart from the command so that worker processes import only what a run needs. Everything a
run depends on is in ``Settings`` (shared by all runs of a bench) and the (variant, seed) pair:
    - initial weights: each weight matrix is drawn from a generator seeded by (seed, parameter name),
      so two variants share every weight whose shape is the same (embedding, FFN, norms);
    - data: the training stream is cut into windows of seq_len + 1 tokens, and the seed shuffles
      them; every variant of a seed reads the same batches in the same order;
    - schedule: AdamW, linear warm-up, cosine decay to MIN_LR_RATIO of the peak, gradient clipping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rxt.attention import attention_flops, variant_heads
from rxt.config import ModelConfig
from rxt.model import StatelessLM

log = logging.getLogger(__name__)

MIN_LR_RATIO = 0.1
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
INIT_STD = 0.02  # as rxt.model's own initialisation


@dataclass(frozen=True)
class Settings:
    """Everything shared by the runs of one bench; two runs compare only under equal settings."""

    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    seq_len: int
    vocab_size: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    eval_every: int
    val_seqs: int
    threads: int
    data_key: str  # hash of the shards and tokenizer (rxt.bench.prose.cache_key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, variant: str) -> ModelConfig:
        n_q, n_kv = variant_heads(variant, self.n_heads)
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            n_q_heads=n_q, n_kv_heads=n_kv, cross_n_q_heads=n_q, cross_n_kv_heads=n_kv,
            ffn_dim=self.ffn_dim, max_seq_len=self.seq_len,
        )  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    settings: Settings
    streams_dir: str  # the cached train.npy / valid.npy (rxt.bench.prose.TokenStreams.directory)
    jobs: int = 1  # runs training at the same time (recorded: they share the machine)


def model_flops(settings: Settings, n_q_heads: int, n_kv_heads: int) -> dict[str, int]:
    """Forward FLOPs of one sequence of seq_len tokens, by part.

    attention: Q/K/V/O projections and the full T x T score and value products, as
    ``rxt.attention.attention_flops`` counts them; ffn: SwiGLU's three matrices; head: the tied
    output projection to the vocabulary. Norms, RoPE and the softmax are left out.
    """
    s = settings
    layer = attention_flops(s.d_model, s.n_heads, n_q_heads, n_kv_heads, s.seq_len)
    attention = s.n_layers * layer["total"]
    ffn = s.n_layers * 2 * 3 * s.d_model * s.ffn_dim * s.seq_len
    head = 2 * s.d_model * s.vocab_size * s.seq_len
    return {"attention": attention, "ffn": ffn, "head": head, "total": attention + ffn + head}


def flops_per_token(settings: Settings, n_q_heads: int, n_kv_heads: int) -> float:
    """Training FLOPs per token: forward + backward, the backward counted as twice the forward."""
    return 3 * model_flops(settings, n_q_heads, n_kv_heads)["total"] / settings.seq_len


def learning_rate(step: int, settings: Settings) -> float:
    """Linear warm-up to the peak, then cosine decay to MIN_LR_RATIO of it at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def seeded_model(settings: Settings, variant: str, seed: int) -> StatelessLM:
    """The variant's model; every weight matrix drawn from (seed, its name), so equal shapes get equal weights."""
    model = StatelessLM(settings.model_config(variant))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:  # norm weights stay at one
                parameter.normal_(0.0, INIT_STD, generator=torch.Generator().manual_seed(_seed_of(seed, name)))
    return model


def window_order(n_windows: int, n_needed: int, seed: int) -> np.ndarray:
    """Indices of the training windows, in the order this seed reads them (a new shuffle each pass)."""
    rng = np.random.default_rng(_seed_of(seed, "data"))
    passes = [rng.permutation(n_windows) for _ in range(math.ceil(n_needed / n_windows))]
    return np.concatenate(passes)[:n_needed]


def windows(stream: np.ndarray, indices: np.ndarray, seq_len: int) -> torch.Tensor:
    """Windows of seq_len + 1 tokens (inputs and their next-token targets): (N, seq_len + 1)."""
    rows = [np.asarray(stream[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in indices]
    return torch.from_numpy(np.stack(rows))


def validation_windows(stream: np.ndarray, settings: Settings) -> torch.Tensor:
    """A fixed set of val_seqs held-out windows, spread evenly over the validation stream."""
    n_windows = (len(stream) - 1) // settings.seq_len
    if n_windows < 1:
        raise ValueError(
            f"the validation shards hold {len(stream)} tokens, fewer than one sequence of "
            f"--seq-len {settings.seq_len} + 1; give more validation text or a shorter --seq-len"
        )
    if n_windows < settings.val_seqs:
        log.warning("only %d validation sequences of %d tokens (asked for %d)", n_windows, settings.seq_len,
                    settings.val_seqs)  # fmt: skip
    chosen = np.unique(np.linspace(0, n_windows - 1, min(n_windows, settings.val_seqs)).round().astype(int))
    return windows(stream, chosen, settings.seq_len)


def next_token_loss(model: StatelessLM, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each next token: batch (B, T + 1) -> scalar."""
    logits = model.decode(batch[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: StatelessLM, val: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats per token) over the validation windows."""
    model.eval()
    total = sum(next_token_loss(model, chunk, "sum").item() for chunk in val.split(batch_size))
    model.train()
    return total / (val.shape[0] * (val.shape[1] - 1))


def train_run(spec: RunSpec, progress: bool = False) -> dict[str, Any]:
    """Train one (variant, seed) and return its record (see rxt.bench.quality for the fields)."""
    s = spec.settings
    train_stream, val = _load_streams(spec)
    n_windows = (len(train_stream) - 1) // s.seq_len
    order = window_order(n_windows, s.steps * s.batch_size, spec.seed)
    model = seeded_model(s, spec.variant, spec.seed)
    optimizer = _optimizer(model, s)
    clock = StepClock()
    losses: list[float] = []
    curve = [{"step": 0, "train_s": 0.0, "train_cpu_s": 0.0, "train_loss": None,
              "val_loss": evaluate(model, val, s.batch_size)}]  # fmt: skip
    bar = tqdm(total=s.steps, desc=f"{spec.variant} seed {spec.seed}", unit="step", disable=not progress)
    for step in range(s.steps):
        batch = windows(train_stream, order[step * s.batch_size : (step + 1) * s.batch_size], s.seq_len)
        with clock:
            losses.append(_train_step(model, optimizer, batch, learning_rate(step, s)))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            curve.append(_curve_point(model, val, s, step + 1, clock, losses, curve[-1]["step"]))
            if not progress:
                log.info("%s seed %d: step %d/%d, train loss %.3f, val loss %.3f, %.0f s", spec.variant,
                         spec.seed, step + 1, s.steps, curve[-1]["train_loss"], curve[-1]["val_loss"],
                         curve[-1]["train_s"])  # fmt: skip
    bar.close()
    return _record(spec, model, curve, clock, n_windows, val.shape[0] * s.seq_len)


class StepClock:
    """Wall and CPU seconds of the training steps alone (``with clock:`` around each step).

    CPU seconds are the process's: with one thread, the time the step computed. On a machine that
    other work shares, wall time also counts the waits for a free core, CPU time does not.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu_s = 0.0

    def __enter__(self) -> None:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def __exit__(self, *exc_info: object) -> None:
        self.wall.append(time.perf_counter() - self._start)
        self.cpu_s += time.process_time() - self._cpu_start

    @property
    def wall_s(self) -> float:
        return sum(self.wall)


def _load_streams(spec: RunSpec) -> tuple[np.ndarray, torch.Tensor]:
    """The training stream (memory-mapped) and the validation windows."""
    s, streams = spec.settings, Path(spec.streams_dir)
    train_stream = np.load(streams / "train.npy", mmap_mode="r")
    if len(train_stream) < s.seq_len + 1:
        raise ValueError(f"the train shards hold {len(train_stream)} tokens, fewer than one sequence of "
                         f"--seq-len {s.seq_len} + 1")  # fmt: skip
    return train_stream, validation_windows(np.load(streams / "valid.npy", mmap_mode="r"), s)


def _optimizer(model: StatelessLM, settings: Settings) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def _train_step(model: StatelessLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = next_token_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _curve_point(
    model: StatelessLM, val: torch.Tensor, s: Settings, step: int, clock: StepClock,
    losses: list[float], last_step: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "step": step,
        "train_s": clock.wall_s,
        "train_cpu_s": clock.cpu_s,
        "train_loss": statistics.fmean(losses[last_step:step]),  # mean since the previous point
        "val_loss": evaluate(model, val, s.batch_size),
    }


def _record(
    spec: RunSpec, model: StatelessLM, curve: list[dict[str, Any]], clock: StepClock,
    n_windows: int, val_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    s = spec.settings
    n_q, n_kv = variant_heads(spec.variant, s.n_heads)
    flops = model_flops(s, n_q, n_kv)
    tokens = s.steps * s.batch_size * s.seq_len
    train_s = clock.wall_s
    return {
        "variant": spec.variant,
        "seed": spec.seed,
        "n_heads": s.n_heads,
        "n_q_heads": n_q,
        "n_kv_heads": n_kv,
        "params": model.num_parameters(),
        "tokens": tokens,
        "passes_over_data": s.steps * s.batch_size / n_windows,
        "val_loss": curve[-1]["val_loss"],
        "val_tokens": val_tokens,
        "train_loss": curve[-1]["train_loss"],
        "train_s": train_s,
        "train_cpu_s": clock.cpu_s,
        "tokens_per_s": tokens / train_s,
        "step_s_median": statistics.median(clock.wall),
        "flops_per_token": flops_per_token(s, n_q, n_kv),
        "flops_vs_mha": flops["total"] / model_flops(s, s.n_heads, s.n_heads)["total"],
        "attention_flop_share": flops["attention"] / flops["total"],
        "threads": torch.get_num_threads(),
        "jobs": spec.jobs,
        "curve": curve,
    }


def _seed_of(seed: int, name: str) -> int:
    """A 63-bit seed derived from the run's seed and a name, the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
