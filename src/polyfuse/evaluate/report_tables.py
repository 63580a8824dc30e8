"""The report's tables, computed from loaded runs (:class:`~polyfuse.evaluate.report_run.Run`) as plain
cells and strings; :mod:`polyfuse.evaluate.report` renders them as Markdown and HTML.

* :func:`metric_table`: the papers' table for each metric of the results file
  (:mod:`polyfuse.evaluate.results`): bits per byte per domain plus the pooled ``all`` (lower is better)
  and task accuracy plus the mean over tasks (higher is better). Rows in the papers' order
  (:func:`~polyfuse.evaluate.results.row_order`), the best value of each column marked (compared at the
  printed precision, so ties are all best), and each row's change against the same run's target. A
  missing figure is ``–``.
* :func:`summary_lines`: each trained row against the target, the CLM baseline and the best source, and
  the extra time fusion cost.
* :func:`transfer_rows`: gap closed per domain, accuracy as a share of the best source, and what each
  source's teacher signal kept through align and fuse.
* :func:`lm_eval_rows`: every lm-evaluation-harness metric; :func:`stage_rows`: each stage's time, work,
  rate and size on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from polyfuse.evaluate.report_run import Run, Stage, stage_rank
from polyfuse.evaluate.results import best_source_share, gap_closed, row_order, source_rows

__all__ = [
    "METRICS",
    "MINUS",
    "MISSING",
    "TRANSFER_NOTE",
    "Cell",
    "MetricSpec",
    "MetricTable",
    "lm_eval_rows",
    "metric_table",
    "stage_rows",
    "stage_work",
    "summary_lines",
    "transfer_rows",
]

MISSING = "\u2013"  # en dash
MINUS = "\u2212"


# --------------------------------------------------------------------------------------------------
# the papers' table


@dataclass
class Cell:
    """One figure of a :class:`MetricTable`, with its delta against the run's target."""

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


class MetricSpec(NamedTuple):
    """How one metric of the results file is shown."""

    title: str
    lower_is_better: bool
    scale: float
    """Stored value -> displayed value (accuracy is stored as a fraction, shown in %)."""
    digits: int
    """Decimals printed; bold and deltas compare at this precision."""
    average: str
    """The average column's name."""
    note: str
    """How the average is made."""


METRICS = {
    "bpb": MetricSpec(
        "Bits per byte on held-out text",
        True,
        1.0,
        4,
        "all",
        "`all` is pooled over every held-out byte (the byte-weighted average of the domains)",
    ),
    "accuracy": MetricSpec(
        "Task accuracy (%)",
        False,
        100.0,
        2,
        "avg",
        "`avg` is the mean over the tasks, shown only for rows that have every task",
    ),
}
"""The report's metrics, in the order their tables appear."""


def _fmt(value: float, digits: int, signed: bool = False) -> str:
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text.replace("-", MINUS)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def metric_table(runs: Sequence[Run], metric: str) -> MetricTable | None:
    """The papers' table of ``metric`` (``bpb`` or ``accuracy``) over the runs; ``None`` if no row has it."""
    title, lower, scale, digits, avg_name, note = METRICS[metric]
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
# summary, stages, lm-eval metrics, transfer diagnostics


def summary_lines(runs: Sequence[Run], tables: Sequence[MetricTable]) -> list[str]:
    """Plain-text verdicts: each trained row against the target, the CLM baseline and the best source
    on each table's last (average) column, then what the fusion stages cost."""
    lines = []
    for run in runs:
        target = run.target
        prefix = f"[{run.label}] " if run.label else ""
        source_names = set(source_rows(run.results))
        for table in tables:
            col = len(table.columns) - 1  # the average column (or the only one)
            name = table.columns[col]
            value = {m: table.cells[(m, lab)][col].value for m, lab in table.rows if lab == run.label}
            trained = [m for m in value if target and m.startswith(target + "+") and value[m] is not None]
            sources = {m: v for m, v in value.items() if m in source_names and v is not None}
            digits = METRICS[table.metric].digits
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


def stage_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["stage"]
    for run in runs:
        tag = f" ({run.label})" if run.label else ""
        header += [f"time{tag}", f"processed{tag}", f"rate{tag}", f"size{tag}"]
    paths: list[tuple[tuple, str]] = []
    for run in runs:
        for s in run.stages:
            key = (stage_rank(s), s.path)
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


def lm_eval_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]] | None:
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


def transfer_rows(runs: Sequence[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
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


TRANSFER_NOTE = (
    "Gap closed: per domain, (bpb of TARGET+clm - bpb of the model) / (bpb of TARGET+clm - bpb of the best "
    "source): 100% is as good as the best source, 0% no better than plain continual training. Per source: "
    "the target positions that received its distribution, the share of its probability that the stored "
    "entries hold, the share of that which found a target id, the projected probability of the actual next "
    "token over the source's own probability of that text (1 is lossless), and the positions it won in fusion. "
    "Accuracy per task: held-out accuracy, in brackets over the best source's on that task (100% is as good "
    "as the best source)."
)


