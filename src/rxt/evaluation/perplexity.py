"""`rxt eval perplexity`: how well each model predicts the answers of real conversations, by turn.

Every model reads the same held-out dialogues turn by turn with the reference answers as history
(teacher forcing: perplexity is of the given answers) and scores each answer token:

    rxt           the RxT: the new query and its fixed-size memory of the earlier turns
    stateless     the stateless model re-reading the whole history before each query
    current_turn  the stateless model reading the current query only (no memory at all)
    window        the stateless model reading as many recent history tokens as fit in the RxT's
                  memory's bytes (equal state)
    rxt_no_memory the same RxT with its memory wiped before every turn: the control that separates
                  what the memory carries from how good a language model the RxT's decoder is

If the memory carries something, RxT's perplexity on later turns falls below the current-turn
model's; the stateless model bounds what the full history is worth, at a cost that grows with
every turn (the tokens processed show it).

Example:
    rxt eval perplexity --model runs/real/rxt --baseline runs/real/baseline \
        --data data/chitchat/heldout.jsonl --max-turns 32 --json ppl.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from rxt.data.dialogues import Dialogue
from rxt.data.jsonl import DialogueList
from rxt.engine import ChatEngine
from rxt.evaluation.recall import add_engine_arguments, build_engines, tokens_read

log = logging.getLogger(__name__)

# turn ranges of the printed table (1-based turn indices; None: no upper end)
RANGES = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, None))


class PerplexityReport:
    """Sums of answer negative log-likelihood and token counts per model and turn index."""

    def __init__(self, models: list[str]):
        self.models = models
        self.nll: dict[str, dict[int, float]] = {m: defaultdict(float) for m in models}
        self.count: dict[str, dict[int, int]] = {m: defaultdict(int) for m in models}
        self.processed: dict[str, dict[int, int]] = {m: defaultdict(int) for m in models}  # tokens read at turn t
        self.state: dict[str, dict[int, list[int]]] = {m: defaultdict(list) for m in models}  # bytes after turn t
        self.answers: dict[int, int] = defaultdict(int)  # answers scored at turn t (per model)

    def ppl(self, model: str, low: int = 1, high: int | None = None) -> float:
        turns = [t for t in self.count[model] if t >= low and (high is None or t <= high)]
        count = sum(self.count[model][t] for t in turns)
        return math.exp(sum(self.nll[model][t] for t in turns) / count) if count else float("nan")

    def to_dict(self) -> dict:
        turns = sorted(self.answers)
        through: dict[str, dict[str, int]] = {}
        for m in self.models:
            total = 0
            for t in turns:
                total += self.processed[m][t]
                through.setdefault(str(t), {})[m] = total
        return {
            "models": self.models,
            "by_turn": {str(t): {m: self.ppl(m, t, t) for m in self.models} for t in turns},
            "by_range": {_label(lo, hi): {m: self.ppl(m, lo, hi) for m in self.models} for lo, hi in RANGES
                         if any(t >= lo and (hi is None or t <= hi) for t in turns)},
            "from_turn_8": {m: self.ppl(m, 8) for m in self.models},
            "overall": {m: self.ppl(m) for m in self.models},
            "dialogues_by_turn": {str(t): self.answers[t] for t in turns},
            "answer_tokens_by_turn": {str(t): self.count[self.models[0]][t] for t in turns},
            "tokens_processed": {m: sum(self.processed[m].values()) for m in self.models},
            "tokens_processed_through_turn": through,
            "state_bytes": {m: max((max(v) for v in self.state[m].values()), default=0) for m in self.models},
            "state_bytes_by_turn": {str(t): {m: max(self.state[m][t]) for m in self.models} for t in turns},
        }


def _label(low: int, high: int | None) -> str:
    return str(low) if high == low else f"{low}+" if high is None else f"{low}-{high}"


@torch.no_grad()
def evaluate_perplexity(engines: dict[str, ChatEngine], dialogues: Sequence[Dialogue], batch_size: int = 8,
                        progress: bool = True) -> PerplexityReport:
    """``engines`` may hold rxt_no_memory: an RxT engine that never writes its memory (NoMemoryEngine)."""
    report = PerplexityReport(list(engines))
    batches = [dialogues[i : i + batch_size] for i in range(0, len(dialogues), batch_size)]
    bar = tqdm(total=len(batches) * len(engines), desc="perplexity", disable=not progress)
    for name, engine in engines.items():
        for batch in batches:
            _run_batch(name, engine, batch, report)
            bar.update()
    bar.close()
    return report


def _run_batch(name: str, engine: ChatEngine, batch: Sequence[Dialogue], report: PerplexityReport) -> None:
    sessions = [engine.new_session() for _ in batch]
    for t in range(max(len(d.turns) for d in batch)):
        active = [(s, d.turns[t]) for s, d in zip(sessions, batch, strict=True) if t < len(d.turns)]
        live = [s for s, _ in active]
        queries, answers = [x.query for _, x in active], [x.answer for _, x in active]
        read = tokens_read(engine, live, queries, answers)  # RxT: + its encoder reading each turn (see tokens_read)
        for (nll, count), tokens in zip(engine.score(live, queries, answers), read, strict=True):
            report.nll[name][t + 1] += nll
            report.count[name][t + 1] += count
            report.processed[name][t + 1] += tokens
        if name == report.models[0]:
            report.answers[t + 1] += len(active)
        engine.observe(live, queries, answers)  # (rxt_no_memory writes nothing: STM_0 every turn)
        for session in live:
            session.wait()
            report.state[name][t + 1].append(engine.state_bytes(session))


def print_table(data: dict) -> None:
    models = data["models"]
    print(f"{'turns':>8} {'answers':>8} " + " ".join(f"{m:>13}" for m in models))
    for label, row in data["by_range"].items():
        low = int(label.split("-")[0].rstrip("+"))
        high = int(label.split("-")[1]) if "-" in label else (low if "+" not in label else None)
        answers = sum(n for t, n in data["dialogues_by_turn"].items() if int(t) >= low and (high is None or int(t) <= high))
        print(f"{label:>8} {answers:>8} " + " ".join(f"{row[m]:>13.2f}" for m in models))
    print(f"{'8+':>8} {'':>8} " + " ".join(f"{data['from_turn_8'][m]:>13.2f}" for m in models))
    print(f"{'all':>8} {'':>8} " + " ".join(f"{data['overall'][m]:>13.2f}" for m in models))
    print(f"{'tokens':>17} " + " ".join(f"{data['tokens_processed'][m]:>13,}" for m in models))
    print(f"{'state bytes':>17} " + " ".join(f"{data['state_bytes'][m]:>13,}" for m in models))
    print(f"{'params':>17} " + " ".join(f"{data['params'][m]:>13,}" for m in models))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="RxT model directory, or a reactive adapter directory")
    parser.add_argument("--baseline", help="stateless model directory (full history, current turn, window)")
    parser.add_argument("--data", required=True, help="dialogue JSONL (e.g. data/chitchat/heldout.jsonl)")
    parser.add_argument("--dialogues", type=int, help="score the first N dialogues only (default: all)")
    parser.add_argument("--max-turns", type=int, default=32, help="each dialogue's first turns only (0: all)")
    parser.add_argument("--max-chars", type=int, default=0, help="cut each message to this many characters (0: no cut)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    add_engine_arguments(parser, no_memory=False)  # (the no-memory control always runs beside an RxT)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.max_turns < 0 or args.max_chars < 0:
        raise ValueError("--max-turns and --max-chars must be >= 0 (0: no limit)")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json: directory {Path(args.json).parent} does not exist")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data: no such file: {args.data} (`rxt data fetch` prepares data/chitchat/)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dialogues = DialogueList.read(args.data, args.max_turns, args.max_chars).dialogues
    dialogues = dialogues[: args.dialogues] if args.dialogues else dialogues
    # with an RxT, also the same model and weights reading STM_0 at every turn
    engines = build_engines(args.model, args.baseline, args.device, args.base, args.baselines, no_memory=bool(args.model),
                            window_tokens=args.window_tokens)
    data = evaluate_perplexity(engines, dialogues, args.batch_size, progress=not args.no_progress).to_dict()
    data["params"] = {name: engine.model.num_parameters() for name, engine in engines.items()}
    data["data"], data["max_turns"], data["max_chars"] = args.data, args.max_turns, args.max_chars
    data["dialogues"] = len(dialogues)
    print_table(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0
