"""What the reactive wrapper (rxt.pretrained.reactive) adds to a pretrained decoder: its config.

Kept apart from ModelConfig, so the base's config, and with it every saved model's identity, does not
change; ``identity_dict`` leaves out the options that are off, so a model keeps the identity it had
before an option existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rxt.config import ModelConfig
from rxt.records import DictRecord

__all__ = ["MEMORY_READS", "ReactiveConfig"]

MEMORY_READS = ("new", "base")


@dataclass
class ReactiveConfig(DictRecord):
    """What the reactive wrapper adds to a pretrained decoder. Kept apart from ModelConfig: the base's
    config (and with it every saved model's identity) does not change."""

    KIND = "reactive config"

    memory_layers: list[int] = field(default_factory=lambda: list(range(2, 30, 3)))  # every 3rd of 30
    # SQA where it pays: 3 of SmolLM2's 9 query heads of 64 -> a third of MHA's attention FLOPs in the
    # new cross-attention and in the memory attention
    cross_n_q_heads: int = 3
    cross_n_kv_heads: int = 3
    stm_slots: int = 64  # per memory layer
    memory_attention: str = "simple"  # a variant of rxt.memory; the others add a pre-step attention per layer
    # "queue": each turn fills write_slots new slots, the oldest drop out (rxt.memory; or any rxt write).
    # "tokens": no memory attention at all; each memory layer keeps the states of the last stm_slots turn
    # tokens verbatim (each turn's appended, the oldest dropped): a memory of tokens, not of summaries.
    # "kv": every decoder layer keeps the self-attention keys and values of stm_slots past tokens, chosen
    # by ``keep``, and reads them through its own self-attention (rxt.pretrained.kv_memory): no new weights,
    # no memory_layers, no cross-attention
    memory_write: str = "queue"
    keep: str = "recent"  # for memory_write "kv": which tokens stay (KEEP_POLICIES)
    # for keep "salience": the decoder layer whose keys and values the gate reads (None: 4/5 of the depth)
    salience_layer: int | None = None
    write_slots: int = 8  # stm_slots / write_slots = 8 turns kept
    gate_mode: str = "elementwise"  # for memory_write "attention" / "competitive"
    stm_init_std: float = 0.02
    # the memory is also written from the turn's own token embeddings (beside the decoder's states, as
    # further ED positions): a told word's identity is there verbatim, where the later layers' states
    # mostly hold predictions of the next token
    ed_embeddings: bool = False
    # how the memory cross-attention starts: "new" (random queries, keys and values, RoPE on the queries)
    # or "base": its queries, keys and values are the layer's own pretrained self-attention (its input
    # norm folded in, no RoPE), so at the start each memory layer searches the memory as it searches its
    # context. It has the base's heads (SmolLM2: 9 query, 3 key/value); cross_n_q_heads and cross_n_kv_heads
    # then set the memory attention's alone. Either way W_O starts at zero: the model is the base until trained.
    memory_read: str = "new"
    # LoRA on the frozen base (rxt.pretrained.lora): rank 0 is off. Its weights are adapter weights; the
    # base's stay frozen and untouched. alpha / rank scales the update; targets name the decoder layer's
    # linear layers (LORA_TARGETS: q_proj, k_proj, v_proj, o_proj of the self-attention, gate, up, down of
    # the FFN); lora_layers None is every decoder layer
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_layers: list[int] | None = None

    def identity_dict(self) -> dict[str, Any]:
        """to_dict without the keys of options that are off (LoRA, the base-started read): a model without
        them keeps the identity it had before the options existed (its saved sessions stay valid)."""
        data = self.to_dict()
        if not self.lora_rank:
            data = {k: v for k, v in data.items() if not k.startswith("lora_")}
        if self.memory_read == "new":
            data.pop("memory_read")
        if self.memory_write != "kv":
            data.pop("keep")
        if self.memory_write != "kv" or self.keep != "salience":
            data.pop("salience_layer")
        return data

    def memory_config(self, base: ModelConfig) -> ModelConfig:
        """The ModelConfig rxt's memory pieces are built from: the base's width, one layer per memory layer.
        (A "tokens" memory has no memory attention; its STM is built from this config all the same.)"""
        write = "queue" if self.memory_write in ("tokens", "kv") else self.memory_write
        return dataclasses.replace(
            base,
            n_layers=len(self.memory_layers),
            cross_n_q_heads=self.cross_n_q_heads,
            cross_n_kv_heads=self.cross_n_kv_heads,
            stm_slots=self.stm_slots,
            stm_init="normal",
            stm_init_std=self.stm_init_std,
            memory_attention=self.memory_attention,
            memory_write=write,
            # (a kv memory builds nothing from this config: its queue settings are only kept valid)
            write_slots=1 if self.memory_write == "kv" else self.write_slots if write == "queue" else 0,
            gate_mode=self.gate_mode,
            moe_experts=0,
            dropout=0.0,
        )
