"""What every Hugging Face trainer polyfuse runs prints: one polyfuse progress bar with the latest losses.

The Trainer's own tqdm bar and its per-step log dicts are removed (:func:`quiet_trainer`); the logged
values stay in the run's ``trainer_state.json`` (``log_history``), written next to the model. With
``polyfuse --verbose`` (:func:`polyfuse.progress.verbose`) the Trainer prints as it would on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from polyfuse.progress import Bar, verbose

__all__ = ["TrainerBar", "quiet_trainer"]


class TrainerBar(TrainerCallback):
    """A :class:`polyfuse.progress.Bar` over the optimizer steps (resumed runs start where they stopped),
    showing the logged values named in ``keys`` (on the main process only)."""

    def __init__(self, description: str, keys: Sequence[str] = ("loss",), enabled: bool = True) -> None:
        self.description, self.keys, self.enabled = description, tuple(keys), enabled
        self._bar: Bar | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._bar = Bar(self.description, state.max_steps, self.enabled, completed=state.global_step)
            self._bar.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.advance(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        shown = {k: f"{logs[k]:.3f}" for k in self.keys if isinstance((logs or {}).get(k), (int, float))}
        if self._bar is not None and shown:
            self._bar.show(**shown)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def quiet_trainer(trainer: Any, description: str, *, keys: Sequence[str] = ("loss",), progress: bool = True) -> None:
    """Swap ``trainer``'s printing callbacks for one :class:`TrainerBar` (unless ``--verbose``)."""
    if verbose():
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainerBar(description, keys, enabled=progress))
