"""`rxt bench latency`: per-turn latency and cost of RxT against stateless baselines (DESIGN.md 7.1, 7.4).

Every turn does the same work -- a query of q random tokens, then exactly a answer tokens (greedy,
stop token disabled) -- so turns differ only by the history behind them. Each system runs through
its engine's own pieces (``plan`` -> ``decode_tokens`` -> ``finish``), as a chat does:

    rxt            ReactiveEngine: memory K/V projected once per turn before the prompt pass; after
                   the answer, encode + consolidate on the engine's background worker
    rxt_no_update  the same decoder work with no memory update at all: the reference showing that
                   the background update adds nothing to the time to the last answer token
    baseline       StatelessEngine "full": re-reads the whole history every turn
    cached         StatelessEngine "cached": a KV cache kept across turns; prefills only new tokens

With ``--compile`` the same engines also run on the fast path (rxt.fast: static caches, prefill and
decode compiled once), as ``rxt_compiled``, ``baseline_compiled`` and ``cached_compiled``, interleaved
with the eager ones; their warm-up (compilation) is one whole untimed conversation, reported apart.
``--static`` adds the fast path uncompiled (``*_static``) the same way.

Per turn: prompt phase (plan + prefill), time to first token, time to last answer token, memory
update (timed on the worker), tokens processed (prompt + answer, plus the memory encoder's input for
RxT) and state held (the STM; the KV cache kept across turns, or for "full" the one it rebuilds over
the history every turn). The harness waits for each memory
update outside the clock, as a user reading the answer would, and the systems take turns round-robin
so slow spells of a shared machine fall on all of them alike. Medians of ``--repeats`` whole
conversations, with min/max.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models
from tqdm import tqdm

from rxt.baselines import StatelessEngine
from rxt.bench.timing import describe_machine, single_threaded, summarize, synchronize
from rxt.config import ModelConfig
from rxt.engine import ChatEngine, ReactiveEngine
from rxt.generation import SamplingConfig, decode_tokens
from rxt.model import ReactiveTransformer, StatelessLM, load_model
from rxt.session import TurnStats
from rxt.tokenizer import SPECIAL_TOKENS, Tokenizer

log = logging.getLogger(__name__)

# round-robin order: each RxT variant follows a stateless turn, so neither finds the RxT weights warmer in cache
SYSTEMS = ("rxt", "baseline", "rxt_no_update", "cached")
FAST_MODES = ("static", "compiled")  # rxt.fast's modes; each adds twins of rxt, baseline and cached: rxt_static, ...
LABELS = {"rxt": "RxT", "baseline": "stateless, re-reads history", "cached": "stateless, persistent KV cache"}
# the targets for RxT against the persistent cache, in the same mode: (what, from turn)
# cpu: the answering thread's CPU time. With one torch thread every op of a turn runs on it, so this
# is the turn's work without the waits a busy shared machine adds (the memory update's own thread is
# not counted: it is off the answer path either way; the GPU's time is not counted either: CPU only)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
BREAKEVEN_TARGETS = {"prompt": 4, "answer": 8}
DECODE_PARITY, DECODE_WIN_TURN = 0.95, 8
TIMINGS = ("prompt_s", "ttft_s", "answer_s")
FLAT_TARGET, GROWTH_TARGET, UPDATE_TOLERANCE = 1.2, 4.0, 0.05


@dataclass
class TurnMeasure:
    prompt_s: float  # plan + prefill: the prompt phase
    ttft_s: float
    answer_s: float  # to the last answer token
    stats: TurnStats  # tokens, state bytes and (RxT) the memory-update time, filled by the engine


class Conversation:
    """One system's conversation, driven at the token level through its engine."""

    def __init__(self, engine: ChatEngine, remember: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.engine, self.remember, self.clock = engine, remember, clock
        self.session = engine.new_session()
        self.measures: list[TurnMeasure] = []

    def turn(self, query: list[int], answer_tokens: int) -> None:
        """Answer ``query`` with exactly ``answer_tokens`` tokens, then let the memory update finish."""
        device, marks = self.engine.device, {}
        synchronize(device)
        start = self.clock()
        plan = self.engine.plan([self.session], [query], max_new_tokens=answer_tokens)

        def step(*args: torch.Tensor) -> torch.Tensor:
            logits = plan.step(*args)
            if "prompt" not in marks:  # the first call is the prefill
                synchronize(device)
                marks["prompt"] = self.clock() - start
            return logits

        answer: list[int] = []
        greedy = SamplingConfig(max_new_tokens=answer_tokens)
        for token in decode_tokens(step, plan.prompt, plan.key_mask, plan.positions, greedy, stop_id=None):
            answer.append(int(token))  # waits for the device
            marks.setdefault("first", self.clock() - start)
        answer_s = self.clock() - start
        prompt_tokens = plan.prompt_tokens[0]
        stat = TurnStats(self.session.turns + 1, prompt_tokens, len(answer), marks["first"], answer_s,
                         tokens_processed=prompt_tokens + len(answer))
        if self.remember:
            self.engine.finish([self.session], [query + answer], [stat])  # RxT: update starts on the worker
        self.measures.append(TurnMeasure(marks["prompt"], marks["first"], answer_s, stat))
        self.session.wait()  # outside the clock: the update ends before anything else is timed


def fixed_queries(turns: int, query_tokens: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``[Q] x_1 .. x_{q-2} [A]`` with random ordinary tokens: the same queries for every system."""
    generator = torch.Generator().manual_seed(seed)
    first = len(SPECIAL_TOKENS)
    body = torch.randint(first, vocab_size, (turns, query_tokens - 2), generator=generator)
    query_id, answer_id = SPECIAL_TOKENS.index("[Q]"), SPECIAL_TOKENS.index("[A]")
    return [[query_id, *row.tolist(), answer_id] for row in body]


def special_tokens_only() -> Tokenizer:
    """A tokenizer with just the chat-template tokens: enough for engines that never see text."""
    backend = BackendTokenizer(models.BPE())
    backend.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(backend)


def build_engines(args: argparse.Namespace) -> tuple[dict[str, ChatEngine], ModelConfig, dict[str, Any]]:
    """RxT and a stateless LM of the same config: random-init from a preset, or loaded from directories."""
    torch.manual_seed(args.seed)
    if args.model:
        rxt = load_model(args.model, args.device)
        if not isinstance(rxt, ReactiveTransformer):
            raise ValueError(f"--model {args.model} is not an RxT model directory")
        config, source = rxt.config, {"model": str(args.model)}
    else:
        config = ModelConfig.from_name(args.preset, **config_overrides(args.set))
        rxt, source = ReactiveTransformer(config), {"preset": args.preset}
    if args.baseline_model:
        stateless = load_model(args.baseline_model, args.device)
        if not isinstance(stateless, StatelessLM):
            raise ValueError(f"--baseline-model {args.baseline_model} is not a stateless model directory")
        source["baseline_model"] = str(args.baseline_model)
        if stateless.config != config:
            log.warning("the baseline's config differs from the RxT model's: sizes are not matched")
    else:
        stateless = StatelessLM(config)
    tokenizer = getattr(rxt, "tokenizer", None) or special_tokens_only()
    reactive = ReactiveEngine(rxt, tokenizer, args.device)
    engines: dict[str, ChatEngine] = {
        "rxt": reactive,
        "baseline": StatelessEngine(stateless, tokenizer, args.device, mode="full"),
        "rxt_no_update": reactive,  # same engine and weights; its turns are just not remembered
        "cached": StatelessEngine(stateless, tokenizer, args.device, mode="cached"),
    }
    for mode in fast_modes(args):
        full = StatelessEngine(stateless, tokenizer, args.device, "full", inference=mode)
        cached = StatelessEngine(stateless, tokenizer, args.device, "cached", inference=mode)
        cached.fast = full.fast  # one decoder for both stateless modes: each graph is compiled once, not twice
        reactive = ReactiveEngine(rxt, tokenizer, args.device, inference=mode)
        engines.update({f"rxt_{mode}": reactive, f"baseline_{mode}": full, f"cached_{mode}": cached})
    source.update(rxt_parameters=rxt.num_parameters(), baseline_parameters=stateless.num_parameters(),
                  rxt_decoder_parameters=_decoder_parameters(rxt))
    return engines, config, source


def fast_modes(args: argparse.Namespace) -> list[str]:
    chosen = {"static": args.static, "compiled": args.compile}
    return [mode for mode in FAST_MODES if chosen[mode]]


def config_overrides(settings: list[str]) -> dict[str, Any]:
    """``--set d_model=512`` pairs -> {"d_model": 512} (JSON values, else strings)."""
    overrides = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {setting!r}")
        if key not in ModelConfig.__dataclass_fields__:
            raise ValueError(f"--set {key}: not a model config key; known keys are {sorted(ModelConfig.__dataclass_fields__)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _decoder_parameters(model: ReactiveTransformer) -> int:
    return sum(p.numel() for p in model.decoder.parameters()) + model.embedding.weight.numel()


def run_conversations(
    engines: dict[str, ChatEngine], queries: list[list[int]], answer_tokens: int, repeats: int,
    tick: Callable[[], object] = lambda: None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[list[TurnMeasure]]]:
    """``repeats`` whole conversations per system, turns interleaved round-robin across systems."""
    runs: dict[str, list[list[TurnMeasure]]] = {name: [] for name in engines}
    for _ in range(repeats):
        conversations = {name: Conversation(e, name != "rxt_no_update", clock) for name, e in engines.items()}
        for query in queries:
            for conversation in conversations.values():
                conversation.turn(query, answer_tokens)
            tick()
        for name, conversation in conversations.items():
            runs[name].append(conversation.measures)
    return runs


def warm_up_compiled(
    engines: dict[str, ChatEngine], queries: list[list[int]], answer_tokens: int
) -> dict[str, float]:
    """One whole untimed conversation per fast-path system, so no graph is compiled (nor cache bucket
    first met) while timing; seconds each took, compilation included."""
    seconds = {}
    for name, engine in engines.items():
        if engine.inference != "eager":
            start = time.perf_counter()
            run_conversations({name: engine}, queries, answer_tokens, repeats=1)
            seconds[name] = time.perf_counter() - start
    return seconds


def per_turn_rows(runs: dict[str, list[list[TurnMeasure]]]) -> list[dict[str, Any]]:
    """One row per turn: medians with min/max of every timing, tokens and state per system."""
    rows, cumulative = [], dict.fromkeys(runs, 0)
    for index in range(len(runs["rxt"][0])):
        row: dict[str, Any] = {"turn": index + 1}
        for name, conversations in runs.items():
            measures = [conversation[index] for conversation in conversations]
            for timing in TIMINGS:
                _add_spread(row, f"{name}_{timing}", [getattr(m, timing) for m in measures])
            row[f"{name}_decode_tokens_per_s"] = statistics.median(_decode_speed(m) for m in measures)
            if name == "rxt_no_update":
                continue
            tokens = {m.stats.tokens_processed for m in measures}
            if len(tokens) != 1:
                raise RuntimeError(f"{name} turn {index + 1}: token counts differ between repeats: {tokens}")
            cumulative[name] += tokens.pop()
            row[f"{name}_tokens"] = measures[0].stats.tokens_processed
            row[f"{name}_cumulative_tokens"] = cumulative[name]
            row[f"{name}_state_bytes"] = measures[0].stats.state_bytes
        _add_spread(row, "rxt_memory_update_s", [run[index].stats.memory_update_s or 0.0 for run in runs["rxt"]])
        rows.append(row)
    return rows


def _decode_speed(measure: TurnMeasure) -> float:
    """Tokens per second after the first answer token: the decode steps alone."""
    steps = measure.stats.answer_tokens - 1
    return steps / (measure.answer_s - measure.ttft_s) if steps else float("nan")


def breakeven_turn(rows: list[dict[str, Any]], faster: str, slower: str) -> int | None:
    """The first turn from which ``faster`` stays below ``slower`` (medians) to the last turn; None if
    it is not below at the last turn."""
    turn = None
    for row in reversed(rows):
        if row[faster] >= row[slower]:
            break
        turn = row["turn"]
    return turn


def breakeven_summary(rows: list[dict[str, Any]], suffix: str = "") -> dict[str, Any]:
    """RxT against the persistent cache in one mode (eager, or ``suffix`` "_static" / "_compiled"):
    break-even turns, decode speed ratios, and the issue's targets met or not."""
    rxt, cached = "rxt" + suffix, "cached" + suffix
    out: dict[str, Any] = {}
    for phase in BREAKEVEN_TARGETS:
        out[f"breakeven_{phase}_turn"] = breakeven_turn(rows, f"{rxt}_{phase}_s", f"{cached}_{phase}_s")
    speed = [row[f"{rxt}_decode_tokens_per_s"] / row[f"{cached}_decode_tokens_per_s"] for row in rows]
    out["decode_speed_ratio_per_turn"] = speed  # RxT tokens/s over the cached baseline's
    out["breakeven_decode_turn"] = breakeven_turn(
        [{"turn": row["turn"], "slow": 1.0, "fast": 1.0 / ratio} for row, ratio in zip(rows, speed, strict=True)],
        "fast", "slow")
    targets = {}
    for phase, turn in BREAKEVEN_TARGETS.items():
        found = out[f"breakeven_{phase}_turn"]
        targets[f"{phase} faster than the persistent cache from turn {turn}"] = found is not None and found <= turn
    targets[f"decode tokens/s >= {DECODE_PARITY}x the persistent cache's at turn 1"] = speed[0] >= DECODE_PARITY
    if len(rows) >= DECODE_WIN_TURN:
        win = out["breakeven_decode_turn"]
        targets[f"decode faster from turn {DECODE_WIN_TURN}"] = win is not None and win <= DECODE_WIN_TURN
    out["breakeven_targets"] = targets
    return out


def _add_spread(row: dict[str, Any], name: str, values: list[float]) -> None:
    spread = summarize(values)
    row[name], row[f"{name}_min"], row[f"{name}_max"] = spread["median_s"], spread["min_s"], spread["max_s"]


def token_closed_forms(turns: int, turn_tokens: int) -> dict[str, list[int]]:
    """Cumulative tokens after n = 1..N turns of T tokens, in closed form.

    rxt       decoder reads T, memory encoder reads T:  2 T n               (linear)
    baseline  turn k re-reads k T tokens:                T n (n + 1) / 2     (quadratic)
    cached    T per turn, plus the previous turn's last answer token, which enters the cache only
              when the next turn is prefilled:          T n + (n - 1)
    """
    n_values = range(1, turns + 1)
    return {
        "rxt": [2 * turn_tokens * n for n in n_values],
        "baseline": [turn_tokens * n * (n + 1) // 2 for n in n_values],
        "cached": [turn_tokens * n + n - 1 for n in n_values],
    }


def summarize_runs(rows: list[dict[str, Any]], turn_tokens: int) -> dict[str, Any]:
    first, last = rows[0], rows[-1]
    summary: dict[str, Any] = {"turns": len(rows)}
    for name in ("rxt", "baseline", "cached"):
        key = f"{name}_prompt_s"
        summary[f"{name}_prompt_ratio"] = last[key] / first[key]
        summary[f"{name}_prompt_ratio_range"] = [last[f"{key}_min"] / first[f"{key}_max"],
                                                 last[f"{key}_max"] / first[f"{key}_min"]]
        summary[f"{name}_prompt_ratio_of_minima"] = last[f"{key}_min"] / first[f"{key}_min"]
        summary[f"{name}_answer_ratio"] = last[f"{name}_answer_s"] / first[f"{name}_answer_s"]
    closed = token_closed_forms(len(rows), turn_tokens)
    for name, expected in closed.items():
        measured = [row[f"{name}_cumulative_tokens"] for row in rows]
        summary[f"{name}_total_tokens"] = measured[-1]
        summary[f"{name}_total_tokens_closed_form"] = expected[-1]
        summary[f"{name}_tokens_match_closed_form"] = measured == expected
    summary["rxt_tokens_exactly_linear"] = summary["rxt_tokens_match_closed_form"] and len(
        {row["rxt_tokens"] for row in rows}) == 1
    summary["baseline_tokens_exactly_quadratic"] = summary["baseline_tokens_match_closed_form"]
    with_update = sum(row["rxt_answer_s"] for row in rows)
    without = sum(row["rxt_no_update_answer_s"] for row in rows)
    summary["rxt_answer_total_s"], summary["rxt_no_update_answer_total_s"] = with_update, without
    summary["async_update_answer_ratio"] = with_update / without
    summary["async_update_answer_ratio_per_turn_median"] = statistics.median(
        row["rxt_answer_s"] / row["rxt_no_update_answer_s"] for row in rows)
    summary["rxt_memory_update_median_s"] = statistics.median(row["rxt_memory_update_s"] for row in rows)
    summary.update(breakeven_summary(rows))
    for mode in FAST_MODES:
        if f"rxt_{mode}_prompt_s" in rows[0]:
            summary[mode] = breakeven_summary(rows, f"_{mode}")
            summary[mode]["tokens_match_eager"] = all(
                row[f"{name}_{mode}_tokens"] == row[f"{name}_tokens"] for row in rows for name in LABELS)
    summary["rxt_answer_median_s"] = statistics.median(row["rxt_answer_s"] for row in rows)
    summary["targets"] = {
        f"rxt_prompt_ratio <= {FLAT_TARGET}": summary["rxt_prompt_ratio"] <= FLAT_TARGET,
        f"baseline_prompt_ratio >= {GROWTH_TARGET}": summary["baseline_prompt_ratio"] >= GROWTH_TARGET,
        "tokens: rxt linear, baseline quadratic (exact)": summary["rxt_tokens_exactly_linear"]
        and summary["baseline_tokens_exactly_quadratic"],
        f"async update adds nothing (answer time within {UPDATE_TOLERANCE:.0%})":
            summary["async_update_answer_ratio"] <= 1 + UPDATE_TOLERANCE,
    }
    return summary


def format_table(rows: list[dict[str, Any]]) -> str:
    """Medians per turn; times in milliseconds; tokens and state as rxt / baseline / cached."""
    head = (f"{'turn':>4} | {'prompt ms: rxt':>14} {'base':>7} {'cached':>7} | {'answer ms: rxt':>14} {'base':>7} "
            f"{'cached':>7} {'no-upd':>7} | {'update ms':>9} | {'tokens/turn r/b/c':>17} | {'cumulative r/b/c':>20} | "
            f"{'state bytes r/b/c':>25}")
    lines = [head, "-" * len(head)]
    for row in rows:
        ms = {key: value * 1e3 for key, value in row.items() if key.endswith("_s")}
        tokens = "/".join(str(row[f"{n}_tokens"]) for n in ("rxt", "baseline", "cached"))
        cumulative = "/".join(str(row[f"{n}_cumulative_tokens"]) for n in ("rxt", "baseline", "cached"))
        state = "/".join(str(row[f"{n}_state_bytes"]) for n in ("rxt", "baseline", "cached"))
        lines.append(
            f"{row['turn']:>4} | {ms['rxt_prompt_s']:>14.2f} {ms['baseline_prompt_s']:>7.2f} "
            f"{ms['cached_prompt_s']:>7.2f} | {ms['rxt_answer_s']:>14.2f} {ms['baseline_answer_s']:>7.2f} "
            f"{ms['cached_answer_s']:>7.2f} {ms['rxt_no_update_answer_s']:>7.2f} | {ms['rxt_memory_update_s']:>9.2f} | {tokens:>17} | "
            f"{cumulative:>20} | {state:>25}"
        )
    return "\n".join(lines)


def format_mode_table(rows: list[dict[str, Any]], mode: str) -> str:
    """Medians per turn of one fast mode's systems, in milliseconds, with decode speed against the cache."""
    names = [f"{name}_{mode}" for name in LABELS]
    head = (f"{'turn':>4} | {mode + ' prompt ms: rxt':>23} {'base':>7} {'cached':>7} | {'answer ms: rxt':>14} "
            f"{'base':>7} {'cached':>7} | {'decode tok/s: rxt':>17} {'cached':>7}")
    lines = [head, "-" * len(head)]
    for row in rows:
        prompt = " ".join(f"{row[f'{n}_prompt_s'] * 1e3:>7.2f}" for n in names)
        answer = " ".join(f"{row[f'{n}_answer_s'] * 1e3:>7.2f}" for n in names)
        speed = f"{row[names[0] + '_decode_tokens_per_s']:>17.0f} {row[names[2] + '_decode_tokens_per_s']:>7.0f}"
        lines.append(f"{row['turn']:>4} | {prompt:>39} | {answer:>30} | {speed}")
    return "\n".join(lines)


def format_breakeven(summary: dict[str, Any], mode: str) -> list[str]:
    """Where RxT overtakes the persistent cache, in one mode, and the issue's targets."""
    def turn(value: int | None) -> str:
        return f"turn {value}" if value is not None else "no turn (slower at the last turn)"

    speed = summary["decode_speed_ratio_per_turn"]
    lines = [f"{mode}: RxT stays faster than the persistent cache from {turn(summary['breakeven_prompt_turn'])} "
             f"(prompt phase), {turn(summary['breakeven_answer_turn'])} (whole answer), "
             f"{turn(summary['breakeven_decode_turn'])} (decode tokens/s: {speed[0]:.2f}x at turn 1, "
             f"{speed[-1]:.2f}x at turn {len(speed)})"]
    return lines + [f"target ({mode}) {name}: {'met' if ok else 'NOT met'}"
                    for name, ok in summary["breakeven_targets"].items()]


def format_summary(summary: dict[str, Any], turn_tokens: int) -> str:
    n, s = summary["turns"], summary
    lines = []
    for name, label in LABELS.items():
        low, high = s[f"{name}_prompt_ratio_range"]
        lines.append(f"prompt phase, turn {n} / turn 1, {label}: {s[f'{name}_prompt_ratio']:.2f}x of medians, "
                     f"{s[f'{name}_prompt_ratio_of_minima']:.2f}x of minima (min/max bounds {low:.2f}-{high:.2f}x)")
    closed = token_closed_forms(n, turn_tokens)
    lines.append(
        f"cumulative tokens after {n} turns: RxT {s['rxt_total_tokens']} (closed form 2*{turn_tokens}*{n} = "
        f"{closed['rxt'][-1]}: {_verdict(s['rxt_tokens_exactly_linear'], 'exactly linear')}); "
        f"baseline {s['baseline_total_tokens']} ({turn_tokens}*{n}*{n + 1}/2 = {closed['baseline'][-1]}: "
        f"{_verdict(s['baseline_tokens_exactly_quadratic'], 'exactly quadratic')}); "
        f"cached {s['cached_total_tokens']} ({turn_tokens}*{n}+{n - 1} = {closed['cached'][-1]}: "
        f"{_verdict(s['cached_tokens_match_closed_form'], 'exact')})"
    )
    lines.append(
        f"time to last answer token, summed over turns: {s['rxt_answer_total_s']:.4f} s with the background "
        f"memory update vs {s['rxt_no_update_answer_total_s']:.4f} s with no update at all "
        f"({s['async_update_answer_ratio']:.3f}x; per-turn median {s['async_update_answer_ratio_per_turn_median']:.3f}x)"
    )
    update, answer = s["rxt_memory_update_median_s"], s["rxt_answer_median_s"]
    lines.append(f"memory update (on the worker, after the answer): median {update * 1e3:.2f} ms per turn; "
                 f"done synchronously it would add {update / answer:.0%} to a {answer * 1e3:.1f} ms answer")
    lines += [f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in s["targets"].items()]
    lines += format_breakeven(s, "eager")
    for mode in FAST_MODES:
        if mode in s:
            lines += format_breakeven(s[mode], mode)
    if "warmup_s" in s:
        lines.append("fast-path warm-up (one untimed conversation, compilation included): " + ", ".join(
            f"{name} {seconds:.1f} s" for name, seconds in s["warmup_s"].items()))
    return "\n".join(lines)


def _verdict(ok: bool, text: str) -> str:
    return text if ok else f"NOT {text}"


def plot(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Two panels: prompt-phase latency per turn (median, min-max band) and cumulative tokens."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    latency, tokens = figure.subplots(1, 2)
    turns = [row["turn"] for row in rows]
    for name, label in LABELS.items():
        median = [row[f"{name}_prompt_s"] * 1e3 for row in rows]
        (line,) = latency.plot(turns, median, marker=".", label=label)
        low = [row[f"{name}_prompt_s_min"] * 1e3 for row in rows]
        high = [row[f"{name}_prompt_s_max"] * 1e3 for row in rows]
        latency.fill_between(turns, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        tokens.plot(turns, [row[f"{name}_cumulative_tokens"] for row in rows], marker=".",
                    label=label + (" (decoder + memory encoder)" if name == "rxt" else ""))
    latency.set_yscale("log")  # flat vs growing stays readable when one line is 50x the others
    latency.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    latency.yaxis.set_major_formatter(ScalarFormatter())
    latency.yaxis.set_minor_formatter(NullFormatter())
    latency.set(xlabel="turn", ylabel="prompt phase (ms, log scale)",
                title="prompt-phase latency per turn (median, min-max band)")
    tokens.set(xlabel="turn", ylabel="tokens processed", title="cumulative tokens processed")
    for axes in (latency, tokens):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=120)
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--turns", type=int, default=32)
    parser.add_argument("--turn-tokens", type=int, default=64, help="query + answer tokens per turn")
    parser.add_argument("--query-tokens", type=int, default=None, help="of which query (default half)")
    parser.add_argument("--preset", default="nano", help="random-init model of this preset (default nano)")
    parser.add_argument("--model", help="a trained RxT model directory instead of --preset")
    parser.add_argument("--baseline-model", help="a stateless model directory (default: random init, same config)")
    parser.add_argument("--repeats", type=int, default=3, help="whole conversations per system")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write per-turn results and the summary to this file")
    parser.add_argument("--plot", help="write a PNG with the two panels to this file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also run every system on the compiled fast path (rxt.fast), interleaved")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time (default); cpu: CPU time of the answering thread, which leaves "
                             "out the time a shared machine gives to other processes")
    parser.add_argument("--static", action="store_true",
                        help="also run every system on the fast path uncompiled (static caches), interleaved")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a --preset config value, e.g. --set d_model=512 (repeatable)")


def run(args: argparse.Namespace) -> int:
    query_tokens = args.query_tokens or args.turn_tokens // 2
    answer_tokens = args.turn_tokens - query_tokens
    if args.turns < 1 or args.repeats < 1 or query_tokens < 2 or answer_tokens < 1:
        print("rxt bench latency: need --turns >= 1, --repeats >= 1, --query-tokens >= 2 and "
              "--turn-tokens > --query-tokens", file=sys.stderr)
        return 2
    try:
        engines, config, source = build_engines(args)
    except (OSError, ValueError) as error:
        print(f"rxt bench latency: {error}", file=sys.stderr)
        return 2
    vocab_size = min(config.vocab_size, engines["baseline"].model.config.vocab_size)
    queries = fixed_queries(args.turns, query_tokens, vocab_size, args.seed)
    try:
        with single_threaded(args.threads):
            hardware = describe_machine(args.device)
            eager = {name: e for name, e in engines.items() if e.inference == "eager"}
            run_conversations(eager, queries[:2], answer_tokens, repeats=1)  # warm-up, not timed
            warmup_s = warm_up_compiled(engines, queries, answer_tokens)
            with tqdm(total=args.repeats * args.turns, desc="turns", disable=args.no_progress) as bar:
                runs = run_conversations(engines, queries, answer_tokens, args.repeats, tick=bar.update,
                                         clock=CLOCKS[args.clock])
    finally:
        for engine in engines.values():
            if isinstance(engine, ReactiveEngine):
                engine.close()
    rows = per_turn_rows(runs)
    summary = summarize_runs(rows, args.turn_tokens)
    if warmup_s:
        summary["warmup_s"] = warmup_s
    settings = dict(turns=args.turns, turn_tokens=args.turn_tokens, query_tokens=query_tokens,
                    answer_tokens=answer_tokens, repeats=args.repeats, threads=args.threads, seed=args.seed,
                    device=args.device, clock=args.clock, fast_modes=fast_modes(args), model_config=config.to_dict(), **source)
    platform_text = f"{hardware}; {platform.platform()}; torch {torch.__version__}"
    print(f"rxt bench latency: {source.get('model') or 'preset ' + source.get('preset', '?')}, "
          f"{args.turns} turns of {query_tokens}+{answer_tokens} tokens, {args.repeats} repeats, "
          f"threads={args.threads}, {args.clock} clock; {platform_text}")
    print(format_table(rows))
    for mode in fast_modes(args):
        print(format_mode_table(rows, mode))
    print(format_summary(summary, args.turn_tokens))
    if args.json:
        record = {"turns": rows, "summary": summary, "config": settings, "hardware": platform_text}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        title = (f"{source.get('model') or source.get('preset')}: {args.turns} turns x {args.turn_tokens} tokens, "
                 f"median of {args.repeats}, threads={args.threads} -- {hardware}")
        print(f"wrote {plot(rows, args.plot, title)}")
    tokens_ok = summary["rxt_tokens_exactly_linear"] and summary["baseline_tokens_exactly_quadratic"]
    return 0 if tokens_ok and summary["cached_tokens_match_closed_form"] else 1
