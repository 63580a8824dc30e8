"""results.json updates: deep merge, and concurrent writers never lose each other's rows."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from polyfuse.evaluate.results import update_results


def test_deep_merge_keeps_earlier_figures(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    update_results(path, {"t": {"bpb": {"a": 1.0, "all": 1.0}}}, meta={"bpb": {"split": "heldout"}})
    data = update_results(path, {"t": {"accuracy": {"x": 0.5}}, "s": {"bpb": {"all": 2.0}}})
    assert data == json.loads(path.read_text())
    assert data["models"] == {"t": {"bpb": {"a": 1.0, "all": 1.0}, "accuracy": {"x": 0.5}},
                              "s": {"bpb": {"all": 2.0}}}
    assert data["meta"] == {"bpb": {"split": "heldout"}}


def _writer(path: str, worker: int, rows: int) -> None:
    for i in range(rows):
        update_results(path, {f"w{worker}-{i}": {"bpb": {"all": float(i)}}})


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run" / "results.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    models = json.loads(path.read_text())["models"]
    assert set(models) == {f"w{w}-{i}" for w in range(4) for i in range(15)}
