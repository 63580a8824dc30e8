"""The lm-evaluation-harness bridge: a task defined locally (YAML + JSONL, no downloads) run on the tiny
world's target; the score is checked against our own log-likelihood ranking and followed into
results.json and the report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from polyfuse.errors import ModelLoadError, PolyfuseError
from polyfuse.evaluate.lm_eval_bridge import LmEvalScores, _clean_metrics, _pick_headline, run_lm_eval

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness not installed: pip install polyfuse[eval]",
)
TASK = "polyfuse_local_mc"
ROWS = [
    ("def add(a, b):\n    return", ["a + b", "the sea", "7 days"], 0),
    ("The capital of France is", ["Paris", "import os", "x = 1"], 0),
    ("for i in range(10):\n    ", ["print(i)", "the cat", "3 / 4"], 0),
    ("Two plus two equals", ["four", "def f():", "]]"], 0),
    ("x = [1, 2, 3]\nprint(len(", ["x))", "the", "Monday"], 0),
    ("Once upon a time there was a", ["king", "0 + 0", "return"], 0),
    ("The integral of 2x is", ["x^2", "banana", "import"], 0),
    ("She opened the door and", ["smiled", "{}", "= 5"], 0),
]


def write_task(root: Path) -> Path:
    """A multiple-choice task over a local JSONL file, in the harness's YAML format."""
    task_dir = root / "tasks"
    task_dir.mkdir(parents=True)
    data = task_dir / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in ROWS))
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {root / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task_dir


def reference_accuracy(model_dir: Path) -> float:
    """Multiple-choice accuracy computed here: the choice with the highest summed log-prob of its
    tokens after the question (continuation = " " + choice, split off the jointly encoded text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits = 0
    for question, choices, label in ROWS:
        scores = []
        for choice in choices:
            context = tok.encode(question)
            continuation = tok.encode(question + " " + choice)[len(context):]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = model(ids).logits[0].float().log_softmax(-1)  # [T, V]
            scores.append(sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
        hits += max(range(len(choices)), key=scores.__getitem__) == label
    return hits / len(ROWS)


@pytest.fixture(scope="module")
def bridged(tiny_world, tmp_path_factory):
    from polyfuse.evaluate.lm_eval_bridge import lm_eval_into_results

    root = tmp_path_factory.mktemp("lm_eval")
    run = root / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"models": {"target": {"bpb": {"code": 3.0, "all": 3.0}}}}))
    model = tiny_world / "models" / "target"
    results = lm_eval_into_results(run, "target", model, [TASK], include_path=write_task(root), device="cpu",
                                   batch_size=4)
    return run, model, results


@needs_lm_eval
def test_local_task_score_lands_in_results(bridged):
    run, model, results = bridged
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == results
    target = on_disk["models"]["target"]
    assert target["bpb"] == {"code": 3.0, "all": 3.0}  # earlier figures kept
    assert target["tasks"][TASK] == {"acc": target["accuracy"][TASK]}
    assert target["accuracy"][TASK] == pytest.approx(reference_accuracy(model))
    meta = on_disk["meta"]["lm_eval"]["tasks"][TASK]
    assert meta["metric"] == "acc" and meta["n_samples"] == len(ROWS) and meta["higher_is_better"] == {"acc": True}
    raw = json.loads((run / "lm_eval" / "target.json").read_text())
    assert raw["results"][TASK]["acc,none"] == target["accuracy"][TASK]


@needs_lm_eval
def test_local_task_score_appears_in_the_report(bridged):
    from polyfuse.evaluate.report import write_report

    run, _, results = bridged
    md_path, html_path = write_report([run], None)
    md, page = md_path.read_text(), html_path.read_text()
    shown = f"{100 * results['models']['target']['accuracy'][TASK]:.2f}"
    row = next(line for line in md.split("## Task accuracy", 1)[1].splitlines() if line.startswith("| target"))
    assert row == f"| target | **{shown}** |"
    assert f"| target | {TASK} | acc | {results['models']['target']['tasks'][TASK]['acc']:.4f} |" in md
    assert TASK in page and f"<span class=\"best\">{shown}</span>" in page


def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(PolyfuseError, match=r"pip install polyfuse\[eval\]"):
        run_lm_eval(tmp_path, ["anything"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        run_lm_eval(tmp_path / "no-model", ["x"])
    with pytest.raises(PolyfuseError, match="no lm-eval task"):
        run_lm_eval(tmp_path, [])


def test_metrics_are_cleaned_and_a_headline_picked():
    entry = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.75,
             "exact_match,strict-match": 0.25, "perplexity,none": 12.0, "name": "t"}
    metrics = _clean_metrics(entry)
    assert metrics == {"acc": 0.5, "acc_norm": 0.75, "exact_match,strict-match": 0.25, "perplexity": 12.0}
    higher = {"acc": True, "acc_norm": True, "exact_match": True, "perplexity": False}
    assert _pick_headline(metrics, higher, None) == "acc"
    assert _pick_headline({"perplexity": 12.0, "exact_match,strict-match": 0.25}, higher, None) == (
        "exact_match,strict-match")
    assert _pick_headline({"perplexity": 12.0}, higher, None) is None
    assert _pick_headline(metrics, higher, "acc_norm") == "acc_norm"
    with pytest.raises(PolyfuseError, match="not reported"):
        _pick_headline(metrics, higher, "f1")
    scores = LmEvalScores(metrics={"a": {"acc": 0.5}, "b": {"bleu": 31.0}}, headline={"a": "acc", "b": "bleu"})
    assert scores.accuracy == {"a": 0.5}  # only fractions are accuracies


@needs_lm_eval
def test_eval_command_runs_a_local_task_into_the_run(bridged, tiny_world, tmp_path, capsys):
    """`polyfuse eval MODEL --lm-eval TASK --include-path DIR --run RUN` gives the bridge's score."""
    from polyfuse.cli import main

    _, _, results = bridged
    run = tmp_path / "run"
    tasks = write_task(tmp_path / "t")
    assert main(["eval", "--world", str(tiny_world), "t=world:target", "--lm-eval", TASK, "--include-path",
                 str(tasks), "--run", str(run), "--device", "cpu", "--batch-size", "4"]) == 0
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["models"]["t"]["accuracy"][TASK] == pytest.approx(results["models"]["target"]["accuracy"][TASK])
    assert "task accuracy" in capsys.readouterr().out
