"""A bridge to lm-evaluation-harness: run named tasks on any model path, keep the scores in results.json.

lm-eval is the optional ``eval`` extra (``pip install polyfuse[eval]``); it is imported only when a
task runs. Tasks are the harness's own (``hellaswag``, ``gsm8k``, ...) or ones defined in YAML files
under ``include_path`` (a task YAML can point ``dataset_path: json`` at a local JSONL file, which is
how the tests run without downloads). The model goes through the harness's Hugging Face class
(``model="hf"``), so any local model directory (or hub id) the harness can load works.

What lands in the results file (schema in :mod:`polyfuse.evaluate.results`)::

    models[NAME]["tasks"][TASK] = {METRIC: float}     # every metric the harness reported
    models[NAME]["accuracy"][TASK] = float            # the headline metric, when it is a fraction
    meta["lm_eval"] = {"version": ..., "tasks": {TASK: {"metric", "num_fewshot", "limit", "n_samples",
                                                        "higher_is_better"}}}

The headline metric is the first of :data:`HEADLINE_METRICS` the task reports with
``higher_is_better`` (or the one named in ``metrics={TASK: METRIC}``); it goes into ``accuracy``
only when its value lies in [0, 1], so ``polyfuse report`` shows it as a percentage next to the
other tasks. The harness's raw output (without per-sample logs) is kept as
``<run>/lm_eval/<NAME>.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyfuse.errors import ModelLoadError, PolyfuseError
from polyfuse.evaluate.results import RESULTS_NAME, update_results
from polyfuse.workspace import atomic_write_json

__all__ = ["HEADLINE_METRICS", "LmEvalScores", "lm_eval_into_results", "record_scores", "run_lm_eval"]

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("acc", "exact_match", "pass@1", "pass_at_1", "acc_norm", "em", "f1", "mc2", "mcc")
"""Metrics tried in this order for a task's headline score (after dropping the ``,none`` filter)."""
INSTALL_HINT = "lm-evaluation-harness is not installed; pip install polyfuse[eval] (or pip install lm-eval)"


@dataclass
class LmEvalScores:
    """What one harness run measured, in the results file's terms."""

    metrics: dict[str, dict[str, float]]
    """Task -> metric -> value (standard errors dropped; ``acc,none`` becomes ``acc``)."""
    headline: dict[str, str]
    """Task -> the metric chosen as its headline score (absent when none qualifies)."""
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Task -> ``metric``, ``num_fewshot``, ``limit``, ``n_samples``, ``higher_is_better``."""
    version: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    """The harness's output without samples and environment dump (JSON-serialisable)."""

    @property
    def accuracy(self) -> dict[str, float]:
        """Task -> headline value, for headline values that are fractions in [0, 1]."""
        out = {}
        for task, metric in self.headline.items():
            value = self.metrics[task].get(metric)
            if value is not None and 0.0 <= value <= 1.0:
                out[task] = value
        return out


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise PolyfuseError(f"{INSTALL_HINT} ({err})") from None
    return lm_eval, TaskManager


def _task_manager(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None):
    """A TaskManager that knows every task in ``tasks``; the built-in index (slow to build, about
    20 s) is only read when some task is neither in ``include_path`` nor a YAML file path."""
    _, TaskManager = _import_lm_eval()
    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path or [])
    for p in paths:
        if not Path(p).exists():
            raise PolyfuseError(
                f"lm-eval include path {str(p)!r} does not exist; point it at your task YAML directory"
            )
    wanted = [t for t in tasks if not Path(t).is_file()]
    if paths:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(t in local.all_tasks for t in wanted):
            return local
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    missing = [t for t in wanted if t not in manager.all_tasks]
    if missing:
        where = f" or in {', '.join(map(str, paths))}" if paths else ""
        raise PolyfuseError(
            f"lm-eval task(s) {', '.join(missing)} not found among the harness's tasks{where}; "
            "check the name or define the task in a YAML file under include_path"
        )
    return manager


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _clean_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5}``."""
    out = {}
    for key, value in entry.items():
        if "," not in key or "_stderr" in key.split(",")[0]:
            continue
        metric, filt = key.split(",", 1)
        number = _number(value)
        if number is not None:
            out[metric if filt == "none" else f"{metric},{filt}"] = number
    return out


def _pick_headline(
    metrics: Mapping[str, float], higher: Mapping[str, bool], wanted: str | None
) -> str | None:
    if wanted is not None:
        if wanted not in metrics:
            raise PolyfuseError(
                f"metric {wanted!r} not reported; the task reports {', '.join(sorted(metrics))}"
            )
        return wanted
    good = [m for m in metrics if higher.get(m.split(",")[0], False)]
    for name in HEADLINE_METRICS:
        for metric in good:
            if metric.split(",")[0] == name:
                return metric
    return good[0] if good else None


def run_lm_eval(
    model: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    tokenizer: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    dtype: str = "auto",
    seed: int = 0,
    metrics: Mapping[str, str] | None = None,
) -> LmEvalScores:
    """Run lm-eval ``tasks`` on ``model`` (a local model directory or a hub id) through ``simple_evaluate``.

    Args:
        include_path: directory (or directories) of task YAML files to add to the harness's tasks.
        tokenizer: tokenizer path when it is not stored with the model.
        limit: at most this many documents per task (a fraction below 1 is a share), for smoke runs.
        batch_size: passed to the harness (``"auto"`` lets it search).
        device: ``cpu``, ``cuda``, ``cuda:N``; ``None`` lets the harness pick (CUDA when present).
        metrics: task -> headline metric, overriding :data:`HEADLINE_METRICS`.

    Raises:
        PolyfuseError: lm-eval is missing, a task is unknown, or a named headline metric is absent.
        ModelLoadError: ``model`` looks like a local path but does not exist.
    """
    if not tasks:
        raise PolyfuseError(
            "no lm-eval task given; name at least one (e.g. hellaswag, or a task of include_path)"
        )
    text = str(model)
    if (Path(text).is_absolute() or text.startswith((".", "~"))) and not Path(text).expanduser().exists():
        raise ModelLoadError(f"model path {text!r} does not exist; pass a model directory or a hub id")
    lm_eval, _ = _import_lm_eval()
    manager = _task_manager(tasks, include_path)
    model_args: dict[str, Any] = {
        "pretrained": str(Path(text).expanduser()) if Path(text).expanduser().exists() else text,
        "dtype": dtype,
    }
    if tokenizer is not None:
        model_args["tokenizer"] = str(tokenizer)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # only rank 0 of a distributed run gets results
        return LmEvalScores(metrics={}, headline={})
    scores = LmEvalScores(metrics={}, headline={}, version=str(out.get("lm_eval_version", "")))
    higher_all = out.get("higher_is_better", {})
    for task, entry in out.get("results", {}).items():
        task_metrics = _clean_metrics(entry)
        if not task_metrics:
            continue
        higher = {k: bool(v) for k, v in (higher_all.get(task) or {}).items()}
        scores.metrics[task] = task_metrics
        headline = _pick_headline(task_metrics, higher, (metrics or {}).get(task))
        if headline is not None:
            scores.headline[task] = headline
        scores.meta[task] = {
            "metric": headline,
            "num_fewshot": (out.get("n-shot") or {}).get(task, num_fewshot),
            "limit": limit,
            "n_samples": ((out.get("n-samples") or {}).get(task) or {}).get("effective"),
            "higher_is_better": higher,
        }
    keep = (
        "results",
        "group_subtasks",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
        "lm_eval_version",
        "transformers_version",
        "date",
    )
    scores.raw = _jsonable({k: out[k] for k in keep if k in out})
    return scores


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    number = _number(value) if not callable(value) else None
    return number if number is not None else str(value)


def record_scores(run_dir: str | Path, name: str, scores: LmEvalScores) -> dict[str, Any]:
    """Merge ``scores`` into ``<run_dir>/results.json`` under model ``name``; keep the raw output as
    ``<run_dir>/lm_eval/<name>.json``. Returns the updated results."""
    run_dir = Path(run_dir)
    if scores.raw:
        atomic_write_json(run_dir / "lm_eval" / f"{name.replace('/', '_')}.json", scores.raw)
    figures: dict[str, Any] = {"tasks": scores.metrics}
    if scores.accuracy:
        figures["accuracy"] = scores.accuracy
    return update_results(
        run_dir / RESULTS_NAME,
        {name: figures},
        meta={"lm_eval": {"version": scores.version, "tasks": scores.meta}},
    )


def lm_eval_into_results(
    run_dir: str | Path, name: str, model: str | Path, tasks: Sequence[str], **options: Any
) -> dict[str, Any]:
    """Run :func:`run_lm_eval` (``options`` go to it) and record the scores for row ``name`` of the run."""
    scores = run_lm_eval(model, tasks, **options)
    log.info(
        "lm-eval %s on %s: %s",
        ", ".join(tasks),
        name,
        ", ".join(f"{t}={scores.metrics[t][m]:.4f} ({m})" for t, m in scores.headline.items()),
    )
    return record_scores(run_dir, name, scores)
