"""The merge bench's configurations: one per registered method, each a valid merge that runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyfuse.bench.merge import LlamaShape, method_config, write_llama_checkpoints
from polyfuse.errors import PolyfuseError
from polyfuse.merge import METHODS, parse_merge_config, run_merge

MICRO = LlamaShape(vocab=32, hidden=8, intermediate=16, layers=2, heads=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_llama_checkpoints(tmp_path_factory.mktemp("bench-inputs"), MICRO, ["base", "a", "b", "c"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_bench_merge_that_runs(method: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    config = parse_merge_config(method_config(method, inputs, MICRO.layers), source=f"bench {method}")
    assert config.merge_method == method
    run_merge(config, tmp_path / "out", seed=0)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == MICRO.layers


def test_an_unknown_method_is_refused_by_name(inputs: dict[str, Path]) -> None:
    with pytest.raises(PolyfuseError, match="merge_method: unknown method 'nope'"):
        method_config("nope", inputs, MICRO.layers)
