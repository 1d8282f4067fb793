"""Loss functions of the supervised curriculum (DESIGN.md section 4) and of the stateless baseline.

Every loss returns a *sum* over its loss terms plus named parts for logging; the trainer divides
by the global number of terms, so gradient accumulation and several processes give the same
gradient as one big batch.

    1-2  joint LM / interaction SFT   alpha * L_AR(decoder | noised detached encoder states) + beta * L_MLM
    3    memory-attention pre-train   -cos(MemAttn(STM_{t-1}, ED_t), (1 - w_t) STM_{t-1} + w_t pool(ED_t))
    4    SMAT                         sum_t L_AR(answer_t | STM_{t-1}),  STM_t = update(STM_{t-1}, I_t)
         (optional warm-up: the decoder reads ED_{t-1} itself, so it learns to read encoded turns
         before the memory attention is in the loop)
    base stateless LM                 L_AR(answers | full history)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rxt.config import QUEUE_WRITES
from rxt.model import ReactiveTransformer, StatelessLM
from rxt.training.batches import IGNORE, weighted_count
from rxt.training.recipe import JointLMSpec, MemoryAttentionSpec, SMATSpec

Parts = dict[str, torch.Tensor]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of logits (B, T, V) predicting labels (B, T) shifted by one, each target
    weighted by ``weights`` (B, T) when given."""
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
        reduction="sum" if weights is None else "none",
    )
    return losses if weights is None else (losses * weights[:, 1:].reshape(-1)).sum()


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, spec: JointLMSpec, mask_id: int, vocab: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption: of the chosen positions 80 % -> [MASK], 10 % -> random token, 10 % kept."""
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < spec.mask_prob) & mask
    kind = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(5, vocab, ids.shape, generator=generator)  # never a special token
    corrupted = torch.where(chosen & (kind < 0.8), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, corrupted)
    return corrupted, chosen


def joint_lm_loss(model: ReactiveTransformer, data: dict, spec: JointLMSpec, mask_id: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, Parts]:
    """Stages 1-2. The decoder reads the encoder's states of a masked copy, detached and noised."""
    ids, mask = data["ids"], data["mask"]
    corrupted, chosen = mask_tokens(ids, mask, spec, mask_id, model.config.vocab_size, generator)
    device = next(model.parameters()).device
    ids, mask, corrupted, chosen = ids.to(device), mask.to(device), corrupted.to(device), chosen.to(device)
    encoded = model.encode(corrupted, mask)
    mlm_labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    mlm = F.cross_entropy(model.mlm_logits(encoded).flatten(0, 1).float(), mlm_labels.flatten(), ignore_index=IGNORE,
                          reduction="sum")
    memory = torch.stack([e.detach() for e in encoded])  # (L, B, T, D): any number of memory vectors works
    noise = torch.randn(memory.shape, generator=generator).to(device)
    memory = (memory + spec.memory_noise * memory.std() * noise) * mask[None, :, :, None]
    if spec.memory == "stm":  # fold the states into S slots first: (L, B, S, D)
        memory = model.consolidate(model.initial_memory(ids.shape[0]).to(device), list(memory), mask)
    labels = torch.where(mask, ids, torch.full_like(ids, IGNORE))
    ar = token_loss_sum(model.decode(ids, stm=memory), labels)
    n_targets = mask[:, 1:].sum()
    aux = model.aux_loss() * n_targets
    total = spec.ar_weight * ar + spec.mlm_weight * mlm + aux
    return total, {"ar": ar.detach(), "mlm": mlm.detach()}


def pool_to_slots(encoded: torch.Tensor, mask: torch.Tensor, slots: int) -> torch.Tensor:
    """Resample ED (B, T, D) to (B, S, D): each row's n real tokens are cut into S windows, as
    adaptive average pooling of that row alone would (window s spans positions floor(s*n/S) up to
    ceil((s+1)*n/S)), so a row's target never depends on how far the other rows pad it."""
    n = mask.sum(-1, keepdim=True)[:, None]  # (B, 1, 1)
    position = ((mask.cumsum(-1) - 1) * mask - (~mask).long())[:, None, :]  # (B, 1, T); -1 on padding
    s = torch.arange(slots, device=encoded.device)[None, :, None]  # (1, S, 1)
    start, end = torch.div(s * n, slots, rounding_mode="floor"), -torch.div(-(s + 1) * n, slots, rounding_mode="floor")
    window = ((position >= start) & (position < end)).to(encoded.dtype)  # (B, S, T)
    return window @ encoded / window.sum(-1, keepdim=True).clamp(min=1)


def new_data_weight(spec: MemoryAttentionSpec, step: int, generator: torch.Generator) -> float:
    """w_t: 0.9 on the first update, then start - decay * t, with a little jitter."""
    base = spec.new_weight_first if step == 0 else max(spec.new_weight_min, spec.new_weight_start - spec.new_weight_decay * step)
    jitter = (torch.rand((), generator=generator).item() * 2 - 1) * spec.new_weight_jitter
    return min(0.95, max(0.01, base + jitter))


def memory_attention_loss(model: ReactiveTransformer, turns: list[dict], spec: MemoryAttentionSpec,
                          generator: torch.Generator) -> tuple[torch.Tensor, Parts]:
    """Stage 3. Encoder frozen; the memory attention learns to blend new encoded data into STM."""
    device = next(model.parameters()).device
    batch = turns[0]["ids"].shape[0]
    stm = model.initial_memory(batch).to(device)
    stm = stm + torch.randn(stm.shape, generator=generator).to(device) * model.config.stm_init_std
    total = torch.zeros((), device=device)
    for t, turn in enumerate(turns):
        ids, mask = turn["ids"].to(device), turn["mask"].to(device)
        stm = stm[:, : ids.shape[0]]  # the dialogues still going (longest first)
        with torch.no_grad():
            encoded = model.encode(ids, mask)
        noisy = [e + spec.input_noise * torch.randn(e.shape, generator=generator).to(device) for e in encoded]
        updated = model.consolidate(stm, noisy, mask)  # (L, B, S, D)
        if model.config.memory_write in QUEUE_WRITES:  # the new slots should sum up the turn; the rest is a copy
            k = model.config.write_slots
            written, target = updated[:, :, -k:], torch.stack([pool_to_slots(e, mask, k) for e in encoded])
        else:
            w = new_data_weight(spec, t, generator)
            pooled = torch.stack([pool_to_slots(e, mask, stm.shape[2]) for e in encoded])  # (L, B, S, D)
            written, target = updated, (1 - w) * stm + w * pooled
        target = target + spec.label_noise * target.std() * torch.randn(target.shape, generator=generator).to(device)
        cosine = F.cosine_similarity(written, target.detach(), dim=-1)  # (L, B, S)
        total = total - cosine.sum()
        stm = updated.detach()
    return total, {}


def smat_loss(model: ReactiveTransformer, turns: list[dict], spec: SMATSpec,
              generator: torch.Generator) -> tuple[torch.Tensor, Parts]:
    """Stage 4. Turn t's answer is predicted from STM_{t-1}; the memory chain keeps its gradient,
    so the encoder and memory attention learn to store what later answers need."""
    device = next(model.parameters()).device
    stm = model.initial_memory(turns[0]["ids"].shape[0]).to(device)
    total = torch.zeros((), device=device)
    read_encoder = turns[0].get("read_encoder", False)
    for t, turn in enumerate(turns):
        ids, mask = turn["ids"].to(device), turn["mask"].to(device)
        stm = stm[:, : ids.shape[0]]  # the dialogues still going (longest first): ended ones cost nothing
        total = total + token_loss_sum(model.decode(ids, stm=stm), turn["labels"].to(device), turn["weights"].to(device))
        if t == len(turns) - 1:
            break
        if read_encoder:  # warm-up: the next turn reads this interaction's encoding directly, (L, B, T, D)
            stm = torch.stack(model.encode(ids, mask)) * mask[None, :, :, None]
            continue
        stm = model.update_memory(stm, ids, mask)
        if spec.truncate_every and (t + 1) % spec.truncate_every == 0:
            stm = stm.detach()
    n_targets = sum(weighted_count(turn["labels"], turn["weights"]) for turn in turns)
    return total + model.aux_loss() * n_targets, {}


def baseline_loss(model: StatelessLM, data: dict, generator: torch.Generator) -> tuple[torch.Tensor, Parts]:
    """The stateless LM reads the whole dialogue; loss on every answer token (each sees its full history)."""
    device = next(model.parameters()).device
    logits = model.decode(data["ids"].to(device))  # right padding: causal attention never sees the pads
    labels, weights = data["labels"].to(device), data["weights"].to(device)
    return token_loss_sum(logits, labels, weights) + model.aux_loss() * weighted_count(labels, weights), {}
