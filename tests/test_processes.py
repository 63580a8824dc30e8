"""Local worker processes (:func:`polyfuse.workspace.map_in_processes`, :func:`polyfuse.workspace.beside`)."""

from __future__ import annotations

import os

import pytest

from polyfuse.workspace import beside, map_in_processes


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


class _Counter:
    """A picklable object whose state a worker keeps between its items."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, x: int) -> tuple[int, int]:
        self.seen += 1
        return x, self.seen


def test_results_come_back_in_order_from_other_processes_and_done_sees_every_item() -> None:
    done: list[tuple[int, int]] = []
    out = map_in_processes(_square_and_pid, list(range(8)), workers=2, done=lambda x, r: done.append((x, r[0])))
    assert [v for v, _ in out] == [x * x for x in range(8)]
    assert sorted(done) == [(x, x * x) for x in range(8)]
    pids = {pid for _, pid in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_one_worker_or_one_item_runs_here() -> None:
    assert {pid for _, pid in map_in_processes(_square_and_pid, [1, 2, 3], workers=1)} == {os.getpid()}
    assert map_in_processes(_square_and_pid, [5], workers=4) == [(25, os.getpid())]
    assert map_in_processes(_square_and_pid, [], workers=4) == []


def test_a_worker_keeps_its_state_between_items() -> None:
    out = map_in_processes(_Counter(), list(range(6)), workers=2)
    assert [x for x, _ in out] == list(range(6))
    assert max(seen for _, seen in out) >= 3  # some worker ran several items on one object


def test_a_failure_in_a_worker_is_raised_here() -> None:
    with pytest.raises(ValueError, match="item 3 is bad"):
        map_in_processes(_fail_on_three, list(range(6)), workers=2)


def _shout_and_return(text: str, *, times: int = 1) -> tuple[int, int]:
    import torch

    print(text * times, flush=True)
    return os.getpid(), torch.get_num_threads()


def _fail_loudly() -> None:
    raise ValueError("the job beside failed")


def _sleep_long() -> None:
    import time

    time.sleep(60)


def test_a_job_beside_returns_its_result_with_its_threads_and_its_output_in_the_log(tmp_path) -> None:
    log = tmp_path / "logs" / "job.log"
    with beside(_shout_and_return, "ab", times=2, log=log, threads=1) as job:
        pid, threads = job.get()
    assert pid != os.getpid() and threads == 1
    assert log.read_text() == "abab\n"


def test_a_failure_beside_is_raised_here(tmp_path) -> None:
    with pytest.raises(ValueError, match="the job beside failed"), \
            beside(_fail_loudly, log=tmp_path / "job.log") as job:
        job.get()


def test_a_failure_here_stops_the_job_beside(tmp_path) -> None:
    import time

    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="here"), beside(_sleep_long, log=tmp_path / "job.log"):
        raise RuntimeError("here")
    assert time.perf_counter() - start < 30  # not the job's 60 s
