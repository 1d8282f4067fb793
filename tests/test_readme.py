"""The README's Python example runs as written, and the README opens with the two commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    head = README.read_text().splitlines()[:8]
    assert any("make demo" in line for line in head) and any("make test" in line for line in head)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})
    assert (tmp_path / "ada.rxt").is_file()


def test_cli_reports_bad_input_without_a_traceback(capsys):
    from rxt.cli import main

    assert main(["eval", "recall"]) == 2
    assert main(["eval", "recall", "--values", "fresh-english"]) == 2  # invented values: train split only
    assert main(["train", "--recipe", "/nonexistent/recipe.yaml", "--out", "/tmp/unused"]) == 2
    err = capsys.readouterr().err
    assert "give --model" in err and "needs --split train" in err and "nonexistent" in err and "Traceback" not in err


def test_shipped_models_load_and_name_their_recipes():
    from rxt import load_model
    from rxt.training.recipe import load_recipe

    root = README.parent / "models" / "nano"
    for name in ("rxt", "baseline"):
        model = load_model(root / name)
        recipe = load_recipe(root / name / "recipe.yaml")
        assert model.config == recipe.model.build(model.config.vocab_size)
        chain = [recipe.name]  # each recipe continues the run of the one before, down to the first
        while recipe.init_from:
            recipe = load_recipe(root / name / "continued_from" / Path(recipe.init_from).name / "recipe.yaml")
            chain.append(recipe.name)
        assert chain == ["nano-distract", "nano-para", "nano-real", "nano-queue", "nano-words", "nano-long", "nano"]
