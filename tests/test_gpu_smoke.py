"""scripts/gpu_smoke.sh: valid bash and Python, a clean one-line skip without CUDA, and (with stand-ins for
Python and nvidia-smi) the polyfuse commands it runs on a CUDA machine."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SCRIPT = SCRIPTS / "gpu_smoke.sh"
SKIP_LINE = "gpu_smoke: no CUDA device; nothing to do (GPU paths are skipped on CPU)"


def test_scripts_parse() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    py_compile.compile(str(SCRIPTS / "gpu_smoke.py"), doraise=True)
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script does the real (slow) run")
def test_without_cuda_it_skips_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == SKIP_LINE
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gemma", [False, True])
def test_on_cuda_it_runs_the_real_recipe_offline(tmp_path: Path, gemma: bool) -> None:
    """A stand-in Python that says CUDA is there and logs each call; the Gemma opt-in reaches polyfuse."""
    bin_dir, log, out = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "out"
    bin_dir.mkdir()
    log_call = 'echo "HF_HUB_OFFLINE=$HF_HUB_OFFLINE ${*//$\'\\n\'/ }" >> ' + str(log)  # one line a call
    for name, body in (("python", log_call), ("nvidia-smi", "echo GPU")):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "OUT": str(out), "PYTHON": str(bin_dir / "python"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = ["--accept-gemma-terms"] if gemma else []
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert all(line.startswith("HF_HUB_OFFLINE=1 ") for line in lines)  # every call runs offline
    calls = [line.removeprefix("HF_HUB_OFFLINE=1 ") for line in lines]
    opt_in = " --accept-gemma-terms" if gemma else ""
    assert calls[-3:-1] == [f"-m polyfuse.cli world --out {out}/world --real{opt_in}",
                            f"-m polyfuse.cli demo --world {out}/world --out {out}/demo --family real"]
    assert calls[-1].endswith(f"scripts/gpu_smoke.py {out}{opt_in}")
    assert "GPU" in done.stdout and out.is_dir()


def test_unknown_arguments_are_refused() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--gemma"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage:" in done.stderr
