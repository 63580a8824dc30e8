"""The tiny world's verifiable mini task: seeded, disjoint splits, answers that the maths verifier checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from polyfuse.demo.tasks import (
    TASKS,
    answer_text,
    generate_problems,
    heldout,
    mixed_problems,
    task_names,
    write_problems,
)
from polyfuse.errors import DataError
from polyfuse.evaluate.accuracy import read_problems
from polyfuse.verify.checkers import verify_math


def solve(question: str) -> str:
    """An independent solver for the task questions (parses the text, not the key)."""
    items = question.split(":", 1)[1].strip().rstrip("?").split()
    if question.startswith("What is the first letter"):
        return items[0]
    if question.startswith("What is the last letter"):
        return items[-1]
    if question.startswith("How many digits"):
        return str(len(items))
    if question.startswith("What is the second digit"):
        return items[1]
    if question.startswith("What is the largest digit"):
        return str(max(int(d) for d in items))
    raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_are_right_and_the_verifier_reads_them(task: str) -> None:
    rows = generate_problems(task, 200, "train", seed=3)
    assert len({r["key"] for r in rows}) == 200 and len({r["prompt_id"] for r in rows}) == 200
    for row in rows:
        question = row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and row["task"] == task and row["category"] == "math"
        assert row["answer"] == solve(question)
        assert row["response"] == answer_text(row["answer"])
        assert verify_math(row["response"], row["answer"]).correct
    wrong = next(r for r in rows if r["answer"] not in ("0", "a"))
    assert not verify_math("The answer is 0.", wrong["answer"]).correct
    assert not verify_math("The answer is a.", wrong["answer"]).correct


def test_letter_answers_need_the_exact_letter() -> None:
    assert verify_math("The answer is d.", "d").correct
    assert not verify_math("The answer is e.", "d").correct
    assert not verify_math("The answer is", "d").correct


@pytest.mark.parametrize("task", list(TASKS))
def test_train_and_heldout_never_share_a_problem(task: str) -> None:
    train = {r["key"] for seed in range(3) for r in generate_problems(task, 300, "train", seed)}
    held = {r["key"] for seed in range(3) for r in generate_problems(task, 60, "heldout", seed)}
    assert train and held and not train & held
    assert all(heldout(k) for k in held) and not any(heldout(k) for k in train)
    # the split depends on the content alone: about one problem in ten is held out
    keys = {p.key for p in (TASKS[task](__import__("random").Random(i)) for i in range(3000))}
    share = sum(heldout(k) for k in keys) / len(keys)
    assert 0.05 < share < 0.16


def test_seeded_and_exclusion() -> None:
    a = generate_problems("first", 50, "train", seed=1)
    assert a == generate_problems("first", 50, "train", seed=1)
    assert a != generate_problems("first", 50, "train", seed=2)
    b = generate_problems("first", 50, "train", seed=1, exclude={r["key"] for r in a})
    assert not {r["key"] for r in a} & {r["key"] for r in b}


def test_mixed_problems_interleave_every_task() -> None:
    rows = mixed_problems({"first": 10, "count": 5}, "heldout", seed=0)
    assert [r["task"] for r in rows].count("first") == 10 and [r["task"] for r in rows].count("count") == 5
    assert [r["task"] for r in rows] != sorted(r["task"] for r in rows)  # shuffled, not grouped


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown task 'nope'"):
        task_names(["nope"])
    with pytest.raises(DataError, match="unknown split"):
        generate_problems("first", 1, "dev")
    with pytest.raises(DataError, match="ask for fewer"):
        generate_problems("max", 3_000, "heldout")  # about 1,100 held-out digit strings exist
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt_id": "a"}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:1: missing field 'prompt'")):
        read_problems(bad)


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    rows = generate_problems("last", 5, "train")
    path = write_problems(tmp_path / "x" / "train.jsonl", rows)
    assert read_problems(path) == rows
