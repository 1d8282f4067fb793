"""LoRA (Hu et al. 2021, arXiv:2106.09685) on a frozen linear layer of a pretrained decoder.

    y = x W^T (+ b)  +  (alpha / r) * (x A^T) B^T      W: (out, in) frozen; A: (r, in), B: (out, r) trained

B starts at zero, so the added term is exactly 0.0 until training moves it: the layer's output is the
base layer's bit for bit. A starts small and random (as nn.Linear's own init), so that B's first
gradient, x A^T, is not zero.

The wrapper takes over the base layer's ``weight`` (and ``bias``) as its own attributes, so the base's
state_dict keys do not change (``...q_proj.weight``) and the new ones sit beside them
(``...q_proj.lora_a``, ``...q_proj.lora_b``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LORA_TARGETS", "LoRALinear", "add_lora", "merged_state_dict"]

# the decoder layer's linear layers LoRA can wrap, by short name -> (sub-block, attribute)
LORA_TARGETS = {
    "q_proj": ("self_attention", "q_proj"),
    "k_proj": ("self_attention", "k_proj"),
    "v_proj": ("self_attention", "v_proj"),
    "o_proj": ("self_attention", "o_proj"),
    "gate": ("ffn", "gate"),
    "up": ("ffn", "up"),
    "down": ("ffn", "down"),
}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trained low-rank update of rank ``rank``, scaled by alpha / rank."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the base's own parameters, keys unchanged
        self.rank, self.scale = rank, alpha / rank
        weight = linear.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale}"


def add_lora(layers: nn.ModuleList, targets: list[str], layer_ids: list[int], rank: int, alpha: float) -> None:
    """Wrap ``targets`` (names of LORA_TARGETS) of the decoder layers ``layer_ids`` in LoRALinear, in place."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"lora_targets: unknown or no targets {unknown or targets}; choose from {list(LORA_TARGETS)}")
    bad = [i for i in layer_ids if not isinstance(i, int) or not 0 <= i < len(layers)]
    if bad or len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"lora_layers must be distinct layers in 0..{len(layers) - 1}, got {layer_ids}")
    for i in layer_ids:
        for target in targets:
            block_name, attribute = LORA_TARGETS[target]
            block = getattr(layers[i], block_name)
            linear = getattr(block, attribute, None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"lora_targets: layer {i}'s {block_name} has no linear layer {attribute!r} "
                                 f"({type(block).__name__})")
            setattr(block, attribute, LoRALinear(linear, rank, alpha))



@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with every LoRALinear folded in: its ``weight`` is W + (alpha/r) B A and its
    ``lora_a`` / ``lora_b`` are gone. The result has the base architecture's keys, so it loads into a
    plain model that computes what the LoRA model computes."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith("lora_")}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.weight.detach() + (module.lora_b @ module.lora_a) * module.scale
    return state
