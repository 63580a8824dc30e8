"""Which verifier checks a prompt's responses: the verifier registry and the prompt records it reads.

A prompt record (or a sampled row) carries its gold fields -- ``answer`` (maths), ``tests`` and optional
``entry_point`` (code), an explicit ``category`` -- and :func:`category_of` picks the check from them:
``code`` with tests, ``math`` with an answer, else ``other`` (no verifier). :data:`VERIFIERS` maps a
category to the gold field it needs and the check (:mod:`polyfuse.verify.checkers`) that returns
``{"correct", "verdict"}``. The score stage (:mod:`polyfuse.implicit.score`) and task accuracy
(:mod:`polyfuse.evaluate.accuracy`) both judge responses through it. :func:`check_row` and
:func:`read_rows` validate JSONL rows with one-line errors naming file, line and field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.verify.checkers import VerifierConfig, verify_code, verify_math
from polyfuse.workspace import read_jsonl

__all__ = [
    "CATEGORIES",
    "VERIFIERS",
    "category_of",
    "check_row",
    "gold_fields",
    "needs_verifier",
    "read_prompts",
    "read_rows",
]

CATEGORIES = ("math", "code", "other")
_GOLD_FIELDS = ("answer", "tests", "entry_point", "category")
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "prompt_id": (str, int), "prompt": (str, list), "source": (str,), "sample_index": (int,),
    "response": (str,), "params": (dict,), "answer": (str, int, float), "tests": (str, list),
    "entry_point": (str,), "category": (str,),
}


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_row(row: Any, where: str, required: Sequence[str]) -> dict[str, Any]:
    """Validate one row; ``where`` is ``FILE:LINE`` for the error message."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
    missing = [k for k in required if k not in row]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}"
                        + (f" (also {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
                        + f"; every row needs {', '.join(required)}")
    for key, types in _FIELD_TYPES.items():
        if key in row and row[key] is not None and (not isinstance(row[key], types) or isinstance(row[key], bool)):
            names = " or ".join("list" if t is list else t.__name__ for t in types)
            raise DataError(f"{where}: field {key!r} must be {names}, got {_type_name(row[key])}")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DataError(f"{where}: field 'prompt' item {i} must be {{\"role\": str, \"content\": str}}")
    if row.get("category") is not None and row["category"] not in CATEGORIES:
        raise DataError(f"{where}: field 'category' is {row['category']!r}; use one of {', '.join(CATEGORIES)}")
    tests = row.get("tests")
    if isinstance(tests, list) and not all(isinstance(t, str) for t in tests):
        raise DataError(f"{where}: field 'tests' must be test code or a list of strings of test code")
    return row


def read_rows(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL file, each validated by :func:`check_row`.

    Raises:
        DataError: naming the file, the line number and the missing or mistyped field.
    """
    return [check_row(row, where, required) for where, row in
            read_jsonl(path, missing="file not found; give the JSONL written by the previous stage")]


def read_prompts(path: str | Path, required: Sequence[str] = ("prompt_id",)) -> dict[str, dict[str, Any]]:
    """Read prompt records (JSONL, each with ``prompt_id`` and any of ``answer``, ``tests``, ``entry_point``,
    ``category``) into ``{str(prompt_id): record}``.

    Raises:
        DataError: a bad line or a duplicate ``prompt_id``.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in read_rows(path, required):
        key = str(row["prompt_id"])
        if key in out:
            raise DataError(f"{path}: prompt_id {key!r} appears twice; prompt ids must be unique")
        out[key] = row
    return out


def gold_fields(row: Mapping[str, Any], prompts: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """``answer`` / ``tests`` / ``entry_point`` / ``category`` of a row, the row's own values winning."""
    base = dict(prompts.get(str(row["prompt_id"]), {})) if prompts else {}
    gold = {k: base[k] for k in _GOLD_FIELDS if base.get(k) is not None}
    gold.update({k: row[k] for k in _GOLD_FIELDS if row.get(k) is not None})
    if "answer" in gold:
        gold["answer"] = str(gold["answer"])
    return gold


def category_of(gold: Mapping[str, Any]) -> str:
    """The explicit ``category``, else ``code`` with tests, ``math`` with an answer, else ``other``."""
    if gold.get("category"):
        return str(gold["category"])
    if gold.get("tests"):
        return "code"
    if gold.get("answer") is not None:
        return "math"
    return "other"


def _verify_math_row(gold: Mapping[str, Any], response: str, verifier: VerifierConfig) -> dict[str, Any]:
    verdict = verify_math(response, gold["answer"], verifier)
    return {"correct": verdict.correct, "verdict": verdict.reason}


def _verify_code_row(gold: Mapping[str, Any], response: str, verifier: VerifierConfig) -> dict[str, Any]:
    verdict = verify_code(response, gold["tests"], entry_point=gold.get("entry_point"), config=verifier)
    return {"correct": verdict.correct, "verdict": verdict.status}


#: category -> (the gold field it needs, verifier(gold, response, config) -> {"correct", "verdict"}).
VERIFIERS: dict[str, tuple[str, Callable[[Mapping[str, Any], str, VerifierConfig], dict[str, Any]]]] = {
    "math": ("answer", _verify_math_row),
    "code": ("tests", _verify_code_row),
}


def needs_verifier(category: str, gold: Mapping[str, Any]) -> bool:
    """Whether a verifier of ``category`` exists and ``gold`` holds the field it checks against."""
    return category in VERIFIERS and bool(gold.get(VERIFIERS[category][0]))
