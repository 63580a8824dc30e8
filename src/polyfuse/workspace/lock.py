"""The workdir lock: one polyfuse run per workdir (an ``fcntl.flock`` on ``<workdir>/.polyfuse.lock``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.workspace.ranks import Ranks, current_ranks

__all__ = ["IMPLICIT_LOCK_NAME", "LOCK_NAME", "workdir_lock"]

logger = logging.getLogger("polyfuse.workspace")

LOCK_NAME = ".polyfuse.lock"
"""The run lock in a workdir: held (``fcntl.flock``) by the process running a recipe there."""

IMPLICIT_LOCK_NAME = ".polyfuse-implicit.lock"
"""The lock an implicit recipe's run holds instead: its stages (sample ... accuracy) share no directory with
an explicit recipe's (blocks ... merge) and ``results.json`` is updated under its own lock, so one explicit
and one implicit run may share a workdir (``polyfuse demo`` runs them side by side)."""

_HELD_LOCKS: dict[tuple[str, str], list[Any]] = {}  # (resolved workdir, lock name) -> [open lock file or None, depth]


def held_workdirs() -> set[str]:
    """The resolved workdirs this process holds a lock of (any kind)."""
    return {workdir for workdir, _ in _HELD_LOCKS}


def _lock_holder(fh: Any) -> str:
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: "
            f"{info.get('command')}")


def _take_lock(workdir: Path, name: str) -> Any:
    """Open and lock ``workdir/name`` (None when the workdir cannot be written at all)."""
    import errno
    import fcntl
    import sys

    writable = True
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fh = open(workdir / name, "a+", encoding="utf-8")  # noqa: SIM115 - held until released
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:  # read-only here: a lock file opened for reading still shows (and takes) the lock
            fh = open(workdir / name, encoding="utf-8")  # noqa: SIM115
        except OSError:
            logger.debug("workdir %s is not writable (%s): running without its lock", workdir, exc.strerror)
            return None
        writable = False
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fh)
        fh.close()
        raise DataError(f"{workdir}: in use by another polyfuse run ({holder}); wait for it to finish, or give "
                        f"this run another workdir") from None
    if not writable:
        return fh
    info = {"pid": os.getpid(), "host": platform.node(), "command": " ".join(["polyfuse", *sys.argv[1:]]),
            "started": datetime.now(UTC).isoformat(timespec="seconds")}
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(info) + "\n")
    fh.flush()
    return fh


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, *, ranks: Ranks | None = None, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold the workdir's run lock for the block: one run per workdir (and lock ``name``:
    :data:`IMPLICIT_LOCK_NAME` for implicit recipes).

    The lock is an ``fcntl.flock`` on ``<workdir>/<name>``, which records the holder (pid, host,
    command, start); the kernel releases it when the holder dies, so a lock left by a killed run is
    taken over. Re-entrant within a process. Under several ranks, rank 0 takes it for the whole run
    and every rank learns the outcome. A workdir that cannot be written is used without the lock.

    Raises:
        DataError: another live process holds the lock (named in the message).
    """
    key = (str(Path(workdir).resolve()), name)
    held = _HELD_LOCKS.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    ranks = ranks or current_ranks()
    fh, error = None, None
    if ranks.main:
        try:
            fh = _take_lock(Path(workdir), name)
        except Exception as exc:  # shared with the other ranks below
            error = exc
    failures = ranks.gather(None if error is None else str(error))
    if error is not None:
        raise error
    if failures[0] is not None:
        raise DataError(failures[0])
    _HELD_LOCKS[key] = [fh, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        if fh is not None:
            fh.close()  # closing the descriptor releases the flock
