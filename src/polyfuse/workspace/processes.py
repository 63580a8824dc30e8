"""Local worker processes for the CPU-bound Python parts of a stage (alignment, sampling).

A launcher's ranks (:mod:`polyfuse.workspace.ranks`) split a stage across machines and GPUs; this splits
one rank's share across the cores of its machine, where the work is Python (which a thread would not
run in parallel). Workers are *spawned*, not forked: the parent has usually run torch, pyarrow and the
Rust tokenizers' thread pools by then, and a forked child may inherit their locks held.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["map_in_processes"]

T = TypeVar("T")
R = TypeVar("R")

_FN: Callable[[Any], Any] | None = None
"""The function a worker process runs on each item (installed once per worker by :func:`_install`)."""


def _install(fn: Callable[[Any], Any]) -> None:
    global _FN
    # One core per worker: the workers are the parallelism (torch and the Rust tokenizers read these lazily).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # imported while ``fn`` was unpickled
        sys.modules["torch"].set_num_threads(1)
    _FN = fn


def _run(item: Any) -> Any:
    assert _FN is not None, "worker not initialised"
    return _FN(item)


def map_in_processes(fn: Callable[[T], R], items: Sequence[T], *, workers: int = 1,
                     done: Callable[[T, R], None] = lambda *_: None) -> list[R]:
    """``[fn(item) for item in items]``, computed by up to ``workers`` spawned processes.

    ``fn`` is pickled once per worker (a module-level function, or a bound method of a picklable object whose
    state the worker then keeps between its items: memos, open files, a loaded model). ``done(item, result)`` runs
    in this process as each item finishes, in any order (to save or show progress); the results come back in the
    order of ``items``. With one worker or one
    item everything runs here, with no process started. The first failure cancels what has not started and
    is raised here.
    """
    n = min(workers, len(items))
    if n <= 1:
        out = []
        for item in items:
            out.append(fn(item))
            done(item, out[-1])
        return out
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_install, initargs=(fn,))
    try:
        futures = {pool.submit(_run, item): i for i, item in enumerate(items)}
        results: list[Any] = [None] * len(items)
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                i = futures[future]
                results[i] = future.result()  # raises the worker's exception
                done(items[i], results[i])
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
