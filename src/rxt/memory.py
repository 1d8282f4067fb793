"""The memory system: Short-Term Memory (STM), residual gates and the memory attention network.

After a turn, the memory encoder turns concat(X_t, Y_t) into encoded data ED_t (one layer per STM
layer). The memory attention network folds it into memory, layer by layer (arXiv 2510.03561):

    S'_i      = pre_step(STM_{t-1})_i                    # variant-specific, see below
    Update_i  = Attn(Q = norm(S'_i), K = V = norm(ED_i))  # RoPE on keys only
    STM_t,i   = (1 - G) * STM_{t-1,i} + G * Update_i      # residual gate, G = sigmoid(.)

Competitive writes (``memory_write: competitive``) replace the softmax over the turn's tokens by one
over the slots, as in Slot Attention (arXiv 2006.15055): each token is split among the slots, a
slot's update is the mean of the tokens it took, and its gate is scaled by how much it took,
1 - exp(-taken). Slots compete for a turn instead of all reading it, so a slot that takes nothing
keeps what it holds.

Queue writes (``memory_write: queue``) fold each turn into ``write_slots`` new slots instead: learned
write queries read the memory (the variant's pre-step) and then the turn, the new slots join the end
of the memory and the oldest as many drop out. No gate: a fact is never written over, only dropped
once stm_slots / write_slots newer turns have been written (the order of the slots is the only
clock; the decoder still reads them without positions).

Consolidating writes (``memory_write: consolidate``) keep that queue in the last stm_slots -
long_term_slots slots and fold the slots it evicts into the first long_term_slots slots instead of
dropping them (see ``Consolidation``): the memory is still one (layers, B, stm_slots, D) tensor, so
its size never changes, and the decoder reads recent and long-term slots alike.

Variants differ only by the pre-step:
    simple                  none
    self                    S' = STM_i + Attn(STM_i <- STM_i)
    interlayer              S' = STM_i + Attn(STM_i <- mean_j STM_j)
    gated_self_interlayer   S' = STM_i + Attn(STM_i <- g * STM_i + (1 - g) * mean_j STM_j)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rxt.attention import Attention, RotaryEmbedding
from rxt.config import QUEUE_WRITES, ModelConfig
from rxt.layers import RMSNorm


def positions_from_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for left- or right-padded rows: each row's real tokens count 0, 1, 2, ..."""
    return (key_mask.long().cumsum(-1) - 1).clamp(min=0)


class ShortTermMemory(nn.Module):
    """Fixed-size memory: (layers, B, slots, D). A buffer, not a parameter; slots carry no position.

    ``initial(batch)`` gives the starting state: a fixed small-normal draw, or a learned one.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        shape = (config.n_layers, config.stm_slots, config.d_model)
        generator = torch.Generator().manual_seed(0)  # the same start state for every session
        init = torch.randn(shape, generator=generator) * config.stm_init_std
        if config.stm_init == "learned":
            self.init = nn.Parameter(init)
        else:
            self.register_buffer("init", init)

    def initial(self, batch_size: int = 1) -> torch.Tensor:
        return self.init[:, None].expand(-1, batch_size, -1, -1).clone()  # (L, B, S, D)


class ResidualGate(nn.Module):
    """STM_t = (1 - G) * STM_{t-1} + G * Update (sigmoid); tanh: (1 - G) * old + (1 + G) * new; none: old + new.

    G depends on (slots only, never on the batch):
        static       G = act(w)                                 w per slot
        elementwise  G = act(w * mean_D(STM + Update) + b)      w, b per slot
        linear       G = act(Linear_{S->S}(mean_D(STM + Update)))
        content      G = act(w * mean_D(STM + Update) + b + W_s STM + W_u Update)   one G per element

    The first three give one G per slot, blind to what the slot holds and what the turn says (a
    trained nano model's gates barely move from turn to turn). ``content`` adds two D->D maps, so a
    slot can keep what it holds and take in what matters, dimension by dimension. They start at
    zero: a content gate starts as the elementwise one, and an elementwise model can grow one.
    """

    def __init__(self, slots: int, mode: str, activation: str, dim: int = 0):
        super().__init__()
        self.mode, self.activation = mode, activation
        gated = activation != "none"  # "none" just adds the update: nothing to learn
        per_slot = gated and mode != "linear"  # only the parameters the mode reads, so each gets a gradient
        self.weight = nn.Parameter(torch.full((slots, 1), 0.0 if mode == "static" else 1.0)) if per_slot else None
        self.bias = nn.Parameter(torch.zeros(slots, 1)) if per_slot else None
        self.linear = nn.Linear(slots, slots) if gated and mode == "linear" else None
        if gated and mode == "content":
            if dim < 1:
                raise ValueError(f"a content gate reads the slots: give their size, dim >= 1 (got {dim})")
            self.read_old = nn.Linear(dim, dim, bias=False)
            self.read_update = nn.Linear(dim, dim, bias=False)

    def gate_logits(self, old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.mode == "static":
            return (self.weight + self.bias).expand_as(old[..., :1])  # (B, S, 1)
        summary = (old + update).mean(-1, keepdim=True)  # (B, S, 1)
        if self.mode == "elementwise":
            return self.weight * summary + self.bias
        if self.mode == "content":
            return self.weight * summary + self.bias + self.read_old(old) + self.read_update(update)
        return self.linear(summary.squeeze(-1)).unsqueeze(-1)

    def forward(self, old: torch.Tensor, update: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
        """share: (B, S, 1) in [0, 1], scales how much each slot is written (competitive writes)."""
        if self.activation == "none":
            return old + (update if share is None else share * update)
        logits = self.gate_logits(old, update)
        if self.activation == "sigmoid":
            g = torch.sigmoid(logits) * (1 if share is None else share)
            return (1 - g) * old + g * update
        g = torch.tanh(logits)
        if share is not None:  # tanh: G in (-1, 1); a slot that takes nothing stays as it was
            return old + share * ((1 + g) * update - g * old)
        return (1 - g) * old + (1 + g) * update


class MemoryAttentionLayer(nn.Module):
    """Updates one STM layer from one ED layer; the variant picks the pre-step's keys/values."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        c = config
        self.variant, self.write = c.memory_attention, c.memory_write
        heads = (c.d_model, c.n_heads, c.cross_n_q_heads, c.cross_n_kv_heads)
        if self.variant != "simple":
            self.pre_norm = RMSNorm(c.d_model, c.norm_eps)
            self.pre_attention = Attention(*heads, rope="none", impl=c.attn_impl)
        if self.variant == "gated_self_interlayer":
            self.mix_gate = nn.Parameter(torch.zeros(c.stm_slots, 1))
        self.stm_norm = RMSNorm(c.d_model, c.norm_eps)
        self.ed_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attention = Attention(*heads, rope="k", impl=c.attn_impl, rotary=rotary)
        if self.write in QUEUE_WRITES:  # no gate: new slots replace the oldest ones whole
            self.write_queries = nn.Parameter(torch.randn(c.write_slots, c.d_model) * c.stm_init_std)
            self.long_term_slots = c.long_term_slots
            if self.write == "consolidate":
                self.consolidation = Consolidation(c)
        else:
            self.gate = ResidualGate(c.stm_slots, c.gate_mode, c.gate_activation, c.d_model)

    def pre_step_source(self, stm: torch.Tensor, stm_mean: torch.Tensor) -> torch.Tensor:
        if self.variant == "self":
            return stm
        if self.variant == "interlayer":
            return stm_mean
        g = torch.sigmoid(self.mix_gate)
        return g * stm + (1 - g) * stm_mean

    def forward(
        self, stm: torch.Tensor, stm_mean: torch.Tensor, ed: torch.Tensor, ed_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """stm: (B, S, D) this layer's memory; stm_mean: (B, S, D) mean over layers; ed: (B, T, D)."""
        query = self.write_queries.expand(stm.shape[0], -1, -1) if self.write in QUEUE_WRITES else stm
        if self.variant != "simple":
            source = self.pre_norm(self.pre_step_source(stm, stm_mean))
            query = query + self.pre_attention(self.pre_norm(query), source)
        ed_positions = positions_from_mask(ed_mask) if ed_mask is not None else None  # padding-proof RoPE
        if self.write == "competitive":
            update, taken = competitive_write(self.attention, self.stm_norm(query), self.ed_norm(ed), ed_positions, ed_mask)
            return self.gate(stm, update, share=1 - torch.exp(-taken))
        update = self.attention(
            self.stm_norm(query), self.ed_norm(ed), context_positions=ed_positions, key_mask=ed_mask
        )
        if self.write in QUEUE_WRITES:  # the turn's new slots go to the end, the oldest as many leave
            long_term, queue = stm[:, : self.long_term_slots], stm[:, self.long_term_slots :]
            evicted, kept = queue[:, : query.shape[1]], queue[:, query.shape[1] :]
            if self.write == "consolidate":
                long_term = self.consolidation(long_term, evicted)
            return torch.cat([long_term, kept, query + update], dim=1)
        return self.gate(stm, update)


class Consolidation(nn.Module):
    """Folds the slots a queue evicts, E (B, w, D), into K long-term slots M (B, K, D):

        a_kj     = softmax_k((A_k + W_q norm(M_k)) . W_e norm(E_j) / sqrt(D))   each evicted slot split among M
        taken_k  = sum_j a_kj                                                  how much slot k takes
        U_k      = sum_j a_kj E_j / taken_k                                     the mean of what it took
        M'_k     = (1 - g_k) M_k + g_k U_k,   g_k = min(taken_k, 1) * sigmoid(content gate(M_k, U_k))

    The update is the evicted slots themselves, not a projection of them: a slot taken whole with an
    open gate is moved, not rewritten, so the decoder reads it as it read it in the queue. A_k is a
    learned address per slot (a random one at the start), so facts of a kind can find one place and a
    new value of the fact can replace the old one there; W_q, W_e start as the identity. The gate is
    the residual gate's ``content`` mode (one g per element), a learned stand-in for a surprise
    signal (Titans, arXiv 2501.00663): it can shut for what is not worth keeping. A slot that takes
    nothing keeps what it holds, so a fact outlives the queue until another write lands on its slot.
    Unlike a compressive memory (arXiv 1911.05507) nothing is pooled on a schedule; unlike RMT
    (arXiv 2207.06881) the long-term slots are written only through this gate, never rewritten whole.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        k, d = config.long_term_slots, config.d_model
        generator = torch.Generator().manual_seed(1)
        # (K, D); std 3 gives address scores of std 3: an evicted slot goes mostly to one or two slots
        self.address = nn.Parameter(3.0 * torch.randn(k, d, generator=generator))
        self.slot_norm = RMSNorm(d, config.norm_eps)
        self.evicted_norm = RMSNorm(d, config.norm_eps)
        self.route_query = nn.Linear(d, d, bias=False)
        self.route_key = nn.Linear(d, d, bias=False)
        self.gate = ResidualGate(k, "content", "sigmoid", d)
        self.reset_routing()

    def reset_routing(self) -> None:
        """W_q, W_e = I (the model's weight init would make them near zero: routing by address alone)."""
        with torch.no_grad():
            self.route_query.weight.copy_(torch.eye(self.route_query.weight.shape[0]))
            self.route_key.weight.copy_(torch.eye(self.route_key.weight.shape[0]))

    def forward(self, long_term: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
        """long_term: (B, K, D); evicted: (B, w, D) -> the new long-term slots (B, K, D)."""
        query = self.address + self.route_query(self.slot_norm(long_term))  # (B, K, D)
        key = self.route_key(self.evicted_norm(evicted))  # (B, w, D)
        scores = query.float() @ key.float().transpose(-2, -1) / math.sqrt(key.shape[-1])  # (B, K, w)
        weights = scores.softmax(dim=-2)  # each evicted slot splits itself among the long-term slots
        taken = weights.sum(-1, keepdim=True)  # (B, K, 1)
        update = (weights / (taken + 1e-6)) @ evicted.float()  # (B, K, D)
        return self.gate(long_term, update.type_as(long_term), share=taken.clamp(max=1).type_as(long_term))


def competitive_write(
    attention: Attention,
    slots: torch.Tensor,
    ed: torch.Tensor,
    ed_positions: torch.Tensor | None,
    ed_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots (B, S, D) compete for the tokens of ED (B, T, D) with the attention's projections.

    Returns the update (B, S, D), each slot's mean of the tokens it took, and taken (B, S, 1), how
    many tokens' worth it took (mean over heads; all slots together take T).
    """
    q = attention._heads(attention.q_proj(slots), attention.n_q_heads)  # (B, H_q, S, d)
    k, v = attention.project_kv(ed, ed_positions)  # (B, H_kv, T, d), keys rotated
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)
    weights = scores.softmax(dim=-2)  # each token splits itself among the slots
    if ed_mask is not None:
        weights = weights * ed_mask[:, None, None, :].to(weights.dtype)  # padding gives nothing
    taken = weights.sum(-1, keepdim=True)  # (B, H, S, 1)
    out = (weights / (taken + 1e-6)) @ v.float()  # (B, H, S, d): the mean of what the slot took
    b, h, s, d = out.shape
    update = attention.o_proj(out.type_as(slots).transpose(1, 2).reshape(b, s, h * d))
    return update, taken.mean(1).type_as(slots)


class MemoryAttention(nn.Module):
    """The memory attention network: one MemoryAttentionLayer per STM layer."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.layers = nn.ModuleList(MemoryAttentionLayer(config, rotary) for _ in range(config.n_layers))

    def forward(
        self, stm: torch.Tensor, encoded: list[torch.Tensor], ed_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """stm: (L, B, S, D); encoded: L tensors (B, T, D); ed_mask: (B, T) True for real tokens."""
        stm_mean = stm.mean(0)  # (B, S, D)
        return torch.stack([layer(stm[i], stm_mean, encoded[i], ed_mask) for i, layer in enumerate(self.layers)])
