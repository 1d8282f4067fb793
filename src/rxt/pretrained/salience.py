"""The gate of the kv memory's "salience" keep policy: does a user's message tell something to remember?

What a kv memory should keep longest is what the user will ask about later: a name, a town, a food, a
job told in passing, not the small talk around it. The model's surprise at a message does not tell them
apart (docs/kv-memory.md: a real name is no more surprising than "My cat knocked a glass off the
table"), but its own states do. The gate is a logistic regression over one vector the decoder computes
anyway and the memory stores: the key (before RoPE) and value, at one layer, of the token that closes
the user's message (ChatML's ``<|im_end|>``), where the model has read the whole message:

    salient(message) = w . [k_l ; v_l](closing token) + b > 0

Nothing extra runs at chat time: the write already holds those keys and values. A salient message's
tokens outrank every other message's; among equals the newer stays (``kv_memory.token_scores``).

The gate is fitted by ``rxt wrap --keep salience`` (``fit_gate``) on conversations it reads as in a
chat, each message after the memory of the turns before it: the training generator's fact statements
and updates (1) against its small talk and its questions, and the chitchat corpus's users' messages (0;
real people's messages, so the gate does not fire on every first-person sentence). Fitted on messages
read alone, a gate fires on small talk once a conversation is under way: the closing token's key and
value hold the context as well as the message. An unfitted gate (zero weights) says no to every message: the policy
is then "user".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rxt.generation import left_pad

__all__ = ["GateFit", "SalienceGate", "fit_gate", "gate_dialogues", "gate_features"]


class SalienceGate(nn.Module):
    """w . x + b over the closing token's key and value at decoder layer ``layer``; x is a kv memory slot's
    keys-and-values part (width 2 * H_kv * d_head)."""

    def __init__(self, width: int, layer: int):
        super().__init__()
        self.layer = layer
        self.proj = nn.Linear(width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, turn: torch.Tensor, closing_at: torch.Tensor) -> torch.Tensor:
        """(B,) logits. turn: (L, B, T, width), a turn's keys and values as the memory writes them;
        closing_at: (B,) the column of each row's closing token (-1: the row has no user message)."""
        rows = torch.arange(turn.shape[1], device=turn.device)
        x = turn[self.layer, rows, closing_at.clamp(min=0)].float()  # (B, width)
        logits = self.proj(x)[:, 0]
        return logits.masked_fill(closing_at < 0, float("-inf"))


Dialogue = list[tuple[str, str, int]]  # (query, answer, label of the query: 1 salient, 0 not)


def gate_dialogues(chitchat_file: str | Path, dialogues: int = 150, chitchat: int = 100, max_turns: int = 8,
                   seed: int = 0) -> list[Dialogue]:
    """The conversations ``fit_gate`` learns from: ``dialogues`` of the training generator, each message
    labelled (a fact told or changed: 1; small talk, a question: 0), and ``chitchat`` conversations of the
    chitchat corpus, their users' messages 0 (cut to 300 characters); at most ``max_turns`` turns each."""
    from rxt.data.dialogues import generate_dialogues
    from rxt.data.jsonl import read_dialogues
    from rxt.data.phrasings import SMALL_TALK

    path = Path(chitchat_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; the salience gate learns from the chitchat corpus's "
                                "users (`rxt data fetch` prepares data/chitchat/)")
    talk = {query.lstrip("*") for query, _ in SMALL_TALK}
    out = [[(t.query, t.answer, int(t.check is None and t.query not in talk)) for t in d.turns[:max_turns]]
           for d in generate_dialogues(dialogues, seed=seed, split="train", paraphrases=0.5, fresh_values=0.5)]
    people = [d for d in read_dialogues(path) if d.turns]
    for d in random.Random(f"rxt-salience:{seed}").sample(people, min(chitchat, len(people))):
        out.append([(t.query[:300] or ".", t.answer[:300] or ".", 0) for t in d.turns[:max_turns]])
    return out


@dataclass
class GateFit:
    messages: int
    salient: int  # messages labelled 1
    accuracy: float  # on the messages it was fitted to
    salient_recall: float  # labelled-1 messages the fitted gate calls salient

    def to_dict(self) -> dict:
        return {"messages": self.messages, "salient": self.salient, "accuracy": round(self.accuracy, 4),
                "salient_recall": round(self.salient_recall, 4)}


@torch.no_grad()
def gate_features(model, dialogues: list[Dialogue], batch_size: int = 32) -> torch.Tensor:
    """(N, width): the gate's input for every message of ``dialogues``, in order, each read as the model
    reads it in a chat: after the memory its own write left of the turns before (the closing token's key
    and value depend on that context, so the gate is fitted on what it will see)."""
    kv, tok, layer = model.kv_memory, model.tokenizer, model.salience.layer
    features: list[tuple[int, int, torch.Tensor]] = []  # (dialogue, turn, feature)
    for first in range(0, len(dialogues), batch_size):
        group = dialogues[first : first + batch_size]
        stm = kv.initial(len(group))
        for turn in range(max(len(d) for d in group)):
            rows = [r for r, d in enumerate(group) if turn < len(d)]
            ids, mask = left_pad([model.turn_preamble() + tok.interaction(*group[r][turn][:2]) for r in rows],
                                 tok.pad_id)
            memory = stm[:, rows]
            states, surprisal = kv.turn_kv(memory, ids, mask, model.needs_surprisal)
            at = kv.closing_at(ids, model.turn_mask(ids, mask))
            for i, r in enumerate(rows):
                features.append((first + r, turn, states[layer, i, at[i]].float()))
            stm[:, rows] = kv.keep(memory, states, ids, mask, surprisal)
    return torch.stack([f for _, _, f in sorted(features, key=lambda f: f[:2])])


def fit_gate(model, dialogues: list[Dialogue], l2: float = 1e-2) -> GateFit:
    """Fit ``model.salience`` (a ReactivePretrained with keep "salience") to the labels of ``dialogues``'
    messages by L2-regularised logistic regression on standardised features (L-BFGS; deterministic),
    folded into the gate's one linear layer. The memory the messages are read after is the one the model
    writes with its gate as it is (unfitted: keep "user")."""
    y = torch.tensor([label for d in dialogues for *_, label in d], dtype=torch.float32)
    if not 0 < int(y.sum()) < len(y):
        raise ValueError("fit_gate needs messages of both labels")
    x = gate_features(model, dialogues)
    mean, std = x.mean(0), x.std(0) + 1e-4
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    with torch.no_grad():
        weight = w / std
        model.salience.proj.weight.copy_(weight[None])
        model.salience.proj.bias.copy_(b - (weight * mean).sum())
        said = model.salience.proj(x)[:, 0] > 0
    return GateFit(len(y), int(y.sum()), float((said == y.bool()).float().mean()),
                   float(said[y.bool()].float().mean()))
