"""The Sparse Query Attention family: MHA, GQA, MQA, SQA, sSQA, xSQA, xSMQA, light SQA.

Notation (shape comments use these letters):
    B      batch size
    T      query length, S  key/value length (tokens, or STM slots)
    D      d_model
    H      n_heads      -- the head count of the comparable MHA layer; fixes d_head = D / H
    H_q    n_q_heads    -- query heads actually computed (SQA: H_q < H  => fewer FLOPs)
    H_kv   n_kv_heads   -- key/value heads (GQA/MQA: H_kv < H_q => smaller KV cache)
    d_head head size

One module expresses every variant: W_Q: D -> H_q*d_head, W_K/W_V: D -> H_kv*d_head, W_O: H_q*d_head -> D.
K/V heads are shared by H_q / H_kv query heads. Score and value FLOPs scale with H_q, so SQA's
speed-up over MHA is H / H_q (arXiv 2510.01817).

RoPE placement (arXiv 2510.03561, DESIGN.md section 2) is chosen per use by ``rope``:
    "qk"   self-attention            rotate queries and keys
    "q"    memory cross-attention    rotate queries only: the memory is an unordered set
    "k"    memory attention STM<-ED  rotate keys only: the ED tokens have order, STM slots have not
    "none" STM-to-STM steps
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# variant -> (n_q_heads, n_kv_heads) as a function of H (DESIGN.md section 3)
ATTENTION_VARIANTS = {
    "mha": lambda h: (h, h),
    "gqa": lambda h: (h, max(1, h // 4)),
    "mqa": lambda h: (h, 1),
    "sqa": lambda h: (h // 2, h // 4),
    "ssqa": lambda h: (h // 2, h // 2),
    "xsqa": lambda h: (h // 4, h // 4),
    "xsmqa": lambda h: (h // 4, 1),
    "lsqa": lambda h: (3 * h // 4, 3 * h // 4),
}

ROPE_MODES = ("qk", "q", "k", "none")
ATTENTION_IMPLS = ("sdpa", "eager")


def variant_heads(variant: str, n_heads: int) -> tuple[int, int]:
    """(n_q_heads, n_kv_heads) of a named variant for an MHA layer of ``n_heads`` heads."""
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; choose one of {sorted(ATTENTION_VARIANTS)}")
    n_q, n_kv = ATTENTION_VARIANTS[variant](n_heads)
    if n_q < 1 or n_kv < 1:
        raise ValueError(f"variant {variant!r} needs more heads than n_heads={n_heads} (got H_q={n_q}, H_kv={n_kv})")
    return n_q, n_kv


def check_heads(d_model: int, n_heads: int, n_q_heads: int, n_kv_heads: int) -> int:
    """Validate a head configuration and return d_head. Raises ValueError naming the broken rule."""
    if min(d_model, n_heads, n_q_heads, n_kv_heads) < 1:
        raise ValueError(
            f"d_model, n_heads, n_q_heads, n_kv_heads must be >= 1 "
            f"(got {d_model}, {n_heads}, {n_q_heads}, {n_kv_heads})"
        )
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}: head size must be integral")
    if n_q_heads > n_heads:
        raise ValueError(f"n_q_heads={n_q_heads} > n_heads={n_heads}: SQA may only reduce query heads")
    if n_kv_heads > n_q_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} > n_q_heads={n_q_heads}: each KV head must serve >= 1 query head")
    if n_q_heads % n_kv_heads:
        raise ValueError(f"n_q_heads={n_q_heads} is not divisible by n_kv_heads={n_kv_heads}")
    return d_model // n_heads


def attention_flops(
    d_model: int, n_heads: int, n_q_heads: int, n_kv_heads: int, seq_len: int, kv_len: int | None = None
) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) of one attention layer, batch 1.

    projections: Q, K, V and output projections; core: QK^T scores and the weighted sum of V.
    """
    d_head = check_heads(d_model, n_heads, n_q_heads, n_kv_heads)
    s = seq_len if kv_len is None else kv_len
    q_proj = 2 * seq_len * d_model * n_q_heads * d_head
    kv_proj = 2 * 2 * s * d_model * n_kv_heads * d_head
    o_proj = 2 * seq_len * n_q_heads * d_head * d_model
    core = 2 * 2 * n_q_heads * seq_len * s * d_head
    projections = q_proj + kv_proj + o_proj
    return {"projections": projections, "core": core, "total": projections + core}


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) tables, indexed by explicit positions."""

    def __init__(self, d_head: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"RoPE needs an even head size, got d_head={d_head}")
        self.register_buffer(
            "inv_freq", 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head), persistent=False
        )
        self._build(max_positions)

    def _build(self, n_positions: int) -> None:
        positions = torch.arange(n_positions, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq)  # (P, d_head/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def ensure(self, n_positions: int) -> None:
        """Grow the tables to cover positions 0..n_positions-1 (a host-side int: no device sync)."""
        if n_positions > self.cos.shape[0]:
            self._build(max(n_positions, 2 * self.cos.shape[0]))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, d_head) at positions (B, T) or (T,), growing the tables if they are short.

        Reading the largest position back is a host sync (and a graph break), so it is skipped while
        compiling: the compiled path (rxt.fast) calls ``ensure`` for its whole cache up front.
        """
        if not torch.compiler.is_compiling() and positions.numel():
            # longer than max_seq_len (e.g. a long stateless history): extend the tables
            self.ensure(int(positions.max()) + 1)
        return self.rotate(x, positions)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate without checking the table size: every position must be below ``ensure``'s bound."""
        cos, sin = self.cos[positions], self.sin[positions]  # (B, T, d_head/2) or (T, d_head/2)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return rotated.type_as(x)


@dataclass
class KVCache:
    """Keys and values seen so far by one self-attention layer: (B, H_kv, S, d_head) each."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nelement() * self.k.element_size() * 2


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference attention: explicit KV repetition, matmul and softmax. mask: bool, True = attend."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H_q, S, d_head)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H_q, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1).nan_to_num(0.0)  # rows with no key attend to nothing
    return (weights @ v.float()).type_as(q)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Fast path: PyTorch's fused scaled_dot_product_attention with grouped KV heads."""
    grouped = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)


def build_mask(
    key_mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor | None:
    """Bool mask (B or 1, 1, T, S), True = attend. key_mask: (B, S) True for real keys.

    Causal masks align the last query with the last key, so they also serve cached decoding
    where the T new queries come after S - T cached keys.
    """
    mask = None
    offset = k_len - q_len
    if causal and q_len > 1:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)[None, None]
    if key_mask is not None:
        padding = key_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        mask = padding if mask is None else mask & padding
        if causal:
            # a padding query still sees itself, so no row is empty (an empty row gives NaN in SDPA)
            eye = torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
            eye[torch.arange(q_len), torch.arange(q_len) + offset] = True
            mask = mask | eye[None, None]
    return mask


class Attention(nn.Module):
    """One attention layer of the SQA family (self- or cross-attention).

    Args:
        d_model: model width D.
        n_heads: H of the comparable MHA layer; fixes d_head = D / H.
        n_q_heads: H_q query heads (H_q <= H).
        n_kv_heads: H_kv key/value heads (H_q divisible by H_kv).
        rope: which side RoPE rotates: "qk", "q", "k" or "none" (see module docstring).
        impl: "sdpa" (fused) or "eager" (reference).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_q_heads: int,
        n_kv_heads: int,
        rope: str = "qk",
        impl: str = "sdpa",
        rotary: RotaryEmbedding | None = None,
    ):
        super().__init__()
        self.d_head = check_heads(d_model, n_heads, n_q_heads, n_kv_heads)
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if rope != "none" and rotary is None:
            rotary = RotaryEmbedding(self.d_head, 4096)
        self.n_q_heads, self.n_kv_heads, self.rope, self.impl = n_q_heads, n_kv_heads, rope, impl
        self.rotary = rotary if rope != "none" else None
        self.q_proj = nn.Linear(d_model, n_q_heads * self.d_head, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.d_head, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.d_head, bias=False)
        self.o_proj = nn.Linear(n_q_heads * self.d_head, d_model, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.d_head).transpose(1, 2)  # (B, n, T, d_head)

    def project_kv(
        self, context: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context (B, S, D) -> 2 x (B, H_kv, S, d_head).

        For memory cross-attention this runs once per turn: the STM does not change while a turn
        is answered, so its K/V are reused by every prompt and decode step.
        """
        k = self._heads(self.k_proj(context), self.n_kv_heads)
        v = self._heads(self.v_proj(context), self.n_kv_heads)
        if self.rope in ("qk", "k"):
            k = self.rotary(k, _default_positions(positions, context))
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        context_positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) queries. Keys/values come from ``kv`` (precomputed), else ``context``, else x.

        positions: (B, T) or (T,) RoPE positions of x; context_positions likewise for the context.
        key_mask: (B, S) True for keys to attend to (padding mask over the full key length,
        including cached keys). cache: appended to, then attended over (self-attention decoding).
        """
        q = self._heads(self.q_proj(x), self.n_q_heads)  # (B, H_q, T, d_head)
        if self.rope in ("qk", "q"):
            q = self.rotary(q, _default_positions(positions, x))
        if kv is None:
            if context is None:
                context, context_positions = x, positions
            kv = self.project_kv(context, context_positions)
        k, v = cache.append(*kv) if cache is not None else kv  # (B, H_kv, S, d_head)
        mask = build_mask(key_mask, causal, q.shape[2], k.shape[2], x.device)
        if self.impl == "sdpa" and mask is None and causal and q.shape[2] == k.shape[2] > 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        else:
            out = self.attend(q, k, v, mask)  # (B, H_q, T, d_head)
        return self.output(out)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The attention core of this layer's ``impl``: (B, H_q, T, d_head) from grouped K/V heads."""
        return (sdpa_attention if self.impl == "sdpa" else eager_attention)(q, k, v, mask)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Merge the heads of (B, H_q, T, d_head) and project back: (B, T, D)."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_q_heads * self.d_head))


def _default_positions(positions: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return positions if positions is not None else torch.arange(x.shape[1], device=x.device)
