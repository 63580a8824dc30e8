"""The one stage runner: every mode's table, ``--only`` in pipeline order, unknown stages refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyfuse import stages
from polyfuse.errors import RecipeError
from polyfuse.recipe import parse_recipe

MODELS = {"target": {"model": "world:target"}, "sources": [{"name": "prose", "model": "world:prose"}]}


def _recording(monkeypatch: pytest.MonkeyPatch, table: dict) -> list[str]:
    ran: list[str] = []
    for name in list(table):
        monkeypatch.setitem(table, name, lambda recipe, *, force, progress, name=name: ran.append(name) or {})
    return ran


@pytest.mark.parametrize("mode", ["fusellm", "fusechat", "implicit"])
def test_each_mode_runs_its_stages_in_order(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = parse_recipe({**MODELS, "mode": mode, "workdir": str(tmp_path)})
    ran = _recording(monkeypatch, stages.stage_table(recipe))
    stages.run_recipe(recipe)
    assert ran == list(stages.MODE_STAGES[mode])


def test_only_runs_in_pipeline_order_whatever_the_order_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = parse_recipe({**MODELS, "workdir": str(tmp_path)})
    ran = _recording(monkeypatch, stages.EXPLICIT_STAGES)
    stages.run_recipe(recipe, only=["eval", "pairs", "blocks"])   # pairs: a fusechat stage, allowed by --only
    assert ran == ["blocks", "pairs", "eval"]
    implicit = parse_recipe({**MODELS, "mode": "implicit", "workdir": str(tmp_path / "i")})
    ran = _recording(monkeypatch, stages.IMPLICIT_STAGES)
    stages.run_recipe(implicit, only=["accuracy", "sft"])
    assert ran == ["sft", "accuracy"]


def test_unknown_stage_names_the_mode_and_its_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    implicit = parse_recipe({**MODELS, "mode": "implicit", "workdir": str(tmp_path)})
    ran = _recording(monkeypatch, stages.IMPLICIT_STAGES)
    with pytest.raises(RecipeError, match="unknown stage merge for mode implicit; stages: sample, score"):
        stages.run_recipe(implicit, only=["sft", "merge"])
    assert ran == []   # nothing ran before the refusal
