"""Local worker processes: the CPU-bound Python parts of a stage (alignment, sampling), and whole jobs
run beside each other.

A launcher's ranks (:mod:`polyfuse.workspace.ranks`) split a stage across machines and GPUs; this splits
one rank's share across the cores of its machine, where the work is Python (which a thread would not
run in parallel): :func:`map_in_processes`. :func:`beside` runs one independent job in a second process
while this one does another, each with its share of the cores (on few cores, two jobs of one torch thread
each use the machine better than one job of two threads). Workers are *spawned*, not forked: the parent has
usually run torch, pyarrow and the Rust tokenizers' thread pools by then, and a forked child may inherit
their locks held.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["beside", "map_in_processes"]

T = TypeVar("T")
R = TypeVar("R")

_FN: Callable[[Any], Any] | None = None
"""The function a worker process runs on each item (installed once per worker by :func:`_install`)."""


def _limit_threads(n: int) -> None:
    """Give this process ``n`` compute threads (torch and the Rust tokenizers read these lazily)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:  # imported while a pickled function was loaded
        sys.modules["torch"].set_num_threads(n)


def _install(fn: Callable[[Any], Any]) -> None:
    global _FN
    _limit_threads(1)  # one core per worker: the workers are the parallelism
    _FN = fn


def _start_beside(log: str, threads: int) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _limit_threads(threads)


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


@contextlib.contextmanager
def beside(fn: Callable[..., R], /, *args: Any, log: str | Path, threads: int = 1,
           **kwargs: Any) -> Iterator[AsyncResult[R]]:
    """Run ``fn(*args, **kwargs)`` in a spawned process (``threads`` torch threads, its stdout and stderr
    written to ``log``) while the body of the ``with`` runs here; yields its handle.

    ``handle.get()`` waits for it and returns its result or raises its exception here. The block waits for it
    when the body ends normally; an exception out of the body (Ctrl-C included) stops it at once. ``fn`` and
    its arguments must pickle (a module-level function; paths and plain values).
    """
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=_start_beside, initargs=(str(log), threads))
    handle = pool.apply_async(fn, args, kwargs)
    try:
        yield handle
        handle.wait()
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
