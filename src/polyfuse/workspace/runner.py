"""The stage runner: skip-if-current stages, each writing one artifact directory swapped in whole.

A stage is *current* when its manifest matches the stage, config and input hashes it would be run
with, and is then skipped. A directory is only ever replaced whole: it is built in a `.tmp-*` sibling
and swapped in by renames, so a killed or failing run never leaves a half-written artifact in place.

A *resumable* stage (`run_stage(..., resumable=True)`) is built in a persistent sibling
`.partial-NAME` instead, which survives a failed or killed run: the rerun hands the same directory,
with what the last run wrote, to `build`, which skips the work already there. The partial directory
holds `key.json` (stage, config, input hashes) and is wiped when they change.

Under several processes (``accelerate launch``/``torchrun``: ``WORLD_SIZE`` > 1) every rank calls
`run_stage` with the same arguments. Rank 0 alone opens, wipes and swaps in directories and writes
manifests; the others wait at barriers. A *collective* stage (`collective=True`: capture, training)
is built by every rank in the same directory, each writing its own share; any other stage is built
by rank 0 alone. A failure on any rank is raised on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from polyfuse.workspace.files import (
    PARTIAL_PREFIX,
    _dumps,
    _fsync_dir,
    _remove,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temps,
    swap_in,
    temp_name,
)
from polyfuse.workspace.hashing import check_lineage, file_records, hash_inputs, verify_artifact
from polyfuse.workspace.manifest import (
    MANIFEST_NAME,
    Manifest,
    _read_manifest,
    normalise_config,
    package_versions,
)
from polyfuse.workspace.ranks import Ranks, current_ranks

__all__ = ["PARTIAL_KEY_NAME", "StageResult", "is_current", "partial_dir", "run_stage", "stage_status"]

logger = logging.getLogger("polyfuse.workspace")

PARTIAL_KEY_NAME = "key.json"
"""The key of a partial directory (stage, config, input hashes): a file `build` must not write."""


@dataclass
class StageResult:
    """The directory a stage wrote (or kept), its manifest and whether the build was skipped."""

    path: Path
    manifest: Manifest
    skipped: bool


# --------------------------------------------------------------------------------------------------
# status


def _matches(
    manifest: Manifest | None, stage: str, config: Mapping[str, Any], input_hashes: Mapping[str, str]
) -> bool:
    return (
        manifest is not None
        and manifest.stage == stage
        and manifest.config == normalise_config(config)
        and manifest.inputs == dict(input_hashes)
    )


def is_current(
    out_dir: str | Path, stage: str, config: Mapping[str, Any], input_hashes: Mapping[str, str]
) -> bool:
    """True when `out_dir/manifest.json` records this stage, config and input hashes.

    Package versions and timestamps are not compared: upgrading a package does not make results stale.
    """
    return _matches(_read_manifest(Path(out_dir)), stage, config, input_hashes)


def stage_status(
    out_dir: str | Path, stage: str, config: Mapping[str, Any], inputs: Mapping[str, str | Path]
) -> Literal["missing", "stale", "current"]:
    """`missing` (no manifest), `stale` (manifest differs or is unreadable) or `current`."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).exists():
        return "missing"
    return "current" if is_current(out_dir, stage, config, hash_inputs(inputs)) else "stale"


# --------------------------------------------------------------------------------------------------
# running a stage


def partial_dir(out_dir: str | Path) -> Path:
    """The persistent work directory of a resumable stage writing `out_dir`: `<parent>/.partial-<name>`."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{PARTIAL_PREFIX}{out_dir.name}"


def _stage_key(stage: str, config: Mapping[str, Any], input_hashes: Mapping[str, str]) -> dict[str, Any]:
    return {"stage": stage, "config": normalise_config(config), "inputs": dict(input_hashes)}


def _open_partial(
    work: Path, key: Mapping[str, Any], *, fresh: bool, log: Callable[[str], Any], stage: str
) -> None:
    """Create `work` with `key.json`, or keep it when its key matches (unless `fresh`), else wipe it."""
    key_file = work / PARTIAL_KEY_NAME
    if work.exists() or work.is_symlink():
        try:
            old = json.loads(key_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if old == key and not fresh:
            log(f"stage {stage}: resuming from {work}")
            return
        reason = "force" if fresh and old == key else "config or inputs changed"
        log(f"stage {stage}: discarding partial work in {work} ({reason})")
        _remove(work)
    work.mkdir()
    atomic_write_json(key_file, key)


def run_stage(
    out_dir: str | Path,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str | Path],
    build: Callable[[Path], Mapping[str, Any] | None],
    *,
    force: bool = False,
    log: Callable[[str], Any] | None = None,
    resumable: bool = False,
    collective: bool = False,
    ranks: Ranks | None = None,
) -> StageResult:
    """Build `out_dir` with `build(work_dir)` unless its manifest is current; swap it in atomically.

    `build` writes its files into the directory it is given and may return a dict of outputs
    (counts, metrics, file names) that goes into the manifest.

    By default the directory is a fresh, empty temp directory; if `build` raises, it is deleted,
    the previous `out_dir` (if any) is left untouched and the exception propagates.

    With `resumable=True` it is the persistent `.partial-<name>` sibling (:func:`partial_dir`),
    which holds `key.json` (stage, config and input hashes; do not write a file of that name) and
    whatever an earlier failed or killed run of the same stage, config and inputs wrote there, so
    `build` can skip finished work. It is kept when `build` raises, wiped when the key differs or
    with `force=True`, and on success `key.json` is removed, the manifest written and the
    directory renamed to `out_dir`. `clean_stale_temps` never removes it.

    Under several processes (`ranks`, default :func:`current_ranks`) see the module docstring;
    `collective=True` hands every rank the same (resumable) directory.
    """
    out_dir = Path(out_dir)
    log = log or logger.debug  # the stage bars and the CLI say what ran; --verbose shows these lines
    config = normalise_config(config)
    input_hashes = hash_inputs(inputs)
    input_paths = {name: os.path.relpath(value.resolve(), out_dir.resolve())
                   for name, value in inputs.items() if isinstance(value, Path)}
    ranks = ranks or current_ranks()
    manifest = None if force else _read_manifest(out_dir)
    current = manifest is not None and _matches(manifest, stage, config, input_hashes)
    if ranks.world_size > 1:  # everyone follows rank 0's view, taken before anyone changes anything
        current = ranks.gather(current)[0]
    if current:
        verify_artifact(out_dir)
        log(f"stage {stage}: up to date, skipped ({out_dir})")
        return StageResult(out_dir, _read_manifest(out_dir), skipped=True)
    check_lineage({name: value for name, value in inputs.items() if isinstance(value, Path)}, input_hashes)
    if ranks.world_size > 1:
        return _run_stage_ranked(out_dir, stage, config, input_hashes, build, force=force, log=log,
                                 resumable=resumable, collective=collective, ranks=ranks, input_paths=input_paths)
    return _run_stage_here(out_dir, stage, config, input_hashes, build, force=force, log=log,
                           resumable=resumable, input_paths=input_paths)


def _run_stage_ranked(out_dir: Path, stage: str, config: dict[str, Any], input_hashes: dict[str, str],
                      build: Callable[[Path], Mapping[str, Any] | None], *, force: bool,
                      log: Callable[[str], Any], resumable: bool, collective: bool, ranks: Ranks,
                      input_paths: dict[str, str] | None = None) -> StageResult:
    """`run_stage` on one of several ranks (all ranks decided alike that the stage must run)."""
    if not collective:  # rank 0 builds alone; the others wait for its result
        error: BaseException | None = None
        if ranks.main:
            try:
                _run_stage_here(out_dir, stage, config, input_hashes, build, force=force, log=log,
                                resumable=resumable, input_paths=input_paths)
            except BaseException as exc:  # shared with the other ranks below, then re-raised
                error = exc
        ranks.raise_if_any_failed(error, f"stage {stage}")
        return StageResult(out_dir, _read_manifest(out_dir), skipped=False)
    work = partial_dir(out_dir)
    error = None
    if ranks.main:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(out_dir.parent)
            _open_partial(work, _stage_key(stage, config, input_hashes), fresh=force, log=log, stage=stage)
        except BaseException as exc:
            error = exc
    ranks.raise_if_any_failed(error, f"stage {stage}")
    start = time.perf_counter()
    outputs: Mapping[str, Any] | None = None
    try:
        outputs = build(work)
    except BaseException as exc:
        error = exc
    ranks.raise_if_any_failed(error, f"stage {stage}")
    if ranks.main:
        try:
            _finish(work, out_dir, stage, config, input_hashes, outputs, time.perf_counter() - start,
                    resumable=True, log=log, input_paths=input_paths)
        except BaseException as exc:
            error = exc
    ranks.raise_if_any_failed(error, f"stage {stage}")
    return StageResult(out_dir, _read_manifest(out_dir), skipped=False)


def _finish(tmp: Path, out_dir: Path, stage: str, config: dict[str, Any], input_hashes: dict[str, str],
            outputs: Any, duration: float, *, resumable: bool, log: Callable[[str], Any],
            input_paths: dict[str, str] | None = None) -> Manifest:
    """Write the manifest into the built directory and swap it in as `out_dir`."""
    if outputs is not None and not isinstance(outputs, Mapping):
        raise TypeError(f"stage {stage}: build returned {type(outputs).__name__}, expected a dict or None")
    manifest = Manifest(
        stage=stage,
        config=config,
        inputs=input_hashes,
        versions=package_versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        duration_s=round(duration, 3),
        outputs=json.loads(_dumps(dict(outputs or {}))),
        input_paths=dict(input_paths or {}),
    )
    if resumable:
        (tmp / PARTIAL_KEY_NAME).unlink(missing_ok=True)
    manifest.files = file_records(tmp)
    atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
    swap_in(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    log(f"stage {stage}: wrote {out_dir} in {manifest.duration_s:.1f}s")
    return manifest


def _run_stage_here(out_dir: Path, stage: str, config: dict[str, Any], input_hashes: dict[str, str],
                    build: Callable[[Path], Mapping[str, Any] | None], *, force: bool,
                    log: Callable[[str], Any], resumable: bool,
                    input_paths: dict[str, str] | None = None) -> StageResult:
    """`run_stage` in one process: build in a temp (or partial) directory, then swap it in."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(parent)
    if resumable:
        tmp = partial_dir(out_dir)
        _open_partial(tmp, _stage_key(stage, config, input_hashes), fresh=force, log=log, stage=stage)
    else:
        tmp = parent / temp_name(out_dir.name)
        tmp.mkdir()
    start = time.perf_counter()
    try:
        manifest = _finish(tmp, out_dir, stage, config, input_hashes, build(tmp), time.perf_counter() - start,
                           resumable=resumable, log=log, input_paths=input_paths)
    except BaseException:
        if not resumable:
            _remove(tmp)
        elif tmp.is_dir() and not (tmp / PARTIAL_KEY_NAME).exists():  # failed after the key was removed
            atomic_write_json(tmp / PARTIAL_KEY_NAME, _stage_key(stage, config, input_hashes))
        raise
    return StageResult(out_dir, manifest, skipped=False)
