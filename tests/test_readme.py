"""The README's Python example runs as written, every command it shows parses, it opens with the two
commands, and every relative link of the README and the docs leads somewhere."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# pages whose links are checked: the README, the docs and the READMEs beside recipes and experiments
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "README.md",
         *sorted((ROOT / "experiments").glob("*/README.md")), ROOT / "models" / "nano" / "README.md"]
# arguments under these folders name files of the repository, which must exist (runs/ and the like are outputs)
REPO_FOLDERS = ("recipes/", "models/", "experiments/", "docs/")


def readme_commands() -> list[str]:
    """Every command the README shows: each line of its bash blocks (continuations joined, comments
    cut) and each inline `rxt ...` or `make ...` span."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands + re.findall(r"`((?:rxt|make) [^`]+)`", text)


def check_command(command: str) -> None:
    """Raise if the command would not even start: an unknown make target, a missing script or file,
    or rxt arguments its parser refuses."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading environment settings
        words = words[1:]
    for word in words:
        if word.startswith(REPO_FOLDERS):
            assert (ROOT / word).exists(), f"{command!r} names {word}, which is not in the repository"
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
        assert set(words[1:]) <= set(targets), f"{command!r}: no such make target"
        return
    if words[0] == "python":
        assert (ROOT / words[1]).is_file(), f"{command!r}: no such script"
        return
    if words[0] == "torchrun":
        words = ["rxt", *words[words.index("rxt.cli") + 1:]]
    assert words[0] == "rxt", f"{command!r}: the README shows a command this test does not know how to check"
    from rxt.cli import build_parser

    try:
        build_parser(words[1:]).parse_args(words[1:])
    except SystemExit as stop:  # argparse exits 2 on bad arguments, 0 after --help
        assert stop.code == 0, f"{command!r} does not parse"


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


def test_every_command_the_readme_shows_parses(capsys):
    commands = readme_commands()
    assert len(commands) > 10 and any(c.startswith("rxt serve") for c in commands)
    for command in commands:
        check_command(command)


def test_the_command_check_can_fail():
    for wrong in ("rxt eval recall --history mine", "rxt trian --recipe recipes/tiny.yaml --out x",
                  "rxt train --recipe recipes/nowhere.yaml --out x", "make deploy", "ls -la"):
        with pytest.raises(AssertionError):
            check_command(wrong)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, made as GitHub makes them (code blocks left out)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target} names no heading of {linked.name}"


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

    root = ROOT / "models" / "nano"
    for name in ("rxt", "baseline"):
        model = load_model(root / name)
        recipe = load_recipe(root / name / "recipe.yaml")
        assert model.config == recipe.model.build(model.config.vocab_size)
        chain = [recipe.name]  # each recipe continues the run of the one before, down to the first
        while recipe.init_from:
            recipe = load_recipe(root / name / "continued_from" / Path(recipe.init_from).name / "recipe.yaml")
            chain.append(recipe.name)
        assert chain == ["nano-distract", "nano-para", "nano-real", "nano-queue", "nano-words", "nano-long", "nano"]
    for name in chain:  # the chain's recipes are the ones a user runs, in recipes/ and in `make model`
        assert (ROOT / "recipes" / f"{name}.yaml").is_file()
        assert f"recipes/{name}.yaml" in (ROOT / "Makefile").read_text()
