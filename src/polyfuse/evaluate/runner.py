"""Bits per byte for named model references: what ``polyfuse eval`` and the recipe's eval stage call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polyfuse.errors import RecipeError
from polyfuse.models import data_dir, lazy_loaders, resolve_all


def parse_model_args(items: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=REF`` or ``REF`` → ``(name, ref)``; a bare ref is named after its last path part."""
    pairs = []
    for item in items:
        name, sep, ref = item.partition("=")
        if not sep:
            ref = item
            name = item.removeprefix("world:").rstrip("/").split("/")[-1].split("@")[0]
        if not name or not ref:
            raise RecipeError(f"model argument {item!r}: write NAME=REF or REF, e.g. prose=world:prose")
        pairs.append((name, ref))
    names = [n for n, _ in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"model name {', '.join(dupes)} given twice; name them explicitly as NAME=REF")
    return pairs


def evaluate_refs(models: Sequence[str], *, recipe: str | Path | None = None, data: str = "world:corpus",
                  split: str = "heldout", world_dir: str | Path = "runs/world", batch_size: int = 8,
                  max_length: int = 512, stride: int | None = None, max_bytes: int | None = None,
                  device: str = "auto", dtype: str = "auto", progress: bool = True) -> dict:
    """Bits per byte per domain of ``models`` (or of a recipe's target and sources)."""
    from polyfuse.evaluate.bpb import evaluate_bpb, load_domain_texts

    if recipe is not None:
        from polyfuse.recipe import load_recipe

        r = load_recipe(recipe)
        specs = [(s.name, s.ref.model, s.ref.revision, s.tokenizer) for s in r.models()]
        world_dir, data, split = r.world, r.data.eval, r.data.split
        batch_size, max_length, stride = r.eval.batch_size, r.eval.max_length, r.eval.effective_stride
        max_bytes, device, dtype = r.eval.max_bytes_per_domain, r.eval.device, r.eval.dtype
    else:
        if not models:
            raise RecipeError("no models to evaluate: give model references (e.g. world:target) or --recipe")
        specs = [(name, ref, None, None) for name, ref in parse_model_args(models)]
    entries = lazy_loaders(resolve_all(specs, world_dir=world_dir), dtype=dtype, device=device)
    texts = load_domain_texts(data_dir(data, world_dir), split, None, max_bytes)
    return evaluate_bpb(entries, texts, batch_size=batch_size, max_length=max_length,
                        stride=stride, progress=progress)


def evaluate_task_refs(models: Sequence[str], *, world_dir: str | Path = "runs/world",
                       prompts: str | Path | None = None, lm_eval_tasks: Sequence[str] | None = None,
                       include_path: str | Path | None = None, limit: float | None = None,
                       num_fewshot: int | None = None, batch_size: int = 8, max_new_tokens: int = 256,
                       device: str = "auto", dtype: str = "auto", run_dir: str | Path | None = None,
                       progress: bool = True) -> dict[str, dict[str, Any]]:
    """Task accuracy of ``models`` on a verifiable prompt set (``prompts``) or on lm-eval tasks.

    Returns ``{name: {"accuracy": {task: float, ...}}}`` (lm-eval rows also carry ``tasks``: every metric
    the harness reported); with ``run_dir`` the figures are merged into its ``results.json``. Every model
    reference and the prompt file are checked before any model is loaded.
    """
    from polyfuse.evaluate.results import RESULTS_NAME, update_results

    if not models:
        raise RecipeError("no models to evaluate: give model references (e.g. world:target)")
    resolved = resolve_all([(n, r, None, None) for n, r in parse_model_args(models)], world_dir=world_dir)
    results: dict[str, dict[str, Any]] = {}
    if prompts is not None:
        from polyfuse.evaluate.accuracy import evaluate_accuracy, read_problems

        problems = read_problems(prompts)
        for name, res, _ in resolved:
            acc, _records = evaluate_accuracy(str(res), problems, batch_size=batch_size,
                                              max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                                              progress=progress)
            results[name] = {"accuracy": acc}
            if run_dir is not None:
                update_results(Path(run_dir) / RESULTS_NAME, {name: results[name]},
                               meta={"accuracy": {"prompts": str(prompts), "decoding": "greedy",
                                                  "n_prompts": len(problems)}})
        return results
    if not lm_eval_tasks:
        raise RecipeError("nothing to evaluate: give --prompts FILE or --lm-eval TASK")
    from polyfuse.evaluate.lm_eval_bridge import record_scores, run_lm_eval

    for name, res, _ in resolved:
        scores = run_lm_eval(str(res), lm_eval_tasks, include_path=include_path, limit=limit,
                             num_fewshot=num_fewshot, batch_size=batch_size,
                             device=None if device == "auto" else device, dtype=dtype)
        results[name] = {"accuracy": scores.accuracy, "tasks": scores.metrics}
        if run_dir is not None:
            record_scores(run_dir, name, scores)
    return results
