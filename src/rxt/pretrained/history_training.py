"""The stateless baseline trained as the reactive adapter is: `rxt train --recipe R --out DIR` with
``kind: stateless-pretrained``.

A reactive adapter learns from the fact dialogues and chitchat it is trained on; the pretrained base
never saw them. Compared with the untouched base, the adapter wins by that training as much as by its
memory. This is the fair baseline: LoRA on the same frozen base (rxt.pretrained.lora), trained on the
same dialogues (the same data spec, the same draws for the same seed) reading the **whole history**,
as the stateless engine feeds it (preamble, then every turn's prompt, answer and closing), the loss on
the answers only. Set its LoRA rank so that it trains at least as many weights as the adapter it is
compared with.

    DIR/model/          the trained model, LoRA folded into the base's weights: a plain stateless model
                        directory (`rxt chat DIR/model`, `--baseline DIR/model` in the evaluations)
    DIR/metrics.jsonl   the training log, with the held-out control at each evaluation

The held-out control (``history_control``) mirrors the reactive run's ``memory_control``, so the two
logs read side by side: held-out recall answers scored with the dialogue's own history (``own``),
another dialogue's history of the same length (``other``) and no history at all (``wiped``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rxt.data.dialogues import Dialogue
from rxt.model import StatelessLM
from rxt.pretrained.lora import LORA_TARGETS, add_lora, merged_state_dict
from rxt.pretrained.training import (
    DialogueRecipe,
    DialogueRun,
    answer_score,
    answer_token_losses,
    recall_summary,
)
from rxt.tokenizer import Tokenizer
from rxt.training.batches import Batch, pad

log = logging.getLogger(__name__)

KIND = "stateless-pretrained"
STAGE = "history"


LORA_FILE = "lora.safetensors"  # in a run's DIR/model: the LoRA weights apart, for `rxt wrap --lora`


@dataclass
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None  # None: every decoder layer


@dataclass
class HistoryRecipe(DialogueRecipe):
    kind: str = KIND
    name: str = "stateless"
    lora: LoRASpec = field(default_factory=LoRASpec)

    def validate(self) -> HistoryRecipe:
        self.check(KIND)
        if self.lora.rank < 1 or not self.lora.alpha > 0:
            raise ValueError(f"lora.rank must be at least 1 and lora.alpha positive, got {self.lora.rank} "
                             f"and {self.lora.alpha}")
        unknown = sorted(set(self.lora.targets) - set(LORA_TARGETS))
        if unknown or not self.lora.targets:
            raise ValueError(f"lora.targets: unknown or no targets {unknown or self.lora.targets}; "
                             f"choose from {list(LORA_TARGETS)}")
        return self


def is_history_recipe(path: str | Path) -> bool:
    return HistoryRecipe.is_one(path)


def load_history_recipe(path: str | Path) -> HistoryRecipe:
    return HistoryRecipe.load(path)


# -- data ----------------------------------------------------------------------------------------------
def interaction(tokenizer: Tokenizer, query: str, answer: str) -> tuple[list[int], int]:
    """One turn as the stateless engine keeps it in the history (``Tokenizer.interaction``: prompt,
    answer, closing; no preamble) and the prompt's length."""
    return tokenizer.interaction(query, answer), len(tokenizer.prompt(query))


def history_sequence(tokenizer: Tokenizer, dialogue: Dialogue, weight_of=None) -> tuple[list[int], list[float]]:
    """The whole dialogue as one sequence (preamble, then each turn) and a per-token loss weight: the
    turn's weight on its answer and closing, 0 elsewhere."""
    ids, weights = list(tokenizer.preamble()), [0.0] * len(tokenizer.preamble())
    for turn in dialogue.turns:
        tokens, prompt = interaction(tokenizer, turn.query, turn.answer)
        w = 1.0 if weight_of is None else weight_of(turn)
        ids += tokens
        weights += [0.0] * prompt + [w] * (len(tokens) - prompt)
    return ids, weights


def history_batch(dialogues: list[Dialogue], tokenizer: Tokenizer, recall_weight: float = 1.0) -> Batch:
    """Right-padded (B, T) ids and mask, and (B, T) weights of each token as a target (0: not scored)."""
    rows = [history_sequence(tokenizer, d, lambda turn: recall_weight if turn.check else 1.0) for d in dialogues]
    ids, mask = pad([r[0] for r in rows], tokenizer.pad_id)
    weights = torch.zeros(ids.shape)
    for row, (_, w) in enumerate(rows):
        weights[row, : len(w)] = torch.tensor(w)
    return Batch({"ids": ids, "mask": mask, "weights": weights},
                 count=float(weights[:, 1:].sum()), tokens=int(mask.sum()))


def history_loss(model: StatelessLM, data: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed weighted next-token loss on the answers (the Trainer divides by the batch's count)."""
    device = model.embedding.weight.device
    ids, mask, weights = (data[k].to(device) for k in ("ids", "mask", "weights"))
    key_mask = None if bool(mask.all()) else mask  # right padding: no real token sees a pad before it
    logits = model.decode(ids, key_mask=key_mask)
    losses = answer_token_losses(logits, ids, weights > 0)
    return (losses * weights[:, 1:]).sum(), {}


@torch.no_grad()
def history_control(model: StatelessLM, dialogues: list[Dialogue]) -> dict[str, float]:
    """Held-out recall answers scored after the dialogue's own history (``own``), after another dialogue's
    history of as many turns (``other``: as much text, the wrong facts) and after none (``wiped``); the
    same metrics as rxt.pretrained.training.memory_control (loss, exact, answer tokens top-1)."""
    was_training = model.training
    model.eval()
    device, tok = model.embedding.weight.device, model.tokenizer
    turns = [[interaction(tok, t.query, t.answer) for t in d.turns] for d in dialogues]
    scores: dict[str, list[tuple[float, bool, int, int]]] = {"own": [], "other": [], "wiped": []}
    for n, dialogue in enumerate(dialogues):
        other = turns[(n + 1) % len(dialogues)]
        for t, turn in enumerate(dialogue.turns):
            if not turn.check:
                continue
            tokens, prompt = turns[n][t]
            for name, history in (("own", turns[n][:t]), ("other", other[:t]), ("wiped", [])):
                context = list(tok.preamble()) + [i for h in history for i in h[0]]
                ids = torch.tensor([context + tokens], device=device)
                answer = torch.zeros_like(ids, dtype=torch.bool)
                answer[:, len(context) + prompt:] = True
                scores[name].append(answer_score(model.decode(ids), ids, answer))
    model.train(was_training)
    return recall_summary(scores)


# -- the model -----------------------------------------------------------------------------------------
def lora_model(base: str | Path, spec: LoRASpec) -> StatelessLM:
    """The base, frozen, with LoRA on ``spec.targets`` (B = 0: exactly the base until trained)."""
    model = StatelessLM.from_pretrained(base)
    model.requires_grad_(False)
    layers = model.decoder.layers
    add_lora(layers, spec.targets, list(range(len(layers))) if spec.layers is None else spec.layers,
             spec.rank, spec.alpha)
    return model


def lora_state(model: StatelessLM) -> dict[str, torch.Tensor]:
    """What trains, and so what a checkpoint keeps: the LoRA weights."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def save_merged(model: StatelessLM, directory: str | Path, spec: LoRASpec | None = None, base: str = "") -> Path:
    """A plain stateless model directory with the LoRA update folded into the weights (the model in
    training keeps its LoRA modules). Written beside and moved into place: a reader never sees half a model.
    With ``spec`` and ``base`` it also holds the LoRA weights apart (``LORA_FILE``, naming the base by
    sha256), which `rxt wrap BASE --lora FILE` ships as an adapter on the unchanged base."""
    merged = StatelessLM(model.config)
    merged.load_state_dict(merged_state_dict(model))
    merged.tokenizer = model.tokenizer
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    if spec is not None:
        from safetensors.torch import save_file

        from rxt.pretrained.reactive import base_sha256

        meta = {"lora": json.dumps(dataclasses.asdict(spec)), "base_sha256": base_sha256(base)}
        save_file(lora_state(model), str(tmp / LORA_FILE), metadata=meta)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.replace(directory)
    return directory


# -- the run -------------------------------------------------------------------------------------------
class HistoryRun(DialogueRun):
    """One stateless-pretrained recipe: base + LoRA, the merged model written to ``DIR/model`` at the end."""

    stage = STAGE
    label = "stateless-lora"
    output_name = "model"

    def build_model(self) -> StatelessLM:
        torch.manual_seed(self.recipe.seed)
        return lora_model(self.recipe.base, self.recipe.lora).to(self.device).train()

    def batch(self, dialogues: list[Dialogue], tokenizer: Tokenizer, recall_weight: float) -> Batch:
        return history_batch(dialogues, tokenizer, recall_weight)

    def loss(self, model: StatelessLM, data: Any, generator: torch.Generator | None = None):
        return history_loss(model, data, generator)

    def control(self, model: StatelessLM) -> dict[str, float]:
        return history_control(model, self.heldout)

    def trained_state(self, model: StatelessLM) -> dict[str, torch.Tensor]:
        return lora_state(model)

    def save(self, model: StatelessLM) -> None:
        save_merged(model, self.output_dir, self.recipe.lora, self.recipe.base)
