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


ROOT = Path(__file__).parents[1]
LAUNCH = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCH, ids=[p.name for p in LAUNCH])
def test_accelerate_config_parses_and_names_existing_recipes(path: Path) -> None:
    """accelerate's own loader accepts the file (unknown keys are its errors), and every recipe or file the
    config names (its launch command, a DeepSpeed hostfile) exists; the recipes validate."""
    import re

    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= config.num_machines >= 1
    text = path.read_text(encoding="utf-8")
    named = re.findall(r"(examples/[\w./-]+)", text)
    recipes = [n for n in named if not n.startswith("examples/accelerate/")]
    assert f"examples/accelerate/{path.name}" in named and recipes, "the comment shows the launch command"
    for name in named:
        assert (ROOT / name).is_file(), f"{path.name} names {name}, which does not exist"
    for name in recipes:
        assert load_recipe(ROOT / name).target.name
    hostfile = (config.deepspeed_config or {}).get("deepspeed_hostfile")
    if hostfile:
        slots = [line.split("slots=")[1] for line in (ROOT / hostfile).read_text().split("\n") if line.strip()]
        assert len(slots) == config.num_machines and sum(map(int, slots)) == config.num_processes


def test_accelerate_readme_lists_every_config_and_existing_recipes() -> None:
    import re

    readme = (ROOT / "examples" / "accelerate" / "README.md").read_text(encoding="utf-8")
    assert {p.name for p in LAUNCH} <= set(re.findall(r"`([\w-]+\.yaml)`", readme))
    for name in re.findall(r"run (examples/[\w./-]+\.yaml)", readme):
        assert load_recipe(ROOT / name).target.name
