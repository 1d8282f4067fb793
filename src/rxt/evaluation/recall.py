"""`rxt eval recall`: does the model remember what it was told k turns ago?

Every model hears the same held-out dialogues. By default the reference answers are its history
(teacher forcing), so one wrong answer does not spoil the turns after it; with ``history="own"``
(``--history own``) the model answers every turn and keeps its own answers, as in a real chat. On
each recall question it answers greedily; the answer is right when it contains the exact value (a
whole word, any case). A wrong
answer that names the value of another fact of the same dialogue is counted apart ("another fact"):
the model kept that value but bound it to the wrong question.

Models compared: RxT (its memory), and the stateless baseline reading the full history, the current
turn only (no memory: the lower bound) and a history window with the RxT memory's footprint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from rxt.data.dialogues import Dialogue, generate_dialogues, new_phrasing, new_template
from rxt.engine import ChatEngine
from rxt.generation import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class RecallReport:
    hits: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    asked: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # the same by group (see groups()): model -> group -> key -> hits, and group -> key -> questions
    group_hits: dict[str, dict[str, dict[str, int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(int))))
    group_asked: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    # wrong answers that name the value of another fact asked in the same dialogue: the value was
    # kept, but bound to the wrong question
    confusions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    nll: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    scored_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens_processed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[dict] = field(default_factory=list)  # the first answers, right or wrong
    mistakes: list[dict] = field(default_factory=list)  # every wrong answer (--mistakes)
    history: str = "reference"  # whose answers the models kept as history (HISTORIES)

    def accuracy(self, model: str, distance: int | None = None) -> float:
        if distance is None:
            total = sum(self.asked.values())
            return sum(self.hits[model].values()) / total if total else float("nan")
        return self.hits[model][distance] / self.asked[distance] if self.asked[distance] else float("nan")

    def within(self, counts: dict[int, int], low: int, high: float) -> int:
        """The questions (or hits) of ``counts`` asked low..high turns after the fact, both ends included."""
        return sum(n for d, n in counts.items() if low <= d <= high)

    def ranges(self) -> dict[str, tuple[int, float]]:
        """The DISTANCE_RANGES some question falls in, by label ("1-4", "65+")."""
        return {f"{low}-{high}" if high != math.inf else f"{low}+": (low, high)
                for low, high in DISTANCE_RANGES if self.within(self.asked, low, high)}

    def wrong(self, model: str) -> dict[str, int]:
        """Wrong answers: how many, and how many of them name another fact of the same dialogue."""
        wrong = sum(self.asked.values()) - sum(self.hits[model].values())
        return {"wrong": wrong, "another_fact": self.confusions[model]}

    def group_accuracy(self, model: str, group: str, key: str) -> float:
        asked = self.group_asked[group][key]
        return self.group_hits[model][group][key] / asked if asked else float("nan")

    def by_group(self, group: str, models: list[str]) -> dict[str, dict[str, float]]:
        """Accuracy per key of a group; by phrasing only where some phrasing is new (the synthetic
        held-out split), since all would be "both seen" otherwise."""
        keys = list(self.group_asked[group])
        keys = [p for p in PHRASINGS if p in keys] if group == "phrasing" else sorted(keys)
        if group == "phrasing" and keys in ([], [PHRASINGS[0]]):
            return {}
        return {k: {m: self.group_accuracy(m, group, k) for m in models} for k in keys}

    def questions(self, group: str) -> dict[str, int]:
        return {k: self.group_asked[group][k] for k in self.by_group(group, [])}

    def perplexity(self, model: str) -> float:
        return (
            math.exp(self.nll[model] / self.scored_tokens[model])
            if self.scored_tokens[model]
            else float("nan")
        )

    def to_dict(self) -> dict:
        models, ranges = list(self.nll), self.ranges()
        return {
            "by_distance": {d: {m: self.accuracy(m, d) for m in models} for d in sorted(self.asked)},
            "questions_by_distance": {d: self.asked[d] for d in sorted(self.asked)},
            "by_distance_range": {k: {m: self.within(self.hits[m], *r) / self.within(self.asked, *r) for m in models}
                                  for k, r in ranges.items()},
            "questions_by_distance_range": {k: self.within(self.asked, *r) for k, r in ranges.items()},
            "overall": {m: self.accuracy(m) for m in models},
            "by_slot": self.by_group("slot", models),
            "questions_by_slot": self.questions("slot"),
            "by_phrasing": self.by_group("phrasing", models),
            "questions_by_phrasing": self.questions("phrasing"),
            "by_new_statement": self.by_group("new_statement", models),
            "questions_by_new_statement": self.questions("new_statement"),
            "perplexity": {m: self.perplexity(m) for m in models},
            "wrong_answers": {m: self.wrong(m) for m in models},
            "tokens_processed": dict(self.tokens_processed),
            "history": self.history,
            "examples": self.examples,
        }


PHRASINGS = ("both seen", "told new", "asked new", "both new")
# reference: the dataset's answers are every model's history; own: each model keeps its own answers
HISTORIES = ("reference", "own")
# spans of distance the table also sums up (the project's targets are set at <= 4 and at 8; a queue of
# 16 turns forgets from 17 on)
DISTANCE_RANGES = ((1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, math.inf))


def groups(dialogue: Dialogue, t: int) -> dict[str, str]:
    """The groups the recall question on turn t counts in: "slot", the kind of fact ("city"), when its
    check names one; "phrasing" (PHRASINGS), whether it and the statement it asks about use held-out
    phrasings; and "new_statement", the held-out template that statement used, if it used one."""
    turn = dialogue.turns[t]
    told = dialogue.turns[t - turn.check["distance"]].query
    keys = {"phrasing": PHRASINGS[new_phrasing(told) + 2 * new_phrasing(turn.query)]}
    if "slot" in turn.check:
        keys["slot"] = turn.check["slot"]
    if template := new_template(told):
        keys["new_statement"] = template
    return keys


def is_correct(answer: str, value: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", answer, flags=re.IGNORECASE) is not None


def evaluate_recall(
    engines: dict[str, ChatEngine],
    dialogues: Sequence[Dialogue],
    batch_size: int = 32,
    max_new_tokens: int = 24,
    progress: bool = True,
    history: str = "reference",
) -> RecallReport:
    """Run every engine over the dialogues, batch by batch and turn by turn; ``history`` (HISTORIES)
    says whose answers each model keeps."""
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    report = RecallReport(history=history)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    batches = [dialogues[i : i + batch_size] for i in range(0, len(dialogues), batch_size)]
    bar = tqdm(total=len(batches) * len(engines), desc="recall eval", disable=not progress)
    for batch in batches:
        for d in batch:
            for t, turn in enumerate(d.turns):
                if turn.check:
                    report.asked[turn.check["distance"]] += 1
                    for group, key in groups(d, t).items():
                        report.group_asked[group][key] += 1
        for name, engine in engines.items():
            _run_batch(name, engine, batch, sampling, report)
            bar.update()
    bar.close()
    return report


def _run_batch(
    name: str, engine: ChatEngine, batch: Sequence[Dialogue], sampling: SamplingConfig, report: RecallReport
) -> None:
    sessions = [engine.new_session() for _ in batch]
    own = report.history == "own"  # then every turn is answered, and those answers are kept
    kept_by_session: dict[int, list[str]] = {id(s): [] for s in sessions}  # the answers each history holds
    for t in range(max(len(d.turns) for d in batch)):
        active = [(s, d, d.turns[t]) for s, d in zip(sessions, batch, strict=True) if t < len(d.turns)]
        live, turns = [s for s, _, _ in active], [turn for _, _, turn in active]
        queries, answers = [x.query for x in turns], [x.answer for x in turns]
        asking = active if own else [a for a in active if a[2].check]
        kept = list(answers)
        if asking:
            replies = engine.interact_batch(
                [s for s, _, _ in asking], [x.query for _, _, x in asking], sampling, remember=False
            )
            if own:
                kept = [reply.text for reply in replies]
            for (session, dialogue, turn), reply in zip(asking, replies, strict=True):
                if turn.check:
                    told_answer = kept_by_session[id(session)][t - turn.check["distance"]]
                    _count_answer(report, name, dialogue, t, reply.text, told_answer)
        # perplexity is always of the reference answers; the tokens processed are of the kept ones
        for (nll, count), tokens in zip(
            engine.score(live, queries, answers), tokens_read(engine, live, queries, kept), strict=True
        ):
            report.nll[name] += nll
            report.scored_tokens[name] += count
            report.tokens_processed[name] += tokens
        engine.observe(live, queries, kept)
        for session, answer in zip(live, kept, strict=True):
            kept_by_session[id(session)].append(answer)
    for session in sessions:
        session.wait()


def _count_answer(report: RecallReport, name: str, dialogue: Dialogue, t: int, text: str, told_answer: str) -> None:
    """Score the answer to the recall question on turn t of the dialogue; ``told_answer`` is the answer
    the model's history kept for the turn that told the fact."""
    check = dialogue.turns[t].check
    right = is_correct(text, check["value"])
    report.hits[name][check["distance"]] += right
    others = {x.check["value"] for x in dialogue.turns if x.check} - {check["value"]}
    report.confusions[name] += not right and any(is_correct(text, v) for v in others)
    for group, key in groups(dialogue, t).items():
        report.group_hits[name][group][key] += right
    answer = {"model": name, "told": dialogue.turns[t - check["distance"]].query, "told_answer": told_answer,
              "query": dialogue.turns[t].query, "answer": text, "value": check["value"],
              "distance": check["distance"], "correct": right}
    if len(report.examples) < 20:
        report.examples.append(answer)
    if not right:
        report.mistakes.append(answer)


def prompt_tokens(engine: ChatEngine, sessions, queries) -> list[int]:
    """Tokens each model reads before its answer: the history it re-reads (stateless) and the prompt
    (for an imported chat model's RxT, the template's preamble opens every turn's prompt)."""
    return [
        len(engine.context(s)) + len(engine.turn_prompt(q)) if hasattr(engine, "context") else len(engine.turn_prompt(q))
        for s, q in zip(sessions, queries, strict=True)
    ]


def tokens_read(engine: ChatEngine, sessions, queries, answers) -> list[int]:
    """Tokens processed for one turn of each session, ``answers`` being the ones the history keeps: the
    prompt with its history, the answer and its closing, and for RxT the memory encoder's reading of the
    interaction, unless the memory is written from the states generation computed (``keeps_states``:
    then the update runs only the closing, which ``answered`` counts already)."""
    tokens, tok = [], engine.tokenizer
    rereads = engine.model_type == "rxt" and not getattr(engine, "keeps_states", False)
    for read, query, answer in zip(prompt_tokens(engine, sessions, queries), queries, answers, strict=True):
        answered = len(tok.answer(answer)) + len(tok.closing())
        encoded = len(engine.turn_prompt(query)) + answered if rereads else 0
        tokens.append(read + answered + encoded)
    return tokens


BASELINE_MODES = {"stateless": "full", "current_turn": "current", "window": "window"}  # label -> engine mode
NO_MEMORY = "rxt_no_memory"


def build_engines(
    rxt_dir: str | None, baseline_dir: str | None, device: str = "cpu", base: str | None = None,
    baselines: Sequence[str] = tuple(BASELINE_MODES), no_memory: bool = False, window_tokens: int | None = None,
) -> dict[str, ChatEngine]:
    """The RxT (a model directory, or a reactive adapter with its ``base``), the stateless baseline in
    each of ``baselines``, and with ``no_memory`` the same RxT reading STM_0 at every turn. The window
    baseline keeps ``window_tokens`` of history, by default as many as make a KV cache the size of the
    RxT's memory state (of a reactive adapter too, whose memory has fewer layers than its base)."""
    from rxt.baselines import StatelessEngine
    from rxt.engine import NoMemoryEngine, ReactiveEngine
    from rxt.model import StatelessLM, load_model

    if window_tokens is not None and window_tokens < 1:
        raise ValueError(f"--window-tokens must be at least 1, got {window_tokens}")
    engines: dict[str, ChatEngine] = {}
    if rxt_dir:
        model = load_model(rxt_dir, device, base)
        if isinstance(model, StatelessLM):
            raise ValueError(f"--model {rxt_dir}: a stateless model; give it as --baseline")
        engines["rxt"] = ReactiveEngine(model, device=device)
        if no_memory:
            engines[NO_MEMORY] = NoMemoryEngine(model, device=device)
    if baseline_dir:
        baseline = StatelessLM.from_pretrained(baseline_dir)
        window = window_tokens
        if rxt_dir and window is None:  # equal state size: the window holds as many numbers as the RxT memory
            from rxt.baselines import window_tokens_for

            rxt = engines["rxt"].model
            window = window_tokens_for(baseline.config, rxt.initial_memory(1).numel())
        for label in baselines:
            engines[label] = StatelessEngine(baseline, device=device, mode=BASELINE_MODES[label], window_tokens=window)
    if not engines:
        raise ValueError("give --model (an RxT directory) and/or --baseline (a stateless directory)")
    return engines


def add_engine_arguments(parser: argparse.ArgumentParser, no_memory: bool = True) -> None:
    """The options every evaluation shares for a reactive adapter, the baseline's reading modes and the
    no-memory control."""
    parser.add_argument("--base", help="with a reactive adapter directory (adapter.json) as --model: its pretrained "
                        "base directory (default: where adapter.json says it was)")
    parser.add_argument("--baselines", nargs="+", choices=tuple(BASELINE_MODES), default=list(BASELINE_MODES),
                        help="how the stateless baseline reads the conversation: the full history, the current "
                        "turn only, a window of history as big as the RxT memory")
    parser.add_argument("--window-tokens", type=int, metavar="N",
                        help="history tokens the window baseline keeps (default: a KV cache as big as the RxT "
                        "--model's memory; without one, as big as an STM of the baseline's config)")
    if no_memory:
        parser.add_argument("--no-memory", action="store_true",
                            help=f"also the RxT with its memory never written ({NO_MEMORY}: STM_0 at every turn)")


def print_table(report: RecallReport) -> None:
    data = report.to_dict()
    models = list(data["overall"])
    print(f"{'distance':>8} {'n':>5} " + " ".join(f"{m:>13}" for m in models))
    for d, row in data["by_distance"].items():
        print(f"{d:>8} {data['questions_by_distance'][d]:>5} " + " ".join(f"{row[m]:>13.1%}" for m in models))
    for span, row in data["by_distance_range"].items():
        print(f"{span:>8} {data['questions_by_distance_range'][span]:>5} " + " ".join(f"{row[m]:>13.1%}" for m in models))
    print(
        f"{'all':>8} {sum(report.asked.values()):>5} "
        + " ".join(f"{data['overall'][m]:>13.1%}" for m in models)
    )
    print(f"{'ppl':>14} " + " ".join(f"{data['perplexity'][m]:>13.3f}" for m in models))
    print(f"{'tokens':>14} " + " ".join(f"{data['tokens_processed'][m]:>13,}" for m in models))
    print(f"{'wrong':>14} " + " ".join(f"{data['wrong_answers'][m]['wrong']:>13}" for m in models))
    print(f"{'another fact':>14} " + " ".join(f"{data['wrong_answers'][m]['another_fact']:>13}" for m in models))
    # "told new": the fact was stated in a phrasing training never used; "told in": which one
    for group, title, width in (("slot", "fact", ">12"), ("phrasing", "phrasing", ">12"),
                                ("new_statement", "told in", "<40")):
        if data[f"by_{group}"]:
            print(f"\n{title:{width}} {'n':>5} " + " ".join(f"{m:>13}" for m in models))
            for key, row in data[f"by_{group}"].items():
                print(f"{key:{width}} {data[f'questions_by_{group}'][key]:>5} "
                      + " ".join(f"{row[m]:>13.1%}" for m in models))


def plot(report: RecallReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.to_dict()
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in data["overall"]:
        distances = list(data["by_distance"])
        ax.plot(distances, [data["by_distance"][d][model] for d in distances], marker="o", label=model)
    ax.set(
        xlabel="turns since the fact was told",
        ylabel="recall accuracy",
        ylim=(0, 1.02),
        title="Memory recall, " + ("each model's own answers" if report.history == "own" else "reference answers")
        + " as history",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="RxT model directory, or a reactive adapter directory")
    parser.add_argument("--baseline", help="stateless baseline model directory")
    add_engine_arguments(parser)
    parser.add_argument("--data", help="dialogue JSONL with check fields (default: synthetic held-out split)")
    parser.add_argument("--dialogues", type=int, default=200, help="synthetic held-out dialogues to generate")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="synthetic split (train: values and phrasings seen in training, a memorisation check)")
    parser.add_argument("--values", choices=VALUE_SOURCES,
                        help="where the values come from (default: the split's pools): the other split's pools, "
                        "or newly invented words of one kind (with --split train) - tells new phrasings "
                        "from new values apart")
    parser.add_argument("--turns", type=int, nargs=2, default=(4, 20), metavar=("MIN", "MAX"),
                        help="length of the synthetic dialogues (2 2: one fact, then the question about it)")
    parser.add_argument("--max-distance", type=int, default=16,
                        help="synthetic dialogues: the longest distance a fact is asked at (at most MAX - 1 of --turns)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--mistakes", metavar="FILE.jsonl",
                        help="write every wrong answer here, one JSON line each: model, the statement it asks "
                        "about (told), the answer to it the history kept (told_answer), query, answer, value, distance")
    parser.add_argument("--plot", help="write an accuracy-by-distance PNG here")
    parser.add_argument("--history", choices=HISTORIES, default="reference",
                        help="whose answers each model keeps as history: the dataset's (reference, teacher "
                        "forcing) or its own, answering every turn as in a chat (own; slower)")


VALUE_SOURCES = ("train", "heldout", "fresh-syllables", "fresh-english")


def value_options(args: argparse.Namespace) -> dict:
    """DialogueGenerator options for --values."""
    if args.values is None:
        return {}
    if args.values.startswith("fresh-"):
        if args.split != "train":
            raise ValueError(f"--values {args.values} needs --split train (invented values are a training-side option)")
        return {"fresh_values": 1.0, "fresh_words": args.values.removeprefix("fresh-")}
    return {"values": args.values}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        if args.values:
            raise ValueError("--values picks the values of synthetic dialogues; --data brings its own")
        from rxt.data.jsonl import read_dialogues

        dialogues = read_dialogues(args.data)
    else:
        low, high = args.turns
        if args.max_distance < 1:
            raise ValueError(f"--max-distance must be >= 1, got {args.max_distance}")
        dialogues = generate_dialogues(args.dialogues, seed=args.seed, split=args.split, min_turns=low,
                                       max_turns=high, max_distance=args.max_distance, **value_options(args))
    if not any(turn.check for d in dialogues for turn in d.turns):
        raise ValueError(f"{args.data or 'these dialogues'}: no turn asks a recall question (a 'check' field); "
                         "nothing to measure")
    for option, path in (("--json", args.json), ("--plot", args.plot), ("--mistakes", args.mistakes)):
        if path and not Path(path).resolve().parent.is_dir():  # found out before the run, not after it
            raise ValueError(f"{option} {path}: no such directory {Path(path).resolve().parent}")
    engines = build_engines(args.model, args.baseline, args.device, args.base, args.baselines, args.no_memory,
                            args.window_tokens)
    report = evaluate_recall(engines, dialogues, args.batch_size, args.max_new_tokens, history=args.history)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.mistakes:
        Path(args.mistakes).write_text("".join(json.dumps(m) + "\n" for m in report.mistakes))
    if args.plot:
        plot(report, args.plot)
    return 0
