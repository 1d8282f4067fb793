"""FLOPs per turn, counted: what the arithmetic alone says of RxT against the persistent KV cache.

`rxt bench latency --flops` runs one more conversation per system (eager, and static with
``--static``) with torch's ``FlopCounterMode`` as its clock, so every figure the bench times it also
counts: FLOPs of the prompt phase, to the first token and to the last (matmuls and attention, two per
multiply-add; norms, softmax and other elementwise work are not counted). The break-even turns it
gives are where RxT would overtake the persistent cache if time were proportional to FLOPs. A timed
break-even later than the counted one is overhead (more, smaller ops), not arithmetic; a decode
target above the counted ratio cannot be met by any implementation of the same model.

The compiled systems are not counted: they run the static path's ops (rxt.fast), fused. The memory
update runs on the engine's worker thread, off the answer path, and is not counted either (the
counter sees the ops of the thread that answers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from rxt.bench.latency_report import FAST_MODES, breakeven_summary, turn_text

# counted per turn and system, as fields of the bench's rows
FLOP_FIELDS = {"prompt_s": "prompt_flops", "ttft_s": "first_token_flops", "answer_s": "answer_flops"}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU attention kernel, counted as torch counts the other fused attentions (scores and output)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class FlopClock:
    """A clock that reads the FLOPs counted so far: ``Conversation(clock=FlopClock())`` counts instead of
    timing. Only ops run inside ``with clock.counter:`` on the calling thread are counted."""

    def __init__(self) -> None:
        aten = torch.ops.aten
        self.counter = FlopCounterMode(display=False, custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})

    def __call__(self) -> float:
        return float(self.counter.get_total_flops())


def attach_flops(rows: list[dict[str, Any]], flop_rows: list[dict[str, Any]], systems: list[str]) -> None:
    """Copy the counted figures into the timed rows: ``{system}_prompt_flops`` and so on, and
    ``{system}_decode_flops_per_token`` (the FLOPs of one decode step)."""
    for row, counted in zip(rows, flop_rows, strict=True):
        for name in systems:
            for timing, field in FLOP_FIELDS.items():
                row[f"{name}_{field}"] = int(counted[f"{name}_{timing}"])
            row[f"{name}_decode_flops_per_token"] = round(1.0 / counted[f"{name}_decode_tokens_per_s"])


def flop_summary(flop_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Break-even turns by FLOPs in each counted mode (rows whose "seconds" are FLOPs): the same
    summary the timed rows get, so ``decode_speed_ratio_per_turn`` is the cached baseline's FLOPs per
    decode step over RxT's."""
    summary = {"eager": breakeven_summary(flop_rows)}
    for mode in FAST_MODES:
        if f"rxt_{mode}_prompt_s" in flop_rows[0]:
            summary[mode] = breakeven_summary(flop_rows, f"_{mode}")
    return summary


def format_flops(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Counted FLOPs of RxT and the persistent cache at a few turns, and where RxT overtakes it by count."""
    lines = []
    picks = sorted({1, 4, 8, len(rows)} & set(range(1, len(rows) + 1)))
    for mode, found in summary.items():
        rxt, cached = ("rxt", "cached") if mode == "eager" else (f"rxt_{mode}", f"cached_{mode}")
        lines.append(f"FLOPs ({mode}), RxT / persistent cache: " + "; ".join(
            f"turn {t}: prompt {rows[t - 1][f'{rxt}_prompt_flops'] / 1e6:.2f} / "
            f"{rows[t - 1][f'{cached}_prompt_flops'] / 1e6:.2f} M, decode "
            f"{rows[t - 1][f'{rxt}_decode_flops_per_token'] / 1e6:.3f} / "
            f"{rows[t - 1][f'{cached}_decode_flops_per_token'] / 1e6:.3f} M per token" for t in picks))

        ratio = found["decode_speed_ratio_per_turn"]
        lines.append(f"by FLOPs ({mode}): RxT does less than the persistent cache from {turn_text(found['breakeven_prompt_turn'])} "
                     f"(prompt phase), {turn_text(found['breakeven_answer_turn'])} (whole answer), "
                     f"{turn_text(found['breakeven_decode_turn'])} (decode step); the cache's decode FLOPs over RxT's: "
                     f"{ratio[0]:.3f} at turn 1, {ratio[-1]:.3f} at turn {len(ratio)} (the most RxT's decode speed "
                     f"can be of the cache's where time follows FLOPs)")
    return "\n".join(lines)
