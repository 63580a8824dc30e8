"""Recipe YAML as pydantic models: sections, model references, `key=value` overrides, one-line errors.

A recipe is validated without touching any model or data file: existence is checked by the stages
that load things. Every model forbids unknown keys and every field carries help text, so a typo is an
error that names the file, the dotted key and the fix, never a silent fallback to a default.

The package: :mod:`~polyfuse.recipe.base` (model references, ``Section``, ``RecipeBase``),
:mod:`~polyfuse.recipe.explicit` (``Recipe``: modes ``fusellm`` and ``fusechat``),
:mod:`~polyfuse.recipe.implicit` (``ImplicitRecipe``: mode ``implicit``) and :mod:`~polyfuse.recipe.loading`
(YAML and overrides); errors are one line (:mod:`polyfuse.validation`). :func:`load_recipe` is the
one loader: it reads the file, applies the overrides once and validates against the class of the ``mode``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from polyfuse.errors import RecipeError
from polyfuse.recipe.base import (
    NAME_PATTERN,
    WORLD_PREFIX,
    ModelRef,
    ModelSpec,
    RecipeBase,
    Section,
    TargetSpec,
)
from polyfuse.recipe.explicit import (
    AlignSection,
    BlocksSection,
    CaptureSection,
    CorpusSection,
    DataSection,
    EvalSection,
    FuseSection,
    MergeSection,
    OnlineSection,
    PairsSection,
    Recipe,
    TrainSection,
    VocabSection,
)
from polyfuse.recipe.implicit import ImplicitRecipe
from polyfuse.recipe.loading import _apply_overrides, apply_overrides, read_recipe_file
from polyfuse.validation import format_validation_error

__all__ = [
    "MODES",
    "NAME_PATTERN",
    "WORLD_PREFIX",
    "AlignSection",
    "AnyRecipe",
    "BlocksSection",
    "CaptureSection",
    "CorpusSection",
    "DataSection",
    "EvalSection",
    "FuseSection",
    "ImplicitRecipe",
    "MergeSection",
    "OnlineSection",
    "ModelRef",
    "ModelSpec",
    "PairsSection",
    "Recipe",
    "RecipeBase",
    "Section",
    "TargetSpec",
    "TrainSection",
    "VocabSection",
    "apply_overrides",
    "format_validation_error",
    "load_recipe",
    "parse_recipe",
]

AnyRecipe = Recipe | ImplicitRecipe

MODES: dict[str, type[Recipe] | type[ImplicitRecipe]] = {
    "fusellm": Recipe, "fusechat": Recipe, "online": Recipe, "implicit": ImplicitRecipe}
"""The recipe class of each ``mode`` (absent: ``fusellm``)."""


def parse_recipe(data: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str = "recipe") -> AnyRecipe:
    """Validate an already-loaded recipe mapping plus ``key=value`` / ``~key`` overrides (they win) against the
    class of its ``mode``; ``source`` names it in errors (RecipeError, one line, every problem at once)."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: the recipe must be a mapping of keys ({', '.join(Recipe.model_fields)}), "
                          f"got {type(data).__name__}")
    merged, notes = _apply_overrides(data, overrides)
    mode = merged.get("mode", "fusellm")
    cls = MODES.get(mode) if isinstance(mode, str) else None
    if cls is None:
        note = f" (from override {notes['mode']!r})" if "mode" in notes else ""
        raise RecipeError(f"{source}: mode: expected one of {', '.join(MODES)}, got {mode!r}{note}")
    try:
        return cls.model_validate(merged)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source, cls, overridden=notes)) from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> AnyRecipe:
    """Read a recipe YAML, apply the overrides and validate it: a :class:`Recipe` for modes ``fusellm`` and
    ``fusechat``, an :class:`ImplicitRecipe` for ``implicit``.

    Raises RecipeError (one line) for a missing file, invalid YAML, a malformed override or any
    validation problem (all problems at once).
    """
    return parse_recipe(read_recipe_file(path), overrides, source=str(path))
