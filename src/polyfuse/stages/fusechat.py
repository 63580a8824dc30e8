"""FuseChat: one pairwise fusion and training per source, then a merge of the pairwise targets in
parameter space (SCE by default)."""

from __future__ import annotations

from pathlib import Path

from polyfuse.recipe import Recipe
from polyfuse.stages.common import resolve_models, stage_dir
from polyfuse.stages.fusion import fuse_into, train_run
from polyfuse.workspace import (
    StageResult,
    atomic_write_text,
    run_stage,
)


def pairs_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """FuseChat's pairwise fusion: per source, fuse the target with that source alone and train a target.

    Writes ``pairs/<source>/fuse`` and ``pairs/<source>/train``; each trained target has the target's
    architecture, so :func:`merge_stage` can merge them in parameter space.
    """
    results = {}
    for spec in recipe.sources:
        fuse_dir = stage_dir(recipe, "pairs", spec.name, "fuse")
        results[f"{spec.name}/fuse"] = fuse_into(recipe, [spec.name], fuse_dir, force=force, progress=progress)
        results[f"{spec.name}/train"] = train_run(recipe, fuse_dir, stage_dir(recipe, "pairs", spec.name, "train"),
                                                   force=force, progress=progress, overrides=recipe.section_dict("pairs"),
                                                   description=f"train pair:{spec.name}")
    return results


def merge_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Merge the pairwise targets onto the original target (FuseChat: SCE) with the streaming engine.

    The merged model is ``merge/model``; ``merge/merge.yaml`` is the mergekit-style config used.
    """
    from polyfuse.merge import parse_merge_config, run_merge

    target = next(res for name, res, _ in resolve_models(recipe) if name == recipe.target.name)
    pairs = {s.name: stage_dir(recipe, "pairs", s.name, "train") for s in recipe.sources}
    opts = recipe.merge
    config = {"merge_method": opts.method, "base_model": str(target.location),
              "models": [{"model": str(path.resolve())} for path in pairs.values()],
              "parameters": dict(opts.parameters), "dtype": opts.dtype}
    cfg = {"merge": recipe.section_dict("merge"), "seed": recipe.seed}
    inputs = {"target": target.location, **{f"pair:{n}": p for n, p in pairs.items()}}

    def build(out: Path) -> dict:
        atomic_write_text(out / "merge.yaml", yaml_dump(config))
        result = run_merge(parse_merge_config(config, source=str(out / "merge.yaml")), out / "model",
                           seed=recipe.seed, world_dir=recipe.world, progress=progress)
        return {"tensors": result.tensors, "input_bytes": result.input_bytes, "seconds": result.seconds}

    return run_stage(stage_dir(recipe, "merge"), "merge", cfg, inputs, build, force=force)


def yaml_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
