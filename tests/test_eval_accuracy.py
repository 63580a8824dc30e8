"""Task accuracy on verifiable prompt sets: maths answers and code tests routed to the real verifiers
(code runs in the sandbox), per-task and pooled figures, clear errors, and ``polyfuse eval --prompts``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyfuse.errors import DataError
from polyfuse.evaluate import accuracy as acc_mod
from polyfuse.evaluate.accuracy import evaluate_accuracy, read_problems

PROBLEMS = [
    {"prompt_id": "m1", "prompt": "What is 2+3?", "answer": "5", "task": "arith"},
    {"prompt_id": "m2", "prompt": "What is 7*6?", "answer": "42", "task": "arith"},
    {"prompt_id": "m3", "prompt": "Half of 1?", "answer": "\\frac{1}{2}", "task": "frac"},
    {"prompt_id": "c1", "prompt": "Write add(a, b).", "tests": ["assert add(2, 3) == 5"], "entry_point": "add"},
    {"prompt_id": "c2", "prompt": "Write sub(a, b).", "tests": ["assert sub(5, 3) == 2"], "entry_point": "sub"},
]
RESPONSES = {
    "What is 2+3?": "The answer is 5.",                          # right
    "What is 7*6?": "It is \\boxed{41}",                          # wrong
    "Half of 1?": "The answer is 0.5",                           # right after normalisation
    "Write add(a, b).": "```python\ndef add(a, b):\n    return a + b\n```",      # passes its test
    "Write sub(a, b).": "```python\ndef sub(a, b):\n    return a + b\n```",      # fails its test
}


class FakeBackend:
    """Stands in for the HF generator: answers each prompt with the canned response above."""

    def __init__(self, spec, *, device="auto", dtype="auto"):
        self.spec = spec

    def generate(self, prompts, params, seed):
        assert params.temperature == 0.0 and params.n == 1
        return [(RESPONSES[p[-1]["content"]],) for p in prompts]


@pytest.fixture
def fake_backend(monkeypatch):
    from polyfuse import generate

    monkeypatch.setattr(generate, "HFBackend", FakeBackend)


def test_each_row_goes_to_its_verifier_and_tasks_are_pooled(fake_backend):
    accuracy, records = evaluate_accuracy("any-model", PROBLEMS, batch_size=2)
    assert accuracy == {"arith": 0.5, "code": 0.5, "frac": 1.0, "all": 0.6}
    by_id = {r["prompt_id"]: r for r in records}
    assert [by_id[i]["correct"] for i in ("m1", "m2", "m3", "c1", "c2")] == [True, False, True, True, False]
    assert by_id["c1"]["category"] == "code" and by_id["m2"]["category"] == "math"


def test_a_row_without_gold_fails_before_any_model_is_loaded(monkeypatch):
    from polyfuse import generate

    def boom(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(generate, "HFBackend", boom)
    with pytest.raises(DataError, match="'x'.*neither a gold 'answer' nor code 'tests'"):
        evaluate_accuracy("m", [*PROBLEMS, {"prompt_id": "x", "prompt": "hi"}])


def test_read_problems_names_the_file(tmp_path: Path):
    with pytest.raises(DataError, match="prompts file not found"):
        read_problems(tmp_path / "nope.jsonl")
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    assert [p["prompt_id"] for p in read_problems(path, limit=2)] == ["m1", "m2"]


def test_eval_command_with_prompts_records_accuracy(fake_backend, tiny_world: Path, tmp_path: Path, capsys):
    from polyfuse.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    run = tmp_path / "run"
    assert main(["eval", "--world", str(tiny_world), "t=world:target", "--prompts", str(prompts),
                 "--run", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["models"]["t"]["accuracy"]["all"] == 0.6
    assert results["meta"]["accuracy"]["n_prompts"] == len(PROBLEMS)
    out = capsys.readouterr().out
    assert "task accuracy" in out and "0.6000" in out
    assert main(["eval", "--world", str(tiny_world), "t=world:target", "--prompts", str(prompts),
                 "--lm-eval", "x"]) == 2


def test_module_exports():
    assert set(acc_mod.__all__) == {"answer_accuracy", "evaluate_accuracy", "read_problems"}
