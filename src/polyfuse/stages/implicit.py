"""The implicit-fusion stages (FuseChat-3.0 / WRPO); :func:`polyfuse.stages.run_recipe` runs the stale ones.

Each stage is one :func:`polyfuse.workspace.run_stage` call (manifest, skipped when current)::

    <workdir>/sample/samples.jsonl     N responses per prompt from every source and the target (resumable)
    <workdir>/score/scored.jsonl       + reward, correct, verdict (content-hash cache <workdir>/cache/scores.sqlite)
    <workdir>/build/{sft,dpo,wrpo}.jsonl, stats.json    the FuseChat-3.0 rules (polyfuse.implicit.build)
    <workdir>/sft/                     target+sft       (TRL SFTTrainer, resumable from checkpoints)
    <workdir>/dpo/                     target+sft+dpo   (TRL DPOTrainer, sigmoid or sigmoid_norm)
    <workdir>/wrpo/                    target+sft+wrpo  (WRPOTrainer)
    <workdir>/accuracy/<row>/          greedy answers to the held-out prompts and their accuracy
    <workdir>/results.json             {"models": {ROW: {"accuracy": {TASK: float, "all": float}}}}

Without a reward model (``score.reward_model: null``) the reward of a response is its verifier's verdict,
1.0 right and 0.0 wrong; then every prompt needs a gold answer or tests, and a DPO pair's reward gap is 1,
so recipes set ``build.reward_windows.math: null`` (the published window assumes a reward model's scores).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError, RecipeError
from polyfuse.evaluate.accuracy import evaluate_accuracy, read_problems
from polyfuse.progress import progress_bar
from polyfuse.recipe.implicit import ImplicitRecipe, SamplingOverrides, TrainingSection
from polyfuse.stages.common import section_config, split_over_ranks
from polyfuse.workspace import (
    Ranks,
    StageResult,
    atomic_write_json,
    atomic_write_text,
    current_ranks,
    run_stage,
)

__all__ = ["accuracy_stage", "build_stage", "dpo_stage", "eval_prompts_path", "prompts_path", "row_models",
           "sample_stage", "score_stage", "sft_stage", "wrpo_stage"]

log = logging.getLogger(__name__)

WORLD_TASKS = "world:tasks"


# --------------------------------------------------------------------------------------------------
# helpers


def _dir(recipe: ImplicitRecipe, *parts: str) -> Path:
    return Path(recipe.workdir).joinpath(*parts)


def _world_tasks(recipe: ImplicitRecipe, name: str) -> Path:
    path = Path(recipe.world) / "tasks" / name
    if not path.is_file():
        raise DataError(f"{path}: no tiny-world tasks here; build them with 'polyfuse demo' (or "
                        "polyfuse.demo.implicit.build_chat_world), or give prompts.path as a JSONL file")
    return path


def prompts_path(recipe: ImplicitRecipe) -> Path:
    """The prompts file: ``prompts.path``, ``world:tasks`` being ``<world>/tasks/train.jsonl``."""
    p = recipe.prompts.path
    return _world_tasks(recipe, "train.jsonl") if p == WORLD_TASKS else Path(p)


def eval_prompts_path(recipe: ImplicitRecipe) -> Path | None:
    """The held-out prompts file (``world:tasks``: ``<world>/tasks/heldout.jsonl``), or ``None``."""
    p = recipe.prompts.eval
    if p is None:
        return None
    return _world_tasks(recipe, "heldout.jsonl") if p == WORLD_TASKS else Path(p)


def _location(recipe: ImplicitRecipe, spec: Any) -> str:
    from polyfuse.models import resolve_model_ref

    return resolve_model_ref(spec.model, world_dir=recipe.world, revision=spec.revision).location


def _params(recipe: ImplicitRecipe, overrides: SamplingOverrides) -> Any:
    from polyfuse.generate import SamplingParams

    s = recipe.sample
    mine = overrides.model_dump(exclude_none=True)
    return SamplingParams(**{k: mine.get(k, getattr(s, k)) for k in
                             ("n", "temperature", "top_p", "repetition_penalty", "max_new_tokens")})


def _samplers(recipe: ImplicitRecipe) -> list[Any]:
    from polyfuse.generate import SourceSpec

    models = [*recipe.sources, *([recipe.target] if recipe.sample.include_target else [])]
    return [SourceSpec(m.name, _location(recipe, m), _params(recipe, m.sample), m.chat_template) for m in models]


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------------
# stages


def sample_stage(recipe: ImplicitRecipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """N responses per prompt from each source (and the target), each with its own parameters and template."""
    from polyfuse.implicit.sample import sample_prompts

    prompts = prompts_path(recipe)
    specs = _samplers(recipe)
    cfg = {"sample": section_config(recipe, "sample", "workers"), "seed": recipe.seed, "max_prompts": recipe.prompts.max_prompts,
           "models": {s.name: {"model": s.model, "params": s.params.to_dict(), "chat_template": s.chat_template}
                      for s in specs}}
    inputs = {"prompts": prompts, **{f"model:{s.name}": s.model for s in specs}}

    def build(out: Path) -> dict[str, Any]:
        rows = read_problems(prompts, recipe.prompts.max_prompts)
        o = recipe.sample
        stats = sample_prompts(rows, specs, out / "samples.jsonl", backend=o.backend, batch_size=o.batch_size,
                               seed=recipe.seed, device=o.device, dtype=o.dtype, progress=progress,
                               ranks=current_ranks(), workers=o.workers)
        return {**stats, "prompts": len(rows)}

    # collective: under several processes each rank samples its share of the batches
    return run_stage(_dir(recipe, "sample"), "sample", cfg, inputs, build, force=force, resumable=True,
                     collective=True)


def _verifier_rewards(rows: list[dict[str, Any]]) -> None:
    """Reward = verdict (1.0 right, 0.0 wrong) in place; rows without a verifier are an error."""
    unverified = [r for r in rows if r.get("correct") is None]
    if unverified:
        raise DataError(f"score.reward_model is null but {len(unverified)} responses have no verifier (e.g. "
                        f"prompt_id {unverified[0]['prompt_id']!r}: no answer or tests); set score.reward_model "
                        "to a sequence-classification checkpoint or give every prompt an answer or tests")
    for row in rows:
        row["reward"] = 1.0 if row["correct"] else 0.0


def score_stage(recipe: ImplicitRecipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Reward (reward model, or the verdict) and correctness (maths answers, sandboxed code tests)."""
    from polyfuse.implicit.score import RewardModel, ScoreCache, read_samples, score_samples
    from polyfuse.verify.registry import read_prompts

    o = recipe.score
    samples = _dir(recipe, "sample") / "samples.jsonl"
    prompts = prompts_path(recipe)
    cfg = {"score": recipe.section_dict("score")}
    inputs = {"sample": samples, "prompts": prompts,
              **({"model:reward": _location(recipe, _Ref(o.reward_model))} if o.reward_model else {})}

    def build(out: Path) -> dict[str, Any]:
        reward = None
        if o.reward_model:
            reward = RewardModel.load(o.reward_model, device=o.device, dtype=o.dtype, max_length=o.max_length,
                                      label=o.label, batch_size=o.batch_size, world_dir=recipe.world)
        cache_file = _dir(recipe, "cache", "scores.sqlite")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with ScoreCache(cache_file) as cache:
            rows, stats = score_samples(read_samples(samples), reward_model=reward, cache=cache,
                                        prompts=read_prompts(prompts), workers=o.workers, progress=progress)
        if reward is None:
            _verifier_rewards(rows)
        _write_jsonl(out / "scored.jsonl", rows)
        atomic_write_json(out / "stats.json", stats.to_dict())
        return {**stats.to_dict(), "reward": "model" if reward else "verifier"}

    return run_stage(_dir(recipe, "score"), "score", cfg, inputs, build, force=force, resumable=True)


class _Ref:
    """A bare model reference (for resolving the reward model like a model entry)."""

    def __init__(self, model: str):
        self.model, self.revision = model, None


def build_stage(recipe: ImplicitRecipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """SFT, DPO and WRPO data by the FuseChat-3.0 rules, with the per-category statistics table."""
    from polyfuse.implicit.build import BuildConfig, build_datasets, format_stats, read_scored, write_build

    b = recipe.build
    target = recipe.target.name if recipe.sample.include_target else None
    cfg = {"build": recipe.section_dict("build"), "seed": recipe.seed, "target": target}
    scored = _dir(recipe, "score") / "scored.jsonl"

    def build(out: Path) -> dict[str, Any]:
        config = BuildConfig(split=(b.split[0], b.split[1]), seed=recipe.seed, pairs_per_prompt=b.pairs_per_prompt,
                             reward_windows={k: (tuple(v) if v is not None else None)
                                             for k, v in b.reward_windows.items()}, target=target)
        result = build_datasets(read_scored(scored), config)
        write_build(result, out)
        log.info("build: kept and dropped, per category\n%s", format_stats(result.stats))
        return {"sft": len(result.sft), "dpo": len(result.dpo), "wrpo": len(result.wrpo),
                "stats": result.stats["total"]}

    return run_stage(_dir(recipe, "build"), "build", cfg, {"score": scored}, build, force=force)


def _train(recipe: ImplicitRecipe, stage: str, section: TrainingSection, base: str, data: Path,
           extra_cfg: Mapping[str, Any], inputs: Mapping[str, Any], *, force: bool, progress: bool) -> StageResult:
    from polyfuse.implicit import train

    configs = {"sft": train.SFTTrainConfig, "dpo": train.DPOTrainConfig, "wrpo": train.WRPOTrainConfig}
    kwargs = {**section.trainer_kwargs(), **extra_cfg, "seed": recipe.seed, "chat_template": recipe.target.chat_template,
              "extra": {"disable_tqdm": not progress}}
    cfg = {stage: recipe.section_dict(stage), "seed": recipe.seed, "chat_template": recipe.target.chat_template}
    held = eval_prompts_path(recipe) if recipe.curves.points else None
    if held is not None:
        cfg["curves"] = {**recipe.section_dict("curves"), "max_new_tokens": recipe.accuracy.max_new_tokens,
                         "max_eval_prompts": recipe.prompts.max_eval_prompts}
        inputs = {**inputs, "eval": held}

    def build(out: Path) -> dict[str, Any]:
        callbacks = []
        if held is not None:
            from polyfuse.implicit.curves import AccuracyCurve, sample_per_task

            problems = sample_per_task(read_problems(held, recipe.prompts.max_eval_prompts), recipe.curves.per_task)
            callbacks.append(AccuracyCurve(problems, out, stage=stage, points=recipe.curves.points,
                                           batch_size=recipe.accuracy.batch_size,
                                           max_new_tokens=recipe.accuracy.max_new_tokens))
        summary = train.stage_runner(stage)(base, data, out, configs[stage](**kwargs), callbacks=callbacks)
        return {k: summary[k] for k in ("global_step", "train_loss", "losses", "seconds", "resumed_from")}

    # collective: under several processes every rank trains its share of each batch (DDP / FSDP / DeepSpeed)
    return run_stage(_dir(recipe, stage), stage, cfg, {**inputs, "data": data}, build, force=force, resumable=True,
                     collective=True)


def sft_stage(recipe: ImplicitRecipe, *, force: bool = False, progress: bool = True) -> StageResult | dict:
    """Fine-tune the target on the best responses (``target+sft``)."""
    if not recipe.sft.enabled:
        return {}
    base = _location(recipe, recipe.target)
    return _train(recipe, "sft", recipe.sft, base, _dir(recipe, "build") / "sft.jsonl", {},
                  {"model:target": base}, force=force, progress=progress)


def _from_sft(recipe: ImplicitRecipe) -> tuple[str, dict[str, Any]]:
    """The model a preference stage starts from (the SFT model, or the target when sft is disabled) and its input."""
    if not recipe.sft.enabled:
        base = _location(recipe, recipe.target)
        return base, {"model:target": base}
    sft = _dir(recipe, "sft")
    return str(sft.resolve()), {"sft": sft}


def dpo_stage(recipe: ImplicitRecipe, *, force: bool = False, progress: bool = True) -> StageResult | dict:
    """DPO (or length-normalised DPO) of the SFT model on same-source pairs (``target+sft+dpo``)."""
    if not recipe.dpo.enabled:
        return {}
    base, inputs = _from_sft(recipe)
    extra = {"loss": recipe.dpo.loss, "beta": recipe.dpo.beta, "sft_weight": recipe.dpo.sft_weight}
    return _train(recipe, "dpo", recipe.dpo, base, _dir(recipe, "build") / "dpo.jsonl", extra, inputs,
                  force=force, progress=progress)


def wrpo_stage(recipe: ImplicitRecipe, *, force: bool = False, progress: bool = True) -> StageResult | dict:
    """WRPO of the SFT model: chosen = [source answer, target answer] (``target+sft+wrpo``)."""
    if not recipe.wrpo.enabled:
        return {}
    if not recipe.sample.include_target:
        raise RecipeError("wrpo needs the target's own samples; set sample.include_target=true or wrpo.enabled=false")
    base, inputs = _from_sft(recipe)
    w = recipe.wrpo
    extra = {"alpha_max": w.alpha_max, "beta": w.beta, "alpha_schedule": w.alpha_schedule,
             "length_normalize": w.length_normalize, "sft_weight": w.sft_weight}
    return _train(recipe, "wrpo", w, base, _dir(recipe, "build") / "wrpo.jsonl", extra, inputs,
                  force=force, progress=progress)


def row_models(recipe: ImplicitRecipe) -> dict[str, tuple[str, str | None]]:
    """Row name -> (model location, chat template) for every model the accuracy stage evaluates: the sources
    (when ``accuracy.include_sources``), the target, and each finished training stage's model."""
    t = recipe.target
    rows: dict[str, tuple[str, str | None]] = {}
    if recipe.accuracy.include_sources:
        rows.update({s.name: (_location(recipe, s), s.chat_template) for s in recipe.sources})
    rows[t.name] = (_location(recipe, t), t.chat_template)
    trained = {"sft": f"{t.name}+sft", "dpo": f"{t.name}+sft+dpo", "wrpo": f"{t.name}+sft+wrpo"}
    for stage, row in trained.items():
        if getattr(recipe, stage).enabled and (_dir(recipe, stage) / "manifest.json").is_file():
            rows[row] = (str(_dir(recipe, stage).resolve()), t.chat_template)
    return rows


def accuracy_stage(recipe: ImplicitRecipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Held-out accuracy of every row, each its own stage (``accuracy/<row>``), merged into ``results.json``;
    under several processes each rank evaluates its share of the rows."""
    from polyfuse.evaluate.results import update_results

    held = eval_prompts_path(recipe)
    if held is None:
        return {}
    o = recipe.accuracy
    rows: list[dict[str, Any]] | None = None
    models = list(row_models(recipe).items())
    with progress_bar("accuracy", len(models[current_ranks().rank::current_ranks().world_size]), progress) as advance:

        def run(item: tuple[str, tuple[str, str | None]], ranks: Ranks) -> StageResult:
            row, (location, template) = item
            cfg = {"accuracy": recipe.section_dict("accuracy"), "model": location, "chat_template": template,
                   "max_eval_prompts": recipe.prompts.max_eval_prompts}

            def build(out: Path) -> dict[str, Any]:
                nonlocal rows
                rows = rows if rows is not None else read_problems(held, recipe.prompts.max_eval_prompts)
                acc, records = evaluate_accuracy(location, rows, batch_size=o.batch_size, max_new_tokens=o.max_new_tokens,
                                                 device=o.device, dtype=o.dtype, chat_template=template, progress=False)
                _write_jsonl(out / "responses.jsonl", records)
                return {"accuracy": acc, "prompts": len(records)}

            res = run_stage(_dir(recipe, "accuracy", row), "accuracy", cfg, {"eval": held, "model": location}, build,
                            force=force, ranks=ranks)
            advance(model=row)  # one bar, a step per model
            return res

        results = dict(zip([m[0] for m in models], split_over_ranks(models, run, "accuracy"), strict=True))
    if current_ranks().main:
        for row, res in results.items():
            update_results(_dir(recipe, "results.json"), {row: {"accuracy": res.manifest.outputs["accuracy"]}},
                           meta={"target": recipe.target.name,
                                 "accuracy": {"prompts": str(held), "decoding": "greedy",
                                              "n_prompts": res.manifest.outputs["prompts"]}})
    return results
