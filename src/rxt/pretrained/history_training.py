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
class ViewSpec:
    """What each training sequence reads. ``slots: 0``: the whole history (the stateless model). ``slots: S``:
    what a kv memory of S slots (``rxt wrap --slots S --keep KEEP``) holds, from the turn where it no longer
    holds everything: a dialogue is read whole up to that turn, then each of its last ``questions`` recall
    questions after it is a sequence of its own, the memory's tokens (rxt.pretrained.kv_memory.held_before_turns)
    followed by the question and its answer. A reader trained on what it will read."""

    slots: int = 0
    keep: str = "salience"  # the dialogue's `told` labels stand in for the fitted gate
    questions: int = 1


@dataclass
class HistoryRecipe(DialogueRecipe):
    kind: str = KIND
    name: str = "stateless"
    lora: LoRASpec = field(default_factory=LoRASpec)
    view: ViewSpec = field(default_factory=ViewSpec)
    # a LoRA this run starts from instead of B = 0: a run's lora.safetensors or an adapter directory, on this
    # base, with this recipe's rank, alpha, targets and layers
    init_from: str = ""

    def validate(self) -> HistoryRecipe:
        self.check(KIND)
        if self.view.slots < 0 or self.view.questions < 1:
            raise ValueError(f"view.slots must be 0 (the whole history) or a slot count, and view.questions at "
                             f"least 1, got {self.view.slots} and {self.view.questions}")
        if self.view.keep not in ("recent", "user", "salience"):
            raise ValueError(f"view.keep must be 'recent', 'user' or 'salience', got {self.view.keep!r}")
        if self.init_from and not Path(self.init_from).exists():
            raise FileNotFoundError(f"init_from: {self.init_from}: no such file or directory")
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


def memory_view_sequences(tokenizer: Tokenizer, dialogue: Dialogue, view: ViewSpec,
                          weight_of=None) -> list[tuple[list[int], list[float]]]:
    """The dialogue as a kv memory of ``view.slots`` slots lets the model read it (``ViewSpec``): the
    whole history while the memory holds all of it, then each of the last ``view.questions`` recall
    questions after that as its own sequence, the memory's tokens before it, the loss on its answer."""
    turns = [interaction(tokenizer, t.query, t.answer) for t in dialogue.turns]
    held = _contexts(tokenizer, dialogue, view)
    whole, first_lost = list(tokenizer.preamble()), len(turns)
    for t, (tokens, _) in enumerate(turns):
        if held[t] != whole:
            first_lost = t
            break
        whole += tokens
    short = Dialogue(dialogue.id, dialogue.turns[:first_lost])
    out = [history_sequence(tokenizer, short, weight_of)] if short.turns else []
    later = [t for t in range(first_lost, len(turns)) if dialogue.turns[t].check]
    for t in later[-view.questions:]:
        (tokens, prompt), w = turns[t], 1.0 if weight_of is None else weight_of(dialogue.turns[t])
        out.append((held[t] + tokens, [0.0] * (len(held[t]) + prompt) + [w] * (len(tokens) - prompt)))
    return out


def history_batch(dialogues: list[Dialogue], tokenizer: Tokenizer, recall_weight: float = 1.0,
                  view: ViewSpec | None = None) -> Batch:
    """Right-padded (B, T) ids and mask, and (B, T) weights of each token as a target (0: not scored).
    With a memory ``view`` a dialogue may give several rows (``memory_view_sequences``)."""
    def weight_of(turn) -> float:
        return recall_weight if turn.check else 1.0

    if view is None or view.slots == 0:
        rows = [history_sequence(tokenizer, d, weight_of) for d in dialogues]
    else:
        rows = [row for d in dialogues for row in memory_view_sequences(tokenizer, d, view, weight_of)]
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
def history_control(model: StatelessLM, dialogues: list[Dialogue], view: ViewSpec | None = None) -> dict[str, float]:
    """Held-out recall answers scored after the dialogue's own history (``own``), after another dialogue's
    history of as many turns (``other``: as much text, the wrong facts) and after none (``wiped``); the
    same metrics as rxt.pretrained.training.memory_control (loss, exact, answer tokens top-1). With a
    memory ``view`` a history is what that memory holds before the question."""
    was_training = model.training
    model.eval()
    device, tok = model.embedding.weight.device, model.tokenizer
    turns = [[interaction(tok, t.query, t.answer) for t in d.turns] for d in dialogues]
    contexts = [_contexts(tok, d, view) for d in dialogues]  # per dialogue, per turn: what is read before it
    scores: dict[str, list[tuple[float, bool, int, int]]] = {"own": [], "other": [], "wiped": []}
    for n, dialogue in enumerate(dialogues):
        other = contexts[(n + 1) % len(dialogues)]
        for t, turn in enumerate(dialogue.turns):
            if not turn.check:
                continue
            tokens, prompt = turns[n][t]
            for name, context in (("own", contexts[n][t]), ("other", other[min(t, len(other) - 1)]),
                                  ("wiped", list(tok.preamble()))):
                ids = torch.tensor([context + tokens], device=device)
                answer = torch.zeros_like(ids, dtype=torch.bool)
                answer[:, len(context) + prompt:] = True
                scores[name].append(answer_score(model.decode(ids), ids, answer))
    model.train(was_training)
    return recall_summary(scores)


def _contexts(tokenizer: Tokenizer, dialogue: Dialogue, view: ViewSpec | None) -> list[list[int]]:
    """Per turn, the tokens read before it: the whole history, or what a memory ``view`` holds."""
    from rxt.pretrained.kv_memory import answer_header, held_before_turns

    turns = [interaction(tokenizer, t.query, t.answer) for t in dialogue.turns]
    if view is not None and view.slots:
        header, closing = answer_header(tokenizer)
        written = [(ids, prompt - len(header) + closing, turn.told)
                   for (ids, prompt), turn in zip(turns, dialogue.turns, strict=True)]
        return held_before_turns(tokenizer.preamble(), written, view.slots, view.keep)
    out, context = [], list(tokenizer.preamble())
    for ids, _ in turns:
        out.append(list(context))
        context += ids
    return out


# -- the model -----------------------------------------------------------------------------------------
def lora_model(base: str | Path, spec: LoRASpec) -> StatelessLM:
    """The base, frozen, with LoRA on ``spec.targets`` (B = 0: exactly the base until trained)."""
    model = StatelessLM.from_pretrained(base)
    model.requires_grad_(False)
    layers = model.decoder.layers
    add_lora(layers, spec.targets, list(range(len(layers))) if spec.layers is None else spec.layers,
             spec.rank, spec.alpha)
    return model


def read_lora(base: str | Path, source: str | Path, option: str = "init_from") -> tuple[LoRASpec, dict[str, torch.Tensor]]:
    """The LoRA of ``source`` (a run's lora.safetensors or an adapter directory, made on ``base``): its
    settings and its weights keyed as a ``lora_model`` holds them (what `rxt wrap --lora` would ship)."""
    from rxt.pretrained.reactive import ReactiveConfig
    from rxt.pretrained.wrap import lora_weights

    config = ReactiveConfig(memory_write="kv")
    weights = {k.removeprefix("base."): v.float() for k, v in lora_weights(base, source, config, option).items()}
    return LoRASpec(config.lora_rank, config.lora_alpha, list(config.lora_targets), config.lora_layers), weights


def load_lora(model: StatelessLM, base: str | Path, source: str | Path, spec: LoRASpec,
              option: str = "init_from") -> int:
    """Put the LoRA of ``source`` into ``model`` (a ``lora_model`` with ``spec``); how many weights it has."""
    theirs, weights = read_lora(base, source, option)
    if (theirs.rank, theirs.alpha, sorted(theirs.targets), theirs.layers) != \
            (spec.rank, spec.alpha, sorted(spec.targets), spec.layers):
        raise ValueError(f"{option} {source}: its LoRA is {theirs}, this model's is {spec}")
    expected = {k for k in model.state_dict() if ".lora_" in k}
    if set(weights) != expected:
        raise ValueError(f"{option} {source}: its LoRA weights do not match this model's "
                         f"({len(weights)} tensors against {len(expected)})")
    model.load_state_dict(weights, strict=False)
    return sum(w.numel() for w in weights.values())


def lora_state(model: StatelessLM) -> dict[str, torch.Tensor]:
    """What trains, and so what a checkpoint keeps: the LoRA weights."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def save_lora(weights: dict[str, torch.Tensor], spec: LoRASpec, base: str | Path, path: str | Path) -> None:
    """LoRA weights as a run's ``lora.safetensors``: its settings and its base's sha256 beside them, which
    `rxt wrap --lora` and ``init_from`` check."""
    from safetensors.torch import save_file

    from rxt.pretrained.reactive import base_sha256

    meta = {"lora": json.dumps(dataclasses.asdict(spec)), "base_sha256": base_sha256(base)}
    save_file(weights, str(path), metadata=meta)


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
        save_lora(lora_state(model), spec, base, tmp / LORA_FILE)
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
        model = lora_model(self.recipe.base, self.recipe.lora)
        if self.recipe.init_from:
            load_lora(model, self.recipe.base, self.recipe.init_from, self.recipe.lora)
        return model.to(self.device).train()

    def batch(self, dialogues: list[Dialogue], tokenizer: Tokenizer, recall_weight: float) -> Batch:
        return history_batch(dialogues, tokenizer, recall_weight, self.recipe.view)

    def loss(self, model: StatelessLM, data: Any, generator: torch.Generator | None = None):
        return history_loss(model, data, generator)

    def control(self, model: StatelessLM) -> dict[str, float]:
        return history_control(model, self.heldout, self.recipe.view)

    def trained_state(self, model: StatelessLM) -> dict[str, torch.Tensor]:
        return lora_state(model)

    def save(self, model: StatelessLM) -> None:
        save_merged(model, self.output_dir, self.recipe.lora, self.recipe.base)
