"""`rxt eval memory`: the memory suite, six pass/fail tasks on the limits of a model's memory.

    rxt eval memory --model models/nano/rxt --baseline models/nano/baseline --json FILE --plot FILE

The tasks and their dialogues are in ``rxt.evaluation.memory_tasks``; their words, written by hand,
in memory_suite.yaml (the frozen held-out half unless ``--half dev``). Each model answers every
turn greedily and keeps its own answers as history, as in a real chat (``--history reference``
keeps the hand-written reference answers instead). Every question has one outcome (OUTCOMES):

right         recall: the answer names the expected value (a whole word, any case);
              abstain: it says it was not told (one of the suite's ``not_told`` forms) and names no value
stale         it names a value that was right once (the old one of ``update``, a room left in ``track``)
another_fact  it names another value told in the same dialogue
abstained     recall only: it says it was not told
invented      it names a word that neither the question nor any sentence of the suite or of the training
              generator has: a value from elsewhere, or one made up
wrong         anything else

Models compared: those of ``rxt eval recall`` (``build_engines``): the RxT with its memory, and the
stateless baseline reading the full history, the current turn only, and a window of history as big
as the RxT memory.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from rxt.engine import ChatEngine
from rxt.evaluation.memory_tasks import (
    HALVES,
    KINDS,
    SUITE_FILE,
    TASKS,
    WORD,
    Question,
    Suite,
    SuiteDialogue,
    build_dialogues,
    half_sha256,
    known_words,
    load_suite,
    task_distances,
)
from rxt.evaluation.recall import (
    BASELINE_MODES,
    HISTORIES,
    add_engine_arguments,
    build_engines,
    is_correct,
    prompt_tokens,
    tokens_read,
)
from rxt.generation import SamplingConfig

OUTCOMES = ("right", "stale", "another_fact", "abstained", "invented", "wrong")
DISTANCE_MEANS = {  # what the distance of each task counts, in turns
    "single": "since the fact was told", "multi": "since the message, to the first question",
    "update": "since the change", "abstain": "before the question",
    "mqar": "since the last pair, to the first question", "track": "since the last supporting fact",
}


# -- scoring -------------------------------------------------------------------------------------------
def says_not_told(answer: str, forms: Sequence[str]) -> bool:
    text = answer.lower().replace("\u2019", "'")
    return any(form in text for form in forms)


def names_a_value(answer: str, query: str) -> bool:
    """Whether the answer names a word that neither its question nor any sentence of the suite or of the
    training generator has (``known_words``): a value from elsewhere, or one made up."""
    known = known_words() | {w.lower() for w in WORD.findall(query)}
    return any(w.lower() not in known for w in WORD.findall(answer))


def outcome(answer: str, question: Question, query: str, told: Sequence[str], not_told: Sequence[str]) -> str:
    """The first of OUTCOMES that applies (see the module docstring)."""
    if question.expected is not None and is_correct(answer, question.expected):
        return "right"
    if any(is_correct(answer, v) for v in question.stale):
        return "stale"
    if any(is_correct(answer, v) for v in told if v != question.expected):
        return "another_fact"
    invents = names_a_value(answer, query)
    if says_not_told(answer, not_told) and not invents:
        return "right" if question.expected is None else "abstained"
    return "invented" if invents else "wrong"


# -- running -------------------------------------------------------------------------------------------
@dataclass
class Transcript:
    """One model's run through one dialogue."""

    dialogue: SuiteDialogue
    replies: dict[int, str] = field(default_factory=dict)  # turn -> the model's answer, where it answered
    kept: list[str] = field(default_factory=list)  # the answer the history kept, turn by turn
    read: dict[int, int] = field(default_factory=dict)  # question turn -> tokens read before answering
    tokens: int = 0  # tokens processed over the dialogue (the cost model of `rxt eval recall`)
    state_bytes: int = 0  # state held after the last turn


def converse(engine: ChatEngine, dialogues: Sequence[SuiteDialogue], history: str, sampling: SamplingConfig,
             on_turn: Callable[[], object] = lambda: None) -> list[Transcript]:
    """Run one engine through a batch of dialogues turn by turn. With ``history="own"`` it answers every
    turn and keeps its answers; with ``"reference"`` it answers only the questions and keeps the suite's
    reference answers."""
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    sessions = [engine.new_session() for _ in dialogues]
    scripts = [Transcript(d) for d in dialogues]
    for t in range(max(len(d.turns) for d in dialogues)):
        live = [(s, x) for s, x in zip(sessions, scripts, strict=True) if t < len(x.dialogue.turns)]
        turns = [x.dialogue.turns[t] for _, x in live]
        queries, kept = [turn.query for turn in turns], [turn.reference for turn in turns]
        asking = [k for k, turn in enumerate(turns) if history == "own" or turn.question]
        if asking:
            sessions_asked, queries_asked = [live[k][0] for k in asking], [queries[k] for k in asking]
            reads = prompt_tokens(engine, sessions_asked, queries_asked)
            replies = engine.interact_batch(sessions_asked, queries_asked, sampling, remember=False)
            for k, reply, read in zip(asking, replies, reads, strict=True):
                script = live[k][1]
                script.replies[t] = reply.text
                if turns[k].question:
                    script.read[t] = read
                if history == "own":
                    kept[k] = reply.text
        live_sessions = [s for s, _ in live]
        for (_, script), tokens in zip(live, tokens_read(engine, live_sessions, queries, kept), strict=True):
            script.tokens += tokens
        engine.observe(live_sessions, queries, kept)
        for (session, script), answer in zip(live, kept, strict=True):
            script.kept.append(answer)
            if len(script.kept) == len(script.dialogue.turns):
                session.wait()
                script.state_bytes = engine.state_bytes(session)
        on_turn()
    for session in sessions:
        session.wait()
    return scripts


@dataclass
class Answer:
    """One model's answer to one question, scored."""

    model: str
    task: str
    distance: int
    variant: str
    kind: str | None
    about: str
    true_distance: int
    dialogue: str
    query: str
    answer: str
    expected: str | None
    outcome: str
    read: int  # tokens read before answering (history and prompt)


@dataclass
class MemoryReport:
    models: list[str]
    settings: dict
    answers: list[Answer] = field(default_factory=list)
    tokens_processed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    state_bytes: dict[str, int] = field(default_factory=dict)  # after the last turn of the longest dialogue
    longest_turns: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # that dialogue's turns
    max_seq_len: dict[str, int] = field(default_factory=dict)

    def add(self, model: str, script: Transcript, suite: Suite) -> None:
        d = script.dialogue
        self.tokens_processed[model] += script.tokens
        if len(d.turns) > self.longest_turns[model]:
            self.longest_turns[model], self.state_bytes[model] = len(d.turns), script.state_bytes
        for t, turn in enumerate(d.turns):
            if q := turn.question:
                text = script.replies[t]
                scored = outcome(text, q, turn.query, d.told, suite.not_told)
                self.answers.append(Answer(model, d.task, d.distance, d.variant, q.kind, q.about, q.true_distance,
                                           d.id, turn.query, text, q.expected, scored, script.read[t]))

    def grouped(self, key: Callable[[Answer], object]) -> tuple[dict, dict]:
        """Accuracy {task: {key: {model: share right}}} and questions {task: {key: n}}, by ``key(answer)``
        (answers whose key is None are left out)."""
        right, asked = defaultdict(lambda: defaultdict(int)), defaultdict(lambda: defaultdict(int))
        for a in self.answers:
            if (k := key(a)) is not None:
                right[a.task, k][a.model] += a.outcome == "right"
                asked[a.task, k][a.model] += 1
        accuracy, questions = {}, {}
        present = {task for task, _ in asked}
        for task in [t for t in TASKS if t in present]:
            keys = sorted({k for t, k in asked if t == task}, key=lambda k: (k in KINDS and KINDS.index(k), k))
            accuracy[task] = {k: {m: right[task, k][m] / asked[task, k][m] for m in self.models} for k in keys}
            questions[task] = {k: asked[task, k][self.models[0]] for k in keys}
        return accuracy, questions

    def outcomes(self) -> dict[str, dict[str, dict[str, int]]]:
        tasks = {a.task for a in self.answers}
        counts = {t: {m: dict.fromkeys(OUTCOMES, 0) for m in self.models} for t in tasks}
        for a in self.answers:
            counts[a.task][a.model][a.outcome] += 1
        return {t: counts[t] for t in TASKS if t in counts}

    def context(self, model: str) -> dict:
        """The longest context the model read before an answer, and the distances of each task where some
        question's context was longer than its max_seq_len: RoPE extends its tables, so the model still
        answers there, at lengths it was never trained on."""
        beyond = defaultdict(set)
        for a in self.answers:
            if a.model == model and a.read > self.max_seq_len[model]:
                beyond[a.task].add(a.distance)
        return {"max_seq_len": self.max_seq_len[model],
                "longest_read": max(a.read for a in self.answers if a.model == model),
                "beyond_max_seq_len": {t: sorted(beyond[t]) for t in TASKS if t in beyond}}

    def to_dict(self) -> dict:
        tasks, questions = self.grouped(lambda a: a.distance)
        overall, asked = self.grouped(lambda a: "all")
        by_kind, asked_by_kind = self.grouped(lambda a: a.kind)
        by_variant, asked_by_variant = self.grouped(lambda a: a.variant or None)
        half = self.settings["half"]
        return {
            "suite": {"half": half, "sha256": half_sha256(half), "file": f"src/rxt/evaluation/{SUITE_FILE.name}"},
            "settings": self.settings,
            "models": self.models,
            "tasks": tasks,
            "questions": questions,
            "overall": {t: row["all"] for t, row in overall.items()},
            "questions_overall": {t: row["all"] for t, row in asked.items()},
            "by_value_kind": by_kind,
            "questions_by_value_kind": asked_by_kind,
            "by_variant": by_variant,
            "questions_by_variant": asked_by_variant,
            "outcomes": self.outcomes(),
            "tokens_processed": dict(self.tokens_processed),
            "state_bytes": dict(self.state_bytes),
            "state_bytes_after_turns": dict(self.longest_turns),
            "context": {m: self.context(m) for m in self.models},
            "examples": [asdict(a) for a in self._examples()],
        }

    def _examples(self) -> list[Answer]:
        """The first answer of each model to each task."""
        seen, out = set(), []
        for a in self.answers:
            if (a.model, a.task) not in seen:
                seen.add((a.model, a.task))
                out.append(a)
        return out


def evaluate_memory(engines: dict[str, ChatEngine], suite: Suite, dialogues: Sequence[SuiteDialogue],
                    history: str = "own", batch_size: int = 32, max_new_tokens: int = 24,
                    progress: bool = True, settings: dict | None = None) -> MemoryReport:
    """Run every engine through the dialogues (longest first, ``batch_size`` at a time) and score them."""
    report = MemoryReport(list(engines), {"half": suite.half, "history": history, **(settings or {})})
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    ordered = sorted(dialogues, key=lambda d: -len(d.turns))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    steps = sum(len(b[0].turns) for b in batches) * len(engines)
    with tqdm(total=steps, desc="memory suite", unit="turn", disable=not progress) as bar:
        for name, engine in engines.items():
            report.max_seq_len[name] = engine.model.config.max_seq_len
            for batch in batches:
                for script in converse(engine, batch, history, sampling, on_turn=bar.update):
                    report.add(name, script, suite)
    return report


# -- output --------------------------------------------------------------------------------------------
def print_table(report: MemoryReport) -> None:
    data, models = report.to_dict(), report.models
    head = " ".join(f"{m:>13}" for m in models)
    for task, rows in data["tasks"].items():
        print(f"\n{task}: accuracy by turns {DISTANCE_MEANS[task]}\n{'distance':>18} {'n':>5} {head}")
        sections = [(rows, data["questions"][task])]
        for group in ("by_value_kind", "by_variant"):
            sections.append((data[group].get(task, {}), data[f"questions_{group}"].get(task, {})))
        sections.append(({"all": data["overall"][task]}, {"all": data["questions_overall"][task]}))
        for accuracy, asked in sections:
            for key, row in accuracy.items():
                print(f"{key:>18} {asked[key]:>5} " + " ".join(f"{row[m]:>13.1%}" for m in models))
    print(f"\n{'answers not right':>26} {head}")
    for task, by_model in data["outcomes"].items():
        for kind in OUTCOMES[1:]:
            if any(by_model[m][kind] for m in models):
                print(f"{task + ' ' + kind:>26} " + " ".join(f"{by_model[m][kind]:>13}" for m in models))
    turns = max(data["state_bytes_after_turns"].values())
    totals = {"tokens processed": data["tokens_processed"], f"state bytes after {turns} turns": data["state_bytes"],
            "longest context read": {m: data["context"][m]["longest_read"] for m in models}}
    print()
    for title, row in totals.items():
        print(f"{title:>26} " + " ".join(f"{row[m]:>13,}" for m in models))
    for model in models:
        if beyond := data["context"][model]["beyond_max_seq_len"]:
            print(f"{model}: read more than its max_seq_len ({data['context'][model]['max_seq_len']}) tokens at "
                  + "; ".join(f"{t} distance {', '.join(map(str, d))}" for t, d in beyond.items()))


def plot(report: MemoryReport, path: str) -> None:
    """One panel per task, accuracy by distance, a line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.to_dict()
    tasks = list(data["tasks"])
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        distances = list(data["tasks"][task])
        for model in report.models:
            ax.plot(distances, [data["tasks"][task][d][model] for d in distances], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(distances, [str(d) for d in distances])
        ax.set(title=task, xlabel=f"turns {DISTANCE_MEANS[task]}", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.xaxis.label.set_size(8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    whose = "each model's own answers" if data["settings"]["history"] == "own" else "reference answers"
    fig.suptitle(f"Memory suite ({data['suite']['half']} half), {whose} as history")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model directory, RxT or stateless, or a reactive adapter directory")
    parser.add_argument("--baseline", help="a stateless model directory to compare an RxT --model with")
    add_engine_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                        help=f"tasks to run, of {', '.join(TASKS)}")
    parser.add_argument("--half", choices=HALVES, default="heldout",
                        help="the suite's words: heldout (frozen, the default) or dev (training may look at it)")
    parser.add_argument("--history", choices=HISTORIES, default="own",
                        help="whose answers each model keeps as history: its own (a real chat) or the suite's "
                        "hand-written reference answers")
    parser.add_argument("--per-task", type=int, default=8, help="dialogues per task and distance")
    parser.add_argument("--max-distance", type=int, help="only the distances up to this many turns")
    parser.add_argument("--min-distance", type=int, default=1, help="only the distances from this many turns "
                        "(the same dialogues as in a run from 1: each is drawn from its own seed)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write accuracy by distance, a panel per task, as a PNG here")
    parser.add_argument("--answers", metavar="FILE.jsonl",
                        help="write every scored answer here, one JSON line each")


def _model_type(directory: str, option: str) -> str:
    if (Path(directory) / "adapter.json").is_file():
        return "rxt-pretrained"  # a reactive adapter: an RxT around a pretrained base
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise ValueError(f"{option} {directory}: not a model directory (no config.json there)")
    return json.loads(config.read_text()).get("model_type", "")


def engines_for(model: str | None, baseline: str | None, device: str = "cpu", base: str | None = None,
                baselines: Sequence[str] = tuple(BASELINE_MODES), no_memory: bool = False,
                window_tokens: int | None = None) -> dict[str, ChatEngine]:
    """``--model`` may be an RxT, a reactive adapter or a stateless directory; ``--baseline`` goes with an
    RxT ``--model``."""
    if not model and not baseline:
        raise ValueError("give --model (an RxT or stateless model directory)")
    if baseline and _model_type(baseline, "--baseline") != "stateless":
        raise ValueError(f"--baseline {baseline}: not a stateless model")
    if model and _model_type(model, "--model") == "stateless":
        if baseline:
            raise ValueError("--model is a stateless model: --baseline compares one with an RxT --model")
        return build_engines(None, model, device, baselines=baselines, window_tokens=window_tokens)
    return build_engines(model, baseline, device, base, baselines, no_memory, window_tokens)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    for option, path in (("--json", args.json), ("--plot", args.plot), ("--answers", args.answers)):
        if path and not Path(path).resolve().parent.is_dir():  # found out before the run, not after it
            raise ValueError(f"{option} {path}: no such directory {Path(path).resolve().parent}")
    suite = load_suite(args.half)
    dialogues = build_dialogues(suite, tuple(args.tasks), args.per_task, args.seed, args.max_distance,
                                args.min_distance)
    if not dialogues:
        raise ValueError(f"no distance of {args.tasks} lies in --min-distance {args.min_distance} to "
                         f"--max-distance {args.max_distance}")
    engines = engines_for(args.model, args.baseline, args.device, args.base, args.baselines, args.no_memory,
                          args.window_tokens)
    settings = {"seed": args.seed, "per_task": args.per_task, "max_new_tokens": args.max_new_tokens,
                "distances": {t: list(task_distances(t, args.max_distance, args.min_distance)) for t in args.tasks},
                "distance_counts": {t: DISTANCE_MEANS[t] for t in args.tasks}}
    report = evaluate_memory(engines, suite, dialogues, args.history, args.batch_size, args.max_new_tokens,
                             settings=settings)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps(asdict(a)) + "\n" for a in report.answers))
    if args.plot:
        plot(report, args.plot)
    return 0
