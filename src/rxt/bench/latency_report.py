"""What `rxt bench latency` makes of its measurements: per-turn rows (medians with min/max), the
closed-form token counts they must match, the turn from which RxT stays faster than the persistent
KV cache in each mode, the text tables and the plot. The measuring itself is rxt.bench.latency.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rxt.bench.timing import summarize
from rxt.session import TurnStats

FAST_MODES = ("static", "compiled")  # rxt.fast's modes; each adds twins of rxt, baseline and cached: rxt_static, ...
LABELS = {"rxt": "RxT", "baseline": "stateless, re-reads history", "cached": "stateless, persistent KV cache"}
TIMINGS = ("prompt_s", "ttft_s", "answer_s")
# the targets for RxT against the persistent cache, in the same mode: phase -> from which turn
BREAKEVEN_TARGETS = {"prompt": 4, "answer": 8}
DECODE_PARITY, DECODE_WIN_TURN = 0.95, 8
FLAT_TARGET, GROWTH_TARGET, UPDATE_TOLERANCE = 1.2, 4.0, 0.05


@dataclass
class TurnMeasure:
    prompt_s: float  # plan + prefill: the prompt phase
    ttft_s: float
    answer_s: float  # to the last answer token
    stats: TurnStats  # tokens, state bytes and (RxT) the memory-update time, filled by the engine


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


def turn_text(value: int | None) -> str:
    """A break-even turn as the reports print it."""
    return f"turn {value}" if value is not None else "no turn (not ahead at the last turn)"


def format_breakeven(summary: dict[str, Any], mode: str) -> list[str]:
    """Where RxT overtakes the persistent cache, in one mode, and the issue's targets."""
    speed = summary["decode_speed_ratio_per_turn"]
    lines = [f"{mode}: RxT stays faster than the persistent cache from {turn_text(summary['breakeven_prompt_turn'])} "
             f"(prompt phase), {turn_text(summary['breakeven_answer_turn'])} (whole answer), "
             f"{turn_text(summary['breakeven_decode_turn'])} (decode tokens/s: {speed[0]:.2f}x at turn 1, "
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
