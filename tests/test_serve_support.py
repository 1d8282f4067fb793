"""Helpers shared by the serving tests: a tiny RxT model on disk, an in-thread server, a reference run."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis
import torch
import uvicorn

from rxt.baselines import StatelessEngine
from rxt.config import ModelConfig
from rxt.engine import ReactiveEngine
from rxt.generation import SamplingConfig
from rxt.model import ReactiveTransformer, load_model
from rxt.serve.app import create_app
from rxt.serve.launch import free_port
from rxt.serve.service import ServeSettings
from rxt.serve.store import SessionStore
from rxt.tokenizer import Tokenizer

NAMES = ["Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jun"]
THINGS = ["tea", "maps", "cats", "jazz", "rain", "chess", "boats", "bread", "stars", "snow"]
TEXTS = [f"Hi, my name is {n} and I like {t}. What do I like? You like {t}, {n}."
         for n in NAMES for t in THINGS] + [f"The {t} of {n} is blue, café über" for n in NAMES for t in THINGS]
MAX_TOKENS = 8


def make_tiny_model(directory: Path, seed: int = 0, model_class: type = ReactiveTransformer, **overrides) -> Path:
    """A random tiny RxT model (or ``model_class``, e.g. StatelessLM; ``overrides`` of its config) with a
    trained tokenizer, saved like a real one.

    Weights are drawn wider than the training init (std 0.02): at that scale an untrained model
    repeats its last input token whatever it reads, and the tests need answers that depend on the
    message and on the memory.
    """
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    model = model_class(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.2)
    model.tokenizer = tokenizer
    model.save_pretrained(directory)
    return directory


def queries(session: int, turns: int) -> list[str]:
    """Distinct, deterministic messages for one conversation."""
    return [f"Hi, my name is {NAMES[(session + t) % 10]} and I like {THINGS[(session * 3 + t) % 10]}."
            for t in range(turns)]


def reference_answers(model_dir: Path, conversations: Sequence[Sequence[str]], max_tokens: int = MAX_TOKENS):
    """Greedy answers of an in-process engine, one conversation after another, and the final STMs."""
    engine = ReactiveEngine(load_model(model_dir))
    answers, stms = [], []
    for turns in conversations:
        session = engine.new_session()
        answers.append([engine.interact(session, q, SamplingConfig(max_new_tokens=max_tokens)).text for q in turns])
        session.wait()
        stms.append(session.tensors["stm"].clone())
    engine.close()
    return answers, stms


@contextlib.contextmanager
def serve_in_thread(model_dir: Path, store: SessionStore, api_keys: Sequence[str] = (), model_name: str = "tiny-rxt",
                    **settings) -> Iterator[str]:
    """A live uvicorn server on a free loopback port, in a thread of this process; yields its URL.

    A stateless model directory is served with a persistent KV cache (as `rxt serve` does by default).
    """
    model = load_model(model_dir)
    settings = ServeSettings(model_name=model_name, **settings)
    engine = ReactiveEngine(model) if isinstance(model, ReactiveTransformer) else StatelessEngine(model, mode="cached")
    app = create_app(engine, store, settings, api_keys)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-thread server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def redis_server_binary() -> str | None:
    """The redis-server executable; installs the Debian package once if it is missing (None if that fails)."""
    found = shutil.which("redis-server")
    if found is None and shutil.which("apt-get"):
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server"]):
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=300,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            except (OSError, subprocess.SubprocessError):
                return None
        found = shutil.which("redis-server")
    return found


class RedisProcess:
    """A private redis-server on a free loopback port; every write is fsynced to its append-only file."""

    def __init__(self, binary: str, directory: Path, port: int | None = None):
        self.binary, self.directory, self.port = binary, directory, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
