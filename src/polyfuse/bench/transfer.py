"""The ``transfer`` bench suite: how much of the teachers' knowledge reaches the target, with controls.

On the tiny world (with its two oracle teachers, ``polyfuse world --oracles``), every run below
continually trains the target on the same blocks for the same steps and evaluates bits per byte
on the held-out set:

================  =================================================================================
run               teachers and loss
================  =================================================================================
clm               none: plain causal LM (the baseline every fused run is compared with)
default           the packaged ``tiny.yaml`` (its projection, ``w`` and strategy), with a sampled tail
                  (``capture.samples`` = :data:`SAMPLES`, as every run here)
distill           the same with ``w = 0``: distillation alone
PROJ / PROJ-w0    the three sources through each projection (:data:`PROJECTIONS`), default ``w`` and 0
self              ``w = 0``, the only teacher is the starting target itself (self-distillation)
oracle            ``w = 0``, the only teacher is ``world:oracle`` (the target's own tokenizer); in these
                  single-teacher runs the target is no teacher and the positions the teacher does
                  not reach keep the target's own distribution (``fuse.fallback=target``)
twin              ``w = 0``, the only teacher is ``world:oracle-twin`` (same training, other tokenizer)
distill-label,    as ``distill`` and ``twin``, with ``fuse.fallback=label``: the positions no source
twin-label        reaches learn the next token (FuseLLM's one-hot fallback; not pure distillation)
specialists       the default recipe with each source replaced by ``world:oracle-<source>``, a
                  specialist with the same data and steps and the *target's* tokenizer (its own
                  ``clm`` row is ``specialists-clm``; its blocks are cut for one tokenizer)
================  =================================================================================

Headline keys (``--json``):

=====================================  ==========================================================
key                                    definition
=====================================  ==========================================================
gap_closed_min                         ``default``: the smallest, over domains, of (bpb clm - bpb
                                       fused) / (bpb clm - bpb of the best source); goal >= 0.20
oracle_gap_closed_min                  the same for ``specialists``: what fusion closes when nothing
                                       is lost across tokenizers
gap_closed_share_of_oracle             the smallest, over domains, of ``default``'s gap closed /
                                       ``specialists``' gap closed; goal >= 0.5 where the
                                       specialists close less than 0.20
distill_only_over_clm                  bpb ``distill`` / bpb ``clm`` on ``all``; goal <= 1.02
same_tokenizer_distill_over_teacher    bpb ``oracle`` / bpb of ``world:oracle`` itself on ``all``;
                                       goal <= 1.02
oracle_retention                       (bpb target - bpb ``twin``) / (bpb target - bpb ``oracle``)
                                       on ``all``: what crossing tokenizers keeps; goal >= 0.75
=====================================  ==========================================================

plus ``bpb.RUN.DOMAIN`` for every run and domain. Runs that share their teachers share one work
directory, so blocks and captures are computed once; each run's figures are read as soon as it
is evaluated. The world is ``WORKDIR/transfer/world``: built there (demo preset, seed 0) unless a
world is already there (a link to one built with ``polyfuse world --seed S`` measures seed S; the
oracles are added to it). ``--quick`` uses the test world and 20 steps (a smoke run, not a measurement);
``--run NAME`` (repeatable) measures only the named runs (:data:`RUNS`), and only the keys whose runs
were measured are reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from polyfuse.bench import Figure
from polyfuse.demo.world import SPECIALIST_PREFIX

__all__ = ["PROJECTIONS", "RUNS", "run"]

logger = logging.getLogger(__name__)

PROJECTIONS = {
    "mined": ["vocab.method=mined", "align.method=offsets", "align.inside=false", "align.cuts=false"],
    "prefix": ["vocab.method=prefix", "align.method=offsets", "align.inside=false", "align.cuts=false"],
    "groups": ["vocab.method=groups", "align.method=starts", "align.inside=false", "align.cuts=false"],
    "context": ["vocab.method=groups", "align.method=starts", "align.inside=true", "align.cuts=true"],
}
"""The projections compared: name -> recipe overrides. FuseLLM's MinED map on one-to-one tokens is the
reference; ``context`` adds the positions inside source tokens and the target's cuts (the default)."""
SAMPLES = 54
"""``capture.samples`` of every run: the top-10 plus a sampled tail (the whole distribution, unbiased)."""


def _base() -> dict[str, Any]:
    import yaml

    text = resources.files("polyfuse.demo.recipes").joinpath("tiny.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _run(data: dict[str, Any], overrides: Sequence[str], rows: Sequence[str]) -> dict[str, dict[str, float]]:
    """Run a recipe (every stale stage) and return the bits per byte of ``rows`` (name -> domain -> bpb)."""
    from polyfuse.recipe import parse_recipe
    from polyfuse.stages import run_recipe

    recipe = parse_recipe(data, overrides, source="bench transfer")
    run_recipe(recipe, progress=False)
    out = {}
    for row in rows:
        path = Path(recipe.workdir) / "eval" / row / "bpb.json"
        out[row] = json.loads(path.read_text())["bpb"]
    return out


def _single_teacher(base: dict[str, Any], model: str, workdir: Path) -> dict[str, Any]:
    """The base recipe with one source, ``teacher`` (the target is not a teacher, no CLM baseline)."""
    data = {**base, "workdir": str(workdir), "sources": [{"name": "teacher", "model": model}]}
    data["fuse"] = {**data.get("fuse", {}), "include_target": False}
    data["train"] = {**data.get("train", {}), "baseline": False}
    return data


def _plan(base: dict[str, Any], workdir: Path) -> list[tuple[str, dict[str, Any], list[str], dict[str, str]]]:
    """Every run of the module docstring, in order: (name, recipe data, overrides, eval row -> figure name)."""
    sources = {**base, "workdir": str(workdir / "sources")}
    plan = [("default", sources, [], {"target": "target", "target+clm": "clm", "target+fused": "default",
                                      **{s["name"]: s["name"] for s in base["sources"]}}),
            ("distill", sources, ["train.lm_loss_weight=0"], {"target+fused": "distill"}),
            ("distill-label", sources, ["train.lm_loss_weight=0", "fuse.fallback=label"],
             {"target+fused": "distill-label"})]
    default_w = float(base.get("train", {}).get("lm_loss_weight", 0.9))
    for method, overrides in PROJECTIONS.items():
        for w in (default_w, 0.0):
            name = method if w == default_w else f"{method}-w0"
            plan.append((name, sources, [*overrides, f"train.lm_loss_weight={w}"], {"target+fused": name}))
    specialists = {**base, "workdir": str(workdir / "specialists"),
                   "sources": [{**s, "model": f"world:{SPECIALIST_PREFIX}{s['name']}"} for s in base["sources"]]}
    plan.append(("specialists", specialists, [], {"target+clm": "specialists-clm", "target+fused": "specialists",
                                                  **{s["name"]: SPECIALIST_PREFIX + s["name"] for s in base["sources"]}}))
    for name, model in (("self", "world:target"), ("oracle", "world:oracle"), ("twin", "world:oracle-twin")):
        rows = {"target+fused": name, **({} if name == "self" else {"teacher": f"{name}-teacher"})}
        plan.append((name, _single_teacher(base, model, workdir / name), ["train.lm_loss_weight=0"], rows))
    plan.append(("twin-label", _single_teacher(base, "world:oracle-twin", workdir / "twin"),
                 ["train.lm_loss_weight=0", "fuse.fallback=label"], {"target+fused": "twin-label"}))
    return plan


RUNS = ("default", "distill", "distill-label", *(f"{m}{w}" for m in PROJECTIONS for w in ("", "-w0")),
        "specialists", "self", "oracle", "twin", "twin-label")
"""The run names, in the order they run (``--run`` selects some)."""


def run(*, quick: bool, workdir: Path, runs: Sequence[str] | None = None) -> list[Figure]:
    """The runs of the module docstring (``runs``: only those, in their usual order); figures as measured.

    A headline key is reported only when the runs it compares were measured.
    """
    from polyfuse.demo.world import build_world
    from polyfuse.errors import PolyfuseError

    unknown = sorted(set(runs or ()) - set(RUNS))
    if unknown:
        raise PolyfuseError(f"unknown bench transfer run {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    world = workdir / "world"
    facts = json.loads((world / "world.json").read_text()) if (world / "world.json").is_file() else {}
    preset, seed = facts.get("preset", "test" if quick else "demo"), int(facts.get("seed", 0))
    build_world(world, preset=preset, seed=seed, budget=float(facts.get("budget", 1.0)), oracles=True)
    base = {**_base(), "world": str(world), "seed": seed}
    base["capture"] = {**base.get("capture", {}), "samples": SAMPLES}
    steps = ["train.max_steps=20"] if quick else []
    bpb: dict[str, dict[str, float]] = {}
    for run_name, data, overrides, rows in _plan(base, workdir):
        if runs and run_name not in runs:
            continue
        got = _run(data, [*steps, *overrides], list(rows))
        for row, as_name in rows.items():
            bpb[as_name] = got[row]
            logger.info("bench transfer: %s (%s) all %.4f", as_name, run_name, got[row]["all"])
    return _figures(bpb, [s["name"] for s in base["sources"]])


def _figures(bpb: dict[str, dict[str, float]], sources: list[str]) -> list[Figure]:
    """The headline keys whose runs were measured, then ``bpb.RUN.DOMAIN`` for every run."""
    from polyfuse.evaluate.results import gap_closed

    def closed(clm: str, fused: str, names: list[str]) -> dict[str, float]:
        if not all(n in bpb for n in (clm, fused, *names)):
            return {}
        return gap_closed({"models": {"target+clm": {"bpb": bpb[clm]}, "target+fused": {"bpb": bpb[fused]},
                                      **{n: {"bpb": bpb[n]} for n in names}}}, "target+fused")

    mine = closed("clm", "default", sources)
    oracle = closed("specialists-clm", "specialists", [SPECIALIST_PREFIX + n for n in sources])
    share = {d: mine[d] / v for d, v in oracle.items() if d in mine and v > 0}
    all_of = {k: v["all"] for k, v in bpb.items()}
    figures = []
    if mine:
        figures.append(Figure("gap_closed_min", round(min(mine.values()), 4), "share",
                              "default recipe, per domain: " + ", ".join(f"{d} {v:.1%}" for d, v in mine.items())))
    if oracle:
        figures.append(Figure("oracle_gap_closed_min", round(min(oracle.values()), 4), "share",
                              "default recipe with same-tokenizer specialists, per domain: "
                              + ", ".join(f"{d} {v:.1%}" for d, v in oracle.items())))
    if share:
        figures.append(Figure("gap_closed_share_of_oracle", round(min(share.values()), 4), "ratio",
                              "per domain, gap closed / the specialists' gap closed: "
                              + ", ".join(f"{d} {v:.2f}" for d, v in share.items())))
    if {"distill", "clm"} <= all_of.keys():
        figures.append(Figure("distill_only_over_clm", round(all_of["distill"] / all_of["clm"], 4), "ratio",
                              f"w=0 {all_of['distill']:.4f} vs clm {all_of['clm']:.4f} bpb (all)"))
    if {"oracle", "oracle-teacher"} <= all_of.keys():
        figures.append(Figure("same_tokenizer_distill_over_teacher",
                              round(all_of["oracle"] / all_of["oracle-teacher"], 4), "ratio",
                              f"distilled from world:oracle {all_of['oracle']:.4f} vs the oracle "
                              f"{all_of['oracle-teacher']:.4f}"))
    if {"target", "twin", "oracle"} <= all_of.keys():
        figures.append(Figure(
            "oracle_retention", round((all_of["target"] - all_of["twin"]) / (all_of["target"] - all_of["oracle"]), 4),
            "share", f"gain over the target {all_of['target']:.4f}: twin {all_of['target'] - all_of['twin']:+.4f}, "
                     f"oracle {all_of['target'] - all_of['oracle']:+.4f} bpb (all)"))
    for run_name, domains in bpb.items():
        for domain, value in domains.items():
            figures.append(Figure(f"bpb.{run_name}.{domain}", round(value, 4), "bits/byte", ""))
    return figures
