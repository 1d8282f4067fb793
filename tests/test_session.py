"""Session state: save -> load -> continue, fork, and refusing state that is corrupt or foreign."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch.testing import assert_close

from rxt.engine import ChatEngine
from rxt.generation import SamplingConfig
from rxt.model import ReactiveTransformer, StatelessLM, load_model
from rxt.session import Session, SessionStateError

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingConfig(max_new_tokens=8)
FIRST = ["Hi, my name is Ada.", "I live in Oslo."]
LATER = ["What is my name?", "Where do I live?"]


def chat(engine: ChatEngine, session: Session, queries: list[str]) -> list[list[int]]:
    return [engine.interact(session, query, GREEDY).token_ids for query in queries]


def state(session: Session) -> dict[str, torch.Tensor]:
    session.wait()
    return {name: tensor.clone() for name, tensor in session.tensors.items()}


def restore(engine: ChatEngine, target: Session, data: bytes) -> None:
    """Validate everything first, then swap the state in: a refused file leaves the target as it was."""
    loaded = Session.from_bytes(data)
    engine.check_session(loaded)
    target.replace_with(loaded)


# ---------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["rxt", "full", "cached"])
def test_save_load_continue_equals_uninterrupted(engine_factory, kind: str, tmp_path: Path) -> None:
    """A new process (model reloaded from disk, new engine) continues exactly where the session was."""
    engine = engine_factory(kind)
    session = engine.new_session()
    chat(engine, session, FIRST)
    path = session.save(tmp_path / "session.safetensors")
    engine.model.save_pretrained(tmp_path / "model")
    uninterrupted = chat(engine, session, LATER)

    reloaded = load_model(tmp_path / "model")
    other = engine_factory(kind, model=reloaded)
    resumed = Session.load(path)
    other.check_session(resumed)
    assert resumed.turns == len(FIRST) and resumed.id != ""
    assert chat(other, resumed, LATER) == uninterrupted
    for name, tensor in state(session).items():
        assert_close(state(resumed)[name], tensor)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_to_bytes_waits_for_the_pending_update(engine_factory) -> None:
    engine = engine_factory("rxt", update_delay_s=0.2)
    session = engine.new_session()
    engine.interact(session, FIRST[0], GREEDY)
    assert session.pending is not None
    data = session.to_bytes()  # must hold the turn just answered, not the memory before it
    assert session.pending is None
    assert torch.equal(Session.from_bytes(data).tensors["stm"], session.tensors["stm"])
    assert not torch.equal(session.tensors["stm"], engine.new_session().tensors["stm"])


def test_metadata_round_trip(engine_factory) -> None:
    engine = engine_factory("rxt")
    session = engine.new_session()
    chat(engine, session, FIRST)
    loaded = Session.from_bytes(session.to_bytes())
    for field in ("model_type", "model_identity", "turns", "id", "created"):
        assert getattr(loaded, field) == getattr(session, field)


# ---------------------------------------------------------------------------- fork


@pytest.mark.parametrize("kind", ["rxt", "cached", "full"])
def test_fork_diverges_without_touching_the_parent(engine_factory, kind: str) -> None:
    engine = engine_factory(kind)
    parent, control = engine.new_session(), engine.new_session()
    chat(engine, parent, FIRST)
    chat(engine, control, FIRST)
    before = state(parent)

    child = parent.fork()
    assert child.id != parent.id and child.turns == parent.turns
    chat(engine, child, ["Forget all that: my name is Bo and I live in Lima."])
    moved = state(child)
    assert any(moved[n].shape != t.shape or not torch.equal(moved[n], t) for n, t in before.items())
    for name, tensor in before.items():
        assert torch.equal(state(parent)[name], tensor)  # the parent did not
    assert parent.turns == len(FIRST)
    assert chat(engine, parent, LATER) == chat(engine, control, LATER)  # as if the fork never happened


# ---------------------------------------------------------------------------- refusing bad state


def _header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda data: b"",
    "four bytes": lambda data: data[:4],
    "header cut": lambda data: data[: 8 + _header_length(data) // 2],
    "tensor cut": lambda data: data[:-7],
    "half": lambda data: data[: len(data) // 2],
    "garbage": lambda data: bytes(range(256)) * 4,
    "text": lambda data: b"definitely not a session\n" * 10,
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_state_is_refused_clearly(engine_factory, case: str, tmp_path: Path) -> None:
    engine = engine_factory("rxt")
    session = engine.new_session()
    chat(engine, session, FIRST[:1])
    bad = CORRUPTIONS[case](session.to_bytes())
    with pytest.raises(SessionStateError):
        Session.from_bytes(bad)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad)
    with pytest.raises(SessionStateError):
        Session.load(path)


@pytest.mark.parametrize("header", [{"format": 1}, {"format": 99}, [1, 2], {"format": 1, "shapes": [3]}])
def test_safetensors_without_a_valid_session_header_is_refused(header) -> None:
    data = save_safetensors({"stm": torch.zeros(2, 1, 4, 8)}, metadata={"rxt_session": json.dumps(header)})
    with pytest.raises(SessionStateError):
        Session.from_bytes(data)


def test_model_weights_file_is_not_a_session(engine_factory, tmp_path: Path) -> None:
    engine_factory("rxt").model.save_pretrained(tmp_path)
    with pytest.raises(SessionStateError):
        Session.load(tmp_path / "model.safetensors")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Session.load(tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize(
    "source",
    [
        dict(kind="rxt", seed=1),  # same config, other weights
        dict(kind="rxt", stm_slots=4),  # other config
        dict(kind="full"),  # another kind of model
    ],
)
def test_state_of_another_model_is_refused_and_target_untouched(engine_factory, make_tiny_model, source) -> None:
    source = dict(source)
    kind, seed = source.pop("kind"), source.pop("seed", 0)
    model_class = ReactiveTransformer if kind == "rxt" else StatelessLM
    foreign_engine = engine_factory(kind, model=make_tiny_model(model_class, seed, **source))
    foreign = foreign_engine.new_session()
    chat(foreign_engine, foreign, FIRST[:1])

    engine = engine_factory("rxt")
    target = engine.new_session()
    chat(engine, target, FIRST)
    before, turns = state(target), target.turns
    with pytest.raises(SessionStateError, match="made by"):
        restore(engine, target, foreign.to_bytes())
    assert target.turns == turns and torch.equal(state(target)["stm"], before["stm"])
    with pytest.raises(SessionStateError):
        engine.interact(foreign, LATER[0], GREEDY)  # the engine refuses to run it, too


def test_restore_of_valid_state_replaces_the_conversation(engine_factory) -> None:
    engine = engine_factory("rxt")
    saved, target = engine.new_session(), engine.new_session()
    chat(engine, saved, FIRST)
    chat(engine, target, ["Something else entirely."])
    restore(engine, target, saved.to_bytes())
    assert target.turns == len(FIRST) and target.stats == []
    assert chat(engine, target, LATER) == chat(engine, saved, LATER)
