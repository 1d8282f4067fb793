"""`rxt eval compare`: two answers files of `rxt eval memory` paired question by question."""

from __future__ import annotations

import json

import pytest

from rxt.cli import main
from rxt.evaluation.compare import compare, read_answers, sign_test


def answers(path, outcomes, model="rxt", task="single"):
    rows = [{"model": model, "task": task, "dialogue": f"{task}-{i}", "query": "Where do I live?", "distance": 4,
             "outcome": "right" if right else "wrong", "answer": "..."} for i, right in enumerate(outcomes)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sign_test_matches_the_binomial_by_hand():
    assert sign_test(0, 0) == 1.0
    assert sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 2 ** 10)  # 0.0215
    assert sign_test(9, 1) == sign_test(1, 9)
    assert sign_test(0, 2) == 0.5
    assert sign_test(5, 5) == 1.0


def test_counts_pair_only_the_shared_questions(tmp_path):
    a = read_answers(answers(tmp_path / "a.jsonl", [True, True, False, False, True]), None)
    b = read_answers(answers(tmp_path / "b.jsonl", [True, False, True, False]), None)  # no 5th question
    got = compare(a, b)["all"]
    assert (got["paired"], got["both"], got["only_a"], got["only_b"], got["neither"]) == (4, 1, 1, 1, 1)
    assert got["p"] == 1.0


def test_the_command_prints_and_writes_the_table(tmp_path, capsys):
    answers(tmp_path / "a.jsonl", [False] * 10)
    answers(tmp_path / "b.jsonl", [True] * 9 + [False])
    assert main(["eval", "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                 "--json", str(tmp_path / "c.json")]) == 0
    assert "0.004" in capsys.readouterr().out  # 9 to 0: 2 / 2**9
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["tasks"]["single"]["only_b"] == 9 and saved["tasks"]["single"]["p"] == pytest.approx(0.0039, abs=1e-4)


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    two = tmp_path / "two.jsonl"
    two.write_text(answers(tmp_path / "x.jsonl", [True]).read_text() + answers(tmp_path / "y.jsonl", [True], "window").read_text())
    one = answers(tmp_path / "one.jsonl", [True])
    assert main(["eval", "compare", str(two), str(one)]) == 2
    assert "name one with --models" in capsys.readouterr().err
    assert main(["eval", "compare", str(two), str(one), "--models", "window", "rxt"]) == 0
    assert main(["eval", "compare", str(two), str(one), "--models", "nope", "rxt"]) == 2
    assert "no answers of model 'nope'" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"model": "rxt"}\n')
    assert main(["eval", "compare", str(tmp_path / "bad.jsonl"), str(one)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path / "none.jsonl"), str(one)]) == 2
    assert "no such file" in capsys.readouterr().err
    other = answers(tmp_path / "other.jsonl", [True], task="multi")
    assert main(["eval", "compare", str(other), str(one)]) == 2
    assert "share no question" in capsys.readouterr().err
