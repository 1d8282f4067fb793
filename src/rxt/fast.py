"""The fast inference path: static caches, the memory read prepared in one op, prefill and decode as two graphs.

gpt-fast's recipe, applied to the RxT decoder and its stateless baseline:

- every tensor a turn's decoding writes is allocated up front with a fixed shape (``DecodeState``)
  and written by slot index: nothing is concatenated, nothing is read back to the host;
- masks are built on the device from slot indices and a validity row, with no branch on values;
- the memory cross-attention K/V of every layer come from one batched matmul over the stacked
  projection weights, once per turn: inside the prefill, or (the engine) right after the memory
  update, on its background thread, so the prompt phase does not wait for it;
- the prefill computes logits for the last position only (the one the next token is sampled from);
- prefill and decode are two functions; ``compile=True`` makes each one ``torch.compile`` graph
  (on CUDA with mode "reduce-overhead": CUDA graphs). Caches come in power-of-two capacities, so a
  conversation meets only a few shapes; attention reads only the slots in use, rounded up to
  ``SPAN_STEP`` (a cache kept across turns pays for what it holds, not for its capacity).

The eager model (rxt.model, rxt.attention) stays the reference: tests hold this path to its logits.

Slots and positions: slot j of a cache holds the j-th token written into this state, one index for
the whole batch (as concatenation gave); RoPE positions stay per row (left padding). The query in
slot i sees key j when j <= i and token j is real, or when j == i (a padding query sees itself, so no
row is empty): rxt.attention.build_mask's rule, restated on slots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rxt.generation import Step
from rxt.layers import DecoderLayer, MoEFeedForward

log = logging.getLogger(__name__)

__all__ = ["INFERENCE_MODES", "DecodeState", "FastDecoder", "capacity_for", "fast_decoder"]

# eager: the reference model code (rxt.model); static: this module's path, uncompiled; compiled: torch.compile'd
INFERENCE_MODES = ("eager", "static", "compiled")

MIN_CAPACITY = 64
ANSWER_RESERVE = 64  # slots reserved for the answer when a prompt is planned; the cache grows past it
SPAN_STEP = 64  # attention spans the slots in use rounded up to this: few distinct shapes, little waste


def fast_decoder(model: nn.Module, inference: str) -> FastDecoder | None:
    """The fast path an engine runs for ``inference`` (None: the eager reference)."""
    if inference not in INFERENCE_MODES:
        raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
    return None if inference == "eager" else FastDecoder(model, compile=inference == "compiled")


def capacity_for(n_tokens: int, minimum: int = MIN_CAPACITY) -> int:
    """The cache capacity for ``n_tokens``: the next power of two, at least ``minimum``.

    Few distinct shapes mean few compiled graphs; attention then spans at most twice the slots used.
    """
    return max(minimum, 1 << max(0, n_tokens - 1).bit_length())


@dataclass
class DecodeState:
    """Everything decoding writes, preallocated: the self-attention caches of all layers, which slots
    hold real tokens, and this turn's memory K/V."""

    # one (B, H_kv, C, d_head) tensor per layer, not views of one stacked tensor: a compiled graph that
    # writes into a view rewrites the whole base tensor (a copy of every layer's cache at every step)
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor  # (B, C) bool: a real token was written in this slot
    memory_keys: torch.Tensor | None = None  # (L_mem, B, H_kv, S, d_head)
    memory_values: torch.Tensor | None = None
    length: int = 0  # slots written so far, counted on the host

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes of the keys and values written so far (what an eager KVCache of as many tokens holds)."""
        per_slot = sum(k[:, :, 0].nelement() * k.element_size() for k in self.keys)
        return 2 * per_slot * self.length

    def allocated_bytes(self) -> int:
        """Bytes the preallocated keys and values take, written or not."""
        return 2 * sum(k.nelement() * k.element_size() for k in self.keys)


class FastDecoder:
    """Prefill and decode of an RxT (or stateless) decoder over a ``DecodeState``.

    Works for any model with ``decoder.layers`` of rxt ``DecoderLayer`` and ``decoder.norm``:
    ReactiveTransformer, StatelessLM, and ReactivePretrained (memory in some layers only; its STM
    has one layer per memory layer, in order). Weights are read from the model at every call, except
    the stacked memory projection, rebuilt whenever a source weight changed. The decoder's linear layers
    are called as modules, so LoRA-wrapped ones (rxt.pretrained.lora) run as on the eager path.
    """

    def __init__(
        self, model: nn.Module, compile: bool = False, min_capacity: int = MIN_CAPACITY, span_step: int = SPAN_STEP
    ):
        self.model = model
        language_model = model if hasattr(model, "embedding") else model.base
        self.embedding, self.logits = language_model.embedding, language_model.logits
        self.layers: list[DecoderLayer] = list(model.decoder.layers)
        self.norm = model.decoder.norm
        self.min_capacity, self.span_step = min_capacity, span_step
        self.memory_layers = [i for i, layer in enumerate(self.layers) if layer.memory_cross_attention is not None]
        self.rotary = self.layers[0].self_attention.rotary
        self._memory_weight: torch.Tensor | None = None
        self._weight_versions: tuple[int, ...] = ()
        if self.memory_layers:
            readers = [self.layers[i].memory_cross_attention for i in self.memory_layers]
            if any(r.rope not in ("q", "none") for r in readers):
                raise ValueError("the fast path needs memory keys without RoPE (memory cross-attention rope 'q')")
            if len({self.layers[i].memory_norm.eps for i in self.memory_layers}) != 1:
                raise ValueError("the fast path projects all memory layers at once: their norm eps must agree")
        self.compiled = compile
        self._prefill, self._decode = self._prefill_graph, self._decode_graph
        if compile:
            self._prefill, self._decode = self._compile(self._prefill_graph), self._compile(self._decode_graph)

    # -- host side ---------------------------------------------------------------------------------------
    def _compile(self, fn: Callable) -> Callable:
        device = self.embedding.weight.device
        moe = any(isinstance(m, MoEFeedForward) for m in self.model.modules())
        if moe:  # expert routing picks rows by value: a graph break per MoE layer
            log.warning("MoE layers route by value: the compiled graph breaks at each of them")
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs where there are any
        return torch.compile(fn, fullgraph=not moe, mode=mode)

    def new_state(self, batch_size: int, n_tokens: int) -> DecodeState:
        """An empty state with room for ``n_tokens`` (rounded up to a capacity bucket)."""
        attention = self.layers[0].self_attention
        capacity = capacity_for(n_tokens, self.min_capacity)
        weight = self.embedding.weight
        shape = (batch_size, attention.n_kv_heads, capacity, attention.d_head)

        def zeros() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]

        valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=weight.device)
        self.rotary.ensure(capacity)  # positions never exceed slots: no bounds check inside the graphs
        return DecodeState(zeros(), zeros(), valid)

    def reserve(self, state: DecodeState, n_new: int) -> DecodeState:
        """``state`` if ``n_new`` more tokens fit, else a copy in a larger capacity bucket."""
        needed = state.length + n_new
        if needed <= state.capacity:
            return state
        grown = self.new_state(state.valid.shape[0], needed)
        n = state.length
        for new, old in zip(grown.keys + grown.values, state.keys + state.values, strict=True):
            new[:, :, :n] = old[:, :, :n]
        grown.valid[:, :n] = state.valid[:, :n]
        return replace(grown, memory_keys=state.memory_keys, memory_values=state.memory_values, length=n)

    def step(
        self,
        state: DecodeState,
        stm: torch.Tensor | None = None,
        all_logits: bool = False,
        keep: Callable[[DecodeState], None] | None = None,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Step:
        """A ``generation.Step`` over ``state``: the first call prefills (reading ``stm``, or its projected
        ``memory``), later calls decode. ``keep`` is told of the state whenever it grows into a new one
        (a cache kept across turns)."""
        current, prefilled = state, False

        def step(tokens: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            nonlocal current, prefilled
            n = tokens.shape[1]
            grown = self.reserve(current, n)
            if grown is not current:
                current = grown
                if keep is not None:
                    keep(grown)
            if prefilled:
                return self.decode(current, tokens, positions)
            prefilled = True
            return self.prefill(current, tokens, positions, key_mask[:, -n:], stm, all_logits, memory)

        return step

    @torch.no_grad()
    def prefill(
        self,
        state: DecodeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        stm: torch.Tensor | None = None,
        all_logits: bool = False,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Write ``tokens`` (B, T) into the next T slots; logits (B, 1, V) of the last one (``all_logits``:
        (B, T, V)). positions: (B, T) RoPE positions; valid: (B, T) True for real tokens; stm: the
        memory (L_mem, B, S, D), projected here once for the turn, or ``memory``: its K/V already
        projected (``project_memory``). ``state`` must have room (reserve)."""
        slots = self._slots(state, tokens.shape[1])
        memory_weight = None
        if memory is not None:
            state.memory_keys, state.memory_values = memory
            stm = None  # nothing left to project
        elif stm is not None:
            memory_weight = self._stacked_memory_weight()
            if state.memory_keys is None or state.memory_keys.shape[3] != stm.shape[2]:
                attention = self.layers[self.memory_layers[0]].memory_cross_attention
                shape = (len(self.memory_layers), stm.shape[1], attention.n_kv_heads, stm.shape[2], attention.d_head)
                state.memory_keys = torch.zeros(shape, dtype=stm.dtype, device=stm.device)
                state.memory_values = torch.zeros_like(state.memory_keys)
        logits = self._prefill(tokens, positions, slots, self._span(state, tokens.shape[1]), valid, state.keys,
                               state.values, state.valid, stm, memory_weight, state.memory_keys,
                               state.memory_values, all_logits)
        state.length += tokens.shape[1]
        return logits

    @torch.no_grad()
    def decode(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per row: tokens and positions (B, 1) -> logits (B, 1, V)."""
        slots = self._slots(state, 1)
        logits = self._decode(tokens, positions, slots, self._span(state, 1), state.keys, state.values,
                              state.valid, state.memory_keys, state.memory_values)
        state.length += 1
        return logits

    @torch.no_grad()
    def project_memory(self, stm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory K/V of every memory layer, (L_mem, B, H_kv, S, d_head) x 2, for ``prefill(memory=...)``."""
        attention = self.layers[self.memory_layers[0]].memory_cross_attention
        shape = (len(self.memory_layers), stm.shape[1], attention.n_kv_heads, stm.shape[2], attention.d_head)
        keys = torch.empty(shape, dtype=stm.dtype, device=stm.device)
        values = torch.empty_like(keys)
        self._project_memory(stm, self._stacked_memory_weight(), keys, values)
        return keys, values

    def _slots(self, state: DecodeState, n: int) -> torch.Tensor:
        if state.length + n > state.capacity:
            raise ValueError(f"the decode state holds {state.capacity} slots, {state.length} used: "
                             f"no room for {n} more (call reserve first)")
        return torch.arange(state.length, state.length + n, device=state.valid.device)

    def _span(self, state: DecodeState, n: int) -> int:
        """Slots attention reads once ``n`` more are written: those in use, rounded up to ``span_step``."""
        return min(state.capacity, -(-(state.length + n) // self.span_step) * self.span_step)

    def _stacked_memory_weight(self) -> torch.Tensor:
        """(L_mem, D, 2 H_kv d_head): every memory layer's K and V projections side by side."""
        readers = [self.layers[i].memory_cross_attention for i in self.memory_layers]
        sources = [w for r in readers for w in (r.k_proj.weight, r.v_proj.weight)]
        versions = tuple(w._version for w in sources) + tuple(id(w) for w in sources)
        if versions != self._weight_versions:  # first call, or the weights were trained or loaded since
            stacked = torch.stack([torch.cat([r.k_proj.weight, r.v_proj.weight]).T for r in readers])
            if self._memory_weight is not None and self._memory_weight.shape == stacked.shape:
                self._memory_weight.copy_(stacked)  # same tensor: a compiled graph keeps its input
            else:
                self._memory_weight = stacked.contiguous()
            self._weight_versions = versions
        return self._memory_weight

    # -- device side: the two graphs ---------------------------------------------------------------------
    def _prefill_graph(self, tokens, positions, slots, span: int, valid, keys, values, valid_slots,
                       stm, memory_weight, memory_keys, memory_values, all_logits: bool) -> torch.Tensor:
        if stm is not None:
            self._project_memory(stm, memory_weight, memory_keys, memory_values)
        hidden = self._run(tokens, positions, slots, span, valid, keys, values, valid_slots,
                           memory_keys, memory_values)
        return self.logits(hidden if all_logits else hidden[:, -1:])

    def _decode_graph(self, tokens, positions, slots, span: int, keys, values, valid_slots,
                      memory_keys, memory_values) -> torch.Tensor:
        valid = torch.ones_like(tokens, dtype=torch.bool)
        return self.logits(self._run(tokens, positions, slots, span, valid, keys, values, valid_slots,
                                     memory_keys, memory_values))

    def _project_memory(self, stm, weight, memory_keys, memory_values) -> None:
        """K/V of every memory layer in one bmm: stm (L_mem, B, S, D) -> (L_mem, B, H_kv, S, d_head) x 2.

        As DecoderLayer.project_memory: RMS-normalised slots (no learned weight), no RoPE on keys."""
        n_layers, batch, slots, width = stm.shape
        _, n_kv_heads, _, d_head = memory_keys.shape[1:]
        eps = self.layers[self.memory_layers[0]].memory_norm.eps
        normed = F.rms_norm(stm, (width,), eps=eps)
        kv = torch.bmm(normed.reshape(n_layers, batch * slots, width), weight)  # (L_mem, B*S, 2 H_kv d)
        kv = kv.view(n_layers, batch, slots, 2, n_kv_heads, d_head).permute(3, 0, 1, 4, 2, 5)
        memory_keys.copy_(kv[0])
        memory_values.copy_(kv[1])

    def _run(self, tokens, positions, slots, span, valid, keys, values, valid_slots, memory_keys, memory_values):
        """The decoder layers over the new tokens (B, T): normed hidden states (B, T, D). Attention
        reads the first ``span`` slots (every written one is among them)."""
        valid_slots.index_copy_(1, slots, valid)
        key_slots = torch.arange(span, device=slots.device)
        own = key_slots == slots[:, None]  # (T, span)
        mask = ((key_slots <= slots[:, None]) & (valid_slots[:, None, :span] | own))[:, None]  # (B, 1, T, span)
        x = self.embedding(tokens)
        memory_slot = 0
        for i, layer in enumerate(self.layers):
            x = x + self._self_attention(layer, x, positions, slots, keys[i], values[i], mask, span)
            if layer.memory_cross_attention is not None:
                x = x + self._memory_read(layer, x, positions, memory_keys[memory_slot], memory_values[memory_slot])
                memory_slot += 1
            x = x + layer.ffn(layer.ffn_norm(x))
        return self.norm(x)

    @staticmethod
    def _self_attention(layer, x, positions, slots, keys, values, mask, span) -> torch.Tensor:
        attention = layer.self_attention
        h = layer.self_norm(x)
        q = attention.rotary.rotate(attention._heads(attention.q_proj(h), attention.n_q_heads), positions)
        k = attention.rotary.rotate(attention._heads(attention.k_proj(h), attention.n_kv_heads), positions)
        keys.index_copy_(2, slots, k)  # (B, H_kv, C, d_head): written by slot, never concatenated
        values.index_copy_(2, slots, attention._heads(attention.v_proj(h), attention.n_kv_heads))
        return attention.output(attention.attend(q, keys[:, :, :span], values[:, :, :span], mask))

    @staticmethod
    def _memory_read(layer, x, positions, memory_keys, memory_values) -> torch.Tensor:
        reader = layer.memory_cross_attention
        q = reader._heads(reader.q_proj(layer.memory_norm(x)), reader.n_q_heads)
        if reader.rope == "q":
            q = reader.rotary.rotate(q, positions)
        return reader.output(reader.attend(q, memory_keys, memory_values, None))
