"""``polyfuse report``: one view of a run (or several side by side) as ``report.md`` and ``report.html``.

What a report shows, all computed from the run directory (nothing is typed in):

* **the papers' table** for each metric of the results file (:mod:`polyfuse.evaluate.results`):
  bits per byte per domain plus the pooled ``all`` (lower is better) and task accuracy plus the
  mean over tasks (higher is better). Rows in the papers' order
  (:func:`~polyfuse.evaluate.results.row_order`),
  the best value of each column in bold (compared at the printed precision, so ties are all bold),
  and each row's change against the same run's target in parentheses. A missing figure is ``–``.
* a summary: each trained row against the target, the CLM baseline and the best source, and the
  extra time fusion cost;
* training curves (total, CLM and distillation loss; the CLM baseline and the fused target on the
  same axes) from ``train/*/trainer_state.json``;
* bits per byte (and accuracy) per domain as grouped bars;
* per stage: wall-clock time, what it processed and how fast, and the artifact's size on disk,
  from every ``manifest.json`` under the run.

``report.html`` is self-contained (inline CSS, figures as base64 PNG); ``report.md`` links the same
PNGs from ``report_files/`` beside it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.evaluate import plots
from polyfuse.evaluate.results import (
    RESULTS_NAME,
    best_source_share,
    gap_closed,
    load_results,
    read_curve,
    row_order,
    source_rows,
    target_name,
)
from polyfuse.workspace import atomic_write_bytes, atomic_write_text

__all__ = [
    "MetricTable",
    "Run",
    "Stage",
    "load_run",
    "metric_table",
    "render_html",
    "render_markdown",
    "write_report",
]

MISSING = "\u2013"  # en dash
MINUS = "\u2212"
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
ASSETS_DIR = "report_files"


# --------------------------------------------------------------------------------------------------
# reading a run


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


def _stage_rank(stage: Stage) -> tuple[int, str, str]:
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
    stages = sorted(filter(None, (_read_stage(path, d) for d in stage_dirs)), key=_stage_rank)
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


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short distinct names for runs: the directory name, then more of the path where names clash."""
    if len(paths) == 1:
        return [""]
    for depth in range(1, 4):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i + 1}:{p.name}" for i, p in enumerate(paths)]


# --------------------------------------------------------------------------------------------------
# the table


@dataclass
class Cell:
    value: float | None
    text: str
    """The value as printed (``–`` when missing)."""
    delta: float | None = None
    """``value - target's value`` in display units; ``None`` for the target row or a missing side."""
    delta_text: str = ""
    best: bool = False


@dataclass
class MetricTable:
    """One metric's table: rows are (model, run label), columns domains/tasks then the average."""

    metric: str
    title: str
    lower_is_better: bool
    columns: list[str]
    rows: list[tuple[str, str]]
    cells: dict[tuple[str, str], list[Cell]]
    note: str


_METRICS = {
    # key: (title, lower_is_better, scale, digits, average column, how the average is made)
    "bpb": (
        "Bits per byte on held-out text",
        True,
        1.0,
        4,
        "all",
        "`all` is pooled over every held-out byte (the byte-weighted average of the domains)",
    ),
    "accuracy": (
        "Task accuracy (%)",
        False,
        100.0,
        2,
        "avg",
        "`avg` is the mean over the tasks, shown only for rows that have every task",
    ),
}


def _fmt(value: float, digits: int, signed: bool = False) -> str:
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text.replace("-", MINUS)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def metric_table(runs: Sequence[Run], metric: str) -> MetricTable | None:
    """The papers' table of ``metric`` (``bpb`` or ``accuracy``) over the runs; ``None`` if no row has it."""
    title, lower, scale, digits, avg_name, note = _METRICS[metric]
    columns: list[str] = []
    has_avg = False
    for run in runs:
        for figures in run.results["models"].values():
            keys = list((figures or {}).get(metric, {}) or {})
            has_avg |= avg_name in keys
            columns += [k for k in keys if k != avg_name and k not in columns]
    if not columns and not has_avg:
        return None
    columns.sort()
    if (metric == "accuracy" and len(columns) > 1) or (metric != "accuracy" and has_avg):
        columns.append(avg_name)  # accuracy's mean is computed; bpb's pooled figure is read

    def values_of(run: Run, model: str) -> list[float | None]:
        figures = (run.results["models"].get(model) or {}).get(metric) or {}
        vals = [_number(figures.get(c)) for c in columns]
        if metric == "accuracy" and columns[-1] == avg_name and avg_name not in figures:
            task_vals = vals[:-1]
            vals[-1] = None if None in task_vals else sum(task_vals) / len(task_vals)
        return [None if v is None else v * scale for v in vals]

    rows: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], list[Cell]] = {}
    for model in row_order([m for r in runs for m in r.results["models"]], runs[0].target):
        for run in runs:
            if model not in run.results["models"]:
                continue
            vals = values_of(run, model)
            if all(v is None for v in vals):
                continue
            target = run.target
            base = (
                values_of(run, target)
                if target and target in run.results["models"] and model != target
                else None
            )
            row = []
            for i, v in enumerate(vals):
                cell = Cell(value=v, text=MISSING if v is None else _fmt(v, digits))
                if v is not None and base is not None and base[i] is not None:
                    cell.delta = round(v, digits) - round(base[i], digits)
                    cell.delta_text = _fmt(cell.delta, digits, signed=True)
                row.append(cell)
            rows.append((model, run.label))
            cells[(model, run.label)] = row
    for i in range(len(columns)):  # best at the printed precision, so equal-looking cells are all bold
        shown = [round(cells[r][i].value, digits) for r in rows if cells[r][i].value is not None]
        if shown:
            best = min(shown) if lower else max(shown)
            for r in rows:
                if cells[r][i].value is not None and round(cells[r][i].value, digits) == best:
                    cells[r][i].best = True
    direction = "lower is better \u2193" if lower else "higher is better \u2191"
    target_names = sorted({r.target for r in runs if r.target})
    vs = f"`{'`, `'.join(target_names)}`" if target_names else "the target"
    delta_note = (
        f"In parentheses: change against {vs} of the same run "
        f"({'negative' if lower else 'positive'} is better)."
    )
    return MetricTable(
        metric=metric,
        title=f"{title} ({direction})",
        lower_is_better=lower,
        columns=columns,
        rows=rows,
        cells=cells,
        note=f"Bold: best in its column. {delta_note} {note}.",
    )


# --------------------------------------------------------------------------------------------------
# summary, stages


def summary_lines(runs: Sequence[Run], tables: Sequence[MetricTable]) -> list[str]:
    """Plain-text verdicts: each trained row against the target, the CLM baseline and the best source
    on each table's last (average) column, then what the fusion stages cost."""
    lines = []
    for run in runs:
        target = run.target
        prefix = f"[{run.label}] " if run.label else ""
        for table in tables:
            col = len(table.columns) - 1  # the average column (or the only one)
            name = table.columns[col]
            value = {m: table.cells[(m, lab)][col].value for m, lab in table.rows if lab == run.label}
            trained = [m for m in value if target and m.startswith(target + "+") and value[m] is not None]
            sources = {m: v for m, v in value.items() if "+" not in m and m != target and v is not None}
            digits = _METRICS[table.metric][3]
            better = (lambda a, b: a < b) if table.lower_is_better else (lambda a, b: a > b)

            def versus(v: float, other: float | None, what: str, digits=digits, better=better) -> str | None:
                if other is None:
                    return None
                d = round(v, digits) - round(other, digits)
                verdict = (
                    "better"
                    if better(round(v, digits), round(other, digits))
                    else ("same" if d == 0 else "worse")
                )
                return f"vs {what} {_fmt(d, digits, signed=True)} ({verdict})"

            for model in trained:
                v = value[model]
                parts = [versus(v, value.get(target), target)]
                if model != f"{target}+clm":
                    parts.append(versus(v, value.get(f"{target}+clm"), f"{target}+clm"))
                if sources:
                    best = (
                        min(sources, key=sources.get)
                        if table.lower_is_better
                        else max(sources, key=sources.get)
                    )
                    parts.append(versus(v, sources[best], f"best source {best}"))
                metric = "bpb" if table.metric == "bpb" else "accuracy"
                lines.append(
                    f"{prefix}{model}: {metric} {name} {_fmt(v, digits)}; " + "; ".join(p for p in parts if p)
                )
        fusion = sum(s.duration_s for s in run.stages if s.kind in ("capture", "vocab", "align", "fuse"))
        train = {Path(s.path).name: s.duration_s for s in run.stages if s.kind == "train"}
        if fusion or train:
            cost = f"{prefix}cost: capture + vocab + align + fuse {fusion:,.1f} s"
            if "fused" in train:
                cost += f"; training the fused target {train['fused']:,.1f} s"
            if "clm" in train:
                cost += f" (the CLM baseline {train['clm']:,.1f} s)"
            lines.append(cost)
    return lines


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TiB"


def stage_work(stage: Stage) -> tuple[str, str]:
    """(what the stage processed, its rate) from its manifest outputs; ``–`` where unknown."""
    out, t = stage.outputs, stage.duration_s

    def rate(n: float, unit: str) -> str:
        return f"{n / t:,.0f} {unit}/s" if t > 0 else MISSING

    if isinstance(out.get("tokens"), int | float):
        tps = out.get("tokens_per_s")
        return f"{out['tokens']:,} tokens", f"{tps:,.0f} tokens/s" if tps else rate(out["tokens"], "tokens")
    if stage.kind == "blocks" and "blocks" in out:
        return f"{out['blocks']:,} blocks, {out.get('chars', 0):,} chars", rate(out.get("chars", 0), "chars")
    if stage.kind == "align" and "positions" in out:
        return f"{out['positions']:,} positions", rate(out["positions"], "positions")
    if stage.kind == "fuse" and isinstance(out.get("teacher_share"), dict):
        n = out["teacher_share"].get("positions", 0)
        return f"{n:,} positions", rate(n, "positions")
    if stage.kind == "vocab" and "n_src" in out:
        return f"{out['n_src']:,} source tokens", rate(out["n_src"], "tokens")
    if stage.kind == "train" and "steps" in out:
        samples = stage.extra.get("samples_per_s")
        return f"{out['steps']:,} steps", (f"{out['steps'] / t:,.2f} steps/s" if t > 0 else MISSING) + (
            f", {samples:,.1f} samples/s" if samples else ""
        )
    if stage.kind == "eval" and stage.extra.get("n_bytes"):
        return f"{stage.extra['n_bytes']:,} bytes", rate(stage.extra["n_bytes"], "bytes")
    return MISSING, MISSING


def _stage_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["stage"]
    for run in runs:
        tag = f" ({run.label})" if run.label else ""
        header += [f"time{tag}", f"processed{tag}", f"rate{tag}", f"size{tag}"]
    paths: list[tuple[tuple, str]] = []
    for run in runs:
        for s in run.stages:
            key = (_stage_rank(s), s.path)
            if s.path not in [p for _, p in paths]:
                paths.append(key)
    paths.sort()
    body = []
    for _, path in paths:
        row = [path]
        for run in runs:
            stage = next((s for s in run.stages if s.path == path), None)
            if stage is None:
                row += [MISSING] * 4
            else:
                row += [f"{stage.duration_s:,.1f} s", *stage_work(stage), _human_bytes(stage.size_bytes)]
        body.append(row)
    total = ["total"]
    for run in runs:
        total += [
            f"{sum(s.duration_s for s in run.stages):,.1f} s",
            "",
            "",
            _human_bytes(sum(s.size_bytes for s in run.stages)),
        ]
    body.append(total)
    return header, body


def _lm_eval_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]] | None:
    """Every lm-eval metric (``models.NAME.tasks``) as (model, run, task, metric, value) rows."""
    body = []
    for run in runs:
        models = run.results["models"]
        for model in row_order(models, run.target):
            for task, metrics in sorted(((models[model] or {}).get("tasks") or {}).items()):
                for metric, value in sorted((metrics or {}).items()):
                    v = _number(value)
                    body.append(
                        [
                            model,
                            *([run.label] if len(runs) > 1 else []),
                            task,
                            metric,
                            MISSING if v is None else f"{v:.4f}",
                        ]
                    )
    if not body:
        return None
    return ["model", *(["run"] if len(runs) > 1 else []), "task", "metric", "value"], body


def _transfer_rows(runs: Sequence[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The transfer diagnostics: gap closed per domain, and what each source's signal kept on its way.

    Returns ``(title, header, body)`` tables (none when the runs have nothing to show).
    """
    multi = len(runs) > 1
    tables = []
    gap_body, domains = [], []
    for run in runs:
        target = run.target
        for row in row_order(run.results["models"], target):
            if not target or not row.startswith(target + "+") or row == f"{target}+clm":
                continue
            closed = gap_closed(run.results, row)
            if closed:
                domains += [d for d in closed if d not in domains]
                gap_body.append((row, run.label, closed))
    if gap_body:
        header = ["model", *(["run"] if multi else []), *domains]
        body = [[row, *([label] if multi else []), *(f"{closed[d]:+.1%}" if d in closed else MISSING for d in domains)]
                for row, label, closed in gap_body]
        tables.append(("Gap closed", header, body))
    acc_body, tasks = [], []
    for run in runs:
        target, models = run.target, run.results["models"]
        for row in row_order(models, target):
            if target and (row == target or row.startswith(target + "+")) and (share := best_source_share(run.results, row)):
                tasks += [t for t in share if t not in tasks]
                acc = models[row]["accuracy"]
                acc_body.append((row, run.label, {t: f"{acc[t]:.2f} ({share[t]:.0%})" for t in share}))
    if acc_body:
        header = ["model", *(["run"] if multi else []), *tasks]
        body = [[row, *([label] if multi else []), *(cells.get(t, MISSING) for t in tasks)]
                for row, label, cells in acc_body]
        tables.append(("Accuracy per task (share of the best source)", header, body))
    src_body = []
    for run in runs:
        share = next((s.outputs.get("teacher_share", {}) for s in run.stages if s.path == "fuse"), {})
        teachers = next((s.outputs.get("teachers") for s in run.stages if s.path == "fuse"), None)
        domain_share = next((s.outputs.get("teacher_share_by_domain", {}) for s in run.stages
                             if s.path == "fuse"), {})
        for stage in run.stages:
            out = stage.outputs
            if stage.kind != "align" or "coverage" not in out:
                continue
            name = Path(stage.path).name
            won, by_domain = MISSING, MISSING
            if teachers and name in teachers and share.get("share"):
                won = f"{share['share'][teachers.index(name)]:.1%}"
                by_domain = " · ".join(f"{d} {shares[teachers.index(name)]:.0%}"
                                       for d, shares in domain_share.items()) or MISSING
            src_body.append([name, *([run.label] if multi else []), f"{out['coverage']:.1%}",
                             *(f"{out[k]:.3f}" if k in out else MISSING
                               for k in ("stored_mass", "mapped_mass", "actual_ratio")), won, by_domain])
    if src_body:
        header = ["source", *(["run"] if multi else []), "aligned positions", "stored mass", "mapped mass",
                  "actual-token ratio", "fused share", "fused share per domain"]
        tables.append(("Teacher signal per source", header, src_body))
    return tables


_TRANSFER_NOTE = (
    "Gap closed: per domain, (bpb of TARGET+clm - bpb of the model) / (bpb of TARGET+clm - bpb of the best "
    "source): 100% is as good as the best source, 0% no better than plain continual training. Per source: "
    "the target positions that received its distribution, the share of its probability that the stored "
    "entries hold, the share of that which found a target id, the projected probability of the actual next "
    "token over the source's own probability of that text (1 is lossless), and the positions it won in fusion. "
    "Accuracy per task: held-out accuracy, in brackets over the best source's on that task (100% is as good "
    "as the best source)."
)


# --------------------------------------------------------------------------------------------------
# figures


@dataclass
class Figure:
    name: str
    caption: str
    png: bytes


def make_figures(runs: Sequence[Run], tables: Sequence[MetricTable]) -> list[Figure]:
    """The report's PNG figures (those with something to draw)."""
    figures = []
    for table in tables:
        title, lower, scale, _, _, _ = _METRICS[table.metric]
        panels = []
        for run in runs:
            models = [m for m, lab in table.rows if lab == run.label]
            data = {m: ((run.results["models"].get(m) or {}).get(table.metric) or {}) for m in models}
            if table.metric == "accuracy" and table.columns[-1] == "avg":
                for m, lab in table.rows:
                    if lab == run.label and (avg := table.cells[(m, lab)][-1].value) is not None:
                        data[m] = {**data[m], "avg": avg / scale}
            if models:
                panels.append((run.label, models, table.columns, data))
        png = panels and plots.metric_bars(
            panels,
            ylabel="bits per byte" if table.metric == "bpb" else "accuracy (%)",
            lower_is_better=lower,
            scale=scale,
        )
        if png:
            what = "Bits per byte per held-out domain" if table.metric == "bpb" else "Accuracy per task"
            figures.append(Figure(f"{table.metric}.png", f"{what}; one bar per model.", png))
    curves = plots.training_curves([(run.label, run.curves) for run in runs])
    if curves:
        figures.append(
            Figure(
                "training.png",
                "Training loss per optimizer step: total, CLM (next-token) and "
                "distillation loss; the CLM baseline and the fused target share the axes.",
                curves,
            )
        )
    refs = [{name: run.results["models"][name]["accuracy"] for name in source_rows(run.results)
             if "accuracy" in run.results["models"][name]} for run in runs]
    learning = plots.accuracy_curves([(run.label, run.accuracy_curves) for run in runs], refs[0] if refs else {})
    if learning:
        figures.append(
            Figure(
                "learning.png",
                "Held-out accuracy per task during SFT, then DPO / WRPO (which start where SFT ended); the dashed "
                "lines are the sources' accuracies (of the first run).",
                learning,
            )
        )
    per_kind = []
    for run in runs:
        kinds: dict[str, float] = {}
        for s in run.stages:
            kinds[s.kind] = kinds.get(s.kind, 0.0) + s.duration_s
        per_kind.append((run.label, kinds))
    durations = plots.stage_durations(per_kind)
    if durations:
        figures.append(Figure("stages.png", "Wall-clock time per pipeline stage.", durations))
    return figures


# --------------------------------------------------------------------------------------------------
# rendering


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]], right_from: int = 1) -> list[str]:
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "| " + " | ".join("---" if i < right_from else "---:" for i in range(len(header))) + " |",
    ]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in body]
    return lines


def _md_cell(cell: Cell) -> str:
    text = f"**{cell.text}**" if cell.best else cell.text
    return f"{text} ({cell.delta_text})" if cell.delta_text else text


def _table_header(table: MetricTable, multi: bool) -> list[str]:
    return ["model", *(["run"] if multi else []), *table.columns]


def _table_row_labels(table: MetricTable, row: tuple[str, str], multi: bool) -> list[str]:
    return [row[0], *([row[1]] if multi else [])]


def _about(runs: Sequence[Run]) -> list[tuple[str, str]]:
    items = []
    for run in runs:
        tag = f" ({run.label})" if run.label else ""
        created = max((s.created for s in run.stages if s.created), default="")
        items.append((f"run{tag}", f"{run.path} (last stage written {created or MISSING})"))
        bpb = run.results.get("meta", {}).get("bpb")
        if bpb:
            items.append((f"bpb settings{tag}", ", ".join(f"{k}={v}" for k, v in sorted(bpb.items()))))
        lm = run.results.get("meta", {}).get("lm_eval")
        if lm:
            items.append(
                (
                    f"lm-eval{tag}",
                    f"version {lm.get('version', '?')}, tasks: " + ", ".join(sorted(lm.get("tasks", {}))),
                )
            )
    return items


def render_markdown(runs: Sequence[Run], tables: Sequence[MetricTable], figures: Sequence[Figure]) -> str:
    """The report as Markdown; figures are linked from ``report_files/``."""
    multi = len(runs) > 1
    out = ["# polyfuse report", ""]
    out += [f"- **{k}**: {v}" for k, v in _about(runs)] + [""]
    if not tables:
        out += ["No figures in the results file yet (run the eval stage).", ""]
    for table in tables:
        out += [f"## {table.title}", "", table.note, ""]
        body = [
            [*_table_row_labels(table, r, multi), *(_md_cell(c) for c in table.cells[r])] for r in table.rows
        ]
        out += _md_table(_table_header(table, multi), body, right_from=2 if multi else 1) + [""]
    lines = summary_lines(runs, tables)
    if lines:
        out += ["## Summary", ""] + [f"- {line}" for line in lines] + [""]
    transfer = _transfer_rows(runs)
    if transfer:
        out += ["## Transfer", "", _TRANSFER_NOTE, ""]
        for title, header, rows in transfer:
            out += [f"### {title}", ""] + _md_table(header, rows, right_from=2 if multi else 1) + [""]
    lm = _lm_eval_rows(runs)
    if lm:
        out += ["## lm-evaluation-harness metrics", ""] + _md_table(*lm, right_from=len(lm[0]) - 1) + [""]
    for fig in figures:
        out += [f"![{fig.caption}]({ASSETS_DIR}/{fig.name})", "", f"*{fig.caption}*", ""]
    header, body = _stage_rows(runs)
    out += (
        [
            "## Pipeline stages",
            "",
            "Wall-clock time, work done and rate, and size on disk of each artifact "
            "directory (from its `manifest.json`).",
            "",
        ]
        + _md_table(header, body)
        + [""]
    )
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#111;background:#fff;
max-width:1100px;margin:2rem auto;padding:0 1.5rem;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.3rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-variant-numeric:tabular-nums;font-size:.92rem}
th,td{border:1px solid #c8c8c8;padding:.3rem .55rem;text-align:right;vertical-align:top;white-space:nowrap}
.wide{overflow-x:auto}
th{background:#f0f3f7}
td:first-child,th:first-child,td.label{text-align:left;font-family:ui-monospace,Menlo,monospace}
tr.target td{background:#fafae8}tr.total td{font-weight:600;border-top:2px solid #888}
.best{font-weight:700}.delta{display:block;font-size:.78rem;color:#555}
.delta.good{color:#0a6b2f}.delta.bad{color:#a11}
.note{color:#444;font-size:.9rem}figure{margin:1rem 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.88rem;color:#444}dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dt{font-weight:600}dd{margin:0;word-break:break-all}ul.summary li{margin:.2rem 0}
@media print{body{margin:0;max-width:none}h2{break-after:avoid}figure,table{break-inside:avoid}}
"""


def _html_table(
    header: Sequence[str],
    body: Sequence[Sequence[str]],
    label_cols: int = 1,
    row_classes: Sequence[str] | None = None,
) -> str:
    e = html.escape
    parts = [
        '<div class="wide"><table><thead><tr>'
        + "".join(f"<th>{e(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
    ]
    for i, row in enumerate(body):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(
            f'<td class="label">{e(c)}</td>' if j < label_cols else f"<td>{e(c)}</td>"
            for j, c in enumerate(row)
        )
        parts.append(f"<tr{cls}>{cells}</tr>")
    return "".join(parts) + "</tbody></table></div>"


def _html_cell(cell: Cell, lower_is_better: bool) -> str:
    cls = ' class="best"' if cell.best else ""
    inner = f"<span{cls}>{html.escape(cell.text)}</span>"
    if cell.delta_text:
        good = cell.delta < 0 if lower_is_better else cell.delta > 0
        tone = "" if cell.delta == 0 else (" good" if good else " bad")
        inner += f'<span class="delta{tone}">{html.escape(cell.delta_text)}</span>'
    return f"<td>{inner}</td>"


def _metric_html(table: MetricTable, multi: bool, targets: set[str]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in _table_header(table, multi))
    rows = []
    for r in table.rows:
        cls = ' class="target"' if r[0] in targets else ""
        labels = "".join(f'<td class="label">{e(x)}</td>' for x in _table_row_labels(table, r, multi))
        rows.append(
            f"<tr{cls}>{labels}"
            + "".join(_html_cell(c, table.lower_is_better) for c in table.cells[r])
            + "</tr>"
        )
    note = e(table.note).replace("`", "")
    return (
        f'<h2>{e(table.title)}</h2><p class="note">{note}</p>'
        f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
    )


def render_html(runs: Sequence[Run], tables: Sequence[MetricTable], figures: Sequence[Figure]) -> str:
    """The report as one self-contained HTML page (inline CSS, figures as base64 PNG, no scripts)."""
    e = html.escape
    multi = len(runs) > 1
    targets = {r.target for r in runs if r.target}
    body = ["<h1>polyfuse report</h1>", "<dl>"]
    body += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _about(runs)] + ["</dl>"]
    if not tables:
        body.append("<p>No figures in the results file yet (run the eval stage).</p>")
    body += [_metric_html(t, multi, targets) for t in tables]
    lines = summary_lines(runs, tables)
    if lines:
        body.append(
            '<h2>Summary</h2><ul class="summary">' + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul>"
        )
    transfer = _transfer_rows(runs)
    if transfer:
        body.append(f'<h2>Transfer</h2><p class="note">{e(_TRANSFER_NOTE)}</p>')
        for title, header, rows in transfer:
            body.append(f"<h3>{e(title)}</h3>" + _html_table(header, rows, label_cols=2 if multi else 1))
    lm = _lm_eval_rows(runs)
    if lm:
        body.append("<h2>lm-evaluation-harness metrics</h2>" + _html_table(*lm, label_cols=len(lm[0]) - 1))
    if figures:
        body.append("<h2>Figures</h2>")
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        body.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{e(fig.caption)}">'
            f"<figcaption>{e(fig.caption)}</figcaption></figure>"
        )
    header, rows = _stage_rows(runs)
    body.append(
        '<h2>Pipeline stages</h2><p class="note">Wall-clock time, work done and rate, and size on disk '
        "of each artifact directory (from its manifest.json).</p>"
        + _html_table(header, rows, row_classes=[""] * (len(rows) - 1) + ["total"])
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f'<p class="note">Written by polyfuse report on {stamp}.</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>polyfuse report</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_files/*.png``) and a self-contained ``report.html``.

    Args:
        run_dirs: one run directory, or several to show side by side (rows per run, deltas against
            each run's own target).
        out_dir: where to write; defaults to the run directory (one run) or
            ``<first run>/compare`` (several).

    Returns:
        ``(md_path, html_path)``.
    """
    if not run_dirs:
        raise DataError("no run directory given; pass at least one (polyfuse report RUN_DIR)")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths), strict=True)]
    out = Path(out_dir) if out_dir is not None else (paths[0] if len(paths) == 1 else paths[0] / "compare")
    tables = [t for metric in _METRICS if (t := metric_table(runs, metric)) is not None]
    figures = make_figures(runs, tables)
    for fig in figures:
        atomic_write_bytes(out / ASSETS_DIR / fig.name, fig.png)
    md = atomic_write_text(out / "report.md", render_markdown(runs, tables, figures))
    page = atomic_write_text(out / "report.html", render_html(runs, tables, figures))
    return md, page
