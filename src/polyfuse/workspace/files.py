"""Atomic writes: files via a temp file, directories swapped in by renames, leftovers of killed runs; JSON and JSONL.

A file is written to a `.tmp-NAME-PID-RANDOM` sibling, fsynced and renamed over the target
(:func:`atomic_write_bytes`). A finished directory replaces the old one by renames, the old one going to
a `.trash-*` sibling first (:func:`swap_in`). Names carry the writer's pid, so
:func:`clean_stale_temps` removes only what dead processes left. JSON is written with sorted keys and
a trailing newline; JSONL is read with ``FILE:LINE`` in every error.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError

__all__ = [
    "PARTIAL_PREFIX",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale_temps",
    "iter_jsonl",
    "read_jsonl",
    "swap_in",
    "temp_name",
]

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
PARTIAL_PREFIX = ".partial-"
"""The persistent work directory of a resumable stage (:func:`polyfuse.workspace.partial_dir`); never a leftover."""


# --------------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(name: str, prefix: str = TMP_PREFIX) -> str:
    """A sibling name for writing ``name`` atomically: ``PREFIX NAME-PID-RANDOM``, the form
    :func:`clean_stale_temps` reads the writer's pid from."""
    return f"{prefix}{name}-{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory, fsync and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(path.name)
    try:
        with tmp.open("xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as JSON (indent 2, sorted keys, trailing newline)."""
    return atomic_write_text(path, _dumps(obj))


# --------------------------------------------------------------------------------------------------
# directories


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale_temps(parent: str | Path, name: str | None = None) -> list[Path]:
    """Remove `.tmp-*` / `.trash-*` entries in `parent` left by killed runs; return what was removed.

    Names carry the writer's pid (`.tmp-NAME-PID-RANDOM`); entries whose process is still alive on
    this machine are kept, so concurrent stages sharing a parent do not delete each other's work.
    With ``name`` only the temps of that one output (`.tmp-NAME-*`, `.trash-NAME-*`) are considered.
    """
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    prefixes = (TMP_PREFIX, TRASH_PREFIX) if name is None else (f"{TMP_PREFIX}{name}-", f"{TRASH_PREFIX}{name}-")
    for entry in parent.iterdir():
        if not entry.name.startswith(prefixes):  # `.partial-*` dirs are kept
            continue
        if name is not None and entry.name.count("-") != name.count("-") + 3:  # another output's temp
            continue
        pid_text = entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 3 else ""
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp` with renames; the old directory goes to a `.trash-*` sibling first."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    trash = out_dir.parent / temp_name(out_dir.name, TRASH_PREFIX)
    os.replace(out_dir, trash)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(trash, out_dir)
        raise
    _remove(trash)


# --------------------------------------------------------------------------------------------------
# JSON and JSONL


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "model_dump"):  # pydantic models
        return value.model_dump(mode="json")
    raise TypeError(
        f"{type(value).__name__} is not JSON-serialisable; convert it before putting it in a config"
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def iter_jsonl(path: str | Path, *, missing: str, fix: str = "each line must be one JSON object"
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream the objects of a JSONL file, each with its ``FILE:LINE`` (blank lines skipped).

    Raises:
        DataError: the file is absent (``"{path}: {missing}"``), or a line is not JSON or not an object
            (``FILE:LINE`` named, then ``fix``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or drop the line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); {fix}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got a {type(row).__name__}; {fix}")
            yield where, row


def read_jsonl(path: str | Path, *, missing: str, fix: str = "each line must be one JSON object"
               ) -> list[tuple[str, dict[str, Any]]]:
    """:func:`iter_jsonl` as a list."""
    return list(iter_jsonl(path, missing=missing, fix=fix))
