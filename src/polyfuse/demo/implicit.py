"""The implicit-fusion demo (FuseChat-3.0 / WRPO) on the tiny world: chat-tuned sources whose skills differ.

:func:`build_chat_world` adds to a built tiny world (:func:`polyfuse.demo.world.build_world`)::

    <world>/tasks/train.jsonl        prompts for the implicit pipeline (train split of polyfuse.demo.tasks)
    <world>/tasks/heldout.jsonl      held-out prompts for the accuracy stage (disjoint by construction)
    <world>/tasks/sft/<model>.jsonl  each chat model's own SFT rows (train split, none of the pipeline prompts)
    <world>/models/chat-<model>/     the world's model after run_sft on its rows (default chat template)
    <world>/chat.json                skills, paths and held-out accuracies

Each source is SFT'd mostly (``own_share``) on one task -- :data:`SKILLS`: prose -> ``first``, code ->
``last``, math -> ``max`` -- and a little on the others (so it answers in the format but is wrong there);
the target gets fewer steps spread evenly over the tasks, so it is weaker everywhere. Every part is a stage
with a manifest (``polyfuse.workspace.run_stage``): a rerun reuses what is current.

:func:`run_implicit_demo` builds the world and the chat world, then runs the packaged ``implicit.yaml``
recipe: sample, score (verifiers), build, sft, dpo, wrpo and the accuracy table in ``results.json``.
"""

from __future__ import annotations

import json
import logging
import random
import time
import zlib
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from polyfuse.demo.tasks import TASKS_VERSION, generate_problems, write_problems
from polyfuse.demo.threads import FAMILY_THREADS, fixed_threads
from polyfuse.workspace import atomic_write_json, hash_path, run_stage

__all__ = ["CHAT_PRESETS", "SKILLS", "TRANSFER_SHARE", "ChatWorldPreset", "build_chat_world", "chat_world_checks",
           "implicit_recipe_path", "run_implicit_demo", "transfer_checks"]

log = logging.getLogger(__name__)

#: Which task each world source is tuned on (the target gets all of them, less).
SKILLS: dict[str, str] = {"prose": "first", "code": "last", "math": "count"}
TARGET = "target"


@dataclass(frozen=True)
class ChatWorldPreset:
    """How the chat models are tuned (``steps`` are optimizer steps; one epoch of ``steps * batch_size`` rows)."""

    source_steps: int
    target_steps: int
    batch_size: int
    learning_rate: float
    own_share: float
    prompts_per_task: int
    heldout_per_task: int
    warmup_ratio: float = 0.05
    lr_scheduler_type: str = "constant_with_warmup"


CHAT_PRESETS: dict[str, ChatWorldPreset] = {
    # About a minute per source on 2 free cores.
    "demo": ChatWorldPreset(source_steps=160, target_steps=80, batch_size=16, learning_rate=6e-4, own_share=0.8,
                            prompts_per_task=600, heldout_per_task=100),
    # Seconds: the test world's models are tiny.
    "test": ChatWorldPreset(source_steps=120, target_steps=60, batch_size=8, learning_rate=3e-3, own_share=0.8,
                            prompts_per_task=8, heldout_per_task=8),
}


def implicit_recipe_path() -> Path:
    """The packaged implicit-fusion recipe for the tiny world."""
    return Path(str(files("polyfuse.demo") / "recipes" / "implicit.yaml"))


def _sft_rows(model: str, preset: ChatWorldPreset, seed: int) -> list[dict[str, Any]]:
    """One epoch of SFT rows: a source's own task ``own_share`` of them, the rest shared by the other tasks."""
    tasks = list(SKILLS.values())
    steps = preset.target_steps if model == TARGET else preset.source_steps
    total = steps * preset.batch_size
    if model == TARGET:
        counts = {t: total // len(tasks) + (i < total % len(tasks)) for i, t in enumerate(tasks)}
    else:
        own = SKILLS[model]
        others = [t for t in tasks if t != own]
        rest = total - round(total * preset.own_share)
        counts = {own: total - rest, **{t: rest // len(others) + (i < rest % len(others)) for i, t in enumerate(others)}}
    model_seed = zlib.crc32(f"sft:{model}:{seed}".encode())
    rows = [r for t, n in counts.items() if n for r in generate_problems(t, n, "train", seed=model_seed)]
    random.Random(model_seed).shuffle(rows)
    return [{"messages": [*r["prompt"], {"role": "assistant", "content": r["response"]}], "task": r["task"],
             "key": r["key"]} for r in rows]


def _build_tasks(out: Path, preset: ChatWorldPreset, seed: int, models: list[str]) -> dict[str, Any]:
    """Each model's SFT rows, then the pipeline's prompts (none of those rows) and the held-out prompts."""
    tasks = list(SKILLS.values())
    used: set[str] = set()
    sizes = {}
    for model in models:
        rows = _sft_rows(model, preset, seed)
        write_problems(out / "sft" / f"{model}.jsonl", rows)
        used.update(r["key"] for r in rows)
        sizes[model] = len(rows)
    train = [r for t in tasks for r in generate_problems(t, preset.prompts_per_task, "train", seed, exclude=used)]
    held = [r for t in tasks for r in generate_problems(t, preset.heldout_per_task, "heldout", seed)]
    write_problems(out / "train.jsonl", train)
    write_problems(out / "heldout.jsonl", held)
    return {"train": len(train), "heldout": len(held), "sft_rows": sizes, "tasks": tasks}


def _tune(out: Path, base: Path, data: Path, steps: int, preset: ChatWorldPreset, seed: int,
          progress: bool) -> dict[str, Any]:
    from polyfuse.implicit.train import SFTTrainConfig, run_sft

    cfg = SFTTrainConfig(learning_rate=preset.learning_rate, max_steps=steps, per_device_train_batch_size=preset.batch_size,
                         warmup_ratio=preset.warmup_ratio, lr_scheduler_type=preset.lr_scheduler_type,
                         max_length=64, seed=seed, logging_steps=max(1, steps // 8),
                         save_steps=max(10, steps // 2), extra={"disable_tqdm": not progress})
    with fixed_threads(FAMILY_THREADS):
        summary = run_sft(str(base), data, out, cfg)
    return {k: summary[k] for k in ("global_step", "train_loss", "losses", "seconds")}


def build_chat_world(world_dir: str | Path, *, preset: str = "demo", seed: int = 0, force: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Add the task files and the chat-tuned models to a built world; returns the ``chat.json`` summary."""
    from polyfuse.demo.world import load_world

    if preset not in CHAT_PRESETS:
        raise ValueError(f"unknown chat world preset {preset!r}; choose one of {', '.join(CHAT_PRESETS)}")
    world = Path(world_dir)
    info = load_world(world)
    spec = CHAT_PRESETS[preset]
    models = [*SKILLS, TARGET]
    missing = [m for m in models if m not in info["models"]]
    if missing:
        from polyfuse.errors import DataError

        raise DataError(f"{world}/world.json has no model {missing[0]!r}; rebuild the world with 'polyfuse world'")
    tasks = run_stage(world / "tasks", "world.tasks", {"preset": asdict(spec), "seed": seed,
                                                      "skills": SKILLS, "tasks_version": TASKS_VERSION},
                      {}, lambda out: _build_tasks(out, spec, seed, models), force=force)
    summary: dict[str, Any] = {"preset": preset, "seed": seed, "skills": SKILLS, "tasks": str(world / "tasks"),
                               "models": {}}
    for model in models:
        steps = spec.target_steps if model == TARGET else spec.source_steps
        base = world / "models" / model
        data = world / "tasks" / "sft" / f"{model}.jsonl"
        cfg = {"seed": seed, "steps": steps, "base": model, "batch_size": spec.batch_size,
               "learning_rate": spec.learning_rate, "warmup_ratio": spec.warmup_ratio,
               "lr_scheduler_type": spec.lr_scheduler_type, "threads": FAMILY_THREADS}
        res = run_stage(world / "models" / f"chat-{model}", "world.chat_model", cfg,
                        {"base": base, "data": data},
                        lambda out, base=base, data=data, steps=steps: _tune(out, base, data, steps, spec, seed,
                                                                             progress),
                        force=force, resumable=True)
        summary["models"][model] = {"path": str(res.path), "skill": SKILLS.get(model, "all"),
                                    "steps": steps, "seconds": res.manifest.outputs.get("seconds")}
    summary["tasks_hash"] = hash_path(world / "tasks")
    summary["task_stats"] = tasks.manifest.outputs
    atomic_write_json(world / "chat.json", summary)
    return summary


def chat_world_checks(accuracy: dict[str, dict[str, float]], target: str = TARGET) -> list[tuple[str, bool]]:
    """Is the chat world a meaningful test bed? Each source best on its task; the target behind on each.

    ``accuracy`` maps a model row name (``prose``, ``code``, ``math``, ``target``) to ``{task: accuracy}``.
    """
    checks = []
    for source, task in SKILLS.items():
        if source not in accuracy:
            continue
        others = [n for n in accuracy if n != source and task in accuracy[n] and "+" not in n]
        best = all(accuracy[source].get(task, 0) > accuracy[n][task] for n in others)
        checks.append((f"source {source} is the most accurate on {task}", best))
        if target in accuracy:
            checks.append((f"{target} is behind {source} on {task}",
                           accuracy[target].get(task, 0) < accuracy[source].get(task, 0)))
    return checks


#: The share of the best source's accuracy a fused row must reach on every task.
TRANSFER_SHARE = 0.8


def transfer_checks(results: dict[str, Any], target: str = TARGET) -> list[tuple[str, bool]]:
    """Did implicit fusion move every source's strength into the target? For the DPO and WRPO rows: more
    accurate than the target, at least :data:`TRANSFER_SHARE` of the best source on every task, and more
    accurate overall than every single source."""
    from polyfuse.evaluate.results import best_source_share, source_rows

    acc = {name: row["accuracy"] for name, row in results["models"].items() if "accuracy" in row}
    sources = [n for n in source_rows(results) if n in acc]
    checks = []
    for row in (f"{target}+sft+dpo", f"{target}+sft+wrpo"):
        if row not in acc or target not in acc:
            continue
        checks.append((f"{row} is more accurate than {target} on held-out prompts",
                       acc[row]["all"] > acc[target]["all"]))
        share = best_source_share(results, row)
        checks.append((f"{row} reaches {TRANSFER_SHARE:.0%} of the best source on every task ("
                       + ", ".join(f"{t} {v:.0%}" for t, v in share.items()) + ")",
                       bool(share) and min(share.values()) >= TRANSFER_SHARE))
        if sources:
            checks.append((f"{row} is more accurate overall than every source",
                           all(acc[row]["all"] > acc[s]["all"] for s in sources)))
    return checks


def run_implicit_demo(out_dir: str | Path = "runs/demo", world_dir: str | Path = "runs/world", seed: int = 0,
                      preset: str = "demo", *, budget: float = 1.0, overrides: list[str] | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the world and the chat world, run ``implicit.yaml`` into ``out_dir``; returns results.

    The returned dict is ``results.json`` plus ``implicit_checks``: ``(text, ok)`` pairs saying whether each
    source leads on its task and whether the DPO and WRPO rows took every source's strength
    (:func:`transfer_checks`).
    """
    from polyfuse.demo.world import build_world
    from polyfuse.evaluate.results import read_results
    from polyfuse.recipe import ImplicitRecipe, load_recipe
    from polyfuse.stages import run_recipe

    started = time.perf_counter()
    build_world(world_dir, preset=preset, seed=seed, budget=budget)
    extra = [] if preset == "demo" else _test_overrides()
    recipe = load_recipe(implicit_recipe_path(), [f"workdir={out_dir}", f"world={world_dir}",
                                                  f"seed={seed}", *extra, *(overrides or [])])
    if not isinstance(recipe, ImplicitRecipe):
        raise TypeError(f"{implicit_recipe_path()} is not an implicit recipe")
    with fixed_threads(FAMILY_THREADS):  # the same figures side by side or alone (threads.FAMILY_THREADS)
        build_chat_world(world_dir, preset=preset, seed=seed, progress=progress)
        run_recipe(recipe, progress=progress)
    results = read_results(Path(out_dir) / "results.json")
    acc = {name: row["accuracy"] for name, row in results["models"].items() if "accuracy" in row}
    checks = chat_world_checks(acc, recipe.target.name) + transfer_checks(results, recipe.target.name)
    results["implicit_checks"] = checks
    results["implicit_seconds"] = round(time.perf_counter() - started, 1)
    log.debug("implicit demo: %s", json.dumps(checks))
    return results


def _test_overrides() -> list[str]:
    """Smaller settings for the test world (seconds, not minutes)."""
    # n = 4: the test world has 8 prompts per task, too few with 2 responses each to leave WRPO any rows
    return ["sample.n=4", "sample.max_new_tokens=8", "sft.max_steps=8", "dpo.max_steps=4", "wrpo.max_steps=4"]
