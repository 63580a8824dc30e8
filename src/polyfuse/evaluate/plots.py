"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state).

Every function returns PNG bytes (or ``None`` when there is nothing to draw). Figures are sized
for an A4 page / a 1000-pixel column at 150 dpi, on a white background, with the Okabe-Ito
colour-blind-safe palette; lines also differ by style and marker so they survive grey-scale print.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["accuracy_curves", "metric_bars", "stage_durations", "training_curves"]

PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
    "#999999",
    "#882255",
    "#44AA99",
    "#117733",
)
LINESTYLES = ("-", "--", ":", "-.")
REFERENCE_GREYS = ("#444444", "#777777", "#AAAAAA")
MARKERS = ("o", "s", "^", "D", "v", "P")
DPI = 150
_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
}
LOSS_PANELS = (("loss", "total loss"), ("clm_loss", "CLM loss"), ("distill_loss", "distillation loss"))
"""(trainer_state log key, panel title) of the training-curve panels."""


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _with_style(draw):
    """Run ``draw`` under the report's rc settings (a context, so callers' settings are untouched)."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        return draw()


def training_curves(curves: Sequence[tuple[str, Mapping[str, Sequence[Mapping[str, Any]]]]]) -> bytes | None:
    """Loss against optimizer step, one panel per loss (total, CLM, distillation).

    Args:
        curves: ``[(run_label, {row_name: trainer_state log_history})]``; every training of every
            run is one line in each panel that has its key (a CLM baseline has no distillation
            loss), so the baseline and the fused target share the axes. ``run_label`` is ``""``
            for a single run.
    """
    series = [(run, row, log) for run, rows in curves for row, log in rows.items()]
    panels = [
        (key, title)
        for key, title in LOSS_PANELS
        if any(key in entry for _, _, log in series for entry in log)
    ]
    if not panels:
        return None

    def draw() -> bytes:
        fig = _figure(10, 3.4)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        rows = list(dict.fromkeys(row for _, row, _ in series))
        runs = list(dict.fromkeys(run for run, _, _ in series))
        for ax, (key, title) in zip(axes, panels, strict=True):
            for run, row, log in series:
                points = [(e["step"], e[key]) for e in log if key in e and "step" in e and _finite(e[key])]
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                i, j = rows.index(row), runs.index(run)
                ax.plot(
                    steps,
                    values,
                    color=PALETTE[i % len(PALETTE)],
                    linestyle=LINESTYLES[j % len(LINESTYLES)],
                    marker=MARKERS[i % len(MARKERS)],
                    markersize=3,
                    linewidth=1.5,
                    label=f"{row} ({run})" if run else row,
                )
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("nats per token")
        handles, labels = _legend_entries(axes)
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), frameon=False)
        return _png(fig)

    return _with_style(draw)


def accuracy_curves(runs: Sequence[tuple[str, Mapping[str, Sequence[tuple[int, Mapping[str, float]]]]]],
                    references: Mapping[str, Mapping[str, float]]) -> bytes | None:
    """Held-out accuracy against optimizer step, one panel per task, with the sources as dashed lines.

    Args:
        runs: ``[(run_label, {row_name: [(step, {task: accuracy})]})]``; ``run_label`` is ``""`` for one run.
        references: ``{source: {task: accuracy}}``, drawn as horizontal lines in each task's panel.
    """
    series = [(run, row, points) for run, rows in runs for row, points in rows.items() if points]
    tasks = list(dict.fromkeys(t for _, _, points in series for _, acc in points for t in acc if t != "all"))
    if not tasks:
        return None

    def draw() -> bytes:
        fig = _figure(10, 3.4)
        axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
        rows = list(dict.fromkeys(row for _, row, _ in series))
        labels = list(dict.fromkeys(run for run, _, _ in series))
        for ax, task in zip(axes, tasks, strict=True):
            for k, (source, acc) in enumerate(references.items()):
                if _finite(acc.get(task)):  # grey, one dash pattern per source: apart from the trained rows
                    ax.axhline(100 * acc[task], color=REFERENCE_GREYS[k % len(REFERENCE_GREYS)],
                               linestyle=LINESTYLES[1 + k % (len(LINESTYLES) - 1)], linewidth=1.2,
                               label=f"{source} (source)")
            for run, row, points in series:
                xy = [(s, 100 * a[task]) for s, a in points if _finite(a.get(task))]
                if not xy:
                    continue
                i, j = rows.index(row), labels.index(run)
                ax.plot(*zip(*xy, strict=True), color=PALETTE[i % len(PALETTE)],
                        linestyle=LINESTYLES[j % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)], markersize=3,
                        linewidth=1.5, label=f"{row} ({run})" if run else row)
            ax.set_title(task)
            ax.set_xlabel("optimizer step")
            ax.set_ylim(-2, 102)
        axes[0].set_ylabel("accuracy (%)")
        handles, names = _legend_entries(axes)
        fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(names)), frameon=False)
        return _png(fig)

    return _with_style(draw)


def _legend_entries(axes: Sequence[Axes]) -> tuple[list, list[str]]:
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def metric_bars(
    panels: Sequence[tuple[str, Sequence[str], Sequence[str], Mapping[str, Mapping[str, float]]]],
    *,
    ylabel: str,
    lower_is_better: bool,
    scale: float = 1.0,
) -> bytes | None:
    """Grouped bars: one group per column (domain or task), one bar per model; one panel per run.

    Args:
        panels: ``[(title, models, columns, {model: {column: value}})]``; missing values leave a gap.
        ylabel: axis label; the direction (lower/higher is better) is appended.
        scale: multiplier for display (100 shows fractions as percentages).

    The y axis starts just below the smallest value (not at zero) so that small differences show;
    the axis label says so.
    """
    values = [
        v * scale
        for _, models, cols, data in panels
        for m in models
        for c in cols
        if _finite(v := data.get(m, {}).get(c, math.nan))
    ]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = (high - low) * 0.15 or abs(high) * 0.05 or 1.0
    bottom = max(0.0, low - pad) if low >= 0 else low - pad

    def draw() -> bytes:
        n_models = max(len(models) for _, models, _, _ in panels)
        n_cols = max(len(cols) for _, _, cols, _ in panels)
        width = min(10.0, 2.0 + 4.2 * len(panels) + 0.08 * n_models * n_cols * len(panels))
        fig = _figure(max(width, 6.0), 3.8)
        axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        all_models = list(dict.fromkeys(m for _, models, _, _ in panels for m in models))
        for ax, (title, models, cols, data) in zip(axes, panels, strict=True):
            bar = 0.8 / max(len(models), 1)
            for i, model in enumerate(models):
                xs, heights = [], []
                for j, col in enumerate(cols):
                    value = data.get(model, {}).get(col, math.nan)
                    if _finite(value):
                        xs.append(j - 0.4 + bar * (i + 0.5))
                        heights.append(value * scale - bottom)
                colour = PALETTE[all_models.index(model) % len(PALETTE)]
                ax.bar(
                    xs,
                    heights,
                    bar,
                    bottom=bottom,
                    color=colour,
                    label=model,
                    edgecolor="white",
                    linewidth=0.5,
                )
            ax.set_xticks(range(len(cols)), cols)
            ax.set_ylim(bottom, high + pad)
            ax.grid(axis="x", visible=False)
            if title:
                ax.set_title(title)
        direction = "lower is better" if lower_is_better else "higher is better"
        axes[0].set_ylabel(f"{ylabel} ({direction})" + (f"; axis from {bottom:.3g}" if bottom else ""))
        handles, labels = _legend_entries(axes)
        fig.legend(handles, labels, loc="outside right upper", frameon=False)
        return _png(fig)

    return _with_style(draw)


def stage_durations(runs: Sequence[tuple[str, Mapping[str, float]]]) -> bytes | None:
    """Horizontal bars of wall-clock seconds per pipeline stage kind, one bar per run.

    Args:
        runs: ``[(run_label, {stage_kind: seconds})]`` with stage kinds in pipeline order.
    """
    kinds = list(dict.fromkeys(k for _, stages in runs for k in stages))
    if not kinds:
        return None

    def draw() -> bytes:
        fig = _figure(10, 0.32 * len(kinds) * max(1, len(runs)) ** 0.5 + 0.9)
        ax = fig.subplots()
        bar = 0.8 / len(runs)
        for j, (label, stages) in enumerate(runs):
            ys = [i - 0.4 + bar * (j + 0.5) for i in range(len(kinds))]
            widths = [stages.get(k, 0.0) for k in kinds]
            ax.barh(ys, widths, bar, color=PALETTE[j % len(PALETTE)], label=label or None)
            for y, w in zip(ys, widths, strict=True):
                if w:
                    ax.annotate(
                        f"{w:,.1f} s",
                        (w, y),
                        xytext=(3, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=8,
                    )
        ax.set_yticks(range(len(kinds)), kinds)
        ax.invert_yaxis()
        ax.set_xlabel("wall-clock seconds (all models of a stage summed)")
        ax.grid(axis="y", visible=False)
        ax.margins(x=0.12)
        if len(runs) > 1:
            ax.legend(frameon=False)
        return _png(fig)

    return _with_style(draw)
