"""Gather the runs of docs/lasting-memory.md into one JSON and one figure.

    PYTHONPATH=src python experiments/lasting/collect.py --runs runs \
        --json docs/results/lasting-memory.json --plot docs/images/lasting-memory.png

Reads runs/probe/<memory>.json (`rxt eval recall`, synthetic held-out dialogues, distances to 64) and
runs/suite/single-<model>.json (`rxt eval memory --tasks single --per-task 24`, the suite's frozen
held-out half, own answers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEMORIES = {  # name in the runs -> label, state bytes
    "shipped": ("shipped queue, 32 slots", 65536),
    "queue64": ("queue, 64 slots", 131072),
    "queue128": ("queue, 128 slots", 262144),
    "lasting0": ("queue 32 + 32 long-term, untrained", 131072),
    "lasting": ("queue 32 + 32 long-term, trained", 131072),
    "lasting_more": ("queue 32 + 32 long-term, trained 300 steps", 131072),
}
COLOURS = {"shipped": "tab:blue", "queue64": "tab:orange", "queue128": "tab:green", "lasting0": "tab:red",
           "lasting": "tab:purple", "lasting_more": "tab:brown"}  # one colour a memory, in both panels
SUITE = {"shipped": "models_nano_rxt", "queue128": "runs_probe_queue128", "lasting0": "runs_probe_lasting0",
         "lasting": "runs_nano-lasting_rxt", "lasting_more": "runs_nano-lasting-more_rxt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot", required=True)
    args = parser.parse_args()
    runs = Path(args.runs)
    result: dict = {"probe": {}, "suite_single": {}, "state_bytes": {}, "labels": {}}
    for name, (label, state) in MEMORIES.items():
        result["labels"][name], result["state_bytes"][name] = label, state
        probe = runs / "probe" / f"{name}.json"
        if probe.is_file():
            data = json.loads(probe.read_text())
            result["probe"][name] = {"by_distance_range": {k: v["rxt"] for k, v in data["by_distance_range"].items()},
                                     "questions": data["questions_by_distance_range"],
                                     "tokens_processed": data["tokens_processed"]["rxt"]}
        suite = runs / "suite" / f"single-{SUITE.get(name, '')}.json"
        if name in SUITE and suite.is_file():
            data = json.loads(suite.read_text())
            result["suite_single"][name] = {"by_distance": {d: v["rxt"] for d, v in data["tasks"]["single"].items()},
                                            "questions": data["questions"]["single"],
                                            "outcomes": data["outcomes"]["single"]["rxt"],
                                            "tokens_processed": data["tokens_processed"]["rxt"],
                                            "state_bytes": data["state_bytes"]["rxt"]}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in result["probe"].items():
        spans = list(row["by_distance_range"])
        left.plot(spans, [100 * row["by_distance_range"][s] for s in spans], marker="o", label=result["labels"][name],
                  color=COLOURS[name])
    left.set(title="synthetic held-out dialogues (reference history)", xlabel="turns since the fact", ylabel="recall, %")
    for name, row in result["suite_single"].items():
        distances = list(row["by_distance"])
        right.plot(distances, [100 * row["by_distance"][d] for d in distances], marker="o", label=result["labels"][name],
                   color=COLOURS[name])
    right.set(title="memory suite, held-out half, single (own answers)", xlabel="turns since the fact", ylabel="right, %")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
