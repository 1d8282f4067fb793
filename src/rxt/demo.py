"""`make demo`: a reactive SmolLM2 in a hand-written conversation, next to the same model re-reading it all.

The shipped adapter (models/smollm2-kv: LoRA on SmolLM2-135M-Instruct and a 256-token memory of its own
keys and values, docs/kv-memory.md) answers each message from the message and its memory; the stateless
model is the same weights reading the whole history. Facts are told early, in words no training
dialogue used, and asked about turns later. For each turn it prints both answers, whether a recall
answer names the told value, and both models' time to the first token and prompt size; then it writes a
short report with a latency plot to out/demo/. ``--nano`` plays the shipped nano RxT on a generated
dialogue instead; without the SmolLM2 base (`rxt data fetch smollm2`, `rxt import gguf`, which `make
demo` runs) it falls back to that.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rxt.baselines import StatelessEngine
from rxt.data.dialogues import Dialogue, DialogueGenerator, Turn
from rxt.engine import ReactiveEngine
from rxt.evaluation.recall import is_correct
from rxt.generation import SamplingConfig
from rxt.model import ReactiveTransformer, StatelessLM

MODELS = Path("models/nano")
ADAPTER, BASE = Path("models/smollm2-kv"), Path("runs/smollm2")

# (message, the told value a recall question must name, or None). Written for this demo, in everyday
# words: none of it comes from the training generator or the memory suite.
CONVERSATION = [
    ("Hi! I'm Tomasz. I moved to Aberdeen last month for a new job.", None),
    ("I work at the harbour, I drive one of the big container cranes.", None),
    ("What is a good way to meet people in a new town?", None),
    ("Oh, and I adopted a rescue dog on Saturday. She's called Biscuit.", None),
    ("Any ideas for what to do on a rainy Sunday?", None),
    ("In the evenings I've started learning the cello.", None),
    ("Can you suggest a book for a long train ride?", None),
    ("What is my dog called?", "Biscuit"),
    ("Which city did I move to?", "Aberdeen"),
    ("What instrument am I learning?", "cello"),
    ("Do you remember my name?", "Tomasz"),
]


def handwritten_dialogue() -> Dialogue:
    """CONVERSATION as a Dialogue: each question records how many turns back its value was told."""
    turns = []
    for number, (query, value) in enumerate(CONVERSATION):
        check = None
        if value is not None:
            told = next(i for i, (q, _) in enumerate(CONVERSATION[:number]) if value.lower() in q.lower())
            check = {"slot": "", "value": value, "distance": number - told}
        turns.append(Turn(query, "", check))
    return Dialogue("handwritten", turns)


def scripted_dialogue(min_checks: int = 3, seed: int = 7) -> Dialogue:
    """A long held-out dialogue (values and phrasings never seen in training) with far-back questions."""
    generator = DialogueGenerator(seed=seed, split="heldout", min_turns=16, max_turns=20)
    best = max((generator[i] for i in range(200)), key=_difficulty)
    if sum(1 for t in best.turns if t.check) < min_checks:
        raise RuntimeError("no scripted dialogue with enough recall questions")
    return best


def _difficulty(dialogue: Dialogue) -> float:
    distances = [t.check["distance"] for t in dialogue.turns if t.check]
    return len(distances) + sum(distances) / 16


def play(rxt: ReactiveEngine, baseline: StatelessEngine, dialogue: Dialogue, out=sys.stdout) -> list[dict]:
    sampling = SamplingConfig(max_new_tokens=32)
    rxt_session, base_session = rxt.new_session(), baseline.new_session()
    rows = []
    for number, turn in enumerate(dialogue.turns, 1):
        mine = rxt.interact(rxt_session, turn.query, sampling)  # returns before the memory update ends
        theirs = baseline.interact(base_session, turn.query, sampling)
        row = {
            "turn": number,
            "query": turn.query,
            "rxt": mine.text,
            "baseline": theirs.text,
            "rxt_ttft_s": mine.stats.time_to_first_token_s,
            "rxt_answer_s": mine.stats.answer_s,
            "baseline_ttft_s": theirs.stats.time_to_first_token_s,
            "baseline_answer_s": theirs.stats.answer_s,
            "rxt_prompt_tokens": mine.stats.prompt_tokens,
            "baseline_prompt_tokens": theirs.stats.prompt_tokens,
        }
        if turn.check:
            row.update(
                value=turn.check["value"],
                distance=turn.check["distance"],
                rxt_correct=is_correct(mine.text, turn.check["value"]),
                baseline_correct=is_correct(theirs.text, turn.check["value"]),
            )
        rows.append(row)
        _print_turn(row, out)
    rxt_session.wait()
    return rows


def _print_turn(row: dict, out) -> None:
    mark = lambda ok: "right" if ok else "WRONG"  # noqa: E731
    print(f"\n[turn {row['turn']:>2}] user: {row['query']}", file=out)
    rxt_note = f"  ({mark(row['rxt_correct'])}: told {row['distance']} turns ago)" if "value" in row else ""
    print(f"  RxT      : {row['rxt']}{rxt_note}", file=out)
    base_note = f"  ({mark(row['baseline_correct'])})" if "value" in row else ""
    print(f"  stateless: {row['baseline']}{base_note}", file=out)
    print(
        f"  latency  : RxT first token {row['rxt_ttft_s'] * 1e3:6.1f} ms ({row['rxt_prompt_tokens']} prompt tokens)"
        f" | stateless {row['baseline_ttft_s'] * 1e3:6.1f} ms ({row['baseline_prompt_tokens']} prompt tokens)",
        file=out,
    )


def write_report(rows: list[dict], directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    turns = [r["turn"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(turns, [r["rxt_ttft_s"] * 1e3 for r in rows], marker="o", label="RxT")
    left.plot(
        turns, [r["baseline_ttft_s"] * 1e3 for r in rows], marker="s", label="stateless (re-reads history)"
    )
    left.set(xlabel="turn", ylabel="time to first token (ms)", title="Per-turn latency")
    right.plot(turns, [r["rxt_prompt_tokens"] for r in rows], marker="o", label="RxT")
    right.plot(turns, [r["baseline_prompt_tokens"] for r in rows], marker="s", label="stateless")
    right.set(xlabel="turn", ylabel="prompt tokens read", title="Prompt size per turn")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "latency.png", dpi=110)
    plt.close(fig)
    checks = [r for r in rows if "value" in r]
    lines = [
        "# rxt demo report",
        "",
        f"Recall questions: {len(checks)}; RxT right {sum(r['rxt_correct'] for r in checks)}, "
        f"stateless right {sum(r['baseline_correct'] for r in checks)}.",
        "",
        f"Time to first token, turn 1 -> turn {rows[-1]['turn']}: RxT {rows[0]['rxt_ttft_s'] * 1e3:.1f} -> "
        f"{rows[-1]['rxt_ttft_s'] * 1e3:.1f} ms; stateless {rows[0]['baseline_ttft_s'] * 1e3:.1f} -> "
        f"{rows[-1]['baseline_ttft_s'] * 1e3:.1f} ms.",
        "",
        "![latency](latency.png)",
        "",
        "| turn | distance | value | RxT | stateless |",
        "|---|---|---|---|---|",
        *[f"| {r['turn']} | {r['distance']} | {r['value']} | {r['rxt']} | {r['baseline']} |" for r in checks],
    ]
    report = directory / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapter", default=str(ADAPTER), help="a reactive adapter directory (SmolLM2 kv memory)")
    parser.add_argument("--base", default=str(BASE), help="its base: the imported SmolLM2 directory")
    parser.add_argument("--nano", action="store_true", help="play the shipped nano RxT instead")
    parser.add_argument("--models", default=str(MODELS), help="with --nano: directory with rxt/ and baseline/")
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a fair, quiet comparison on a shared machine
    if not args.nano and (Path(args.base) / "config.json").is_file():
        rxt, baseline, dialogue = smollm2_engines(Path(args.adapter), Path(args.base))
        print(f"SmolLM2-135M-Instruct with a {rxt.model.reactive.stm_slots}-token memory of its own keys and values "
              f"(adapter {args.adapter}) vs the same weights re-reading the whole conversation")
    else:
        if not args.nano:
            print(f"no SmolLM2 base at {args.base} (`make demo` fetches and imports it): playing the nano RxT")
        models = Path(args.models)
        if not (models / "rxt" / "model.safetensors").is_file():
            print(f"no trained model under {models}: running the short attention benchmark instead")
            from rxt.cli import main as cli

            return cli(["bench", "attention", "--seq-lens", "512", "1024", "--repeats", "3", "--passes", "fwd"])
        rxt = ReactiveEngine(ReactiveTransformer.from_pretrained(models / "rxt"))
        baseline = StatelessEngine(StatelessLM.from_pretrained(models / "baseline"), mode="full")
        dialogue = scripted_dialogue()
        print(
            f"RxT nano ({rxt.model.num_parameters() / 1e6:.1f}M parameters) vs stateless baseline "
            f"({baseline.model.num_parameters() / 1e6:.1f}M), dialogue {dialogue.id}, {len(dialogue.turns)} turns"
        )
        print("(a 2M-parameter model trained for ~40 minutes on one CPU core: its recall is still weak; the README "
              "has the measured numbers)")
    rows = play(rxt, baseline, dialogue)
    report = write_report(rows, Path(args.out))
    checks = [r for r in rows if "value" in r]
    print(
        f"\nrecall: RxT {sum(r['rxt_correct'] for r in checks)}/{len(checks)}, "
        f"stateless {sum(r['baseline_correct'] for r in checks)}/{len(checks)}; report: {report}"
    )
    rxt.close()
    return 0


def smollm2_engines(adapter: Path, base: Path) -> tuple[ReactiveEngine, StatelessEngine, Dialogue]:
    """The shipped reactive adapter on its base, and the same weights (LoRA and all) as a stateless model."""
    import copy

    from rxt.pretrained.reactive import ReactivePretrained

    model = ReactivePretrained.from_pretrained(adapter, base)
    return ReactiveEngine(model), StatelessEngine(copy.deepcopy(model.base), mode="full"), handwritten_dialogue()


if __name__ == "__main__":
    sys.exit(main())
