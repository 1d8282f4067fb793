"""Training a pretrained decoder made reactive: `rxt train --recipe experiments/reactive_pretrained/smollm2-reactive.yaml --out DIR`.

Supervised memory-aware training with the base frozen: each turn of a dialogue is one teacher-forced
pass reading the memory the earlier turns wrote (its loss on the answer, and its ED), the gradient runs
back through the memory path over the whole dialogue, and only the adapter's weights move. The data
mixes the training generator's fact dialogues (facts asked 1..max_distance turns later, small talk
between) with real chitchat conversations. rxt's Trainer runs it: warm-up + cosine, accumulation,
exact resume from ``DIR/checkpoints/reactive.safetensors`` (which holds the adapter, not the base).

    DIR/adapter/            adapter.safetensors + adapter.json (rewritten at every checkpoint),
                            recipe.yaml, training_log.jsonl and control.json at the end
    DIR/metrics.jsonl       the training log, with the held-out memory control at each evaluation

The held-out control (``memory_control``) is what tells memory from wording: the loss and exact-match
of held-out recall answers read with their own dialogue's memory, with another dialogue's memory of
the same age (full, but the wrong facts) and with the memory wiped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from rxt.data.dialogues import FACTS, FRESH_WORDS, Dialogue, DialogueGenerator
from rxt.data.jsonl import DialogueList
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained
from rxt.tokenizer import Tokenizer
from rxt.training.batches import Batch, batch_indices, pad, rank_slice
from rxt.training.recipe import StageSpec, parse
from rxt.training.trainer import Trainer, init_distributed

log = logging.getLogger(__name__)

KIND = "reactive-pretrained"
STAGE = "reactive"
IGNORE = -100


@dataclass
class ShortFacts:
    """A share of the fact dialogues drawn short (the other generator settings shared unless set here): a run
    that trains long dialogues keeps rehearsing the short ones an earlier run learned from."""

    share: float = 0.0
    min_turns: int = 3
    max_turns: int = 10
    max_distance: int = 8
    facts_per_dialogue: list[int] = field(default_factory=lambda: [1, 3])
    # None: data.abstain and data.update_prob. Short dialogues are read whole, so what they ask is trained
    # on every turn of them: where a recipe puts its not-told questions and changed facts
    abstain: float | None = None
    update_prob: float | None = None


@dataclass
class ReactiveDataSpec:
    seed: int = 0
    fact_share: float = 0.6  # share of training dialogues that are fact dialogues; the rest are chitchat
    # fact dialogues (rxt.data.dialogues, train split): turns, recall distances, facts told per dialogue
    min_turns: int = 3
    max_turns: int = 10
    max_distance: int = 8
    facts_per_dialogue: list[int] = field(default_factory=lambda: [1, 3])
    frames: float = 0.3  # share of queries wrapped in an opener or closer
    paraphrases: float = 0.3  # share of statements in a training-only paraphrase
    recall_weight: float = 1.0  # loss weight of the answers to recall questions
    abstain: float = 0.0  # share of fact dialogues that also ask about a fact never told (answer: not told)
    update_prob: float = 0.25  # chance that a fact is told, then changed before it is asked (the newest is right)
    # share of fact values drawn as new words (never a held-out value), so that recall must copy the
    # value from memory rather than recall one of a few hundred training words; which kind of words
    fresh_values: float = 0.0
    fresh_words: str = "syllables"  # rxt.data.dialogues.FRESH_WORDS
    # real conversations (JSONL, e.g. data/chitchat/train.jsonl from `rxt data fetch`), cut short
    chitchat_file: str = ""
    chitchat_max_turns: int = 6
    chitchat_max_chars: int = 200
    heldout_dialogues: int = 16  # held-out fact dialogues (generator's heldout split) for the memory control
    short: ShortFacts = field(default_factory=ShortFacts)


@dataclass
class DialogueRecipe:
    """What every recipe on a pretrained base and these dialogues holds (reactive and stateless alike)."""

    kind: str = ""
    name: str = ""
    base: str = ""  # the pretrained model directory (`rxt import gguf ... --out DIR`)
    seed: int = 0
    threads: int = 1
    bf16_autocast: bool = False
    log_every: int = 10
    checkpoint_every: int = 25
    data: ReactiveDataSpec = field(default_factory=ReactiveDataSpec)
    train: StageSpec = field(default_factory=StageSpec)

    def check(self, kind: str) -> None:
        """The checks shared by every kind: the kind, the base directory, the data and the optimisation."""
        if self.kind != kind:
            raise ValueError(f"kind must be {kind!r}, got {self.kind!r}")
        if not self.base or not (Path(self.base) / "config.json").is_file():
            raise FileNotFoundError(f"base: {self.base!r} is not a model directory "
                                    f"(make one with `rxt import gguf FILE --out DIR`)")
        validate_data(self.data, self.train)

    @classmethod
    def is_one(cls, path: str | Path) -> bool:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return isinstance(data, dict) and data.get("kind") == cls.kind

    @classmethod
    def load(cls, path: str | Path) -> Any:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return parse(cls, data, str(path)).validate()


@dataclass
class ReactiveRecipe(DialogueRecipe):
    kind: str = KIND
    name: str = "reactive"
    reactive: ReactiveConfig = field(default_factory=ReactiveConfig)
    # an adapter directory (an earlier stage's DIR/adapter) this run starts from instead of a fresh adapter:
    # a curriculum's next stage. Its reactive config must be this recipe's.
    init_from: str = ""

    def validate(self) -> ReactiveRecipe:
        if self.reactive.memory_write == "kv":
            raise ValueError("reactive.memory_write 'kv' has no weights of its own to train: train the base with a "
                             "'kind: stateless-pretrained' recipe and give its model a kv memory with `rxt wrap`")
        self.check(KIND)
        if self.init_from and not (Path(self.init_from) / "adapter.json").is_file():
            raise FileNotFoundError(f"init_from: {self.init_from!r} is not an adapter directory (no adapter.json); "
                                    f"it is an earlier run's DIR/adapter")
        return self


def validate_data(d: ReactiveDataSpec, t: StageSpec) -> None:
    """The data and optimisation checks every recipe on these dialogues shares (reactive and stateless)."""
    shares = [(key, getattr(d, key)) for key in ("fact_share", "frames", "paraphrases", "fresh_values", "abstain",
                                                 "update_prob")]
    shares += [(f"short.{key}", getattr(d.short, key)) for key in ("abstain", "update_prob")
               if getattr(d.short, key) is not None]
    for key, value in shares:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.{key} is a share in [0, 1], got {value}")
    if d.fact_share < 1.0 and not d.chitchat_file:
        raise ValueError(f"data.fact_share {d.fact_share} leaves room for chitchat: give data.chitchat_file")
    if d.chitchat_file and not Path(d.chitchat_file).is_file():
        raise FileNotFoundError(f"data.chitchat_file: no such file: {d.chitchat_file} (run `rxt data fetch` first?)")
    if d.fresh_words not in FRESH_WORDS:
        raise ValueError(f"data.fresh_words must be one of {FRESH_WORDS}, got {d.fresh_words!r}")
    for key, facts in (("facts_per_dialogue", d.facts_per_dialogue), ("short.facts_per_dialogue", d.short.facts_per_dialogue)):
        if len(facts) != 2 or not 1 <= facts[0] <= facts[1] <= len(FACTS):
            raise ValueError(f"data.{key} must be [min, max] with 1 <= min <= max <= {len(FACTS)}, got {facts}")
    if not 0.0 <= d.short.share <= 1.0 or not 2 <= d.short.min_turns <= d.short.max_turns or d.short.max_distance < 1:
        raise ValueError(f"data.short: share in [0, 1], 2 <= min_turns <= max_turns and max_distance >= 1, got "
                         f"{d.short.share}, {d.short.min_turns}, {d.short.max_turns}, {d.short.max_distance}")
    if not d.recall_weight > 0 or d.heldout_dialogues < 2:
        raise ValueError("data.recall_weight must be positive and data.heldout_dialogues at least 2")
    if t.steps < 1 or t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ValueError("train: steps >= 1, batch_size >= 1, grad_accum >= 1 dividing batch_size are required")


def is_reactive_recipe(path: str | Path) -> bool:
    return ReactiveRecipe.is_one(path)


def load_reactive_recipe(path: str | Path) -> ReactiveRecipe:
    return ReactiveRecipe.load(path)


# -- data ----------------------------------------------------------------------------------------------
def chat_turn(tokenizer: Tokenizer, query: str, answer: str) -> tuple[list[int], int]:
    """One turn as ReactiveEngine feeds it (preamble, prompt, answer, closing) and the prompt's length."""
    prompt = tokenizer.preamble() + tokenizer.prompt(query)
    return prompt + tokenizer.answer(answer) + tokenizer.closing(), len(prompt)


def dialogue_batch(dialogues: list[Dialogue], tokenizer: Tokenizer, recall_weight: float = 1.0) -> Batch:
    """Per turn: right-padded ids and mask (n_t, T_t), answer mask (answer + closing) and loss weights.
    Longest dialogue first, so the n_t dialogues still going at turn t are the first n_t rows."""
    dialogues = sorted(dialogues, key=lambda d: len(d.turns), reverse=True)
    turns, count, tokens = [], 0.0, 0
    for t in range(len(dialogues[0].turns)):
        live = [d.turns[t] for d in dialogues if t < len(d.turns)]
        encoded = [chat_turn(tokenizer, turn.query, turn.answer) for turn in live]
        ids, mask = pad([e[0] for e in encoded], tokenizer.pad_id)
        positions = torch.arange(ids.shape[1])
        answer = mask & (positions[None] >= torch.tensor([e[1] for e in encoded])[:, None])
        weights = torch.tensor([recall_weight if turn.check else 1.0 for turn in live])[:, None].expand(ids.shape)
        turns.append({"ids": ids, "mask": mask, "answer": answer, "weights": weights})
        count += float((answer[:, 1:] * weights[:, 1:]).sum())
        tokens += int(mask.sum())
    return Batch(turns, count=count, tokens=tokens)


class TrainingDialogues:
    """Training dialogue ``i``: a fact dialogue (share ``fact_share``; of those, share ``short.share`` drawn
    short) or a chitchat conversation, drawn from (seed, i) alone, so a batch is the same whatever ran before
    it (exact resume)."""

    def __init__(self, spec: ReactiveDataSpec):
        self.spec = spec

        def generator(min_turns: int, max_turns: int, max_distance: int, facts: list[int], abstain: float | None = None,
                      update_prob: float | None = None) -> DialogueGenerator:
            return DialogueGenerator(spec.seed, "train", min_turns, max_turns, max_distance, tuple(facts),
                                     spec.update_prob if update_prob is None else update_prob,
                                     fresh_values=spec.fresh_values, fresh_words=spec.fresh_words, frames=spec.frames,
                                     paraphrases=spec.paraphrases, abstain=spec.abstain if abstain is None else abstain)

        self.facts = generator(spec.min_turns, spec.max_turns, spec.max_distance, spec.facts_per_dialogue)
        short = spec.short
        self.short = (generator(short.min_turns, short.max_turns, short.max_distance, short.facts_per_dialogue,
                                short.abstain, short.update_prob) if short.share > 0 else None)
        self.chitchat = (DialogueList.read(spec.chitchat_file, spec.chitchat_max_turns, spec.chitchat_max_chars)
                         if spec.chitchat_file else None)

    def __getitem__(self, index: int) -> Dialogue:
        rng = random.Random(f"rxt-reactive-mix:{self.spec.seed}:{index}")
        if self.chitchat is not None and rng.random() >= self.spec.fact_share:
            return self.chitchat[rng.randrange(len(self.chitchat))]
        if self.short is not None and rng.random() < self.spec.short.share:
            return self.short[index]
        return self.facts[index]


def heldout_fact_dialogues(spec: ReactiveDataSpec) -> list[Dialogue]:
    """The generator's held-out split (its own values and phrasings), with at least one recall question."""
    generator = DialogueGenerator(spec.seed, "heldout", spec.min_turns, spec.max_turns, spec.max_distance,
                                  tuple(spec.facts_per_dialogue))
    return generator.take(spec.heldout_dialogues)


# -- loss ----------------------------------------------------------------------------------------------
def _device(model: ReactivePretrained) -> torch.device:
    return model.base.embedding.weight.device


def _read(model: ReactivePretrained, turn: dict[str, torch.Tensor], stm: torch.Tensor):
    ids, mask = turn["ids"], turn["mask"]
    key_mask = None if bool(mask.all()) else mask  # no padding: the plain causal path
    logits, encoded = model.read_turn(ids, stm, key_mask)
    return logits, encoded, model.turn_mask(ids, key_mask)


def answer_token_losses(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(B, T-1) next-token cross-entropy, zero outside the answer."""
    targets = ids[:, 1:].masked_fill(~answer[:, 1:], IGNORE)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return ce.view(targets.shape)


def memory_aware_loss(model: ReactivePretrained, turns: list[dict[str, torch.Tensor]],
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed weighted answer loss over a batch of dialogues, each turn reading the memory its earlier
    turns wrote, the gradient through the memory path (the Trainer divides by the batch's count)."""
    device = _device(model)
    stm = model.initial_memory(turns[0]["ids"].shape[0]).to(device)
    total = torch.zeros((), device=device)
    for turn in turns:
        turn = {k: v.to(device) for k, v in turn.items()}
        rows = turn["ids"].shape[0]
        stm = stm[:, :rows]  # dialogues that ended dropped out of the batch (the last rows)
        logits, encoded, written = _read(model, turn, stm)
        total = total + (answer_token_losses(logits, turn["ids"], turn["answer"]) * turn["weights"][:, 1:]).sum()
        stm = model.consolidate(stm, encoded, written, turn["ids"])
    return total, {}


@torch.no_grad()
def memory_control(model: ReactivePretrained, dialogues: list[Dialogue]) -> dict[str, float]:
    """Held-out recall answers scored reading their own dialogue's memory, another dialogue's memory of
    the same age (the next dialogue's, after as many turns: full, but the wrong facts) and STM_0.
    ``recall_loss_*``: mean answer loss; ``recall_exact_*``: share of answers whose every token is the
    model's top-1 given the right tokens before it; ``recall_tokens_*``: share of answer tokens that are the
    top-1 (the answers' wording is much alike, so own against other in it is mostly the values' tokens)."""
    was_training = model.training
    model.eval()
    device, tok = _device(model), model.tokenizer
    batches = [dialogue_batch([d], tok).data for d in dialogues]
    memories = []  # per dialogue: the memory before each turn
    for turns in batches:
        stm, seen = model.initial_memory(1).to(device), []
        for turn in turns:
            seen.append(stm)
            turn = {k: v.to(device) for k, v in turn.items()}
            _, encoded, written = _read(model, turn, stm)
            stm = model.consolidate(stm, encoded, written, turn["ids"])
        memories.append(seen)
    scores: dict[str, list[tuple[float, bool, int, int]]] = {"own": [], "other": [], "wiped": []}
    for n, (dialogue, turns) in enumerate(zip(dialogues, batches, strict=True)):
        other = memories[(n + 1) % len(dialogues)]
        for t, turn in enumerate(dialogue.turns):
            if not turn.check:
                continue
            data = {k: v.to(device) for k, v in turns[t].items()}
            for name, stm in (("own", memories[n][t]), ("other", other[min(t, len(other) - 1)]),
                              ("wiped", model.initial_memory(1).to(device))):
                scores[name].append(answer_score(_read(model, data, stm)[0], data["ids"], data["answer"]))
    model.train(was_training)
    return recall_summary(scores)


def answer_score(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> tuple[float, bool, int, int]:
    """One answer: its mean loss, whether every token is the top-1, how many are, and how many there are."""
    losses = answer_token_losses(logits, ids, answer)
    on_answer = answer[:, 1:]
    right = (logits[:, :-1].argmax(-1) == ids[:, 1:])[on_answer]
    return float(losses.sum() / on_answer.sum()), bool(right.all()), int(right.sum()), right.numel()


def recall_summary(scores: dict[str, list[tuple[float, bool, int, int]]]) -> dict[str, float]:
    """Per reading (own, other, wiped): mean answer loss, share of answers exact, share of answer tokens top-1."""
    out: dict[str, float] = {}
    for name, rows in scores.items():
        out[f"recall_loss_{name}"] = round(sum(r[0] for r in rows) / max(1, len(rows)), 4)
        out[f"recall_exact_{name}"] = round(sum(r[1] for r in rows) / max(1, len(rows)), 4)
        out[f"recall_tokens_{name}"] = round(sum(r[2] for r in rows) / max(1, sum(r[3] for r in rows)), 4)
    out["recall_questions"] = len(scores["own"])
    return out


# -- the run -------------------------------------------------------------------------------------------
def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here")
    return torch.device(device)


class DialogueRun:
    """A run on these dialogues, whatever it trains: the output directory (refused if it holds a run's
    checkpoints and ``resume`` is off), the device, the training and held-out dialogues, one Trainer,
    the held-out control at each evaluation, and the trained model written to ``output_dir`` at the end
    with the recipe, the training log and the final control. Subclasses say what model, batch, loss and
    control; the batches are drawn by (seed, step) under the reactive stage's name whatever the subclass,
    so two kinds of run on one recipe's data see the same dialogues at the same step."""

    stage = STAGE
    label = "reactive"
    output_name = "adapter"

    def __init__(self, recipe: Any, out: str | Path, resume: bool = False, device: str = "auto",
                 progress: bool = True):
        self.recipe, self.out, self.resume, self.progress = recipe, Path(out), resume, progress
        self.rank, self.world = init_distributed()
        self.device = pick_device(device)
        self.metrics_path = self.out / "metrics.jsonl"
        self.output_dir = self.out / self.output_name
        if not resume and (self.out / "checkpoints").exists():
            raise FileExistsError(f"{self.out} holds a run's checkpoints: pass --resume to continue it, "
                                  f"or choose another --out")
        self.data = TrainingDialogues(recipe.data)
        self.heldout = heldout_fact_dialogues(recipe.data)
        self._last_control: dict[str, float] | None = None  # the trainer's control at its last evaluation

    # what a subclass supplies
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, dialogues: list[Dialogue], tokenizer: Tokenizer, recall_weight: float) -> Batch:
        raise NotImplementedError

    def loss(self, model: nn.Module, data: Any, generator: torch.Generator | None = None):
        raise NotImplementedError

    def control(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, model: nn.Module) -> None:
        raise NotImplementedError

    def on_checkpoint(self, model: nn.Module) -> None:
        """After each checkpoint (default: nothing; the reactive run rewrites its adapter)."""

    # the rest is shared
    def trainer(self, model: nn.Module) -> Trainer:
        spec, recipe = self.recipe.train, self.recipe
        tok, weight = model.tokenizer, recipe.data.recall_weight

        def make_batch(step: int, micro: int, rank: int, world: int) -> Batch:
            indices = batch_indices(recipe.seed, STAGE, step, spec.batch_size, 1 << 30)
            return self.batch([self.data[i] for i in rank_slice(indices, micro, spec.grad_accum, rank, world)],
                              tok, weight)

        return Trainer(
            model=model, stage=self.stage, spec=spec, make_batch=make_batch, loss_fn=self.loss,
            work_dir=self.out, metrics_path=self.metrics_path, seed=recipe.seed, log_every=recipe.log_every,
            checkpoint_every=recipe.checkpoint_every, bf16_autocast=recipe.bf16_autocast, progress=self.progress,
            extra_metrics={"model": self.label}, model_state=self.trained_state, monitor=self._monitor,
            on_checkpoint=self.on_checkpoint,
        )

    def _monitor(self, model: nn.Module) -> dict[str, float]:
        self._last_control = self.control(model)  # the trainer runs it at the last step too: kept for the summary
        return self._last_control

    def run(self) -> dict[str, Any]:
        model = self.build_model()
        if self.rank == 0 and not self.resume:
            log.info("held-out control before training: %s", self.control(model))
        self.trainer(model).train(resume=self.resume)
        if self.rank != 0:
            return {}
        self.save(model)
        recipe_yaml = yaml.safe_dump(dataclasses.asdict(self.recipe), sort_keys=False)
        (self.output_dir / "recipe.yaml").write_text(recipe_yaml)
        if self.metrics_path.is_file():
            shutil.copyfile(self.metrics_path, self.output_dir / "training_log.jsonl")
        trained = sum(t.numel() for t in self.trained_state(model).values())
        control = self._last_control if self._last_control is not None else self.control(model)
        summary = {"steps": self.recipe.train.steps, "trained_parameters": trained, "control": control}
        (self.output_dir / "control.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        return summary


class ReactiveRun(DialogueRun):
    """One reactive-pretrained recipe: base + fresh adapter (or an earlier stage's), the adapter saved as
    it goes (``DIR/adapter``)."""

    def __init__(self, recipe: ReactiveRecipe, out: str | Path, resume: bool = False, device: str = "auto",
                 progress: bool = True):
        super().__init__(recipe, out, resume, device, progress)
        self.adapter_dir = self.output_dir

    def build_model(self) -> ReactivePretrained:
        torch.manual_seed(self.recipe.seed)
        if not self.recipe.init_from:
            return ReactivePretrained.from_base(self.recipe.base, self.recipe.reactive).to(self.device)
        model = ReactivePretrained.from_pretrained(self.recipe.init_from, self.recipe.base, self.device)
        if model.reactive != self.recipe.reactive:
            ours, theirs = self.recipe.reactive.to_dict(), model.reactive.to_dict()
            differ = {k: (theirs[k], ours[k]) for k in ours if ours[k] != theirs[k]}
            raise ValueError(f"init_from {self.recipe.init_from}: its reactive config differs from the recipe's "
                             f"(key: (adapter, recipe)): {differ}")
        return model.train()

    def batch(self, dialogues: list[Dialogue], tokenizer: Tokenizer, recall_weight: float) -> Batch:
        return dialogue_batch(dialogues, tokenizer, recall_weight)

    def loss(self, model: ReactivePretrained, data: Any, generator: torch.Generator | None = None):
        return memory_aware_loss(model, data, generator)

    def control(self, model: ReactivePretrained) -> dict[str, float]:
        return memory_control(model, self.heldout)

    def trained_state(self, model: ReactivePretrained) -> dict[str, torch.Tensor]:
        return model.adapter_state_dict()

    def save(self, model: ReactivePretrained) -> None:
        model.save_adapter(self.adapter_dir)

    def on_checkpoint(self, model: ReactivePretrained) -> None:
        model.save_adapter(self.adapter_dir)
