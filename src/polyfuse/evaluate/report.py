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

This module picks the figures (drawn by :mod:`polyfuse.evaluate.plots`), renders Markdown and HTML and
writes the files; reading a run is :mod:`polyfuse.evaluate.report_run`, the tables' rows and cells
:mod:`polyfuse.evaluate.report_tables`. ``report.html`` is self-contained (inline CSS, figures as base64
PNG); ``report.md`` links the same PNGs from ``report_files/`` beside it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from polyfuse.errors import DataError
from polyfuse.evaluate import plots
from polyfuse.evaluate.report_run import ASSETS_DIR, Run, Stage, load_run, run_labels
from polyfuse.evaluate.report_tables import (
    METRICS,
    MISSING,
    TRANSFER_NOTE,
    Cell,
    MetricTable,
    lm_eval_rows,
    metric_table,
    stage_rows,
    summary_lines,
    transfer_rows,
)
from polyfuse.evaluate.results import source_rows
from polyfuse.workspace import atomic_write_bytes, atomic_write_text

__all__ = [
    "Figure",
    "MetricTable",
    "Run",
    "Stage",
    "load_run",
    "make_figures",
    "metric_table",
    "render_html",
    "render_markdown",
    "write_report",
]


# --------------------------------------------------------------------------------------------------
# figures


@dataclass
class Figure:
    """One PNG of the report: ``report_files/NAME`` beside ``report.md``, inline in ``report.html``."""

    name: str
    caption: str
    png: bytes


def make_figures(runs: Sequence[Run], tables: Sequence[MetricTable]) -> list[Figure]:
    """The report's PNG figures (those with something to draw)."""
    figures = []
    for table in tables:
        spec = METRICS[table.metric]
        panels = []
        for run in runs:
            models = [m for m, lab in table.rows if lab == run.label]
            data = {m: ((run.results["models"].get(m) or {}).get(table.metric) or {}) for m in models}
            if table.metric == "accuracy" and table.columns[-1] == "avg":
                for m, lab in table.rows:
                    if lab == run.label and (avg := table.cells[(m, lab)][-1].value) is not None:
                        data[m] = {**data[m], "avg": avg / spec.scale}
            if models:
                panels.append((run.label, models, table.columns, data))
        png = panels and plots.metric_bars(
            panels,
            ylabel="bits per byte" if table.metric == "bpb" else "accuracy (%)",
            lower_is_better=spec.lower_is_better,
            scale=spec.scale,
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
    transfer = transfer_rows(runs)
    if transfer:
        out += ["## Transfer", "", TRANSFER_NOTE, ""]
        for title, header, rows in transfer:
            out += [f"### {title}", ""] + _md_table(header, rows, right_from=2 if multi else 1) + [""]
    lm = lm_eval_rows(runs)
    if lm:
        out += ["## lm-evaluation-harness metrics", ""] + _md_table(*lm, right_from=len(lm[0]) - 1) + [""]
    for fig in figures:
        out += [f"![{fig.caption}]({ASSETS_DIR}/{fig.name})", "", f"*{fig.caption}*", ""]
    header, body = stage_rows(runs)
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
    transfer = transfer_rows(runs)
    if transfer:
        body.append(f'<h2>Transfer</h2><p class="note">{e(TRANSFER_NOTE)}</p>')
        for title, header, rows in transfer:
            body.append(f"<h3>{e(title)}</h3>" + _html_table(header, rows, label_cols=2 if multi else 1))
    lm = lm_eval_rows(runs)
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
    header, rows = stage_rows(runs)
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
    runs = [load_run(p, label) for p, label in zip(paths, run_labels(paths), strict=True)]
    out = Path(out_dir) if out_dir is not None else (paths[0] if len(paths) == 1 else paths[0] / "compare")
    tables = [t for metric in METRICS if (t := metric_table(runs, metric)) is not None]
    figures = make_figures(runs, tables)
    for fig in figures:
        atomic_write_bytes(out / ASSETS_DIR / fig.name, fig.png)
    md = atomic_write_text(out / "report.md", render_markdown(runs, tables, figures))
    page = atomic_write_text(out / "report.html", render_html(runs, tables, figures))
    return md, page
