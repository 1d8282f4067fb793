"""Model configuration: one dataclass, named presets, strict JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rxt.attention import ATTENTION_IMPLS, check_heads
from rxt.records import DictRecord

MEMORY_ATTENTION_VARIANTS = ("simple", "self", "interlayer", "gated_self_interlayer")
GATE_MODES = ("static", "elementwise", "linear", "content")
GATE_ACTIVATIONS = ("sigmoid", "tanh", "none")
MEMORY_WRITES = ("attention", "competitive", "queue", "consolidate")
QUEUE_WRITES = ("queue", "consolidate")  # writes that append write_slots new slots a turn


@dataclass
class ModelConfig(DictRecord):
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4  # decoder layers = encoder layers = STM layers
    n_heads: int = 8  # H of the comparable MHA layer; fixes d_head = d_model / n_heads
    n_q_heads: int = 4  # self-attention query heads (sSQA 4/4 by default)
    n_kv_heads: int = 4  # self-attention key/value heads
    cross_n_q_heads: int = 4  # memory cross-attention and memory attention query heads
    cross_n_kv_heads: int = 4
    ffn_dim: int = 384  # SwiGLU hidden size (per expert with MoE)
    moe_experts: int = 0  # 0 = dense SwiGLU in the decoder; >0 = Mixture-of-Experts
    moe_top_k: int = 2
    moe_aux_loss_weight: float = 0.01  # load-balancing loss scale
    stm_slots: int = 32  # memory slots per layer
    stm_init: str = "normal"  # "normal" (fixed small normal) or "learned"
    stm_init_std: float = 0.02
    memory_attention: str = "interlayer"  # one of MEMORY_ATTENTION_VARIANTS
    gate_mode: str = "elementwise"  # one of GATE_MODES
    gate_activation: str = "sigmoid"  # one of GATE_ACTIVATIONS
    # how slots read a turn: "attention" (each slot a softmax over the tokens) or "competitive"
    # (each token split among the slots; a slot that takes no token keeps what it holds), or "queue"
    # (each turn folded into write_slots new slots; the oldest write_slots slots drop out), or
    # "consolidate" (a queue whose oldest slots are folded into long_term_slots gated slots instead)
    memory_write: str = "attention"
    write_slots: int = 0  # slots a queue write fills per turn (queue slots / write_slots turns are kept)
    long_term_slots: int = 0  # "consolidate": the first slots of the memory, the rest is the queue
    max_seq_len: int = 1024  # RoPE table length: longest sequence one pass may see
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attn_impl: str = "sdpa"  # "sdpa" (fused) or "eager" (reference, for parity tests)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_heads(self.d_model, self.n_heads, self.n_q_heads, self.n_kv_heads)
        check_heads(self.d_model, self.n_heads, self.cross_n_q_heads, self.cross_n_kv_heads)
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        _choice("memory_attention", self.memory_attention, MEMORY_ATTENTION_VARIANTS)
        _choice("gate_mode", self.gate_mode, GATE_MODES)
        _choice("gate_activation", self.gate_activation, GATE_ACTIVATIONS)
        _choice("memory_write", self.memory_write, MEMORY_WRITES)
        if self.memory_write == "consolidate" and not 1 <= self.long_term_slots < self.stm_slots:
            raise ValueError(f"memory_write 'consolidate' needs 1 <= long_term_slots < stm_slots={self.stm_slots}, "
                             f"got long_term_slots={self.long_term_slots}")
        if self.memory_write != "consolidate" and self.long_term_slots:
            raise ValueError(f"long_term_slots={self.long_term_slots} is for memory_write 'consolidate' "
                             f"(got {self.memory_write!r})")
        queue = self.stm_slots - self.long_term_slots
        if self.memory_write in QUEUE_WRITES and not 1 <= self.write_slots <= queue:
            raise ValueError(f"memory_write {self.memory_write!r} needs 1 <= write_slots <= {queue} (the queue's "
                             f"slots: stm_slots={self.stm_slots} - long_term_slots={self.long_term_slots}), "
                             f"got write_slots={self.write_slots}")
        if self.memory_write not in QUEUE_WRITES and self.write_slots:
            raise ValueError(f"write_slots={self.write_slots} is for memory_write 'queue' or 'consolidate' "
                             f"(got {self.memory_write!r})")
        _choice("stm_init", self.stm_init, ("normal", "learned"))
        _choice("attn_impl", self.attn_impl, ATTENTION_IMPLS)
        for name in ("vocab_size", "n_layers", "ffn_dim", "stm_slots", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be in 1..moe_experts={self.moe_experts}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def save(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps({**extra, **self.to_dict()}, indent=2) + "\n")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # for tests: runs a full training step in milliseconds
    "tiny": dict(
        vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_q_heads=2, n_kv_heads=2,
        cross_n_q_heads=2, cross_n_kv_heads=2, ffn_dim=64, stm_slots=8, max_seq_len=256,
    ),
    # trainable on 2 CPU cores in well under an hour (~3M parameters with a 4k vocabulary)
    "nano": dict(
        vocab_size=4096, d_model=128, n_layers=4, n_heads=8, n_q_heads=4, n_kv_heads=4,
        cross_n_q_heads=4, cross_n_kv_heads=4, ffn_dim=384, stm_slots=32, max_seq_len=1024,
    ),
    # close to the paper's 12M model: d=128, 6 layers, 8 heads, sSQA 4/4, MoE 12 experts top-2
    "micro": dict(
        vocab_size=8192, d_model=128, n_layers=6, n_heads=8, n_q_heads=4, n_kv_heads=4,
        cross_n_q_heads=4, cross_n_kv_heads=4, ffn_dim=256, moe_experts=12, moe_top_k=2,
        stm_slots=64, max_seq_len=1024,
    ),
}
