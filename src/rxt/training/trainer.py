"""A small trainer shared by every stage: AdamW, warm-up + cosine decay, clipping, accumulation,
exact checkpoint/resume, held-out evaluation, JSONL metrics, and DistributedDataParallel.

A stage plugs in two functions:
    make_batch(step, micro, rank, world) -> Batch     deterministic in its arguments
    loss_fn(model, batch.data, generator) -> (loss_sum, parts)
The loss of one optimiser step is sum(loss_sum) / (global number of loss terms), so one process
with a batch of B equals two processes with B/2 each, and accumulation equals a bigger batch.

Multi-process: launch with ``torchrun --nproc_per_node N``; the process group (gloo on CPU, NCCL
on GPU) is set up only when WORLD_SIZE > 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rxt.training.batches import Batch
from rxt.training.checkpoint import load_checkpoint, save_checkpoint
from rxt.training.recipe import StageSpec

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]
BatchFn = Callable[[int, int, int, int], Batch]


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); joins the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_factor(step: int, spec: StageSpec) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _StageModule(nn.Module):
    """Wraps model + loss so DistributedDataParallel sees one forward per micro-step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, data: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss_fn(self.model, data, generator)


@dataclass
class Trainer:
    model: nn.Module
    stage: str
    spec: StageSpec
    make_batch: BatchFn
    loss_fn: LossFn
    work_dir: Path  # checkpoints/<stage>.safetensors live here
    metrics_path: Path | None = None
    eval_batches: list[Batch] = field(default_factory=list)
    trainable: Callable[[int], Callable[[str], bool]] | None = None  # step -> parameter-name filter
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    bf16_autocast: bool = False
    progress: bool = True
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    # what a checkpoint keeps of the model (default: its whole state_dict); a frozen pretrained base
    # need not be written every checkpoint, only what trains
    model_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    monitor: Callable[[nn.Module], dict[str, float]] | None = None  # extra held-out metrics at each evaluation
    on_checkpoint: Callable[[nn.Module], None] | None = None  # after each checkpoint (rank 0), e.g. export

    def __post_init__(self) -> None:
        self.rank, self.world = init_distributed()
        self.device = next(self.model.parameters()).device
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.spec.lr, betas=(0.9, 0.95),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.spec))
        self.step = 0
        self.tokens_seen = 0
        self.checkpoint_path = Path(self.work_dir) / "checkpoints" / f"{self.stage}.safetensors"
        self._wrapped: nn.Module | None = None
        self._trainable_key: tuple | None = None

    # ---- trainable set and (re)wrapping -------------------------------------------------------
    def _set_trainable(self) -> nn.Module:
        if self.trainable is not None:
            keep = self.trainable(self.step)
            for name, p in self.model.named_parameters():
                p.requires_grad_(keep(name))
        key = tuple(p.requires_grad for p in self.model.parameters())
        if key != self._trainable_key:  # DDP registers the trainable set at construction
            module = _StageModule(self.model, self.loss_fn)
            if self.world > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                module = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
            self._wrapped, self._trainable_key = module, key
        return self._wrapped

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.rank == 0:
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "stage": self.stage, "step": self.step, "tokens_seen": self.tokens_seen,
                "model": self._model_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            }
            save_checkpoint(self.checkpoint_path, state)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.model)
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = load_checkpoint(self.checkpoint_path, self.device)
        self._load_model_state(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        log.info("%s: resumed at step %d", self.stage, self.step)
        return True

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict() if self.model_state is None else self.model_state(self.model)

    def _load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.model_state is None:
            self.model.load_state_dict(state)
            return
        expected = set(self.model_state(self.model))
        if set(state) != expected:
            raise ValueError(f"{self.checkpoint_path}: the checkpoint does not hold this model's trained weights "
                             f"(missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})")
        self.model.load_state_dict(state, strict=False)

    # ---- training ------------------------------------------------------------------------------
    def _generator(self, micro: int) -> torch.Generator:
        key = f"{self.seed}:{self.stage}:{self.step}:{micro}:{self.rank}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16_autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        module = self._set_trainable()
        self.model.train()
        batches = [self.make_batch(self.step, m, self.rank, self.world) for m in range(self.spec.grad_accum)]
        counts = torch.tensor([float(sum(b.count for b in batches)), float(sum(b.tokens for b in batches))])
        if self.world > 1:
            dist.all_reduce(counts)
        n_terms, n_tokens = max(1.0, counts[0].item()), int(counts[1].item())
        scale = self.world / n_terms  # DDP averages gradients over processes
        loss_sum, parts_sum = 0.0, {}
        for micro, batch in enumerate(batches):
            last = micro == len(batches) - 1
            sync = module.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
            with sync, self._autocast():
                loss, parts = module(batch.data, self._generator(micro))
                (loss * scale).backward()
            loss_sum += loss.item()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None], self.spec.grad_clip
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_tokens
        stats = torch.tensor([loss_sum, *parts_sum.values()])
        if self.world > 1:
            dist.all_reduce(stats)
        metrics = {"loss": stats[0].item() / n_terms, "grad_norm": float(grad_norm), "tokens": n_tokens}
        metrics.update({k: v.item() / n_terms for k, v in zip(parts_sum, stats[1:], strict=True)})
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_batches:
            return None
        self.model.eval()
        total, count = 0.0, 0
        generator = torch.Generator().manual_seed(self.seed)
        for batch in self.eval_batches:
            loss, _ = self.loss_fn(self.model, batch.data, generator)
            total, count = total + loss.item(), count + batch.count
        self.model.train()
        return total / max(1, count)

    def train(self, resume: bool = True) -> nn.Module:
        if resume:
            self.load_checkpoint()
        bar = tqdm(total=self.spec.steps, initial=self.step, desc=self.stage, mininterval=2.0,
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        start, window_tokens = time.perf_counter(), 0
        while self.step < self.spec.steps:
            metrics = self.train_step()
            window_tokens += metrics["tokens"]
            elapsed = time.perf_counter() - start
            tok_s = window_tokens / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
            done = self.step == self.spec.steps
            record = self.step % self.log_every == 0 or done
            if self.spec.eval_every and self.step % self.spec.eval_every == 0 or done:
                metrics["eval_loss"] = self.evaluate()
                if self.monitor is not None and self.rank == 0:
                    metrics.update(self.monitor(self.model))
                    self.model.train()
                record = True
            if record:
                self._log({**metrics, "tok_s": round(tok_s, 1), "lr": self.scheduler.get_last_lr()[0]})
            if self.step % self.checkpoint_every == 0 or done:
                self.save_checkpoint()
        bar.close()
        return self.model

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.rank != 0 or self.metrics_path is None:
            return
        record = {"stage": self.stage, "step": self.step, "tokens_seen": self.tokens_seen, **self.extra_metrics}
        record.update({k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items() if v is not None})
        record["time"] = round(time.time(), 1)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
