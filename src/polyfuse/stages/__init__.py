"""The stage layer: every stage of every recipe mode, and the one runner that executes the stale ones.

A stage function takes the recipe, assembles its inputs and config, and calls the library
(:mod:`polyfuse.capture`, :mod:`polyfuse.align`, :mod:`polyfuse.fuse`, :mod:`polyfuse.merge`,
:mod:`polyfuse.implicit`, :mod:`polyfuse.evaluate`) through :func:`polyfuse.workspace.run_stage`, which
decides whether its artifact is current. Modules, by family:

* :mod:`~polyfuse.stages.common` (models, tokenizers, stage directories, the ``blocks`` stage),
  :mod:`~polyfuse.stages.teachers` (``capture``, ``vocab``, ``align``), :mod:`~polyfuse.stages.fusion`
  (``fuse``, ``train``), :mod:`~polyfuse.stages.evaluation` (``eval``): FuseLLM;
* :mod:`~polyfuse.stages.fusechat` (``pairs``, ``merge``): FuseChat;
* :mod:`~polyfuse.stages.online` (``online``): on-policy fusion in rounds;
* :mod:`~polyfuse.stages.implicit` (``sample`` … ``accuracy``): FuseChat-3.0 / WRPO.

:func:`run_recipe` runs a mode's stages (:data:`MODE_STAGES`) or ``only`` some of them, always in pipeline
order, under the workdir's lock; only the main process writes ``results.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from polyfuse.errors import RecipeError
from polyfuse.recipe import AnyRecipe
from polyfuse.stages.common import blocks_stage, resolve_models, stage_dir
from polyfuse.stages.evaluation import eval_stage, trained_rows
from polyfuse.stages.fusechat import merge_stage, pairs_stage
from polyfuse.stages.fusion import fuse_stage, train_stage
from polyfuse.stages.implicit import (
    accuracy_stage,
    build_stage,
    dpo_stage,
    sample_stage,
    score_stage,
    sft_stage,
    wrpo_stage,
)
from polyfuse.stages.online import online_stage
from polyfuse.stages.teachers import align_stage, capture_stage, vocab_stage
from polyfuse.workspace import IMPLICIT_LOCK_NAME, LOCK_NAME, StageResult, workdir_lock

__all__ = ["EXPLICIT_STAGES", "IMPLICIT_STAGES", "MODE_STAGES", "resolve_models", "run_recipe", "stage_dir",
           "stage_table", "trained_rows"]

StageFunction = Callable[..., StageResult | dict[str, StageResult]]

EXPLICIT_STAGES: dict[str, StageFunction] = {
    "blocks": blocks_stage,
    "capture": capture_stage,
    "vocab": vocab_stage,
    "align": align_stage,
    "fuse": fuse_stage,
    "train": train_stage,
    "pairs": pairs_stage,
    "merge": merge_stage,
    "online": online_stage,
    "eval": eval_stage,
}
"""The stages of an explicit recipe (modes ``fusellm``, ``fusechat`` and ``online``), in pipeline order."""

IMPLICIT_STAGES: dict[str, StageFunction] = {
    "sample": sample_stage,
    "score": score_stage,
    "build": build_stage,
    "sft": sft_stage,
    "dpo": dpo_stage,
    "wrpo": wrpo_stage,
    "accuracy": accuracy_stage,
}
"""The stages of an implicit recipe, in pipeline order."""

MODE_STAGES: dict[str, tuple[str, ...]] = {
    "fusellm": ("blocks", "capture", "vocab", "align", "fuse", "train", "eval"),
    "fusechat": ("blocks", "capture", "vocab", "align", "pairs", "merge", "eval"),
    "online": ("blocks", "online", "eval"),
    "implicit": tuple(IMPLICIT_STAGES),
}
"""The stages ``polyfuse run`` runs for each recipe ``mode``, in order."""


def stage_table(recipe: AnyRecipe) -> dict[str, StageFunction]:
    """Every stage a recipe of this kind can run (``--only`` may name any of them), in pipeline order."""
    return IMPLICIT_STAGES if recipe.mode == "implicit" else EXPLICIT_STAGES


def run_recipe(recipe: AnyRecipe, *, only: Sequence[str] | None = None, force: bool = False,
               progress: bool = True) -> dict[str, StageResult]:
    """Run the stages of the recipe's mode (or ``only`` these, in pipeline order), skipping current ones.

    Returns every artifact's result keyed ``stage`` or ``stage/<part>``; a disabled stage gives nothing. The
    whole run holds the workdir's lock (:func:`polyfuse.workspace.workdir_lock`): one run per workdir, or
    one explicit and one implicit run, whose stages are disjoint.
    """
    table = stage_table(recipe)
    names = list(only) if only else list(MODE_STAGES[recipe.mode])
    unknown = [n for n in names if n not in table]
    if unknown:
        raise RecipeError(f"unknown stage {', '.join(unknown)} for mode {recipe.mode}; stages: {', '.join(table)}")
    out: dict[str, StageResult] = {}
    with workdir_lock(recipe.workdir, name=IMPLICIT_LOCK_NAME if recipe.mode == "implicit" else LOCK_NAME):
        for name in (n for n in table if n in names):
            result: Any = table[name](recipe, force=force, progress=progress)
            if isinstance(result, dict):
                out.update({f"{name}/{part}": res for part, res in result.items()})
            else:
                out[name] = result
    return out
