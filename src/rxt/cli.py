"""The `rxt` command line. Each command lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes to them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("bench", "attention"): ("rxt.bench.attention", "time the SQA attention family against MHA/GQA/MQA"),
    ("bench", "latency"): ("rxt.bench.latency", "per-turn latency: RxT vs the stateless baselines"),
    ("bench", "serve"): ("rxt.bench.serve", "load-test a running rxt server"),
    ("bench", "quality"): ("rxt.bench.quality", "train one small LM per attention variant on real prose"),
    ("chat",): ("rxt.chat", "chat with a model directory in the terminal"),
    ("train",): ("rxt.training.cli", "run a training recipe (all curriculum stages)"),
    ("eval", "recall"): ("rxt.evaluation.recall", "memory-recall accuracy by turn distance"),
    ("eval", "perplexity"): ("rxt.evaluation.perplexity", "answer perplexity by turn on real dialogues: RxT vs stateless"),
    ("eval", "gates"): ("rxt.evaluation.gates", "how a trained RxT's residual gates write its memory"),
    ("eval", "memory"): ("rxt.evaluation.memory", "the memory suite: pass/fail tasks by distance, own answers as history"),
    ("eval", "compare"): ("rxt.evaluation.compare", "two models' memory-suite answers paired, with a sign test"),
    ("tokenizer", "train"): ("rxt.tokenizer", "train a byte-level BPE tokenizer"),
    ("data", "validate"): ("rxt.data.jsonl", "check a dialogue JSONL file"),
    ("data", "fetch"): ("rxt.data.fetch", "download, check and prepare real corpora (and weights) under data/"),
    ("import", "gguf"): ("rxt.pretrained.gguf", "a llama-layout GGUF model (e.g. SmolLM2) as a stateless rxt model"),
    ("wrap",): ("rxt.pretrained.wrap", "give a stateless model a memory of its own keys and values (an adapter)"),
    ("serve",): ("rxt.serve.cli", "OpenAI-compatible stateful chat server"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every command is listed; only the one named in ``argv`` imports its module (and its
    dependencies), so `rxt train` runs where the server's packages are not installed."""
    chosen = _chosen_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rxt", description="Reactive Transformer (RxT) toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups: dict[str, argparse._SubParsersAction] = {}
    top = parser.add_subparsers(dest="command", required=True)
    for words, (module, help_text) in COMMANDS.items():
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        sub.set_defaults(_module=module)
        if words == chosen:
            _add_arguments(sub, module)
    return parser


def _chosen_command(argv: list[str]) -> tuple[str, ...] | None:
    words = [a for a in argv if not a.startswith("-")]
    return next((key for key in COMMANDS if tuple(words[: len(key)]) == key), None)


def _add_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as error:  # a dependency of this command is not installed
        parser.set_defaults(_missing=error.name or module)


# The least each count option takes, for every command that has it (threads: 0 leaves torch's setting).
LEAST = {"threads": 0, "dialogues": 1, "batch_size": 1}


def _check_counts(args: argparse.Namespace) -> None:
    for option, least in LEAST.items():
        value = getattr(args, option, None)
        if value is not None and value < least:
            raise ValueError(f"--{option.replace('_', '-')} must be >= {least}, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "_missing", None):  # (a command that could not load knows no options)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if getattr(args, "_missing", None):
        print(f"rxt: this command needs the package {args._missing!r}, which is not installed", file=sys.stderr)
        return 2
    try:
        _check_counts(args)
        return importlib.import_module(args._module).run(args) or 0
    except (ValueError, OSError) as error:  # bad input: a clear line, not a traceback (-v shows it)
        if args.verbose:
            raise
        print(f"rxt: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
