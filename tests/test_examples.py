"""Every recipe in examples/ validates (the real-checkpoint ones included: no model is touched)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyfuse.recipe import load_recipe

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples_for_each_family() -> None:
    modes = {getattr(load_recipe(p), "mode", None) for p in EXAMPLES}
    assert {"fusellm", "fusechat", "implicit"} <= modes


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.models() and recipe.target.name
