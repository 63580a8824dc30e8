"""One polyfuse bar per Hugging Face trainer, and the libraries' own output back with --verbose."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from polyfuse import progress
from polyfuse.trainer_bar import TrainerBar, quiet_trainer


class FakeTrainer:
    def __init__(self) -> None:
        self.callbacks: list = [ProgressCallback, PrinterCallback, "other"]

    def remove_callback(self, cb) -> None:
        self.callbacks = [c for c in self.callbacks if c is not cb]

    def add_callback(self, cb) -> None:
        self.callbacks.append(cb)


def test_quiet_trainer_swaps_the_printing_callbacks_for_one_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = FakeTrainer()
    quiet_trainer(trainer, "sft", keys=("loss",))
    assert trainer.callbacks[0] == "other" and isinstance(trainer.callbacks[1], TrainerBar)
    assert len(trainer.callbacks) == 2
    monkeypatch.setattr(progress, "_VERBOSE", True)
    loud = FakeTrainer()
    quiet_trainer(loud, "sft")
    assert loud.callbacks == [ProgressCallback, PrinterCallback, "other"]   # --verbose: untouched


def test_trainer_bar_follows_steps_and_shows_the_logged_losses() -> None:
    bar = TrainerBar("train", keys=("loss", "distill_loss"))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4, global_step=1)   # a resumed run
    bar.on_train_begin(None, state, None)
    inner = bar._bar
    assert inner is not None and inner._args == ("train", 4, 1)
    bar.on_step_end(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 2.5, "distill_loss": 1.25, "learning_rate": 1e-3, "note": "x"})
    assert inner._info == "loss=2.500 distill_loss=1.250"
    bar.on_train_end(None, state, None)
    assert bar._bar is None and inner._bar is None
    quiet = TrainerBar("train", enabled=False)
    quiet.on_train_begin(None, state, None)
    assert quiet._bar is not None and quiet._bar._bar is None   # no live display when disabled
