"""The recipes the repository ships: every one loads and validates, and the data they name can be made."""

import runpy
from pathlib import Path

import pytest
import yaml

from rxt.training.recipe import Recipe, load_recipe, parse

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "experiments").glob("*/*.yaml"))

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path, tmp_path, monkeypatch):
    if (path.parent / "make_data.py").is_file():  # a probe's data files are made first, as its README says
        make_data = runpy.run_path(str(path.parent / "make_data.py"))["main"]
        make_data(tmp_path / "experiments" / path.parent.name / "data")
        monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(path.read_text())
    if raw.get("kind") in ("reactive-pretrained", "stateless-pretrained"):
        _validate_pretrained(raw, tmp_path, monkeypatch, path)
        return
    data = (raw.get("data") or {})
    if any(str(data.get(k, "")).startswith("data/") for k in ("train_file", "heldout_file")) or data.get("text_files"):
        _stand_in_fetched_data(data, tmp_path)  # what `rxt data fetch` prepares, in miniature
        monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.stages.smat.steps > 0


def _validate_pretrained(raw: dict, root: Path, monkeypatch, path: Path) -> None:
    """A recipe on a pretrained base names an imported base and fetched chitchat: stand-ins of both."""
    from rxt.pretrained.history_training import HistoryRecipe
    from rxt.pretrained.training import ReactiveRecipe

    (root / raw["base"]).mkdir(parents=True, exist_ok=True)
    (root / raw["base"] / "config.json").write_text("{}")
    if raw["data"].get("chitchat_file"):
        _stand_in_fetched_data({"train_file": raw["data"]["chitchat_file"]}, root)
    if raw.get("init_from"):  # an adapter or a LoRA file the run starts from
        (root / raw["init_from"]).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(root)
    recipe = (ReactiveRecipe if raw["kind"] == "reactive-pretrained" else HistoryRecipe).load(path)
    assert recipe.train.steps > 0 and recipe.data.fact_share > 0


def _stand_in_fetched_data(data: dict, root: Path) -> None:
    from rxt.data.dialogues import Dialogue, Turn
    from rxt.data.jsonl import write_dialogues

    for key in ("train_file", "heldout_file"):
        if data.get(key):
            (root / data[key]).parent.mkdir(parents=True, exist_ok=True)
            write_dialogues(root / data[key], [Dialogue("d", [Turn("hi there", "hello"), Turn("how are you", "fine")])])
    for pattern in data.get("text_files", []):
        (root / pattern.replace("*", "stand-in")).parent.mkdir(parents=True, exist_ok=True)
        (root / pattern.replace("*", "stand-in")).write_text("Call me Ishmael.\n")


def test_copy_probe_data_is_valid_and_new_at_every_question(tmp_path):
    from rxt.data.jsonl import read_dialogues, validate

    runpy.run_path(str(ROOT / "experiments" / "copy_probe" / "make_data.py"))["main"](tmp_path)
    assert validate(tmp_path / "train.jsonl") == [] and validate(tmp_path / "heldout.jsonl") == []
    train, held = read_dialogues(tmp_path / "train.jsonl"), read_dialogues(tmp_path / "heldout.jsonl")
    words = [[t.check["value"] for t in d.turns if t.check] for d in held]
    assert all(len(w) == 1 for w in words) and len({w[0] for w in words}) > 0.95 * len(held)
    assert {t.check["distance"] for d in train[:200] for t in d.turns if t.check} == {1, 2, 3}
    # the binding variant: three new words for three named locks, every one asked for
    assert validate(tmp_path / "binding-train.jsonl") == [] and validate(tmp_path / "binding-heldout.jsonl") == []
    for d in read_dialogues(tmp_path / "binding-heldout.jsonl")[:50]:
        checks = [t.check for t in d.turns if t.check]
        assert len(checks) == 3 and len({c["slot"] for c in checks}) == 3 and len({c["value"] for c in checks}) == 3
        for t, turn in enumerate(d.turns):
            if turn.check:  # the distance points at the turn that told this lock's code
                told = d.turns[t - turn.check["distance"]]
                assert told.query == f"The {turn.check['slot']} code is {turn.check['value']}."


def test_recipe_rejects_unknown_and_mistyped_keys():
    with pytest.raises(ValueError, match="unknown keys \\['stepz'\\]"):
        parse(Recipe, {"stages": {"smat": {"stepz": 3}}}, "r.yaml")
    with pytest.raises(ValueError, match="expected int"):
        parse(Recipe, {"stages": {"smat": {"steps": "many"}}}, "r.yaml")
