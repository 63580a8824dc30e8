"""A verifiable mini task for the tiny world: seeded chat problems with exact answers, in skills that differ.

Each problem is one user turn and one checkable final answer; the reference response states it as
``The answer is X.``, which :func:`polyfuse.verify.checkers.verify_math` reads back (the answer phrase,
spaces and case ignored). The tasks are small on purpose: each one is learnt by a tiny world model in a
couple of hundred SFT steps on a CPU, and each needs a different skill (attend to the start, to the end,
count every item, or pick a position or compare every item)::

    first   What is the first letter of: d a f c?   -> d
    last    What is the last letter of: d a f c?    -> c
    count   How many digits are in: 3 8 5 1?        -> 4
    second  What is the second digit of: 3 8 5 1?   -> 8
    max     What is the largest digit in: 3 8 5?    -> 8

**Splits.** Whether a problem is held out depends only on its content (``sha256`` of a canonical key such
as ``max:385``; one in :data:`HELDOUT_BUCKETS` of 10), never on the seed or the order of generation: a
held-out problem never appears in any train file, whatever the seed. Within a split a file has no
duplicates; the seed only decides which problems are drawn and in which order.

Rows (JSONL; what the implicit pipeline's ``prompts`` and ``score`` stages read)::

    {"prompt_id": "max-train-00007", "key": "max:385",
     "prompt": [{"role": "user", "content": "What is the largest digit in: 3 8 5?"}],
     "answer": "8", "category": "math", "task": "max", "response": "The answer is 8."}

``category`` is the build rules' category (every task here is verified like a maths answer); ``task`` is
the skill, used for per-task accuracy.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.workspace import atomic_write_text

__all__ = ["HELDOUT_BUCKETS", "SPLITS", "TASKS", "TASKS_VERSION", "Problem", "answer_text", "generate_problems", "heldout",
           "mixed_problems", "task_names", "write_problems"]

SPLITS = ("train", "heldout")
#: Bumped whenever a generator changes what it draws (part of the chat world's stage config).
TASKS_VERSION = 1
#: Problems whose key hashes to bucket 0 of 10 are held out (about 10 %).
HELDOUT_BUCKETS = 10
LETTERS = "abcdefghij"


@dataclass(frozen=True)
class Problem:
    """One generated problem: a stable ``key`` (the split hashes it), the question and the gold answer."""

    task: str
    key: str
    question: str
    answer: str


def answer_text(answer: str) -> str:
    """The reference response: ``The answer is X.``"""
    return f"The answer is {answer}."


def _letters(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]


def _first(rng: random.Random) -> Problem:
    word = _letters(rng, 3, 5)
    return Problem("first", f"first:{''.join(word)}", f"What is the first letter of: {' '.join(word)}?", word[0])


def _last(rng: random.Random) -> Problem:
    word = _letters(rng, 3, 5)
    return Problem("last", f"last:{''.join(word)}", f"What is the last letter of: {' '.join(word)}?", word[-1])


def _count(rng: random.Random) -> Problem:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(2, 9))]
    return Problem("count", f"count:{''.join(digits)}", f"How many digits are in: {' '.join(digits)}?",
                   str(len(digits)))


def _second(rng: random.Random) -> Problem:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
    return Problem("second", f"second:{''.join(digits)}", f"What is the second digit of: {' '.join(digits)}?",
                   digits[1])


def _max(rng: random.Random) -> Problem:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 4))]
    return Problem("max", f"max:{''.join(digits)}", f"What is the largest digit in: {' '.join(digits)}?",
                   max(digits))


#: Task name -> generator of one random problem.
TASKS: dict[str, Callable[[random.Random], Problem]] = {"first": _first, "last": _last, "count": _count, "second": _second,
                                                        "max": _max}


def task_names(tasks: Iterable[str] | None = None) -> list[str]:
    """The tasks asked for (all when ``None``), checked against :data:`TASKS`."""
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise DataError(f"unknown task {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"choose from {', '.join(TASKS)}")
    return names


def heldout(key: str) -> bool:
    """Whether the problem with this canonical key belongs to the held-out split (content hash only)."""
    return int(hashlib.sha256(f"polyfuse-tasks:{key}".encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def generate_problems(task: str, n: int, split: str, seed: int = 0, *,
                      exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``task`` from ``split`` (``train`` or ``heldout``) as prompt rows.

    Deterministic given ``(task, n, split, seed)``; keys in ``exclude`` are skipped (to draw a second,
    disjoint set from the same split). Raises :class:`DataError` when the split has too few problems.
    """
    task_names([task])
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or heldout")
    rng = random.Random(f"{task}:{split}:{seed}")
    seen = set(exclude)
    rows: list[dict[str, Any]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 20 * n + 10_000:
            raise DataError(f"task {task!r}: only {len(rows)} distinct {split} problems found, asked for {n}; "
                            "ask for fewer")
        p = TASKS[task](rng)
        if p.key in seen or heldout(p.key) != (split == "heldout"):
            continue
        seen.add(p.key)
        rows.append({"prompt_id": f"{task}-{split}-{len(rows):05d}", "key": p.key,
                     "prompt": [{"role": "user", "content": p.question}], "answer": p.answer,
                     "category": "math", "task": task, "response": answer_text(p.answer)})
    return rows


def mixed_problems(counts: Mapping[str, int], split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Problems of several tasks (``{task: n}``), interleaved in a seeded order."""
    rows = [row for task, n in counts.items() for row in generate_problems(task, n, split, seed)]
    random.Random(f"mix:{split}:{seed}").shuffle(rows)
    return rows


def write_problems(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write prompt rows as JSONL (atomically)."""
    return atomic_write_text(Path(path), "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))
