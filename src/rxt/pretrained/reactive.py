"""A pretrained decoder made reactive: memory cross-attention in some of its layers, a memory path, an STM.

The base is an imported ``StatelessLM`` (e.g. SmolLM2-135M-Instruct, see docs/import.md). Its weights
stay frozen; what is new is small and ships as an adapter that names its base by sha256:

    decoder layer l in memory_layers:  x = x + SelfAttn(norm(x))          (pretrained, frozen)
                                       x = x + MemCrossAttn(norm(x), STM_i) (new; W_O = 0 at the start)
                                       x = x + FFN(norm(x))                (pretrained, frozen)
    encode:       ED_i = the decoder's own hidden state after layer memory_layers[i] over concat(X_t, Y_t)
    consolidate:  STM_t = MemoryAttention(STM_{t-1}, ED_t)                (rxt.memory, SQA heads)

The cross-attention's output projection starts at zero, so before any training the model adds exactly
0.0 to the residual stream: its logits are the base model's, bit for bit, whatever the memory holds.
Optionally (``lora_rank`` > 0) LoRA wraps some of the base's linear layers (rxt.pretrained.lora); its B
starts at zero, so the same holds, and its weights ship in the adapter while the base's stay frozen.
The memory encoder is the decoder itself (docs/reactive-pretrained.md argues the choice with
measurements): in training, the teacher-forced pass over a turn gives both its loss and its ED.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rxt.attention import Attention, KVCache
from rxt.layers import RMSNorm
from rxt.memory import MemoryAttention, ShortTermMemory, positions_from_mask
from rxt.model import StatelessLM, _init_weights
from rxt.pretrained.kv_memory import KEEP_POLICIES, KVMemory, KVRead
from rxt.pretrained.lora import add_lora
from rxt.pretrained.reactive_config import MEMORY_READS, ReactiveConfig
from rxt.pretrained.salience import SalienceGate

log = logging.getLogger(__name__)

__all__ = ["ReactiveConfig", "ReactivePretrained", "answer_loss", "base_sha256", "dialogue_loss"]

ADAPTER_FORMAT = 1
ADAPTER_WEIGHTS, ADAPTER_META = "adapter.safetensors", "adapter.json"
MemoryKV = list[tuple[torch.Tensor, torch.Tensor] | None]  # per decoder layer; None where it has no memory


class ReactivePretrained(nn.Module):
    """RxT around a frozen pretrained StatelessLM. Has the interface ReactiveEngine drives
    (initial_memory, project_memory, decode, update_memory, identity), so `rxt chat` can run it.

    The base is taken over: the chosen decoder layers gain the memory cross-attention sub-block that
    rxt's DecoderLayer already has (memory_norm + memory_cross_attention, queries rotated only).
    """

    model_type = "rxt-pretrained"

    def __init__(self, base: StatelessLM, config: ReactiveConfig | None = None, base_sha256: str = ""):
        super().__init__()
        config = config or ReactiveConfig()
        n_layers = base.config.n_layers
        kv = config.memory_write == "kv"  # every layer reads its own keys and values: memory_layers unused
        if not kv and (not config.memory_layers or any(not 0 <= i < n_layers for i in config.memory_layers)):
            raise ValueError(f"memory_layers must be a non-empty list of layers in 0..{n_layers - 1}, "
                             f"got {config.memory_layers}")
        if not kv and sorted(set(config.memory_layers)) != list(config.memory_layers):
            raise ValueError(f"memory_layers must be increasing and distinct, got {config.memory_layers}")
        if config.memory_read not in MEMORY_READS:
            raise ValueError(f"memory_read must be one of {MEMORY_READS}, got {config.memory_read!r}")
        if config.keep not in KEEP_POLICIES:
            raise ValueError(f"keep must be one of {KEEP_POLICIES}, got {config.keep!r}")
        salience = kv and config.keep == "salience"
        if salience and config.salience_layer is None:
            config = dataclasses.replace(config, salience_layer=4 * n_layers // 5)
        if salience and not 0 <= config.salience_layer < n_layers:
            raise ValueError(f"salience_layer must be a layer in 0..{n_layers - 1}, got {config.salience_layer}")
        if kv:
            preamble = len(base.tokenizer.preamble()) if base.tokenizer is not None else 0
            if config.stm_slots <= preamble:
                raise ValueError(f"a kv memory needs stm_slots above the {preamble} tokens of the template's "
                                 f"preamble, which it always keeps; got {config.stm_slots}")
        # the base's ModelConfig as `config` (context length, vocabulary: what engines and servers read), the
        # reactive additions as `reactive`
        self.config, self.reactive, self.base_sha256 = base.config, config, base_sha256
        self.base_dir = ""  # where the base was loaded from, if it was (recorded in adapter.json)
        self.memory_config = config.memory_config(base.config)
        self.base_keys = frozenset(f"base.{name}" for name in base.state_dict())
        base.requires_grad_(False)
        self.base = base
        self.tokenizer = base.tokenizer
        rotary = base.decoder.layers[0].self_attention.rotary
        c = self.memory_config
        # a kv memory reads the base's own keys and values (rxt.pretrained.kv_memory): nothing is added
        self.kv_memory = KVMemory(self) if kv else None
        attention = base.decoder.layers[0].self_attention
        # keep "salience": the gate that picks the messages worth keeping (fitted by `rxt wrap`)
        self.salience = SalienceGate(2 * attention.n_kv_heads * attention.d_head, config.salience_layer) \
            if salience else None
        for i in [] if kv else config.memory_layers:
            layer = base.decoder.layers[i]
            layer.memory_norm = RMSNorm(c.d_model, c.norm_eps)
            if config.memory_read == "base":  # the layer's own self-attention's heads, no RoPE
                layer.memory_cross_attention = Attention(c.d_model, c.n_heads, c.n_q_heads, c.n_kv_heads, "none",
                                                         c.attn_impl)
            else:
                layer.memory_cross_attention = Attention(
                    c.d_model, c.n_heads, c.cross_n_q_heads, c.cross_n_kv_heads, "q", c.attn_impl, rotary
                )
        # a "tokens" memory keeps the turn's states verbatim: nothing to learn on the write side
        self.memory_attention = (
            None if config.memory_write in ("tokens", "kv") else MemoryAttention(c, rotary)
        )
        self.stm = None if kv else ShortTermMemory(c)
        for module in self.new_modules():
            module.apply(_init_weights)
        if not kv:
            for i in config.memory_layers:  # the model's output is exactly the base's until this is trained
                nn.init.zeros_(base.decoder.layers[i].memory_cross_attention.o_proj.weight)
            self.init_norms_from_base()
            if config.memory_read == "base":
                self.init_read_from_base()
        if config.lora_rank:
            self.add_lora()

    @torch.no_grad()
    def init_norms_from_base(self) -> None:
        """Start each memory layer's new RMSNorms (the cross-attention's queries, the memory attention's
        ED) as that layer's pretrained FFN norm.

        A few of the residual stream's dimensions carry most of its energy (SmolLM2: 5 of 576 hold half
        or more); through a unit-weight norm every token looks much alike to the new attention (mean
        cosine between a turn's tokens about 0.5). The FFN norm's weights scale those dimensions down
        (about 0.3); the next layer's attention-input norm does not (experiments/reactive_pretrained).
        """
        layers = self.decoder.layers
        for slot, i in enumerate(self.reactive.memory_layers):
            layers[i].memory_norm.weight.copy_(layers[i].ffn_norm.weight)
            if self.memory_attention is not None:
                self.memory_attention.layers[slot].ed_norm.weight.copy_(layers[i].ffn_norm.weight)

    @torch.no_grad()
    def init_read_from_base(self) -> None:
        """Each memory cross-attention's queries, keys and values become its layer's self-attention's: the
        query norm is the layer's attention-input norm; the slots are RMS-normalised without a weight
        (project_memory), so that norm's weight is folded into the key and value projections. W_O stays
        zero: what the read finds is only written into the residual stream once training moves it."""
        layers = self.decoder.layers
        for i in self.reactive.memory_layers:
            read, own, norm = layers[i].memory_cross_attention, layers[i].self_attention, layers[i].self_norm
            layers[i].memory_norm.weight.copy_(norm.weight)
            read.q_proj.weight.copy_(own.q_proj.weight)
            read.k_proj.weight.copy_(own.k_proj.weight * norm.weight)
            read.v_proj.weight.copy_(own.v_proj.weight * norm.weight)

    def add_lora(self) -> None:
        """Wrap the configured linear layers of the base in LoRALinear (after the base's keys were recorded
        and its weights frozen: the LoRA weights are the adapter's, trainable)."""
        c = self.reactive
        if c.lora_rank < 0 or not c.lora_alpha > 0:
            raise ValueError(f"lora_rank must be >= 0 and lora_alpha positive, got {c.lora_rank} and {c.lora_alpha}")
        layers = self.decoder.layers
        add_lora(layers, c.lora_targets, list(range(len(layers))) if c.lora_layers is None else c.lora_layers,
                 c.lora_rank, c.lora_alpha)

    def new_modules(self) -> list[nn.Module]:
        if self.kv_memory:
            return []
        layers = self.base.decoder.layers
        readers = [layers[i].memory_cross_attention for i in self.reactive.memory_layers]
        norms = [layers[i].memory_norm for i in self.reactive.memory_layers]
        return [*readers, *norms] + ([self.memory_attention] if self.memory_attention is not None else [])

    @property
    def decoder(self) -> nn.Module:
        return self.base.decoder

    @property
    def embedding(self) -> nn.Embedding:
        return self.base.embedding

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's tied output head: (B, T, D) normed states -> (B, T, V)."""
        return self.base.logits(hidden)

    # -- the turn cycle ------------------------------------------------------------------------------
    @property
    def ed_from_generation(self) -> bool:
        """ED_t are the decoder's own states over the turn: generation computes them, and ReactiveEngine
        writes the memory from the ones it kept (rxt.turn_states) instead of re-running the turn. A kv
        memory takes the turn's keys and values from generation's cache (``write_kept``)."""
        return True

    @property
    def needs_surprisal(self) -> bool:
        """The "surprise" policy ranks the user's tokens by their surprisal: generation keeps the prefill's."""
        return self.kv_memory is not None and self.reactive.keep == "surprise"

    def initial_memory(self, batch_size: int = 1) -> torch.Tensor:
        """STM_0: (L_mem, B, S, D), one layer per memory layer; for a kv memory (L, B, S, 2*H_kv*d_head + 3),
        one layer per decoder layer, every slot empty but the preamble's (``KVMemory.sink``)."""
        if self.kv_memory:
            return self.kv_memory.initial(batch_size)
        return self.stm.initial(batch_size)

    def project_memory(self, stm: torch.Tensor) -> MemoryKV | KVRead:
        """Cross-attention K/V of every decoder layer (None where it reads no memory), once per turn; for
        a kv memory, its slots' keys (rotated at 0..n-1) and values for every layer's self-attention."""
        if self.kv_memory:
            return self.kv_memory.read(stm)
        kv: MemoryKV = [None] * len(self.decoder.layers)
        for slot, i in enumerate(self.reactive.memory_layers):
            kv[i] = self.decoder.layers[i].project_memory(stm[slot])
        return kv

    def run(
        self,
        input_ids: torch.Tensor,
        memory_kv: MemoryKV,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder over input_ids (B, T): normed final states (B, T, D) and the hidden states after
        each memory layer (L_mem tensors (B, T, D)), which are the turn's encoded data ED."""
        x = self.base.embedding(input_ids)
        if isinstance(memory_kv, KVRead):
            memory_kv, positions, key_mask, caches = self.kv_memory.read_into(memory_kv, x, positions, key_mask,
                                                                              caches)
        if positions is None:
            start = caches[0].length if caches else 0
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        states = []
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, positions, key_mask, memory_kv[i], caches[i] if caches is not None else None)
            if memory_kv[i] is not None:
                states.append(x)
        return self.decoder.norm(x), states

    def decode(
        self,
        input_ids: torch.Tensor,
        stm: torch.Tensor | None = None,
        memory_kv: MemoryKV | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits (B, T, V) reading the memory (stm, or its precomputed K/V); kwargs as Decoder.forward."""
        if memory_kv is None:
            if stm is None:
                raise ValueError("decode needs the memory: pass stm or memory_kv")
            memory_kv = self.project_memory(stm)
        return self.logits(self.run(input_ids, memory_kv, **kwargs)[0])

    def read_turn(
        self, input_ids: torch.Tensor, stm: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One teacher-forced pass over a whole interaction: its logits (B, T, V) and its ED."""
        positions = positions_from_mask(key_mask) if key_mask is not None else None
        hidden, encoded = self.run(input_ids, self.project_memory(stm), positions, key_mask)
        return self.logits(hidden), encoded

    def encode(
        self, input_ids: torch.Tensor, stm: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """ED_t: the decoder's hidden states of concat(X_t, Y_t) after each memory layer, reading STM_{t-1}
        as generation did (no output head: the logits are not needed)."""
        positions = positions_from_mask(key_mask) if key_mask is not None else None
        return self.run(input_ids, self.project_memory(stm), positions, key_mask)[1]

    def consolidate(
        self,
        stm: torch.Tensor,
        encoded: list[torch.Tensor],
        ed_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """STM_t = MemoryAttention(STM_{t-1}, ED_t): (L_mem, B, S, D). With ``ed_embeddings`` the turn's
        token embeddings (``input_ids``, (B, T)) follow its states in every layer's ED, under the same mask."""
        if self.reactive.ed_embeddings:
            if input_ids is None:
                raise ValueError("this model writes its memory from the turn's token embeddings too: pass input_ids")
            tokens = self.base.embedding(input_ids)
            encoded = [torch.cat([states, tokens], dim=1) for states in encoded]
            if ed_mask is None:
                ed_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            ed_mask = torch.cat([ed_mask, ed_mask], dim=1)
        if self.memory_attention is None:
            return keep_tokens(stm, encoded, ed_mask)
        return self.memory_attention(stm, encoded, ed_mask)

    def turn_mask(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) True on the tokens the memory is written from: the turn's, not the padding and not the
        template's preamble (the same system message every turn; it would only dilute the write)."""
        if key_mask is None:
            key_mask = torch.ones_like(input_ids, dtype=torch.bool)
        preamble = len(self.turn_preamble())
        return key_mask.bool() & (positions_from_mask(key_mask) >= preamble)

    def turn_preamble(self) -> list[int]:
        """What opens each turn before the user's message (ReactiveEngine.turn_prompt): the template's
        preamble (a system message), every turn as every conversation the base was trained on opened with
        it. A kv memory holds it once, at its front, where the base saw it (``KVMemory.sink``): its turns open
        with the message."""
        if self.tokenizer is None or self.kv_memory:
            return []
        return self.tokenizer.preamble()

    def update_memory(
        self, stm: torch.Tensor, interaction_ids: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Steps 2-3 of the turn cycle by a second pass over the turn: the reference for what ReactiveEngine
        writes from the states generation kept (rxt.turn_states.write_memory), and its path for turns it
        did not generate (``observe``)."""
        if self.kv_memory:
            return self.kv_memory.write(stm, interaction_ids, key_mask)
        encoded = self.encode(interaction_ids, stm, key_mask)
        return self.consolidate(stm, encoded, self.turn_mask(interaction_ids, key_mask), interaction_ids)

    def interaction(self, query: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One turn as ReactiveEngine feeds it (the template's preamble, the prompt, the answer, the
        closing): input_ids (1, T) and answer_mask (1, T), True on the answer and closing tokens."""
        tok = self.tokenizer
        prompt = self.turn_preamble() + tok.prompt(query)
        ids = prompt + tok.answer(answer) + tok.closing()
        return torch.tensor([ids]), torch.tensor([[i >= len(prompt) for i in range(len(ids))]])

    # -- the adapter ---------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not the base's: cross-attention, memory attention, STM init, LoRA (if on)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k not in self.base_keys}

    def save_adapter(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        """adapter.safetensors (the new weights only, stored as ``dtype``; they load back into fp32) +
        adapter.json (the reactive config and the base's sha256). bf16 halves the file: SmolLM2's adapter
        with memory in every 3rd layer is 18.5 MB instead of 37 MB."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in self.adapter_state_dict().items()}
        save_file(state, str(tmp), metadata={"model_type": self.model_type})
        tmp.replace(directory / ADAPTER_WEIGHTS)
        meta = {
            "format": ADAPTER_FORMAT,
            "model_type": self.model_type,
            "base_sha256": self.base_sha256,
            "base": self.base_dir,  # where the base was: the default place to look for it when loading
            "reactive": self.reactive.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(t.numel() for t in self.adapter_state_dict().values()),
        }
        (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls, adapter_dir: str | Path, base_dir: str | Path | None = None, device: str | torch.device = "cpu"
    ) -> ReactivePretrained:
        """Assemble base + adapter; refuse a base whose sha256 is not the one the adapter names. Without
        ``base_dir``, the base is looked for where adapter.json says it was when the adapter was saved."""
        adapter_dir = Path(adapter_dir)
        for name in (ADAPTER_META, ADAPTER_WEIGHTS):
            if not (adapter_dir / name).is_file():
                raise FileNotFoundError(f"{adapter_dir} is not a reactive adapter directory: {name} is missing")
        meta = json.loads((adapter_dir / ADAPTER_META).read_text())
        if meta.get("format") != ADAPTER_FORMAT or meta.get("model_type") != cls.model_type:
            raise ValueError(f"{adapter_dir}/{ADAPTER_META}: unsupported adapter (format {meta.get('format')!r}, "
                             f"model_type {meta.get('model_type')!r})")
        if base_dir is None:
            base_dir = meta.get("base") or ""
            if not base_dir or not (Path(base_dir) / "config.json").is_file():
                raise FileNotFoundError(f"{adapter_dir}: its base model is not at {base_dir!r}; give the base directory "
                                        f"(--base DIR: the model whose sha256 is {meta['base_sha256']})")
        base_dir = Path(base_dir)
        found = base_sha256(base_dir)
        if found != meta["base_sha256"]:
            raise ValueError(f"{base_dir} is not this adapter's base: the adapter names base sha256 "
                             f"{meta['base_sha256']}, the directory has {found}")
        model = cls(StatelessLM.from_pretrained(base_dir), ReactiveConfig.from_dict(meta["reactive"]), found)
        model.base_dir = str(base_dir)
        state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
        expected = model.adapter_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{adapter_dir}: adapter does not fit its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{adapter_dir}: shape mismatch for {name}: file {tuple(tensor.shape)}, "
                                 f"config {tuple(expected[name].shape)}")
        model.load_state_dict(state, strict=False)  # copied into the fp32 parameters
        if model.kv_memory:
            model.kv_memory.refresh()  # its preamble's keys and values come from the weights just loaded
        return model.to(device).eval()

    @classmethod
    def from_base(cls, base_dir: str | Path, config: ReactiveConfig | None = None) -> ReactivePretrained:
        """A fresh (untrained) reactive model around the StatelessLM directory ``base_dir``."""
        model = cls(StatelessLM.from_pretrained(base_dir), config, base_sha256(base_dir))
        model.base_dir = str(base_dir)
        return model

    def identity(self) -> str:
        """The base's sha256 and the adapter's weights: sessions are only valid for the model that made them."""
        digest = hashlib.sha256(self.model_type.encode())
        digest.update(self.base_sha256.encode())
        digest.update(json.dumps(self.reactive.identity_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.adapter_state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.float().numpy().tobytes())
        return digest.hexdigest()[:16]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def keep_tokens(stm: torch.Tensor, encoded: list[torch.Tensor], ed_mask: torch.Tensor | None) -> torch.Tensor:
    """The "tokens" write: each memory layer's slots followed by the turn's states under ``ed_mask``, the
    last S kept. stm: (L, B, S, D); encoded: L tensors (B, T, D); ed_mask: (B, T), True on kept tokens."""
    states = torch.stack(list(encoded))  # (L, B, T, D)
    slots = stm.shape[2]
    if ed_mask is None:
        return torch.cat([stm, states], dim=2)[:, :, -slots:]
    rows = []
    for b in range(stm.shape[1]):  # rows keep different numbers of tokens
        rows.append(torch.cat([stm[:, b], states[:, b, ed_mask[b]]], dim=1)[:, -slots:])
    return torch.stack(rows, dim=1)


def base_sha256(base_dir: str | Path) -> str:
    """A base model directory's identity: the sha256 its import.json records for the file it was imported
    from (rxt import gguf writes it), else the sha256 of its model.safetensors."""
    base_dir = Path(base_dir)
    record = base_dir / "import.json"
    if record.is_file():
        sha = json.loads(record.read_text()).get("sha256")
        if sha:
            return str(sha)
    weights = base_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{base_dir} is not an rxt model directory: model.safetensors is missing")
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens only. answer_mask: (B, T) True where a token is
    part of the answer (its prediction from the previous position counts)."""
    targets = input_ids[:, 1:].masked_fill(~answer_mask[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def dialogue_loss(
    model: ReactivePretrained, turns: list[tuple[torch.Tensor, torch.Tensor]], detach_memory: bool = False
) -> torch.Tensor:
    """Supervised memory-aware loss over one dialogue (batch of B dialogues of the same turn count):
    turns are (input_ids (B, T_t), answer_mask (B, T_t)) of concat(X_t, Y_t). Each turn's single pass
    gives its loss and its ED; the memory it writes is what the next turn reads."""
    stm = model.initial_memory(turns[0][0].shape[0]).to(turns[0][0].device)
    losses = []
    for input_ids, answer_mask in turns:
        logits, encoded = model.read_turn(input_ids, stm)
        losses.append(answer_loss(logits, input_ids, answer_mask))
        stm = model.consolidate(stm, encoded, model.turn_mask(input_ids), input_ids)
        if detach_memory:
            stm = stm.detach()
    return torch.stack(losses).mean()
