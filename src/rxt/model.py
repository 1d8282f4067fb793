"""The Reactive Transformer (RxT) and its stateless baseline, built from the same decoder layers.

One turn (event) of RxT, arXiv 2510.03561:
    1. generate:    Y_t = Decoder(X_t, memory = STM_{t-1})          (user waits for this only)
    2. encode:      ED_t = Encoder(concat(X_t, Y_t))                 (one ED layer per STM layer)
    3. consolidate: STM_t = MemoryAttention(STM_{t-1}, ED_t)         (in the background)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rxt.attention import KVCache, RotaryEmbedding
from rxt.config import ModelConfig
from rxt.layers import DecoderLayer, EncoderLayer, RMSNorm
from rxt.memory import Consolidation, MemoryAttention, ResidualGate, ShortTermMemory, positions_from_mask

log = logging.getLogger(__name__)

__all__ = ["ReactiveTransformer", "StatelessLM", "load_model", "positions_from_mask"]

MemoryKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: (B, H_kv, S, d_head) x 2


class Decoder(nn.Module):
    """Decoder layers -> final norm. The model owns the (shared) embedding and the tied output head."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, use_memory: bool):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config, rotary, use_memory) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        memory_kv: MemoryKV | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) embedded tokens -> normed hidden states (B, T, D).

        positions: (B, T) or (T,); defaults to cache length + 0..T-1. key_mask: (B, S_total) over
        cached + new tokens, True for real tokens.
        """
        if positions is None:
            start = caches[0].length if caches else 0
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        for i, layer in enumerate(self.layers):
            memory = memory_kv[i] if memory_kv is not None else None
            x = layer(x, positions, key_mask, memory, caches[i] if caches is not None else None)
        return self.norm(x)


class Encoder(nn.Module):
    """Bidirectional memory encoder. Returns every layer's hidden states: the encoded data ED."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config, rotary) for _ in range(config.n_layers))
        self.mlm_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x: (B, T, D) embedded tokens -> L tensors (B, T, D)."""
        if key_mask is not None:
            positions = positions_from_mask(key_mask)
        else:
            positions = torch.arange(x.shape[1], device=x.device)
        states = []
        for layer in self.layers:
            x = layer(x, positions, key_mask)
            states.append(x)  # ED_i
        return states


class PretrainedMixin:
    """save_pretrained / from_pretrained: config.json + model.safetensors (+ tokenizer.json)."""

    model_type: str
    config: ModelConfig
    tokenizer: Any = None

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = directory / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"model_type": self.model_type})
        tmp.replace(directory / "model.safetensors")  # never leave a half-written file behind
        self.config.save(directory / "config.json", model_type=self.model_type)
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Any:
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not an rxt model directory: {name} is missing")
        data = json.loads((directory / "config.json").read_text())
        model_type = data.pop("model_type", None)
        if model_type != cls.model_type:
            raise ValueError(
                f"{directory}/config.json has model_type={model_type!r}, expected {cls.model_type!r}"
            )
        model = cls(ModelConfig.from_dict(data))
        state = load_file(str(directory / "model.safetensors"))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{directory}: weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{directory}: shape mismatch for {name}: file has {tuple(tensor.shape)}, "
                    f"config expects {tuple(expected[name].shape)}"
                )
        model.load_state_dict(state)
        if (directory / "tokenizer.json").is_file():
            from rxt.tokenizer import Tokenizer

            model.tokenizer = Tokenizer.load(directory)
        return model.to(device).eval()

    def identity(self) -> str:
        """A fingerprint of the config and weights: saved state is only valid for the model that made it."""
        digest = hashlib.sha256(self.model_type.encode())
        digest.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DecoderLM(PretrainedMixin, nn.Module):
    """Shared embedding (also the tied output head) + decoder layers: what both model types have."""

    use_memory: bool

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        rotary = RotaryEmbedding(config.d_head, config.max_seq_len, config.rope_theta)
        self.decoder = Decoder(config, rotary, use_memory=self.use_memory)
        self.build_memory_system(config, rotary)
        self.apply(_init_weights)

    def build_memory_system(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        """Stateless models have none."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embedding.weight.T  # tied output head: (B, T, V)

    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the MoE layers (zero without MoE), already scaled by its weight."""
        from rxt.layers import MoEFeedForward

        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoEFeedForward)]
        if not losses:
            return torch.zeros((), device=self.embedding.weight.device)
        return self.config.moe_aux_loss_weight * torch.stack(losses).mean()


class StatelessLM(DecoderLM):
    """The baseline: the same decoder layers without memory cross-attention."""

    model_type = "stateless"
    use_memory = False

    def decode(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits (B, T, V); kwargs as Decoder.forward (positions, key_mask, caches)."""
        return self.logits(self.decoder(self.embedding(input_ids), **kwargs))


class ReactiveTransformer(DecoderLM):
    """RxT: generator-decoder with memory cross-attention, memory encoder, memory attention, STM."""

    model_type = "rxt"
    use_memory = True
    ed_from_generation = False  # ED_t comes from a separate bidirectional encoder: a pass of its own

    def build_memory_system(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        self.encoder = Encoder(config, rotary)
        self.memory_attention = MemoryAttention(config, rotary)
        self.stm = ShortTermMemory(config)

    def initial_memory(self, batch_size: int = 1) -> torch.Tensor:
        """STM_0: (L, B, S, D)."""
        return self.stm.initial(batch_size)

    def project_memory(self, stm: torch.Tensor) -> MemoryKV:
        """Memory cross-attention K/V of every decoder layer, once per turn. stm: (L, B, S, D)."""
        return [layer.project_memory(stm[i]) for i, layer in enumerate(self.decoder.layers)]

    def decode(
        self,
        input_ids: torch.Tensor,
        stm: torch.Tensor | None = None,
        memory_kv: MemoryKV | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits (B, T, V) of the generator-decoder reading memory (stm, or its precomputed K/V)."""
        if memory_kv is None:
            if stm is None:
                raise ValueError("decode needs the memory: pass stm or memory_kv")
            memory_kv = self.project_memory(stm)
        return self.logits(self.decoder(self.embedding(input_ids), memory_kv=memory_kv, **kwargs))

    def encode(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """ED_t: L tensors (B, T, D), the encoder's per-layer states of concat(X_t, Y_t)."""
        return self.encoder(self.embedding(input_ids), key_mask)

    def mlm_logits(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        """Masked-LM logits from the last encoder layer (joint pre-training): (B, T, V)."""
        return self.logits(self.encoder.mlm_norm(encoded[-1]))

    def consolidate(
        self, stm: torch.Tensor, encoded: list[torch.Tensor], ed_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """STM_t = gate(STM_{t-1}, MemAttn(STM_{t-1}, ED_t)): (L, B, S, D)."""
        return self.memory_attention(stm, encoded, ed_mask)

    def update_memory(
        self, stm: torch.Tensor, interaction_ids: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Steps 2-3 of the turn cycle: encode the finished interaction, fold it into memory."""
        return self.consolidate(stm, self.encode(interaction_ids, key_mask), key_mask)


MODEL_TYPES: dict[str, type[DecoderLM]] = {"rxt": ReactiveTransformer, "stateless": StatelessLM}


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", base: str | Path | None = None
) -> Any:
    """Load any rxt model directory, whichever its type: an RxT, a stateless model, or a reactive adapter
    (adapter.json) assembled with its pretrained base (``base``, or where adapter.json says it was)."""
    if (Path(directory) / "adapter.json").is_file():
        from rxt.pretrained.reactive import ReactivePretrained  # (it builds on this module)

        return ReactivePretrained.from_pretrained(directory, base, device)
    if base is not None:
        raise ValueError(f"{directory} is not a reactive adapter directory (no adapter.json): a base applies only to one")
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory} is not an rxt model directory: config.json is missing")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config} has model_type={model_type!r}, expected one of {list(MODEL_TYPES)}")
    return MODEL_TYPES[model_type].from_pretrained(directory, device)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None and not isinstance(module, nn.Embedding):
            nn.init.zeros_(module.bias)
    if isinstance(module, ResidualGate) and module.mode == "content":  # apply() reaches it after its Linears
        nn.init.zeros_(module.read_old.weight)  # a content gate starts as the elementwise one
        nn.init.zeros_(module.read_update.weight)
    if isinstance(module, Consolidation):  # its routing maps start as the identity
        module.reset_routing()
