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
``--static`` adds the fast path uncompiled (``*_static``) the same way. ``--flops`` also counts every
figure in FLOPs (rxt.bench.flops): one more conversation per eager and static system.

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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models
from tqdm import tqdm

from rxt.baselines import StatelessEngine
from rxt.bench.flops import FlopClock, attach_flops, flop_summary, format_flops
from rxt.bench.latency_report import (
    FAST_MODES,
    TurnMeasure,
    format_mode_table,
    format_summary,
    format_table,
    per_turn_rows,
    plot,
    summarize_runs,
)
from rxt.bench.timing import describe_machine, single_threaded, synchronize
from rxt.config import ModelConfig
from rxt.engine import ChatEngine, ReactiveEngine
from rxt.generation import SamplingConfig, decode_tokens
from rxt.model import ReactiveTransformer, StatelessLM, load_model
from rxt.session import TurnStats
from rxt.tokenizer import SPECIAL_TOKENS, Tokenizer

log = logging.getLogger(__name__)

# round-robin order: each RxT variant follows a stateless turn, so neither finds the RxT weights warmer in cache
SYSTEMS = ("rxt", "baseline", "rxt_no_update", "cached")
# cpu: the answering thread's CPU time. With one torch thread every op of a turn runs on it, so this
# is the turn's work without the waits a busy shared machine adds (the memory update's own thread is
# not counted: it is off the answer path either way; the GPU's time is not counted either: CPU only)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


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
    parser.add_argument("--flops", action="store_true",
                        help="also count the FLOPs of every turn phase (one more conversation per eager and static "
                             "system): where RxT would overtake the persistent cache if time followed FLOPs")
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
            if args.flops:
                counted = {name: e for name, e in engines.items() if e.inference != "compiled"}
                clock = FlopClock()
                with clock.counter:
                    flop_rows = per_turn_rows(run_conversations(counted, queries, answer_tokens, 1, clock=clock))
    finally:
        for engine in engines.values():
            if isinstance(engine, ReactiveEngine):
                engine.close()
    rows = per_turn_rows(runs)
    summary = summarize_runs(rows, args.turn_tokens)
    if warmup_s:
        summary["warmup_s"] = warmup_s
    if args.flops:
        attach_flops(rows, flop_rows, list(counted))
        summary["flops"] = flop_summary(flop_rows)
    settings = dict(turns=args.turns, turn_tokens=args.turn_tokens, query_tokens=query_tokens,
                    answer_tokens=answer_tokens, repeats=args.repeats, threads=args.threads, seed=args.seed,
                    device=args.device, clock=args.clock, fast_modes=fast_modes(args), flops=args.flops, model_config=config.to_dict(), **source)
    platform_text = f"{hardware}; {platform.platform()}; torch {torch.__version__}"
    print(f"rxt bench latency: {source.get('model') or 'preset ' + source.get('preset', '?')}, "
          f"{args.turns} turns of {query_tokens}+{answer_tokens} tokens, {args.repeats} repeats, "
          f"threads={args.threads}, {args.clock} clock; {platform_text}")
    print(format_table(rows))
    for mode in fast_modes(args):
        print(format_mode_table(rows, mode))
    print(format_summary(summary, args.turn_tokens))
    if args.flops:
        print(format_flops(rows, summary["flops"]))
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
