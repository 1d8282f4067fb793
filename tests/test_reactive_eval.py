"""A reactive adapter with its base, as users run it: `rxt chat` / `rxt serve` / the evaluations load the
adapter directory (its base given, or where adapter.json says it was), refuse a wrong base, and the
evaluations compare it with the base as a stateless model. Before training it answers as the base
reading the current turn, so in the memory suite and the perplexity evaluation the untrained adapter,
its no-memory control and the current-turn baseline agree exactly."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch

from rxt.baselines import StatelessEngine
from rxt.chat import build_engine
from rxt.cli import main
from rxt.data.dialogues import Dialogue, Turn
from rxt.data.jsonl import write_dialogues
from rxt.engine import NoMemoryEngine, ReactiveEngine
from rxt.evaluation.memory import engines_for, evaluate_memory
from rxt.evaluation.memory_tasks import build_dialogues, load_suite
from rxt.evaluation.recall import tokens_read
from rxt.model import load_model
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained, base_sha256

pytestmark = pytest.mark.usefixtures("one_thread")

REACTIVE = ReactiveConfig(memory_layers=[1, 3], cross_n_q_heads=2, cross_n_kv_heads=2, stm_slots=8, write_slots=2)


@pytest.fixture
def dirs(tmp_path, chat_base) -> tuple[Path, Path]:
    """(adapter directory, base directory) of an untrained adapter; adapter.json names where the base is."""
    base_dir = chat_base.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = ReactivePretrained(copy.deepcopy(chat_base), REACTIVE, base_sha256(base_dir))
    model.base_dir = str(base_dir)
    return model.save_adapter(tmp_path / "adapter", dtype=torch.float32), base_dir


def test_chat_loads_an_adapter_with_its_base_and_refuses_another(dirs, tmp_path, make_tiny_model):
    adapter_dir, base_dir = dirs
    engine = build_engine(str(adapter_dir), base=str(base_dir))
    assert isinstance(engine, ReactiveEngine) and isinstance(engine.model, ReactivePretrained)
    engine.close()
    assert json.loads((adapter_dir / "adapter.json").read_text())["base"] == str(base_dir)
    assert isinstance(load_model(adapter_dir), ReactivePretrained)  # the base from adapter.json
    other = make_tiny_model(type(engine.model.base), seed=7, n_layers=4, n_q_heads=4, n_kv_heads=2)
    other_dir = other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="is not this adapter's base"):
        build_engine(str(adapter_dir), base=str(other_dir))
    meta = json.loads((adapter_dir / "adapter.json").read_text())
    (adapter_dir / "adapter.json").write_text(json.dumps({**meta, "base": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="--base"):
        load_model(adapter_dir)
    with pytest.raises(ValueError, match="a base applies only to one"):
        load_model(base_dir, base=str(base_dir))
    with pytest.raises(ValueError, match="--baseline applies only"):
        build_engine(str(adapter_dir), baseline="full", base=str(base_dir))
    with pytest.raises(ValueError, match="eager path"):
        build_engine(str(adapter_dir), compile=True, base=str(base_dir))


def test_rxt_chat_and_serve_take_base(dirs, capsys, monkeypatch):
    adapter_dir, base_dir = dirs
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there.\n/quit\n"))
    assert main(["chat", str(adapter_dir), "--base", str(base_dir), "--max-new-tokens", "4"]) == 0
    assert "RxT" in capsys.readouterr().out
    assert main(["serve", "--model", str(adapter_dir), "--base", str(base_dir.parent / "nowhere")]) == 2
    assert "nowhere is not an rxt model directory" in capsys.readouterr().err


def test_untrained_adapter_no_memory_control_and_current_turn_answer_alike_in_the_memory_suite(dirs):
    adapter_dir, base_dir = dirs
    engines = engines_for(str(adapter_dir), str(base_dir), base=str(base_dir),
                          baselines=["stateless", "current_turn"], no_memory=True)
    assert isinstance(engines["rxt_no_memory"], NoMemoryEngine)
    suite = load_suite("heldout")
    dialogues = build_dialogues(suite, ("single", "update"), per_task=1, seed=3, max_distance=2)
    assert {d.distance for d in dialogues} == {1, 2}
    report = evaluate_memory(engines, suite, dialogues, max_new_tokens=6, progress=False)
    answers = {}
    for a in report.answers:
        answers.setdefault(a.model, []).append(a.answer)
    assert answers["rxt"] == answers["rxt_no_memory"] == answers["current_turn"]
    data = report.to_dict()
    # the reactive model reads the preamble, the message and the answer once: its memory is written from
    # the states generation computed (the closing they lack is counted with the answer)
    assert engines["rxt"].keeps_states
    assert data["tokens_processed"]["rxt"] == data["tokens_processed"]["rxt_no_memory"]
    assert data["tokens_processed"]["rxt_no_memory"] == data["tokens_processed"]["current_turn"]
    assert data["state_bytes"]["rxt"] == engines["rxt"].model.initial_memory(1).numel() * 4
    for engine in engines.values():
        if isinstance(engine, ReactiveEngine):
            engine.close()


def test_tokens_read_counts_the_system_message_each_reactive_turn_opens_with(dirs):
    adapter_dir, base_dir = dirs
    engine = ReactiveEngine(load_model(adapter_dir, base=base_dir))
    tok = engine.tokenizer
    session = engine.new_session()
    turn = len(tok.preamble()) + len(tok.interaction("Hi.", "Hello."))
    assert tokens_read(engine, [session], ["Hi."], ["Hello."]) == [turn]  # read once, its states kept
    recompute = ReactiveEngine(engine.model, keep_states=False)
    assert tokens_read(recompute, [session], ["Hi."], ["Hello."]) == [2 * turn]  # read, then encoded again
    recompute.close()
    current = StatelessEngine(engine.model.base, mode="current")
    assert tokens_read(current, [current.new_session()], ["Hi."], ["Hello."]) == [turn]
    engine.close()


def test_perplexity_of_the_untrained_adapter_is_the_current_turn_models(dirs, tmp_path, capsys):
    adapter_dir, base_dir = dirs
    data = tmp_path / "chat.jsonl"
    write_dialogues(data, [Dialogue(f"d{i}", [Turn("Hi, I am Ada.", "Hello Ada."), Turn("I live in Oslo.", "Nice."),
                                              Turn("Where do I live?", "In Oslo.")]) for i in range(2)])
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", str(adapter_dir), "--base", str(base_dir), "--baseline",
                 str(base_dir), "--baselines", "stateless", "current_turn", "--data", str(data), "--no-progress",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"rxt", "rxt_no_memory", "stateless", "current_turn"}
    for turn in ("1", "2", "3"):
        row = report["by_turn"][turn]
        assert row["rxt"] == pytest.approx(row["current_turn"], rel=1e-4)
        assert row["rxt_no_memory"] == pytest.approx(row["current_turn"], rel=1e-4)
    assert report["by_turn"]["3"]["stateless"] != pytest.approx(report["by_turn"]["3"]["current_turn"], rel=1e-4)


def test_the_window_baseline_holds_as_many_numbers_as_the_adapters_memory(dirs, chat_base):
    """An adapter's memory has fewer layers than its base's KV cache: the equal-state window is counted
    from the memory it holds (here 2 memory layers of 8 slots of d_model), not from the base's config;
    --window-tokens sets it, and a window of nothing is refused."""
    adapter_dir, base_dir = dirs
    engines = engines_for(str(adapter_dir), str(base_dir), base=str(base_dir), baselines=["window"])
    c = chat_base.config
    memory = len(REACTIVE.memory_layers) * REACTIVE.stm_slots * c.d_model
    assert engines["rxt"].model.initial_memory(1).numel() == memory
    assert engines["window"].window_tokens == memory // (2 * c.n_layers * c.n_kv_heads * c.d_head)
    session = engines["window"].new_session()
    for text in ("one two three four five six seven", "eight nine ten"):
        engines["window"].interact(session, text)
    assert engines["window"].state_bytes(session) <= memory * 4 + 2 * c.n_layers * c.n_kv_heads * c.d_head * 4 * len(
        engines["window"].preamble)  # the window's cache: the preamble and at most the memory's worth
    assert engines_for(str(base_dir), None, window_tokens=5, baselines=["window"])["window"].window_tokens == 5
    with pytest.raises(ValueError, match="--window-tokens must be at least 1"):
        engines_for(str(base_dir), None, window_tokens=0, baselines=["window"])
    engines["rxt"].close()
