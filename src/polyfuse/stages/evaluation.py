"""Bits per byte of every model of an explicit recipe (world models, trained and merged targets)."""

from __future__ import annotations

from pathlib import Path

from polyfuse.recipe import Recipe
from polyfuse.stages.common import resolve_models, split_over_ranks, stage_dir
from polyfuse.workspace import Ranks, StageResult, atomic_write_json, current_ranks, run_stage


def trained_rows(recipe: Recipe) -> dict[str, Path]:
    """Row name -> model directory for every finished training or merge of the target.

    ``target+clm``, ``target+fused`` (FuseLLM), ``target+pair:SOURCE`` and ``target+fusechat``
    (FuseChat), ``target+online`` (on-policy fusion's last round), each present once its stage has a manifest.
    """
    from polyfuse.stages.online import final_online_dir

    name = recipe.target.name
    candidates = {f"{name}+clm": stage_dir(recipe, "train", "clm"),
                  f"{name}+fused": stage_dir(recipe, "train", "fused"),
                  **{f"{name}+pair:{s.name}": stage_dir(recipe, "pairs", s.name, "train") for s in recipe.sources},
                  f"{name}+online": final_online_dir(recipe)}
    rows = {row: path for row, path in candidates.items() if (path / "manifest.json").is_file()}
    if (stage_dir(recipe, "merge") / "manifest.json").is_file():
        rows[f"{name}+fusechat"] = stage_dir(recipe, "merge", "model")
    return rows


def eval_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Bits per byte of every model (sources, target, trained targets) per held-out domain.

    Each model is its own stage (``eval/<name>``), so adding a trained model evaluates only it; under several
    processes each rank evaluates its share of the models. Rows go into ``<workdir>/results.json`` (rank 0).
    """
    from polyfuse.evaluate.bpb import evaluate_bpb, load_domain_texts
    from polyfuse.evaluate.results import update_results
    from polyfuse.models import data_dir, lazy_loaders, resolve_all

    opts = recipe.eval
    models = resolve_models(recipe)
    for row, path in trained_rows(recipe).items():
        models += resolve_all([(row, str(path.resolve()), None, None)], world_dir=recipe.world)
    corpus = data_dir(recipe.data.eval, recipe.world)
    texts: dict | None = None

    def run(entry: tuple, ranks: Ranks) -> StageResult:
        name, res, _ = entry
        cfg = {"data": recipe.section_dict("data"), "eval": recipe.section_dict("eval"), "model": str(res)}

        def build(out: Path) -> dict:
            nonlocal texts
            if texts is None:
                texts = load_domain_texts(corpus, recipe.data.split, recipe.data.domains, opts.max_bytes_per_domain)
            result = evaluate_bpb(lazy_loaders([entry], dtype=opts.dtype, device=opts.device), texts,
                                  batch_size=opts.batch_size, max_length=opts.max_length,
                                  stride=opts.effective_stride, progress=progress)[name]
            atomic_write_json(out / "bpb.json", result)
            return {"bpb": result["bpb"]}

        return run_stage(stage_dir(recipe, "eval", name), "eval", cfg, {"data": corpus, "model": res.location}, build,
                         force=force, ranks=ranks)

    # under several processes each model is evaluated by one rank (model i on rank i % N)
    results = dict(zip([m[0] for m in models], split_over_ranks(models, run, "eval"), strict=True))
    if current_ranks().main:
        for name, res_stage in results.items():
            update_results(Path(recipe.workdir) / "results.json", {name: {"bpb": res_stage.manifest.outputs["bpb"]}},
                           meta={"bpb": {"split": recipe.data.split, **recipe.section_dict("eval")}})
    return results
