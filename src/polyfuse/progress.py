"""One progress-bar helper for every long loop (rich; silent when disabled or not on a terminal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress_bar(description: str, total: int, enabled: bool | None = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``: moves the bar one step and shows ``fields`` (e.g. ``loss='2.31'``)."""
    if not enabled:
        yield lambda **_: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(**fields: Any) -> None:
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=1, info=info)

        yield advance
