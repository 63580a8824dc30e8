"""Local worker processes (:func:`polyfuse.workspace.map_in_processes`)."""

from __future__ import annotations

import os

import pytest

from polyfuse.workspace import map_in_processes


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
