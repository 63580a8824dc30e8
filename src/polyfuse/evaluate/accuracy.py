"""Task accuracy on verifiable prompt sets: greedy answers checked by the verifiers of :mod:`polyfuse.verify`.

A prompt set is a JSONL file of ``{prompt_id, prompt, ...gold}`` rows (``prompt`` a string or a list of
chat messages). The gold fields decide the check, exactly as in the score stage
(:func:`polyfuse.verify.registry.category_of`):

* ``answer`` -> maths: the final answer is extracted (``\\boxed{}``, "the answer is", last number) and
  compared after normalisation (:func:`polyfuse.verify.checkers.verify_math`);
* ``tests`` (+ optional ``entry_point``) -> code pass@1: the response's code runs against the tests in
  the sandbox (:func:`polyfuse.verify.checkers.verify_code`), never in this process.

Accuracy is reported per task (the row's ``task``, else ``category``, else the verifier's category) and
pooled as ``all``. ``polyfuse eval --prompts FILE`` and the implicit recipe's ``accuracy`` stage call
:func:`evaluate_accuracy`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError

__all__ = ["answer_accuracy", "evaluate_accuracy", "read_problems"]


def read_problems(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a prompt set (JSONL with ``prompt_id`` and ``prompt``), at most ``limit`` of them.

    Raises:
        DataError: the file is missing, a line is bad, or a ``prompt_id`` repeats (file and line named).
    """
    from polyfuse.verify.registry import read_prompts

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found; give a JSONL of {{prompt_id, prompt, answer | tests}} "
                        "rows (or world:tasks in a recipe)")
    rows = list(read_prompts(path, ("prompt_id", "prompt")).values())
    return rows[:limit] if limit else rows


def _check(row: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``(category, gold)`` of a row, or a DataError naming the prompt when nothing can be checked."""
    from polyfuse.verify.registry import category_of, gold_fields, needs_verifier

    gold = gold_fields(row, None)
    category = category_of(gold)
    if not needs_verifier(category, gold):
        raise DataError(f"prompt {row.get('prompt_id')!r} has neither a gold 'answer' nor code 'tests'; accuracy "
                        "needs one of them per prompt")
    return category, gold


def evaluate_accuracy(model: str, problems: Sequence[Mapping[str, Any]], *, batch_size: int = 32,
                      max_new_tokens: int = 32, device: str = "auto", dtype: str = "auto",
                      chat_template: str | None = None, progress: bool = False
                      ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers of ``model`` (a directory or hub id) to ``problems``, each checked by its verifier.

    Returns ``({task: accuracy, "all": accuracy}, one record per problem)``; ``all`` pools every problem.
    Every problem is checked up front, so a row without gold fails before the model is loaded.
    """
    from polyfuse.generate import HFBackend, SourceSpec

    checks = [_check(p) for p in problems]
    backend = HFBackend(SourceSpec("eval", model, chat_template=chat_template), device=device, dtype=dtype)
    return answer_accuracy(backend, problems, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, checks=checks)


def answer_accuracy(backend: Any, problems: Sequence[Mapping[str, Any]], *, batch_size: int = 32,
                    max_new_tokens: int = 32, progress: bool = False,
                    checks: Sequence[tuple[str, Mapping[str, Any]]] | None = None
                    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """:func:`evaluate_accuracy` with a loaded generation backend (anything with ``generate(prompts, params,
    seed)``, e.g. :class:`polyfuse.generate.HFBackend` over a model being trained)."""
    from polyfuse.generate import SamplingParams, as_messages
    from polyfuse.progress import progress_bar
    from polyfuse.verify.checkers import VerifierConfig
    from polyfuse.verify.registry import VERIFIERS

    checks = list(checks) if checks is not None else [_check(p) for p in problems]
    verifier = VerifierConfig()
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    records: list[dict[str, Any]] = []
    hits: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    with progress_bar("accuracy", total=-(-len(problems) // batch_size), enabled=progress) as advance:
        for lo in range(0, len(problems), batch_size):
            part = problems[lo:lo + batch_size]
            msgs = [as_messages(p["prompt"], f"prompt {p.get('prompt_id')!r}") for p in part]
            for row, (category, gold), (text,) in zip(part, checks[lo:lo + batch_size],
                                                      backend.generate(msgs, params, seed=0), strict=True):
                verdict = VERIFIERS[category][1](gold, text, verifier)
                task = str(row.get("task") or row.get("category") or category)
                hits[task] += bool(verdict["correct"])
                totals[task] += 1
                records.append({"prompt_id": row.get("prompt_id"), "task": task, "category": category,
                                "answer": gold.get("answer"), "response": text, "verdict": verdict["verdict"],
                                "correct": bool(verdict["correct"])})
            advance()
    accuracy = {task: round(hits[task] / totals[task], 4) for task in sorted(totals)}
    accuracy["all"] = round(sum(hits.values()) / max(1, sum(totals.values())), 4)
    return accuracy, records
