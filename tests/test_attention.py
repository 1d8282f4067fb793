"""The SQA attention family: fused vs eager parity, hand-written references, caching, head checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rxt.attention import (
    ATTENTION_VARIANTS,
    Attention,
    KVCache,
    RotaryEmbedding,
    attention_flops,
    build_mask,
    variant_heads,
)
from rxt.config import ModelConfig

D_MODEL, N_HEADS = 64, 8
VARIANTS = sorted(ATTENTION_VARIANTS)
TOL = dict(rtol=1e-4, atol=1e-5)


def make_attention(variant: str, rope: str = "qk", impl: str = "sdpa", seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    n_q, n_kv = variant_heads(variant, N_HEADS)
    return Attention(D_MODEL, N_HEADS, n_q, n_kv, rope=rope, impl=impl)


def sdpa_and_eager(variant: str, rope: str = "qk") -> tuple[Attention, Attention]:
    fast = make_attention(variant, rope, "sdpa")
    eager = make_attention(variant, rope, "eager", seed=1)
    eager.load_state_dict(fast.state_dict())
    return fast, eager


def left_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.stack([torch.arange(total) >= total - n for n in lengths])  # (B, total)


# ---------------------------------------------------------------------------- fused vs eager


PARITY_CASES = {
    "bidirectional": dict(),
    "causal": dict(causal=True),
    "padding": dict(key_mask=left_padded_mask([9, 5], 9)),
    "padding_causal": dict(key_mask=left_padded_mask([9, 5], 9), causal=True),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_matches_eager_self_attention(variant: str, case: str) -> None:
    fast, eager = sdpa_and_eager(variant)
    x = torch.randn(2, 9, D_MODEL)
    kwargs = PARITY_CASES[case]
    assert_close(fast(x, **kwargs), eager(x, **kwargs), **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_matches_eager_cross_attention(variant: str) -> None:
    fast, eager = sdpa_and_eager(variant, rope="q")
    x, context = torch.randn(2, 5, D_MODEL), torch.randn(2, 11, D_MODEL)
    key_mask = left_padded_mask([11, 6], 11)
    assert_close(fast(x, context, key_mask=key_mask), eager(x, context, key_mask=key_mask), **TOL)


@pytest.mark.parametrize("variant", ["mha", "sqa", "xsmqa"])
def test_sdpa_matches_eager_with_cached_prefix(variant: str) -> None:
    """Several new queries after cached keys: the causal mask is offset by the cache length."""
    fast, eager = sdpa_and_eager(variant)
    x = torch.randn(2, 10, D_MODEL)
    outputs = []
    for layer in (fast, eager):
        cache = KVCache()
        layer(x[:, :6], positions=torch.arange(6), causal=True, cache=cache)
        outputs.append(layer(x[:, 6:], positions=torch.arange(6, 10), causal=True, cache=cache))
    assert_close(outputs[0], outputs[1], **TOL)


# ---------------------------------------------------------------------------- references


def reference_mha(layer: Attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Textbook multi-head attention with the layer's weights (no RoPE), written with einsum."""
    b, t, _ = x.shape
    h, d = layer.n_q_heads, layer.d_head
    q = (x @ layer.q_proj.weight.T).view(b, t, h, d)
    k = (x @ layer.k_proj.weight.T).view(b, t, h, d)
    v = (x @ layer.v_proj.weight.T).view(b, t, h, d)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    if causal:
        future = torch.ones(t, t, dtype=torch.bool).triu(diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, h * d)
    return out @ layer.o_proj.weight.T


def reference_grouped(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Per-head loop; query head i reads KV head i // (H_q / H_kv), with K/V copied out explicitly."""
    b, t, _ = x.shape
    d, groups = layer.d_head, layer.n_q_heads // layer.n_kv_heads
    q = (x @ layer.q_proj.weight.T).view(b, t, layer.n_q_heads, d)
    k = (x @ layer.k_proj.weight.T).view(b, t, layer.n_kv_heads, d)
    v = (x @ layer.v_proj.weight.T).view(b, t, layer.n_kv_heads, d)
    k_rep = torch.stack([k[:, :, i // groups] for i in range(layer.n_q_heads)], dim=2)  # (B, T, H_q, d)
    v_rep = torch.stack([v[:, :, i // groups] for i in range(layer.n_q_heads)], dim=2)
    heads = []
    for i in range(layer.n_q_heads):
        weights = (q[:, :, i] @ k_rep[:, :, i].transpose(1, 2) / math.sqrt(d)).softmax(-1)  # (B, T, T)
        heads.append(weights @ v_rep[:, :, i])  # (B, T, d)
    return torch.cat(heads, dim=-1) @ layer.o_proj.weight.T


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("causal", [False, True])
def test_full_heads_equal_handwritten_mha(impl: str, causal: bool) -> None:
    layer = make_attention("mha", rope="none", impl=impl)
    x = torch.randn(2, 7, D_MODEL)
    assert_close(layer(x, causal=causal), reference_mha(layer, x, causal), **TOL)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["gqa", "mqa", "sqa", "xsmqa", "ssqa"])
def test_kv_repetition_equals_explicit_repeat(variant: str, impl: str) -> None:
    layer = make_attention(variant, rope="none", impl=impl)
    x = torch.randn(2, 7, D_MODEL)
    assert_close(layer(x), reference_grouped(layer, x), **TOL)


def test_rope_scores_depend_on_relative_position_only() -> None:
    """Shifting every position by the same offset leaves self-attention unchanged."""
    layer = make_attention("sqa", rope="qk")
    x = torch.randn(1, 6, D_MODEL)
    assert_close(layer(x, positions=torch.arange(6)), layer(x, positions=torch.arange(40, 46)), **TOL)
    assert not torch.allclose(
        layer(x, positions=torch.arange(6)), layer(x, positions=torch.arange(6).flip(0))
    )


# ---------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_recomputation(variant: str, impl: str) -> None:
    """Prefill 3 tokens, append a chunk of 3 (causal mask offset by the cache), then 1 token at a time."""
    layer = make_attention(variant, impl=impl)
    x = torch.randn(2, 9, D_MODEL)
    full = layer(x, causal=True)
    cache = KVCache()
    steps = [
        layer(x[:, :3], positions=torch.arange(3), causal=True, cache=cache),
        layer(x[:, 3:6], positions=torch.arange(3, 6), causal=True, cache=cache),
    ]
    for t in range(6, 9):
        steps.append(layer(x[:, t : t + 1], positions=torch.tensor([t]), causal=True, cache=cache))
    assert cache.length == 9
    assert cache.k.shape == (2, layer.n_kv_heads, 9, layer.d_head)
    assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_kv_cache_size_follows_kv_heads() -> None:
    sizes = {}
    for variant in ("mha", "gqa", "mqa"):
        layer, cache = make_attention(variant), KVCache()
        layer(torch.randn(1, 4, D_MODEL), causal=True, cache=cache)
        sizes[variant] = cache.nbytes()
    assert sizes["mha"] == 4 * sizes["gqa"] == N_HEADS * sizes["mqa"]


def test_causal_padding_mask_never_leaves_a_row_empty() -> None:
    mask = build_mask(left_padded_mask([2, 5], 5), causal=True, q_len=5, k_len=5, device=torch.device("cpu"))
    assert mask.shape == (2, 1, 5, 5)
    assert mask.any(-1).all()
    assert not mask[0, 0, 4, :3].any()  # a real query never sees padding keys


# ---------------------------------------------------------------------------- head configuration


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ((64, 8, 6, 4), "n_q_heads=6 is not divisible by n_kv_heads=4"),
        ((64, 8, 16, 4), "n_q_heads=16 > n_heads=8"),
        ((60, 8, 8, 8), "d_model=60 is not divisible by n_heads=8"),
        ((64, 8, 2, 4), "n_kv_heads=4 > n_q_heads=2"),
        ((64, 8, 0, 1), "must be >= 1"),
    ],
)
def test_bad_head_configs_raise(heads: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Attention(*heads)


def test_model_config_checks_heads() -> None:
    with pytest.raises(ValueError, match="n_q_heads=6 is not divisible by n_kv_heads=4"):
        ModelConfig.from_name("tiny", d_model=64, n_heads=8, n_q_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads=4 > n_q_heads=2"):
        ModelConfig.from_name("tiny", cross_n_q_heads=2, cross_n_kv_heads=4)


def test_unknown_variant_and_too_few_heads() -> None:
    with pytest.raises(ValueError, match="unknown attention variant 'nope'"):
        variant_heads("nope", 8)
    with pytest.raises(ValueError, match="n_heads=2"):
        variant_heads("xsqa", 2)


def test_variant_head_counts() -> None:
    assert variant_heads("mha", 16) == (16, 16)
    assert variant_heads("gqa", 16) == (16, 4)
    assert variant_heads("mqa", 16) == (16, 1)
    assert variant_heads("sqa", 16) == (8, 4)
    assert variant_heads("ssqa", 16) == (8, 8)
    assert variant_heads("xsqa", 16) == (4, 4)
    assert variant_heads("xsmqa", 16) == (4, 1)


@pytest.mark.parametrize("seq_len", [1, 1024, 4096])
def test_core_flops_ratios(seq_len: int) -> None:
    def flops(variant: str) -> dict[str, int]:
        return attention_flops(256, 16, *variant_heads(variant, 16), seq_len)

    assert flops("mha")["core"] == 4 * seq_len * seq_len * 256  # 2 matmuls x 2 FLOPs x T x T x D
    assert flops("mha")["core"] / flops("xsqa")["core"] == 4
    assert flops("mha")["core"] / flops("sqa")["core"] == 2
    assert flops("mha")["core"] == flops("gqa")["core"] == flops("mqa")["core"]
    assert flops("mha")["total"] > flops("gqa")["total"]  # GQA saves K/V projections only
    assert flops("mha")["total"] / flops("xsqa")["total"] == 4  # H_q = H_kv = H/4: everything shrinks


def test_rope_table_covers_long_positions() -> None:
    rotary = RotaryEmbedding(8, 16)
    x = torch.randn(1, 2, 3, 8)
    far = rotary(x, torch.tensor([20, 30, 40]))
    assert far.shape == x.shape and torch.isfinite(far).all()
    assert_close(far.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps the norm
