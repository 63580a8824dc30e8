"""Per-task learning curves: held-out accuracy at evenly spaced steps of a training stage.

:class:`AccuracyCurve` is a ``transformers.TrainerCallback``. At step 0 and at ``points`` evenly spaced
optimizer steps up to the last one it answers the held-out prompts greedily with the model being trained,
checks the answers with the verifiers (:func:`polyfuse.evaluate.accuracy.answer_accuracy`) and rewrites
``<output_dir>/curve.json`` atomically::

    {"stage": "sft", "points": [{"step": 0, "accuracy": {"count": 0.33, ..., "all": 0.17}}, ...]}

The evaluation runs in ``eval`` mode under ``torch.no_grad`` and inside :func:`torch.random.fork_rng`, so
training draws the same random numbers with and without the curve: the trained model is the same. A
resumed run keeps the points it already has and adds the missing ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from polyfuse.evaluate.results import CURVE_FILE, read_curve
from polyfuse.workspace import atomic_write_json

__all__ = ["AccuracyCurve", "curve_steps", "sample_per_task"]

log = logging.getLogger(__name__)


def curve_steps(total_steps: int, points: int) -> list[int]:
    """Step 0 and ``points`` evenly spaced steps ending at ``total_steps`` (no repeats)."""
    if total_steps <= 0 or points <= 0:
        return [0]
    return sorted({0, *(round(total_steps * i / points) for i in range(1, points + 1))})


def sample_per_task(problems: Sequence[Mapping[str, Any]], per_task: int | None) -> list[Mapping[str, Any]]:
    """The first ``per_task`` problems of each task, in file order (all when ``None``)."""
    if per_task is None:
        return list(problems)
    seen: dict[str, int] = {}
    out = []
    for p in problems:
        task = str(p.get("task") or p.get("category") or "all")
        if seen.get(task, 0) < per_task:
            seen[task] = seen.get(task, 0) + 1
            out.append(p)
    return out


class AccuracyCurve(TrainerCallback):
    """Held-out accuracy per task at step 0 and ``points`` evenly spaced steps, written to ``curve.json``."""

    def __init__(self, problems: Sequence[Mapping[str, Any]], output_dir: str | Path, *, stage: str,
                 points: int = 4, batch_size: int = 50, max_new_tokens: int = 32):
        self.problems = list(problems)
        self.path = Path(output_dir) / CURVE_FILE
        self.stage, self.points = stage, points
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        previous = read_curve(self.path) or {}
        self.done: dict[int, dict[str, float]] = {int(p["step"]): p["accuracy"] for p in previous.get("points", [])
                                                  if isinstance(p, dict) and "step" in p and "accuracy" in p}
        self.steps: list[int] = [0]

    def _measure(self, step: int, model: Any, tokenizer: Any) -> None:
        from polyfuse.evaluate.accuracy import answer_accuracy
        from polyfuse.generate import HFBackend

        if step in self.done or model is None or tokenizer is None:
            return
        was_training = model.training
        model.eval()
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                accuracy, _ = answer_accuracy(HFBackend.from_loaded(model, tokenizer), self.problems,
                                              batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
        finally:
            model.train(was_training)
        self.done[step] = accuracy
        log.debug("%s step %d: held-out accuracy %s", self.stage, step, accuracy)
        atomic_write_json(self.path, {"stage": self.stage, "steps": self.steps,
                                      "points": [{"step": s, "accuracy": a} for s, a in sorted(self.done.items())]})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        self.steps = curve_steps(state.max_steps, self.points)
        if state.global_step == 0 and state.is_world_process_zero:  # under several processes: rank 0 measures
            self._measure(0, model, processing_class)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                    **kwargs: Any) -> None:
        if state.global_step in self.steps and state.is_world_process_zero:
            self._measure(state.global_step, model, processing_class)
