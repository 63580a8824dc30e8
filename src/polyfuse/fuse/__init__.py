"""Knowledge fusion (FuseLLM): fusion strategies, sparse distillation losses and the fusion trainer.

``strategies`` and ``losses`` are light (numpy / torch); the trainer (which imports transformers) is
loaded on first use of one of its names.
"""

from __future__ import annotations

from typing import Any

from polyfuse.fuse.losses import (
    FusionLoss,
    SparseLoss,
    clm_loss,
    distill_loss,
    fusion_loss,
    selective_log_softmax,
    teacher_distribution,
)
from polyfuse.fuse.strategies import (
    STRATEGIES,
    FusedBlock,
    FusionStats,
    Strategy,
    TeacherBlock,
    avg_ce,
    fuse_block,
    get_strategy,
    min_ce,
    register,
)

_TRAINER_NAMES = ("FusionCollator", "FusionConfig", "FusionTrainer", "lm_weight_at", "train_fusion")

__all__ = [
    "STRATEGIES",
    "FusedBlock",
    "FusionLoss",
    "FusionStats",
    "SparseLoss",
    "Strategy",
    "TeacherBlock",
    "avg_ce",
    "clm_loss",
    "distill_loss",
    "fuse_block",
    "fusion_loss",
    "get_strategy",
    "min_ce",
    "register",
    "selective_log_softmax",
    "teacher_distribution",
    *_TRAINER_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from polyfuse.fuse import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'polyfuse.fuse' has no attribute {name!r}")
