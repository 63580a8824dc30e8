"""A run directory as ``polyfuse report`` sees it: :func:`load_run` reads the results file, every stage
manifest (time, outputs, size on disk), the Trainer's loss logs and the implicit stages' accuracy curves
into a :class:`Run`. Nothing here formats or draws; :mod:`polyfuse.evaluate.report_tables` and
:mod:`polyfuse.evaluate.report` do.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.evaluate.results import RESULTS_NAME, load_results, read_curve, target_name

__all__ = ["ASSETS_DIR", "STAGE_ORDER", "Run", "Stage", "load_run", "run_labels", "stage_rank"]

STAGE_ORDER = (
    "blocks",
    "capture",
    "vocab",
    "align",
    "fuse",
    "train",
    "merge",
    "sample",
    "score",
    "build",
    "sft",
    "dpo",
    "wrpo",
    "eval",
)
"""Stage kinds in pipeline order: the order of the report's stage table."""
ASSETS_DIR = "report_files"
"""The report's figure folder beside ``report.md`` (never read as part of the run)."""


@dataclass
class Stage:
    """One artifact directory with a manifest."""

    path: str
    """Relative to the run directory, e.g. ``capture/code``."""
    kind: str
    """The manifest's ``stage`` (``capture``)."""
    duration_s: float
    size_bytes: int
    """Bytes of the files under it, nested stage directories left out."""
    outputs: dict[str, Any]
    created: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Figures read beside the manifest: ``n_bytes`` (eval), ``samples_per_s`` (train)."""


@dataclass
class Run:
    """A run directory as the report sees it."""

    label: str
    path: Path
    results: dict[str, Any]
    stages: list[Stage]
    curves: dict[str, list[dict[str, Any]]]
    """Row name (``target+fused``) -> the Trainer's ``log_history``."""
    accuracy_curves: dict[str, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)
    """Row name (``target+sft+dpo``) -> ``(step, {task: accuracy})`` during its training; preference stages
    continue the SFT stage's step count."""

    @property
    def target(self) -> str | None:
        return target_name(self.results)


def _is_stage_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path``, not following links or entering nested stages."""
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not _is_stage_dir(Path(root) / d)]
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed while we walk (a stage being rewritten)
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _find_stage_dirs(run_dir: Path, max_depth: int = 3) -> list[Path]:
    found = []
    for root, dirs, _ in os.walk(run_dir):
        depth = len(Path(root).relative_to(run_dir).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "checkpoint-")) and d != ASSETS_DIR)
        if depth >= max_depth:
            dirs[:] = []
        if depth and _is_stage_dir(Path(root)):
            found.append(Path(root))
    return found


def stage_rank(stage: Stage) -> tuple[int, str, str]:
    """Sort key of a stage: its kind's place in :data:`STAGE_ORDER` (unknown kinds last), then kind and path."""
    rank = STAGE_ORDER.index(stage.kind) if stage.kind in STAGE_ORDER else len(STAGE_ORDER)
    return rank, stage.kind, stage.path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _read_stage(run_dir: Path, path: Path) -> Stage | None:
    data = _read_json(path / "manifest.json")
    if not isinstance(data, dict):
        return None
    stage = Stage(
        path=path.relative_to(run_dir).as_posix(),
        kind=str(data.get("stage", path.parts[-1])),
        duration_s=float(data.get("duration_s") or 0.0),
        size_bytes=_dir_size(path),
        outputs=data.get("outputs") or {},
        created=str(data.get("created", "")),
    )
    bpb = _read_json(path / "bpb.json")
    if isinstance(bpb, dict) and isinstance(bpb.get("n_bytes"), dict):
        stage.extra["n_bytes"] = bpb["n_bytes"].get("all")
    log = _log_history(path)
    if log and "train_samples_per_second" in log[-1]:
        stage.extra["samples_per_s"] = log[-1]["train_samples_per_second"]
    return stage


def _log_history(train_dir: Path) -> list[dict[str, Any]]:
    """The Trainer's ``log_history``; from the newest checkpoint when the run did not finish."""
    candidates = [train_dir / "trainer_state.json"]
    checkpoints = sorted(
        train_dir.glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1,
    )
    candidates += checkpoints[::-1]
    for file in candidates:
        data = _read_json(file)
        if isinstance(data, dict) and isinstance(data.get("log_history"), list):
            return [e for e in data["log_history"] if isinstance(e, dict)]
    return []


def load_run(run_dir: str | Path, label: str = "") -> Run:
    """Read a run directory: its results file, every stage manifest and the training logs.

    Raises:
        DataError: the directory does not exist or holds neither a results file nor a manifest.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(
            f"run directory {str(path)!r} does not exist; pass the workdir of a recipe (polyfuse run)"
        )
    stage_dirs = _find_stage_dirs(path)
    if (path / RESULTS_NAME).is_file():
        results = load_results(path)
    elif stage_dirs:
        results = {"models": {}, "meta": {}}
    else:
        raise DataError(f"{path}: neither {RESULTS_NAME} nor stage manifests found; is this a run directory?")
    stages = sorted(filter(None, (_read_stage(path, d) for d in stage_dirs)), key=stage_rank)
    target = target_name(results) or "target"
    curves = {}
    for stage in stages:
        if stage.kind == "train":
            log = _log_history(path / stage.path)
            if log:
                curves[f"{target}+{Path(stage.path).name}"] = log
    return Run(label=label, path=path, results=results, stages=stages, curves=curves,
               accuracy_curves=_accuracy_curves(path, target))


def _accuracy_curves(run_dir: Path, target: str) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """The implicit stages' ``curve.json`` files (``polyfuse.implicit.curves``) as rows; dpo and wrpo start
    where sft ended."""
    out: dict[str, list[tuple[int, dict[str, float]]]] = {}
    offset = 0
    for stage, row in (("sft", "+sft"), ("dpo", "+sft+dpo"), ("wrpo", "+sft+wrpo")):
        curve = read_curve(run_dir / stage)
        if curve is None:
            continue
        points = [(int(p["step"]) + (offset if stage != "sft" else 0), p["accuracy"]) for p in curve["points"]
                  if isinstance(p, dict) and isinstance(p.get("accuracy"), dict) and "step" in p]
        if stage == "sft" and points:
            offset = points[-1][0]
        if points:
            out[target + row] = points
    return out


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short distinct names for runs: the directory name, then more of the path where names clash."""
    if len(paths) == 1:
        return [""]
    for depth in range(1, 4):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i + 1}:{p.name}" for i, p in enumerate(paths)]
