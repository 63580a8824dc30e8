"""Process ranks: this process's place under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1).

:func:`start_process_group` is the one place that joins a launcher's process group (through
``accelerate.PartialState()``, as ``accelerate launch`` and the HF Trainer would); :func:`current_ranks`
reads rank and world size from it for the stage runner and the workdir lock, and the capture backends
read theirs (with a device) through :func:`polyfuse.capture.common.ranks`. Torch is imported only
under a launcher.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_ACCELERATE", "Ranks", "current_ranks", "start_process_group"]

NO_ACCELERATE: Any = object()
"""What :func:`start_process_group` returns, with ``accelerate_optional``, when accelerate cannot be imported."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes running a pipeline (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def shards(self, n_shards: int) -> list[int]:
        """This rank's share of shards ``0..n_shards-1``: those with ``shard % world_size == rank``."""
        return list(range(self.rank, n_shards, self.world_size))

    def raise_if_any_failed(self, error: BaseException | None, what: str) -> None:
        """Every rank calls this at the same point (a collective): re-raise this rank's own ``error``, or
        raise a ``DataError`` naming another rank's failure, so no rank waits for a dead one."""
        from polyfuse.errors import DataError

        failures = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, msg) for r, msg in enumerate(failures) if msg is not None]
        if failed:
            rank, msg = failed[0]
            raise DataError(f"{what} failed on rank {rank}: {msg}")

    @contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run the block on every rank; on leaving it, :meth:`raise_if_any_failed` (a collective), so a failure
        on any rank is raised on all and no rank waits for a dead one."""
        error = None
        try:
            yield
        except BaseException as exc:  # shared with the other ranks, then re-raised
            error = exc
        self.raise_if_any_failed(error, what)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_process_group(*, accelerate_optional: bool = False) -> Any:
    """Under a launcher (``WORLD_SIZE`` > 1) with no process group yet, create it with
    ``accelerate.PartialState()`` (gloo on CPU, nccl on GPU), as ``accelerate launch`` and the HF Trainer would.

    On a machine without an accelerator it also sets ``ACCELERATE_USE_CPU`` (as ``accelerate launch --cpu``
    does): without it accelerate, and so every ``TrainingArguments``, takes a plain ``torchrun`` on CPU for
    one process, and each rank would train on every batch instead of its share.

    Returns the device accelerate gives this rank when it created the group, else None (no launcher, or
    the group exists already). When accelerate cannot be imported this raises ImportError or, with
    ``accelerate_optional``, returns :data:`NO_ACCELERATE` (no group is created).
    """
    if not _launched():
        return None
    import torch
    import torch.distributed as dist

    cpu = not torch.accelerator.is_available()
    if cpu:  # as `accelerate launch --cpu` does: else accelerate (and every Trainer) sees one process, not N
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    if dist.is_available() and dist.is_initialized():
        return None
    try:
        from accelerate import PartialState
    except ImportError:
        if accelerate_optional:
            return NO_ACCELERATE
        raise
    return PartialState(cpu=cpu).device


def current_ranks() -> Ranks:
    """Rank and world size from an initialised process group, else from ``WORLD_SIZE``/``RANK``.

    With ``WORLD_SIZE`` > 1 and no process group yet, :func:`start_process_group` creates it.
    """
    if not _launched():
        return Ranks()
    import torch.distributed as dist

    start_process_group()
    return Ranks(dist.get_rank(), dist.get_world_size())
