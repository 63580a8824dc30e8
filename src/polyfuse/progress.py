"""One progress style for every long loop (rich; silent when disabled), and the verbosity switch.

``progress_bar`` wraps a loop polyfuse drives; :class:`Bar` is the same bar for code that is called back
(the Hugging Face trainers, :mod:`polyfuse.trainer_bar`). ``polyfuse --verbose`` sets :func:`set_verbose`,
which lets the libraries' own bars and log lines through again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_VERBOSE = False


def set_verbose(flag: bool) -> None:
    """Show the libraries' own progress bars and per-step logs (``polyfuse --verbose``)."""
    global _VERBOSE
    _VERBOSE = flag


def verbose() -> bool:
    """Whether ``--verbose`` was asked for."""
    return _VERBOSE


class Bar:
    """A rich progress bar: ``start()``, ``advance(**fields)`` (one step; ``fields`` shown after it, e.g.
    ``loss='2.31'``), ``stop()``; every call does nothing when ``enabled`` is false."""

    def __init__(self, description: str, total: int, enabled: bool | None = True, completed: int = 0) -> None:
        self._args = (description, total, completed)
        self._enabled = bool(enabled)
        self._bar: Any = None
        self._task: Any = None
        self._info = ""

    def start(self) -> None:
        if not self._enabled or self._bar is not None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        description, total, completed = self._args
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=False)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, completed=completed, info="")

    def advance(self, steps: int = 1, **fields: Any) -> None:
        if self._bar is not None:
            if fields:
                self._info = " ".join(f"{k}={v}" for k, v in fields.items())
            self._bar.update(self._task, advance=steps, info=self._info)

    def show(self, **fields: Any) -> None:
        """Replace the fields shown after the bar without moving it."""
        self.advance(0, **fields)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def progress_bar(description: str, total: int, enabled: bool | None = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``: moves the bar one step and shows ``fields`` (e.g. ``loss='2.31'``)."""
    bar = Bar(description, total, enabled)
    bar.start()
    try:
        yield lambda **fields: bar.advance(1, **fields)
    finally:
        bar.stop()
