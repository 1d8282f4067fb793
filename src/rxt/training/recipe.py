"""Training recipes: YAML files describing a whole run, validated into dataclasses.

A recipe names the model (preset + overrides), the tokenizer, the data, and the steps, batch and
learning rate of every curriculum stage and of the baseline. Unknown keys are errors, so a typo
cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import glob
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rxt.config import PRESETS, ModelConfig
from rxt.data.dialogues import FACTS, FRESH_WORDS


@dataclass
class ModelSpec:
    preset: str = "nano"
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field
    # fields in which the stateless baseline differs from the RxT (e.g. {n_layers: 12}, so that it has
    # at least as many parameters: without it, it is the RxT's decoder alone)
    baseline_overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, vocab_size: int) -> ModelConfig:
        return ModelConfig.from_name(self.preset, **{**self.overrides, "vocab_size": vocab_size})

    def build_baseline(self, vocab_size: int) -> ModelConfig:
        return ModelConfig.from_name(self.preset, **{**self.overrides, **self.baseline_overrides,
                                                     "vocab_size": vocab_size})


@dataclass
class TokenizerSpec:
    vocab_size: int = 1024
    synthetic_dialogues: int = 2000  # training dialogues the BPE merges are learned from (plus the corpus)


@dataclass
class DataSpec:
    seed: int = 0
    min_turns: int = 4
    max_turns: int = 20
    max_distance: int = 16
    train_dialogues: int = 100_000  # pool the batches are drawn from (generated on demand)
    heldout_dialogues: int = 64  # for held-out loss and the recall check
    corpus: bool = True  # mix chatterbot-corpus pairs into the language stages when installed
    fresh_values: float = 0.0  # share of training values invented afresh (no value pool to memorise)
    # their shape: "syllables" ("Runeba"), "english" ("bleanots", "Stook"), "real" (real nouns: "lantern"),
    # "mixed" (syllables or english) or "all" (any of the three)
    fresh_words: str = "syllables"
    frames: float = 0.0  # share of training queries wrapped in an opener or closer ("By the way, ...")
    paraphrases: float = 0.0  # share of training statements told in a training-only paraphrase ("{v} is my dog.")
    distractors: float = 0.0  # share of training statements with one invented word that is not the value
    # facts told (and later asked about) per training dialogue: [min, max] (the held-out check keeps 2-5)
    facts_per_dialogue: list[int] = field(default_factory=lambda: [2, 5])
    # loss weight of the answers to recall questions in SMAT and the baseline alike (the only answers
    # that need the memory; 1: every answer token counts the same)
    recall_weight: float = 1.0
    # your own dialogues (JSONL, see docs/data.md) instead of the synthetic ones; paths are relative
    # to the working directory. Without heldout_file the synthetic held-out split is the check.
    train_file: str = ""
    heldout_file: str = ""
    # with dialogue files: keep each dialogue's first file_max_turns turns and each message's first
    # file_max_chars characters (0: all); real chats run to hundreds of turns and thousands of characters
    file_max_turns: int = 0
    file_max_chars: int = 0
    # plain-text files (globs, one paragraph a line, e.g. data/prose/train/*.txt from `rxt data fetch`):
    # cut into text_chunk_words-word pieces, they are half of stage 1's sequences and train the tokenizer
    text_files: list[str] = field(default_factory=list)
    text_chunk_words: int = 96


@dataclass
class StageSpec:
    """Optimisation settings shared by every stage."""

    steps: int = 0  # 0 skips the stage
    batch_size: int = 8  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 2


@dataclass
class JointLMSpec(StageSpec):
    """Stages 1-2: decoder next-token loss reading the noised, detached states of a masked encoder copy."""

    ar_weight: float = 1.0  # alpha
    mlm_weight: float = 1.0  # beta
    mask_prob: float = 0.15
    memory_noise: float = 0.1  # std of the noise added to the encoder states the decoder reads
    # what the decoder reads: "encoder" = the T encoder states themselves (the paper's recipe);
    # "stm" = those states consolidated into S memory slots by the memory attention, which then
    # trains with the decoder (a dense signal for storing tokens in slots and reading them back)
    memory: str = "encoder"
    # share of the training sequences that are copy drills: lists of invented or pool words that only
    # a decoder copying them out of its memory can predict (most useful with memory: stm)
    copy_share: float = 0.0
    # parts that stay as they are in this stage, e.g. [embedding, decoder] to teach the encoder and
    # the memory attention to write for a decoder that is already trained
    frozen: list[str] = field(default_factory=list)


@dataclass
class MemoryAttentionSpec(StageSpec):
    """Stage 3: self-supervised memory attention against a weighted mean of STM_{t-1} and ED_t."""

    new_weight_first: float = 0.9  # w on the first step
    new_weight_start: float = 0.5  # w on step 1, decaying by new_weight_decay per step
    new_weight_decay: float = 0.05
    new_weight_min: float = 0.05
    new_weight_jitter: float = 0.05
    input_noise: float = 0.05
    label_noise: float = 0.05
    max_turns: int = 8


@dataclass
class SMATSpec(StageSpec):
    """Stage 4: decoder trained turn by turn reading the memory the earlier turns built."""

    unfreeze_step: int = 0  # encoder and memory attention train from this step on
    truncate_every: int = 0  # detach the memory every k turns (0: backpropagate through the whole dialogue)
    curriculum_steps: int = 0  # the first steps train on short dialogues (short recall distances) ...
    curriculum_max_turns: int = 6  # ... of at most this many turns
    encoder_memory_steps: int = 0  # warm-up: the decoder reads the previous turn's encoder states, not STM


@dataclass
class StagesSpec:
    joint_lm: JointLMSpec = field(default_factory=JointLMSpec)
    sft: JointLMSpec = field(default_factory=JointLMSpec)
    memory_attention: MemoryAttentionSpec = field(default_factory=MemoryAttentionSpec)
    smat: SMATSpec = field(default_factory=SMATSpec)
    # the stateless baseline: first the text of stage 1 as a plain language model (0 steps: skipped),
    # then whole dialogues
    baseline_lm: StageSpec = field(default_factory=StageSpec)
    baseline: StageSpec = field(default_factory=StageSpec)


@dataclass
class Recipe:
    name: str = "recipe"
    seed: int = 0
    threads: int = 2  # torch CPU threads
    bf16_autocast: bool = False  # CPU autocast; only worth it where bf16 matmuls are fast
    log_every: int = 10
    checkpoint_every: int = 100
    recall_dialogues: int = 64  # held-out dialogues for the greedy recall check at the end
    # a previous run's output directory (rxt/ and/or baseline/): continue from its weights and
    # tokenizer instead of starting from scratch; `model` must describe the same architecture (it may
    # switch memory_write, and grow content gates on elementwise ones)
    init_from: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stages: StagesSpec = field(default_factory=StagesSpec)

    def validate(self) -> Recipe:
        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset {self.model.preset!r} is not one of {sorted(PRESETS)}")
        self.model.build(self.tokenizer.vocab_size)  # raises on bad overrides
        self.model.build_baseline(self.tokenizer.vocab_size)
        for key in ("file_max_turns", "file_max_chars"):
            if getattr(self.data, key) < 0:
                raise ValueError(f"data.{key} must be >= 0 (0: no limit), got {getattr(self.data, key)}")
        if self.data.text_chunk_words < 1:
            raise ValueError(f"data.text_chunk_words must be >= 1, got {self.data.text_chunk_words}")
        for pattern in self.data.text_files:
            if not text_paths([pattern]):
                raise FileNotFoundError(f"data.text_files: nothing matches {pattern!r} (run `rxt data fetch` first?)")
        if not 0.0 <= self.data.fresh_values <= 1.0:
            raise ValueError(f"data.fresh_values is a probability in [0, 1], got {self.data.fresh_values}")
        if not self.data.recall_weight > 0:
            raise ValueError(f"data.recall_weight must be positive, got {self.data.recall_weight}")
        if self.data.fresh_words not in FRESH_WORDS:
            raise ValueError(f"data.fresh_words must be one of {FRESH_WORDS}, got {self.data.fresh_words!r}")
        facts = self.data.facts_per_dialogue
        if len(facts) != 2 or not 1 <= facts[0] <= facts[1] <= len(FACTS):
            raise ValueError(f"data.facts_per_dialogue must be [min, max] with 1 <= min <= max <= {len(FACTS)}, got {facts}")
        for key in ("frames", "paraphrases", "distractors"):
            if not 0.0 <= getattr(self.data, key) <= 1.0:
                raise ValueError(f"data.{key} is a probability in [0, 1], got {getattr(self.data, key)}")
            if self.data.train_file and getattr(self.data, key):
                raise ValueError(f"data.{key} applies to synthetic dialogues, not to data.train_file")
        if self.data.train_file and self.data.fresh_values:
            raise ValueError("data.fresh_values applies to synthetic dialogues, not to data.train_file")
        for key in ("train_file", "heldout_file"):
            path = getattr(self.data, key)
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"data.{key}: no such file: {path}")
        for name in STAGE_ORDER:
            stage = getattr(self.stages, name)
            if stage.steps < 0 or stage.batch_size < 1 or stage.grad_accum < 1:
                raise ValueError(f"stages.{name}: steps >= 0, batch_size >= 1 and grad_accum >= 1 are required")
            if getattr(stage, "memory", "encoder") not in ("encoder", "stm"):
                raise ValueError(f"stages.{name}.memory must be 'encoder' or 'stm', got {stage.memory!r}")
            unknown = sorted(set(getattr(stage, "frozen", [])) - set(FREEZABLE))
            if unknown:
                raise ValueError(f"stages.{name}.frozen: unknown parts {unknown}; choose from {list(FREEZABLE)}")
            if not 0.0 <= getattr(stage, "copy_share", 0.0) <= 1.0:
                raise ValueError(f"stages.{name}.copy_share is a share in [0, 1], got {stage.copy_share}")
            if stage.batch_size % stage.grad_accum:
                raise ValueError(f"stages.{name}: batch_size {stage.batch_size} not divisible by grad_accum")
        return self


def text_paths(patterns: list[str]) -> list[Path]:
    """The files the globs name, sorted, each once (relative patterns from the working directory)."""
    found: set[Path] = set()
    for pattern in patterns:
        found.update(Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_file())
    return sorted(found)


STAGE_ORDER = ("joint_lm", "sft", "memory_attention", "smat", "baseline_lm", "baseline")
BASELINE_STAGES = ("baseline_lm", "baseline")
FREEZABLE = ("embedding", "decoder", "encoder", "memory_attention")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return parse(Recipe, data, str(path)).validate()


def parse(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} in {cls.__name__}; known keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = parse(hint, value, f"{where}: {key}")
        else:
            values[key] = _check_type(hint, value, f"{where}: {key}")
    return cls(**values)


def _check_type(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (dict, list) or isinstance(hint, types.GenericAlias):
        expected = origin or hint
        if not isinstance(value, expected):
            raise ValueError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__} ({value!r})")
    return value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
