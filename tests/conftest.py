"""Shared fixtures: a tiny tokenizer and tiny models whose greedy answers vary from token to token."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from rxt.baselines import StatelessEngine
from rxt.config import ModelConfig
from rxt.engine import ChatEngine, ReactiveEngine
from rxt.model import ReactiveTransformer, StatelessLM
from rxt.tokenizer import Tokenizer, chatml_template

CHAT_LINES = [
    "Hi, my name is {name} and I live in {city}.",
    "What is the name of my cat? It is {name}.",
    "I moved to {city} last year; the café there is naïve and über good.",
    "Remember: my favourite number is {number}.",
    "How many turns ago did I tell you about {city}?",
]
NAMES, CITIES = ["Ada", "Bo", "Chen", "Dara", "Eli", "Zoë"], ["Oslo", "Lima", "Kyoto", "Zürich", "Accra"]


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE (~300 tokens) trained in milliseconds on a few hundred short chat lines."""
    texts = [
        line.format(name=name, city=city, number=7 * i)
        for i, (name, city) in enumerate((n, c) for n in NAMES for c in CITIES)
        for line in CHAT_LINES
    ]
    return Tokenizer.train(texts * 2, vocab_size=300)


@pytest.fixture(scope="session")
def make_tiny_model(tiny_tokenizer: Tokenizer) -> Callable[..., torch.nn.Module]:
    """``make_tiny_model(model_class, seed=0, **config_overrides)``: tiny preset, tokenizer attached.

    Weights are drawn with std 0.2 instead of the 0.02 training init: at 0.02 a random tied-embedding
    model just repeats its last input token, so greedy answers would not exercise anything.
    """

    def make(model_class: type = ReactiveTransformer, seed: int = 0, **overrides: object) -> torch.nn.Module:
        config = ModelConfig.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size, **overrides)
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0.0, 0.2)
        model.tokenizer = tiny_tokenizer
        return model.eval()

    return make


@pytest.fixture
def engine_factory(make_tiny_model) -> Iterator[Callable[..., ChatEngine]]:
    """``engine_factory(kind, seed=0, model=None, **engine_kwargs)``: kind "rxt" or a baseline mode."""
    made: list[ChatEngine] = []

    def make(kind: str = "rxt", seed: int = 0, model=None, **kwargs) -> ChatEngine:
        if kind == "rxt":
            engine = ReactiveEngine(model or make_tiny_model(ReactiveTransformer, seed), **kwargs)
        else:
            engine = StatelessEngine(model or make_tiny_model(StatelessLM, seed), mode=kind, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        if isinstance(engine, ReactiveEngine):
            engine.close()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine, more threads mostly wait for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# llama layout, as an imported model has: GQA self-attention (4 query heads, 2 KV heads)
LLAMA_TINY = dict(n_layers=4, n_q_heads=4, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-5)


@pytest.fixture
def chat_base(tiny_tokenizer) -> StatelessLM:
    """A tiny llama-layout base with a ChatML template whose preamble is a system message, as an
    imported model has."""
    backend = HFTokenizer.from_str(tiny_tokenizer.backend.to_str())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer = Tokenizer(backend, chatml_template(system="You are a tiny test model."))
    torch.manual_seed(3)
    model = StatelessLM(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, **LLAMA_TINY))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    model.tokenizer = tokenizer
    return model.eval()
