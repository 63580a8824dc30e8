"""Benchmarks that print ratios measured side by side in one run (never run by the test suite).

Each suite is a module with ``run(*, quick: bool, workdir: Path) -> list[Figure]``; the CLI
(``polyfuse bench [SUITE] [--json]``) imports it lazily, prints a table, or with ``--json`` one
object ``{key: value}``. Suites measure both sides of every ratio in the same process, on the same
inputs, one after the other, so machine noise affects both alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from polyfuse.errors import PolyfuseError

__all__ = ["SUITES", "Figure", "run_suites"]

SUITES: dict[str, tuple[str, str]] = {
    "fusion": ("polyfuse.bench.fusion", "explicit fusion: alignment, vocabulary map, capture, store, fused step"),
    "merge": ("polyfuse.bench.merge", "parameter-space merging: throughput and peak memory"),
    "transfer": ("polyfuse.bench.transfer", "knowledge transfer: gap closed, distillation alone, oracles"),
}
"""Suite name -> (module, one-line description)."""


@dataclass(frozen=True)
class Figure:
    """One measured figure: ``key`` (the JSON key), ``value``, ``unit`` and how it was measured."""

    key: str
    value: float
    unit: str
    detail: str = ""


def run_suites(names: Sequence[str], *, quick: bool = False, workdir: str | Path = "runs/bench",
               runs: Sequence[str] | None = None, methods: Sequence[str] | None = None,
               mergekit: bool = True) -> list[Figure]:
    """Run the named suites in order and return all their figures (``runs``: the transfer suite's runs to
    measure; ``methods``: the merge suite's methods; ``mergekit=False``: the merge suite skips mergekit)."""
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise PolyfuseError(f"unknown bench suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if runs and list(names) != ["transfer"]:
        raise PolyfuseError("--run selects runs of the transfer suite only; run `polyfuse bench transfer --run NAME`")
    if methods and list(names) != ["merge"]:
        raise PolyfuseError("--method selects methods of the merge suite only; run `polyfuse bench merge --method NAME`")
    figures: list[Figure] = []
    for name in names:
        module = importlib.import_module(SUITES[name][0])
        out = Path(workdir) / name
        out.mkdir(parents=True, exist_ok=True)
        extra = ({"runs": list(runs)} if runs else {"methods": list(methods)} if methods else {})
        if name == "merge" and not mergekit:
            extra["mergekit"] = False
        figures += module.run(quick=quick, workdir=out, **extra)
    return figures
