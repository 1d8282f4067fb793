"""One recipe, end to end: tokenizer -> four RxT stages -> stateless baseline -> saved models.

    out/tokenizer/tokenizer.json
    out/checkpoints/<stage>.safetensors        exact-resume checkpoints (removed when the run completes)
    out/metrics.jsonl                 every stage's training log
    out/rxt/, out/baseline/           save_pretrained directories, each with recipe.yaml,
                                      training_log.jsonl and (rxt) recall.json
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from functools import partial
from pathlib import Path

import torch
import yaml

from rxt.config import QUEUE_WRITES
from rxt.data.corpus import conversation_pairs, default_tokenizer_texts, text_chunks
from rxt.data.dialogues import DialogueGenerator
from rxt.data.jsonl import DialogueList
from rxt.model import ReactiveTransformer, StatelessLM
from rxt.tokenizer import Tokenizer
from rxt.training import stages
from rxt.training.batches import Batch, DialogueSource, TextSource, batch_indices, rank_slice
from rxt.training.recall import quick_recall
from rxt.training.recipe import BASELINE_STAGES, Recipe, SMATSpec, StageSpec, recipe_to_dict, text_paths
from rxt.training.trainer import Trainer, init_distributed

log = logging.getLogger(__name__)

# parameter-name prefixes each stage trains
TRAINABLE = {
    "joint_lm": ("embedding.", "decoder.", "encoder."),
    "sft": ("embedding.", "decoder.", "encoder."),
    "memory_attention": ("memory_attention.",),
    "smat_frozen": ("embedding.", "decoder.", "stm."),
    "smat": ("embedding.", "decoder.", "stm.", "encoder.", "memory_attention."),
}


def prefix_filter(prefixes: tuple[str, ...], exclude: tuple[str, ...] = ()):
    return lambda name: name.startswith(prefixes) and not name.startswith(exclude)


def smat_trainable(unfreeze_step: int):
    """Gradual unfreezing: encoder and memory attention join the decoder at ``unfreeze_step``."""
    unused = ("encoder.mlm_norm",)  # the MLM head plays no part in SMAT
    frozen, full = prefix_filter(TRAINABLE["smat_frozen"], unused), prefix_filter(TRAINABLE["smat"], unused)
    return lambda step: full if step >= unfreeze_step else frozen


class RecipeRun:
    """Everything one recipe needs: tokenizer, data sources, and a Trainer per stage."""

    def __init__(self, recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True):
        self.recipe, self.out, self.resume, self.progress = recipe, Path(out), resume, progress
        if recipe.init_from and not any((Path(recipe.init_from) / n / "model.safetensors").is_file()
                                        for n in ("rxt", "baseline")):
            raise FileNotFoundError(f"init_from: {recipe.init_from} holds no rxt/ or baseline/ model "
                                    f"(train the recipe it continues first)")
        self.rank, self.world = init_distributed()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.metrics_path = self.out / "metrics.jsonl"
        data = recipe.data
        options = dict(min_turns=data.min_turns, max_turns=data.max_turns, max_distance=data.max_distance)
        self.train_dialogues: DialogueGenerator | DialogueList
        self.heldout_dialogues: DialogueGenerator | DialogueList
        if data.train_file:  # the user's own dialogues; every batch draws from them at random
            self.train_dialogues = DialogueList.read(data.train_file, data.file_max_turns, data.file_max_chars)
            self.population = len(self.train_dialogues)
        else:
            self.train_dialogues = DialogueGenerator(data.seed, "train", fresh_values=data.fresh_values,
                                                      fresh_words=data.fresh_words, frames=data.frames,
                                                      paraphrases=data.paraphrases, distractors=data.distractors,
                                                      facts_per_dialogue=tuple(data.facts_per_dialogue), **options)
            self.population = data.train_dialogues
        if data.heldout_file:
            self.heldout_dialogues = DialogueList.read(data.heldout_file, data.file_max_turns, data.file_max_chars)
        else:
            self.heldout_dialogues = DialogueGenerator(data.seed, "heldout", **options)
        self.pairs = conversation_pairs() if data.corpus else []
        self.texts = text_chunks(text_paths(data.text_files), data.text_chunk_words)  # prose for stage 1
        self.tokenizer = self._tokenizer()

    def _tokenizer(self) -> Tokenizer:
        directory = self.out / "tokenizer"
        if self.resume and (directory / "tokenizer.json").is_file():
            return Tokenizer.load(directory)
        if self.recipe.init_from:  # a continued run keeps its tokenizer
            init = Path(self.recipe.init_from)
            source = next(init / n for n in ("rxt", "baseline") if (init / n / "tokenizer.json").is_file())
            if self.rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                Tokenizer.load(source).save(directory)
            if self.world > 1:
                torch.distributed.barrier()
            return Tokenizer.load(directory)
        if self.rank == 0:
            spec = self.recipe.tokenizer
            texts = default_tokenizer_texts(spec.synthetic_dialogues, self.recipe.data.seed)
            if isinstance(self.train_dialogues, DialogueList):
                own = (text for d in self.train_dialogues.dialogues for t in d.turns for text in (t.query, t.answer))
                texts = itertools.chain(texts, own)
            texts = itertools.chain(texts, self.texts)
            tokenizer = Tokenizer.train(texts, vocab_size=spec.vocab_size)
            directory.mkdir(parents=True, exist_ok=True)
            tokenizer.save(directory)
        if self.world > 1:
            torch.distributed.barrier()
        return Tokenizer.load(directory)

    # ---- batches -------------------------------------------------------------------------------
    def _batch_fn(self, stage: str, spec: StageSpec, build):
        population = self.population
        if stage in ("joint_lm", "baseline_lm") and self.texts:  # odd indices are text pieces: reach them all
            population = 2 * max(population, len(self.texts))

        def make(step: int, micro: int, rank: int, world: int) -> Batch:
            indices = batch_indices(self.recipe.seed, stage, step, spec.batch_size, population)
            return build(rank_slice(indices, micro, spec.grad_accum, rank, world))

        return make

    def _eval_batches(self, spec: StageSpec, build) -> list[Batch]:
        n = spec.batch_size // spec.grad_accum
        return [build(list(range(i * n, (i + 1) * n))) for i in range(spec.eval_batches)]

    def _sources(self, stage: str, model: torch.nn.Module):
        """(train builder, held-out builder) of one stage."""
        tok, c = self.tokenizer, model.config
        if stage in ("joint_lm", "sft"):
            chat = stage == "sft"
            spec = getattr(self.recipe.stages, stage)
            train = TextSource(tok, self.train_dialogues, self.pairs, chat, c.max_seq_len, spec.copy_share,
                               self.recipe.data.seed, texts=self.texts)
            held = TextSource(tok, self.heldout_dialogues, [], chat, c.max_seq_len)
            return train.batch, lambda idx: held.batch([2 * i for i in idx])
        # answers to recall questions weigh recall_weight in training; the held-out loss weighs all alike
        weight = self.recipe.data.recall_weight
        if stage == "baseline_lm":  # stage 1's sequences, read by the stateless model as plain text
            seed, length = self.recipe.data.seed, c.max_seq_len
            train = TextSource(tok, self.train_dialogues, self.pairs, False, length, 0.0, seed, texts=self.texts)
            held = TextSource(tok, self.heldout_dialogues, [], False, length)
            return train.lm_batch, lambda idx: held.lm_batch([2 * i for i in idx])
        if stage == "baseline":
            train = DialogueSource(tok, self.train_dialogues, recall_weight=weight)
            return train.history_batch, DialogueSource(tok, self.heldout_dialogues).history_batch
        if stage == "memory_attention":
            turns = self.recipe.stages.memory_attention.max_turns
            train, held = DialogueSource(tok, self.train_dialogues, turns), DialogueSource(tok, self.heldout_dialogues, turns)
            written = c.write_slots if c.memory_write in QUEUE_WRITES else c.stm_slots  # the slots the loss scores
            build = partial(DialogueSource.turns_batch, count="vectors", slots=written, layers=c.n_layers)
            return partial(build, train), partial(build, held)
        train = DialogueSource(tok, self.train_dialogues, recall_weight=weight)
        return train.turns_batch, DialogueSource(tok, self.heldout_dialogues).turns_batch

    def _smat_batch_fn(self, spec: SMATSpec, full):
        """SMAT batches; during the curriculum steps, from short dialogues (short recall distances) first."""
        short = self.train_dialogues.shorter(spec.curriculum_max_turns)  # generated or read: either can be cut short
        short_source = DialogueSource(self.tokenizer, short, recall_weight=self.recipe.data.recall_weight)
        short_fn = self._batch_fn("smat", spec, short_source.turns_batch)

        def make(step: int, *rest):
            batch = (short_fn if step < spec.curriculum_steps else full)(step, *rest)
            if step < spec.encoder_memory_steps:
                batch.data[0]["read_encoder"] = True
            return batch

        return make

    def _loss_fn(self, stage: str, spec: StageSpec):
        if stage in ("joint_lm", "sft"):
            return partial(_joint_lm, spec=spec, mask_id=self.tokenizer.mask_id)
        if stage == "memory_attention":
            return partial(_memory_attention, spec=spec)
        if stage == "smat":
            return partial(_smat, spec=spec)
        return stages.baseline_loss

    def trainer(self, stage: str, model: torch.nn.Module) -> Trainer:
        spec = getattr(self.recipe.stages, stage)
        train_build, held_build = self._sources(stage, model)
        make_batch = self._batch_fn(stage, spec, train_build)
        if stage == "smat":
            trainable = smat_trainable(spec.unfreeze_step)
            make_batch = self._smat_batch_fn(spec, make_batch)
        elif stage in TRAINABLE:
            extra = ("memory_attention.",) if getattr(spec, "memory", "") == "stm" else ()
            keep = prefix_filter(TRAINABLE[stage] + extra, tuple(f"{part}." for part in getattr(spec, "frozen", [])))
            trainable = lambda step: keep  # noqa: E731
        else:
            trainable = None
        return Trainer(
            model=model, stage=stage, spec=spec, make_batch=make_batch,
            loss_fn=self._loss_fn(stage, spec), work_dir=self.out, metrics_path=self.metrics_path,
            eval_batches=self._eval_batches(spec, held_build) if self.rank == 0 else [],
            trainable=trainable, seed=self.recipe.seed, log_every=self.recipe.log_every,
            checkpoint_every=self.recipe.checkpoint_every, bf16_autocast=self.recipe.bf16_autocast,
            progress=self.progress, extra_metrics={"model": "baseline" if stage in BASELINE_STAGES else "rxt"},
        )

    # ---- the whole run -------------------------------------------------------------------------
    def build_models(self) -> tuple[ReactiveTransformer, StatelessLM]:
        torch.manual_seed(self.recipe.seed)
        vocab = self.tokenizer.vocab_size
        rxt, baseline = ReactiveTransformer(self.recipe.model.build(vocab)), StatelessLM(self.recipe.model.build_baseline(vocab))
        if self.recipe.init_from:
            rxt, baseline = (self._initial(name, model) for name, model in (("rxt", rxt), ("baseline", baseline)))
        rxt, baseline = rxt.to(self.device), baseline.to(self.device)
        rxt.tokenizer = baseline.tokenizer = self.tokenizer
        return rxt, baseline

    def _initial(self, name: str, fresh: torch.nn.Module) -> torch.nn.Module:
        """The init_from run's model ``name`` (or ``fresh`` when that run has none), checked against the recipe."""
        directory = Path(self.recipe.init_from) / name
        if not (directory / "model.safetensors").is_file():
            return fresh
        loaded = type(fresh).from_pretrained(directory)
        old, new = loaded.config.to_dict(), fresh.config.to_dict()
        differ = sorted(k for k, v in old.items() if new[k] != v)
        if old["memory_write"] == "queue" and new["memory_write"] == "consolidate":
            return grow_long_term(loaded, fresh, directory)
        # A continued run may switch how memory is written (the attention's weights carry over; a queue
        # write drops the gates and starts new write queries) and grow content gates on elementwise ones
        # (the new maps start at zero: the same function).
        grows = old["gate_mode"] == "elementwise" and new["gate_mode"] == "content"
        refused = [k for k in differ if k not in ("memory_write", "write_slots") and not (k == "gate_mode" and grows)]
        if refused:
            raise ValueError(f"init_from: {directory} is a different model than the recipe's (differs in {refused})")
        if differ:
            missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
            queue = new["memory_write"] == "queue"
            started = ("write_queries",) if queue else ("gate.read_old.weight", "gate.read_update.weight")
            dropped = [k for k in unexpected if not (queue and k.startswith("memory_attention.") and ".gate." in k)]
            if dropped or not all(k.endswith(started) for k in missing):
                raise ValueError(f"init_from: cannot carry {directory}'s weights over: {missing + unexpected}")
            return fresh
        return loaded

    def run(self, only: str | None = None) -> dict:
        """Train both models, or ``only="rxt"`` / ``only="baseline"``: they share nothing but the
        tokenizer and the data, so two processes can train them at once into one output directory."""
        if only not in (None, "rxt", "baseline"):
            raise ValueError(f"only must be 'rxt' or 'baseline', got {only!r}")
        rxt, baseline = self.build_models()
        if only != "baseline":
            for stage in ("joint_lm", "sft", "memory_attention", "smat"):
                if getattr(self.recipe.stages, stage).steps:
                    self.trainer(stage, rxt).train(resume=self.resume)
        if only != "rxt":
            for stage in BASELINE_STAGES:
                if getattr(self.recipe.stages, stage).steps:
                    self.trainer(stage, baseline).train(resume=self.resume)
        summary = {}
        if self.rank == 0:
            both = {"rxt": rxt, "baseline": baseline}
            models = both if only is None else {only: both[only]}
            summary = self.save(models)
        return summary

    def recall(self, model: ReactiveTransformer, n: int | None = None) -> dict:
        n = self.recipe.recall_dialogues if n is None else n
        if isinstance(self.heldout_dialogues, DialogueList):
            n = min(n, len(self.heldout_dialogues))
        return quick_recall(model, self.tokenizer, self.heldout_dialogues.take(n))

    def save(self, models: dict[str, ReactiveTransformer | StatelessLM]) -> dict:
        for model in models.values():
            for p in model.parameters():
                p.requires_grad_(True)
        summary: dict = {"tokens": self.token_summary()}
        if "rxt" in models:
            recall = summary["recall"] = self.recall(models["rxt"])
            log.info("held-out recall: %.3f overall, by distance %s", recall["overall"],
                     {d: round(a, 2) for d, a in recall["by_distance"].items()})
            (self.out / "rxt").mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            directory = model.save_pretrained(self.out / name)
            (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False))
            if self.metrics_path.is_file():
                lines = [line for line in self.metrics_path.read_text().splitlines() if f'"model": "{name}"' in line]
                (directory / "training_log.jsonl").write_text("\n".join(lines) + "\n")
        if "rxt" in models:
            (self.out / "rxt" / "recall.json").write_text(json.dumps(summary, indent=2) + "\n")
        if len(models) == 2:  # with --only, the other process may still be using its checkpoint
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        return summary

    def token_summary(self) -> dict:
        """Tokens each model was trained on (from the log)."""
        totals: dict[str, int] = {}
        if self.metrics_path.is_file():
            last: dict[str, int] = {}
            for line in self.metrics_path.read_text().splitlines():
                record = json.loads(line)
                last[record["stage"]] = record["tokens_seen"]
            rxt_stages = {k: v for k, v in last.items() if k not in BASELINE_STAGES}
            if rxt_stages:
                totals.update(rxt=sum(rxt_stages.values()), rxt_smat=last.get("smat", 0))
            if any(k in last for k in BASELINE_STAGES):
                totals["baseline"] = sum(last.get(k, 0) for k in BASELINE_STAGES)
        return totals


def grow_long_term(loaded: torch.nn.Module, fresh: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """A queue model continued as a consolidating one: its queue, weights and start state carry over
    whole; the long-term slots (their start state) and the consolidation are new."""
    old, new = loaded.config, fresh.config
    grown = dict(memory_write="consolidate", stm_slots=old.stm_slots + new.long_term_slots,
                 long_term_slots=new.long_term_slots)
    differ = sorted(k for k, v in old.to_dict().items() if k not in grown and new.to_dict()[k] != v)
    if differ or new.stm_slots != grown["stm_slots"]:
        raise ValueError(f"init_from: {directory} is a queue of {old.stm_slots} slots; the recipe's model must be "
                         f"the same with long_term_slots added to stm_slots (differs in {differ or ['stm_slots']})")
    state = loaded.state_dict()
    if "stm.init" in state:  # the queue's start state goes behind the fresh long-term slots'
        state["stm.init"] = torch.cat([fresh.stm.init[:, : new.long_term_slots], state["stm.init"]], dim=1)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or not all(".consolidation." in k for k in missing):
        raise ValueError(f"init_from: cannot carry {directory}'s weights over: {missing + unexpected}")
    return fresh


def _joint_lm(model, data, generator, spec, mask_id):
    return stages.joint_lm_loss(model, data, spec, mask_id, generator)


def _memory_attention(model, data, generator, spec):
    return stages.memory_attention_loss(model, data, spec, generator)


def _smat(model, data, generator, spec):
    return stages.smat_loss(model, data, spec, generator)
