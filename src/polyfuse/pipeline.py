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


def stage_dir(recipe: Recipe, *parts: str) -> Path:
    """Where a stage writes: ``<workdir>/<stage>[/<model>]``."""
    return Path(recipe.workdir).joinpath(*parts)


def _tokenizers(recipe: Recipe) -> dict:
    """Every model's tokenizer (target first), loaded once per stage."""
    from polyfuse.models import load_tokenizer

    return {name: load_tokenizer(res, tok) for name, res, tok in resolve_models(recipe)}


def blocks_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Documents of the fusion corpus → blocks that fit every participating tokenizer."""
    from polyfuse.corpus.blocks import make_blocks, write_blocks
    from polyfuse.corpus.documents import domain_path, list_domains, read_documents
    from polyfuse.evaluate.runner import data_dir

    corpus = data_dir(recipe.corpus.path, recipe.world)
    resolved = resolve_models(recipe)
    cfg = {"corpus": recipe.section_dict("corpus"), "blocks": recipe.section_dict("blocks"),
           "tokenizers": {name: str(res) for name, res, _ in resolved}}
    inputs = {"corpus": corpus, **{f"tokenizer:{name}": res.location for name, res, _ in resolved}}

    def build(out: Path) -> dict:
        c = recipe.corpus
        domains = c.domains or list_domains(corpus, c.split)

        def docs():
            for domain in domains:
                budget = c.max_bytes_per_domain
                for doc in read_documents(domain_path(corpus, c.split, domain)):
                    size = len(doc.text.encode("utf-8"))
                    if budget is not None and size > budget:
                        break
                    yield domain, doc
                    if budget is not None:
                        budget -= size

        stats = write_blocks(out / "blocks.jsonl",
                             make_blocks(docs(), list(_tokenizers(recipe).values()), recipe.blocks.max_tokens))
        return {**stats, "domains": domains}

    return run_stage(stage_dir(recipe, "blocks"), "blocks", cfg, inputs, build, force=force)


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
    "blocks": blocks_stage,
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
