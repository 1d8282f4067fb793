"""`rxt chat MODEL_DIR`: talk to a model in the terminal; answers stream token by token.

An RxT directory chats through its memory (the update runs in the background after each answer);
a stateless directory chats as one of the baselines (``--baseline full|cached|current|window``).
Type ``/help`` for the commands: /reset, /save PATH, /load PATH, /stats, /help, /quit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TextIO

from rxt.baselines import MODES, StatelessEngine
from rxt.engine import AnswerEvent, ChatEngine, ReactiveEngine, TokenEvent
from rxt.generation import SamplingConfig
from rxt.model import ReactiveTransformer, StatelessLM, load_model
from rxt.session import Session, SessionStateError, TurnStats

HELP = """commands:
  /reset        start over: empty memory (or history)
  /save PATH    write this conversation's state to PATH
  /load PATH    continue a conversation written by /save
  /stats        per-turn timings, tokens processed and state size
  /memory       the text a memory of kept tokens holds (rxt wrap's kv memory)
  /help         this list
  /quit         leave (Ctrl-D and Ctrl-C work too)"""


class ChatREPL:
    """The read-answer loop over text streams, so a script can drive it as well as a terminal."""

    def __init__(
        self,
        engine: ChatEngine,
        sampling: SamplingConfig | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        prompt: str = "you> ",
    ):
        self.engine = engine
        self.sampling = sampling or SamplingConfig()
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.prompt = prompt
        self.session = engine.new_session()
        self.commands = {
            "/reset": self.reset,
            "/save": self.save,
            "/load": self.load,
            "/stats": self.show_stats,
            "/memory": self.show_memory,
            "/help": self.show_help,
        }

    def run(self) -> int:
        """Chat until /quit, end of input or Ctrl-C. Returns the exit status (0)."""
        try:
            while (line := self.read_line()) is not None:
                line = line.strip()
                if line in ("/quit", "/exit"):
                    break
                if line.startswith("/"):
                    self.command(line)
                elif line:
                    self.answer(line)
        except KeyboardInterrupt:
            self.write("\n")
        self.write("bye\n")
        return 0

    def read_line(self) -> str | None:
        """The next line typed, or None at end of input."""
        if self.stdin is sys.stdin and sys.stdin.isatty():
            try:
                return input(self.prompt)  # line editing in a terminal
            except EOFError:
                self.write("\n")
                return None
        self.write(self.prompt)
        line = self.stdin.readline()
        return line if line else None

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def answer(self, query: str) -> None:
        """Stream one answer. For RxT the memory update keeps running after the answer is shown."""
        self.write("rxt> ")
        events = self.engine.stream(self.session, query, self.turn_sampling())
        started = False
        try:
            for event in events:
                if isinstance(event, TokenEvent):
                    text = event.text if started else event.text.lstrip()
                    started = started or bool(text)
                    self.write(text)
                elif isinstance(event, AnswerEvent):
                    break  # don't wait for the memory update: the next turn does, if it must
        except Exception as error:  # noqa: BLE001 -- e.g. the previous memory update failed: report, keep chatting
            self.write(f"\nerror: {error}")
        finally:
            events.close()
        self.write("\n")

    def turn_sampling(self) -> SamplingConfig:
        """A seeded chat is reproducible turn by turn, without repeating one random stream every turn."""
        if self.sampling.seed is None:
            return self.sampling
        return dataclasses.replace(self.sampling, seed=self.sampling.seed + self.session.turns)

    def command(self, line: str) -> None:
        name, _, argument = line.partition(" ")
        handler = self.commands.get(name)
        if handler is None:
            self.write(f"unknown command {name}; /help lists the commands\n")
        else:
            handler(argument.strip())

    def reset(self, _: str = "") -> None:
        self.engine.reset(self.session)
        self.write("conversation reset\n")

    def save(self, path: str) -> None:
        if not path:
            self.write("usage: /save PATH\n")
            return
        try:
            saved = self.session.save(path)
        except (OSError, RuntimeError, ValueError) as error:
            self.write(f"error: could not save to {path}: {error}\n")
            return
        self.write(f"saved {self.session.turns} turns to {saved}\n")

    def load(self, path: str) -> None:
        """Validate the file fully before touching the current conversation."""
        if not path:
            self.write("usage: /load PATH\n")
            return
        try:
            loaded = Session.load(path, device=self.engine.device)
            self.engine.check_session(loaded)
            self.session.replace_with(loaded)
        except (OSError, SessionStateError, RuntimeError) as error:
            self.write(f"error: could not load {path}: {error}\n")
            return
        self.write(f"loaded {self.session.turns} turns from {path}\n")

    def show_stats(self, _: str = "") -> None:
        self.write(format_stats(self.session.stats, self.session.pending is not None) + "\n")

    def show_memory(self, _: str = "") -> None:
        """What a kv memory keeps, as text; other memories hold vectors, not tokens."""
        model = self.engine.model
        if getattr(model, "kv_memory", None) is None:
            self.write("this model's memory holds vectors, not tokens: /memory shows a kv memory (rxt wrap)\n")
            return
        from rxt.pretrained.kv_memory import kept_tokens

        self.session.wait()
        kept = kept_tokens(self.session.tensors["stm"])[0]
        text = self.engine.tokenizer.decode(kept, skip_special=False)
        self.write(f"{len(kept)} of {model.reactive.stm_slots} slots kept:\n{text}\n")

    def show_help(self, _: str = "") -> None:
        self.write(HELP + "\n")


def format_stats(stats: list[TurnStats], update_running: bool = False) -> str:
    """A per-turn table: time to first token, answer time, memory-update time, tokens, state bytes."""
    if not stats:
        return "no turns yet"
    header = f"{'turn':>4}  {'first token s':>13}  {'answer s':>9}  {'memory update s':>15}  {'tokens':>7}  {'state bytes':>11}"
    rows = [header]
    for stat in stats:
        if stat.memory_update_s is not None:
            update = f"{stat.memory_update_s:.4f}"
        else:
            update = "running" if update_running and stat is stats[-1] else "-"
        rows.append(
            f"{stat.turn:>4}  {stat.time_to_first_token_s:>13.4f}  {stat.answer_s:>9.4f}  {update:>15}  "
            f"{stat.tokens_processed:>7}  {stat.state_bytes:>11}"
        )
    return "\n".join(rows)


def build_engine(
    model_dir: str, baseline: str | None = None, device: str = "cpu", compile: bool = False, base: str | None = None
) -> ChatEngine:
    """An RxT engine for an RxT directory or a reactive adapter (with its ``base``); a baseline engine
    (default mode "full") for a stateless one. ``compile``: the compiled fast path (rxt.fast; the first
    turns wait for compilation)."""
    model = load_model(model_dir, device, base)
    inference = "compiled" if compile else "eager"
    if compile and not isinstance(model, ReactiveTransformer | StatelessLM):
        raise ValueError("--compile runs rxt's own models; a reactive adapter runs on the eager path")
    if not isinstance(model, StatelessLM):
        if baseline is not None:
            raise ValueError(
                f"{model_dir} holds an RxT model; --baseline applies only to a stateless model directory"
            )
        return ReactiveEngine(model, device=device, inference=inference)
    return StatelessEngine(model, device=device, mode=baseline or "full", inference=inference)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a model directory (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--base", help="for a reactive adapter directory (adapter.json): its pretrained base model "
                        "directory (default: where adapter.json says it was)")
    parser.add_argument("--baseline", choices=MODES, help="stateless directories only: how to keep the history "
                        "(default full)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="static caches and compiled prefill/decode (rxt.fast); the first answers wait for it")


def run(args: argparse.Namespace) -> int:
    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        engine = build_engine(args.model_dir, args.baseline, args.device, compile=args.compile, base=args.base)
    except (OSError, ValueError) as error:
        print(f"rxt chat: {error}", file=sys.stderr)
        return 2
    kind = "RxT" if isinstance(engine, ReactiveEngine) else f"stateless LM, baseline mode {engine.mode}"
    print(f"{args.model_dir}: {kind}, {engine.model.num_parameters():,} parameters. /help for commands.")
    try:
        return ChatREPL(engine, sampling).run()
    finally:
        if isinstance(engine, ReactiveEngine):
            engine.close()
