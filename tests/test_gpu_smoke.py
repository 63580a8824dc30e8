"""scripts/gpu_smoke.sh: valid bash and Python, and on a machine without CUDA a clean one-line skip."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_scripts_parse() -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_smoke.sh")], check=True)
    py_compile.compile(str(SCRIPTS / "gpu_smoke.py"), doraise=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script does the real (slow) run")
def test_without_cuda_it_skips_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_smoke.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "gpu_smoke: no CUDA device; nothing to do (GPU paths are skipped on CPU)"
    assert not (tmp_path / "out").exists()
