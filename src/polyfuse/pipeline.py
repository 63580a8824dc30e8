"""Stages of a recipe and the runner that executes the stale ones.

One table maps a stage name to the function that runs it; ``polyfuse run`` walks the table in
order and each function decides (through :func:`polyfuse.workspace.run_stage`) whether its
artifact is current.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from polyfuse.errors import RecipeError
from polyfuse.recipe import Recipe
from polyfuse.workspace import StageResult, atomic_write_json, run_stage


def resolve_models(recipe: Recipe) -> list:
    """``(name, ResolvedModel, tokenizer)`` for the target and every source; a missing one fails here."""
    from polyfuse.evaluate.runner import resolve_all

    return resolve_all([(s.name, s.ref.model, s.ref.revision, s.tokenizer) for s in recipe.models()],
                       world_dir=recipe.world)


def eval_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Bits per byte of the target and every source on each held-out domain, into results.json."""
    from polyfuse.evaluate.bpb import evaluate_bpb, load_domain_texts
    from polyfuse.evaluate.results import update_results
    from polyfuse.evaluate.runner import data_dir, lazy_loaders

    opts = recipe.eval
    resolved = resolve_models(recipe)
    corpus = data_dir(recipe.data.eval, recipe.world)
    inputs = {"data": corpus, **{f"model:{name}": res.location for name, res, _ in resolved}}
    cfg = {"data": recipe.section_dict("data"), "eval": recipe.section_dict("eval"),
           "models": {s.name: str(s.ref) for s in recipe.models()}}

    def build(out: Path) -> dict:
        texts = load_domain_texts(corpus, recipe.data.split, recipe.data.domains, opts.max_bytes_per_domain)
        results = evaluate_bpb(lazy_loaders(resolved, dtype=opts.dtype, device=opts.device), texts,
                               batch_size=opts.batch_size, max_length=opts.max_length,
                               stride=opts.effective_stride, progress=progress)
        atomic_write_json(out / "bpb.json", results)
        return {"bpb": {name: r["bpb"] for name, r in results.items()}}

    res = run_stage(Path(recipe.workdir) / "eval", "eval", cfg, inputs, build, force=force)
    update_results(Path(recipe.workdir) / "results.json",
                   {name: {"bpb": bpb} for name, bpb in res.manifest.outputs["bpb"].items()},
                   meta={"bpb": {"split": recipe.data.split, **recipe.section_dict("eval")}})
    return res


STAGES: dict[str, Callable[..., StageResult]] = {
    "eval": eval_stage,
}


def run_recipe(recipe: Recipe, *, only: Sequence[str] | None = None, force: bool = False,
               progress: bool = True) -> dict[str, StageResult]:
    """Run every stage of the recipe (or ``only`` these), skipping the ones whose manifest is current."""
    names = list(only) if only else list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise RecipeError(f"unknown stage {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    return {name: STAGES[name](recipe, force=force, progress=progress) for name in names}
