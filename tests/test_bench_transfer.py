"""bench transfer's run selection and headline keys (the runs themselves are measurements, not tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyfuse.bench import run_suites
from polyfuse.bench.transfer import RUNS, _figures
from polyfuse.errors import PolyfuseError


def _bpb(code: float, math: float, prose: float) -> dict[str, float]:
    return {"code": code, "math": math, "prose": prose, "all": (code + math + prose) / 3}


def test_unknown_runs_and_suites_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PolyfuseError, match="unknown bench transfer run nope; choose from default"):
        run_suites(["transfer"], workdir=tmp_path, runs=["nope"])
    with pytest.raises(PolyfuseError, match="transfer suite only"):
        run_suites(["fusion"], workdir=tmp_path, runs=["default"])
    assert RUNS[0] == "default" and {"specialists", "oracle", "twin", "context", "mined-w0"} <= set(RUNS)


def test_figures_report_only_what_was_measured() -> None:
    bpb = {"target": _bpb(3.0, 3.0, 3.0), "clm": _bpb(2.8, 2.8, 2.8), "default": _bpb(2.7, 2.75, 2.78),
           "a": _bpb(2.3, 3.5, 3.5), "b": _bpb(3.5, 2.3, 2.3)}
    keys = {f.key: f.value for f in _figures(bpb, ["a", "b"])}
    assert keys["gap_closed_min"] == pytest.approx(0.04)               # prose: 0.02 of a 0.5 gap
    assert not {"distill_only_over_clm", "oracle_retention", "gap_closed_share_of_oracle"} & keys.keys()
    bpb |= {"specialists-clm": _bpb(2.8, 2.8, 2.8), "specialists": _bpb(2.75, 2.75, 2.75),
            "oracle-a": _bpb(2.6, 3.5, 3.5), "oracle-b": _bpb(3.5, 2.6, 2.7),
            "oracle": _bpb(2.9, 2.9, 2.9), "twin": _bpb(2.95, 2.95, 2.95), "distill": _bpb(2.9, 2.9, 2.9)}
    keys = {f.key: f.value for f in _figures(bpb, ["a", "b"])}
    assert keys["oracle_gap_closed_min"] == pytest.approx(0.25)          # 0.05 of every 0.2 gap (prose 0.1: 0.5)
    assert keys["gap_closed_share_of_oracle"] == pytest.approx(0.04 / 0.5)
    assert keys["oracle_retention"] == pytest.approx(0.5)
    assert keys["distill_only_over_clm"] == pytest.approx(2.9 / 2.8, abs=1e-4)
