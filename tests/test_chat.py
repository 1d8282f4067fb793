"""`rxt chat`: the REPL driven by scripted input over tiny saved model directories."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rxt.chat import ChatREPL, build_engine, format_stats
from rxt.cli import main
from rxt.engine import ReactiveEngine
from rxt.generation import SamplingConfig
from rxt.model import ReactiveTransformer, StatelessLM
from rxt.session import TurnStats

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = SamplingConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def model_dirs(make_tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "rxt": make_tiny_model(ReactiveTransformer).save_pretrained(root / "rxt"),
        "stateless": make_tiny_model(StatelessLM).save_pretrained(root / "stateless"),
    }


@pytest.fixture
def engine(model_dirs) -> Iterator[ReactiveEngine]:
    engine = build_engine(str(model_dirs["rxt"]))
    yield engine
    engine.close()


def chat(engine, script: str) -> tuple[ChatREPL, str]:
    output = io.StringIO()
    repl = ChatREPL(engine, SAMPLING, io.StringIO(script), output)
    assert repl.run() == 0
    return repl, output.getvalue()


def test_answers_stream_to_the_output(engine) -> None:
    repl, output = chat(engine, "Hi, my name is Ada.\n/quit\n")
    reference = engine.interact(engine.new_session(), "Hi, my name is Ada.", SAMPLING)
    assert reference.text and f"rxt> {reference.text}\n" in output
    assert repl.session.turns == 1
    assert output.rstrip().endswith("bye")


def test_save_then_load_restores_the_conversation(engine, tmp_path: Path) -> None:
    path = tmp_path / "chat.safetensors"
    repl, output = chat(engine, f"Hi, my name is Ada.\n/save {path}\nI live in Oslo.\nAnd I like tea.\n/load {path}\n")
    assert f"saved 1 turns to {path}" in output and f"loaded 1 turns from {path}" in output
    assert repl.session.turns == 1
    saved, _ = chat(engine, "Hi, my name is Ada.\n")  # the state /save wrote
    saved.session.wait()
    repl.session.wait()
    assert torch.equal(repl.session.tensors["stm"], saved.session.tensors["stm"])


@pytest.mark.parametrize("content", [b"garbage" * 50, b"", None])
def test_loading_a_bad_file_prints_an_error_and_keeps_the_session(engine, tmp_path: Path, content) -> None:
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    repl, output = chat(engine, f"Hi, my name is Ada.\nI live in Oslo.\n/load {path}\n/stats\n")
    assert f"error: could not load {path}" in output
    assert "Traceback" not in output
    assert repl.session.turns == 2 and len(repl.session.stats) == 2


def test_loading_state_of_another_model_is_refused(engine, model_dirs, tmp_path: Path) -> None:
    stateless = build_engine(str(model_dirs["stateless"]))
    path = tmp_path / "stateless.safetensors"
    chat(stateless, f"Hello.\n/save {path}\n")
    repl, output = chat(engine, f"Hi.\n/load {path}\n")
    assert "error: could not load" in output and "made by a stateless model" in output
    assert repl.session.turns == 1 and repl.session.model_type == "rxt"


def test_reset_stats_help_and_unknown_commands(engine) -> None:
    repl, output = chat(engine, "Hi.\nHow are you?\n/stats\n/reset\n/help\n/bogus\n")
    assert "first token s" in output and "memory update s" in output
    assert "conversation reset" in output and repl.session.turns == 0
    assert "/save PATH" in output  # the help text
    assert "unknown command /bogus" in output


def test_stats_table_has_one_row_per_turn() -> None:
    stats = [TurnStats(turn=n, prompt_tokens=5, answer_tokens=3, time_to_first_token_s=0.01, answer_s=0.05,
                       memory_update_s=0.002 if n < 3 else None, tokens_processed=16, state_bytes=2048)
             for n in (1, 2, 3)]
    lines = format_stats(stats, update_running=True).splitlines()
    assert len(lines) == 4
    assert lines[1].split()[:4] == ["1", "0.0100", "0.0500", "0.0020"]
    assert "running" in lines[3] and lines[3].split()[-2:] == ["16", "2048"]
    assert format_stats([]) == "no turns yet"


def test_end_of_input_and_ctrl_c_exit_cleanly(engine) -> None:
    _, output = chat(engine, "Hi.")  # no newline, no /quit
    assert output.rstrip().endswith("bye")

    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    output = io.StringIO()
    assert ChatREPL(engine, SAMPLING, Interrupted(), output).run() == 0
    assert output.getvalue().rstrip().endswith("bye")


def test_cli_chats_with_a_baseline_directory(model_dirs, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there.\nAnd again.\n/stats\n/quit\n"))
    assert main(["chat", str(model_dirs["stateless"]), "--baseline", "cached", "--max-new-tokens", "6"]) == 0
    output = capsys.readouterr().out
    assert "baseline mode cached" in output
    assert output.count("rxt> ") == 2 and "first token s" in output


def test_cli_refuses_baseline_mode_for_an_rxt_directory(model_dirs, capsys) -> None:
    assert main(["chat", str(model_dirs["rxt"]), "--baseline", "full"]) == 2
    assert "--baseline applies only to a stateless model directory" in capsys.readouterr().err


def test_cli_reports_a_missing_directory(tmp_path: Path, capsys) -> None:
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "rxt chat:" in capsys.readouterr().err


def test_a_command_imports_only_its_own_module():
    """`rxt train` must run where the server's packages (uvicorn, fastapi) are not installed."""
    code = ("import sys; from rxt.cli import build_parser; "
            "build_parser(['train', '--recipe', 'r.yaml', '--out', 'o']).parse_args(['train', '--recipe', 'r.yaml', '--out', 'o']); "
            "print(sorted(m for m in sys.modules if m.startswith(('rxt.serve', 'rxt.bench', 'uvicorn', 'fastapi'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_missing_dependency_is_named(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name == "rxt.serve.cli":
            raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert main(["serve", "--model", "m"]) == 2
    assert "needs the package 'uvicorn'" in capsys.readouterr().err
