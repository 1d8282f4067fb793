"""The sub-blocks layers are built from: RMSNorm, SwiGLU, Mixture-of-Experts, decoder and encoder layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rxt.attention import Attention, KVCache, RotaryEmbedding
from rxt.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """FFN(x) = W_down(silu(W_gate x) * W_up x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoEFeedForward(nn.Module):
    """Mixture of SwiGLU experts: softmax router, top-k routing, load-balancing auxiliary loss.

    aux_loss = E * sum_e f_e * P_e, with f_e the fraction of routed (token, slot) pairs sent to
    expert e and P_e its mean router probability (Switch Transformer). It equals 1 when balanced.
    The last forward's loss is kept in ``self.aux_loss`` for the model to collect.
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden) for _ in range(n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, D)
        probs = self.router(tokens).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).type_as(x)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None])
        n_experts = probs.shape[-1]
        routed_fraction = F.one_hot(chosen, n_experts).float().sum(1).mean(0) / self.top_k  # (E,)
        self.aux_loss = n_experts * (routed_fraction * probs.mean(0)).sum()
        return out.view(shape)


def feed_forward(config: ModelConfig, dense: bool = False) -> nn.Module:
    if config.moe_experts and not dense:
        return MoEFeedForward(config.d_model, config.ffn_dim, config.moe_experts, config.moe_top_k)
    return SwiGLU(config.d_model, config.ffn_dim)


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention -> memory cross-attention -> FFN (dense or MoE).

    ``use_memory=False`` drops the cross-attention: that is the stateless baseline's layer.
    """

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, use_memory: bool = True):
        super().__init__()
        c = config
        self.self_norm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attention = Attention(c.d_model, c.n_heads, c.n_q_heads, c.n_kv_heads, "qk", c.attn_impl, rotary)
        self.memory_cross_attention = None
        if use_memory:
            self.memory_norm = RMSNorm(c.d_model, c.norm_eps)
            self.memory_cross_attention = Attention(
                c.d_model, c.n_heads, c.cross_n_q_heads, c.cross_n_kv_heads, "q", c.attn_impl, rotary
            )
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.ffn = feed_forward(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D); memory_kv: this layer's precomputed STM keys/values (see project_memory)."""
        h = self.self_attention(self.self_norm(x), positions=positions, key_mask=key_mask, causal=True, cache=cache)
        x = x + self.dropout(h)
        if self.memory_cross_attention is not None:
            if memory_kv is None:
                raise ValueError("this decoder layer reads memory: pass memory_kv (see project_memory)")
            x = x + self.dropout(self.memory_cross_attention(self.memory_norm(x), kv=memory_kv, positions=positions))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def project_memory(self, stm_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of one STM layer (B, S, D) for memory cross-attention; computed once per turn.

        No RoPE on memory keys: slots are an unordered set. The slots are RMS-normalised first
        (no learned weight): the STM's scale is set by the residual gate, not by the decoder, and an
        unnormalised read lets a small memory be drowned out (the decoder then ignores it).
        """
        normed = F.rms_norm(stm_layer, (stm_layer.shape[-1],), eps=self.memory_norm.eps)
        return self.memory_cross_attention.project_kv(normed)


class EncoderLayer(nn.Module):
    """Pre-norm: bidirectional self-attention -> dense SwiGLU."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        c = config
        self.self_norm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attention = Attention(c.d_model, c.n_heads, c.n_q_heads, c.n_kv_heads, "qk", c.attn_impl, rotary)
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.ffn = feed_forward(c, dense=True)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.self_norm(x), positions=positions, key_mask=key_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
