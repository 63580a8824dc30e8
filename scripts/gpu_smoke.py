"""The figures of ``scripts/gpu_smoke.sh`` (run it, not this): ``python scripts/gpu_smoke.py OUT [--accept-gemma-terms]``.

Reads the real-family run in ``OUT/demo`` and the converted models in ``OUT/world``; prints one JSON object
and writes it to ``OUT/gpu_smoke.json``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "accelerate", "vllm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def capture_over_forward(model_dir: Path, scratch: Path) -> dict[str, float]:
    """hf capture (top-10) vs a bare forward of the same batches, SmolLM2 on the GPU; median of 3 pairs."""
    from polyfuse.capture.hf import capture
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_model, load_tokenizer

    model = load_model(str(model_dir), device="cuda")
    tok = load_tokenizer(str(model_dir))
    text = (Path(torch.__file__).parent / "nn" / "modules" / "module.py").read_text(encoding="utf-8")
    blocks = [(i, text[i * 2000:(i + 1) * 2000]) for i in range(64)]
    encoded = encode_blocks(tok, [t for _, t in blocks])
    batches = []
    for start in range(0, len(encoded), 16):
        part = encoded[start:start + 16]
        width = max(len(e) for e in part)
        ids = torch.zeros((len(part), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(part):
            ids[row, :len(e)], mask[row, :len(e)] = torch.from_numpy(e.ids), 1
        batches.append((ids.cuda(), mask.cuda()))

    @torch.inference_mode()
    def forward() -> None:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def run_capture() -> None:
        capture(model, tok, blocks, scratch / f"capture-{time.monotonic_ns()}", k=10, batch_size=16,
                shard_size=len(blocks), progress=False, meta={"model": str(model_dir)})

    run_capture(), forward()  # warm-up
    pairs = sorted(_timed(run_capture) / _timed(forward) for _ in range(3))
    tokens = sum(len(e) for e in encoded)
    return {"capture_over_forward": round(pairs[1], 3), "forward_tokens_per_s": round(tokens / _timed(forward), 1),
            "dtype": str(model.dtype)}


def train_tokens_per_s(run: Path) -> dict[str, float | None]:
    """Training tokens/s of the fused real-family training: its trainer_state, and the block lengths."""
    state = json.loads((run / "train" / "fused" / "trainer_state.json").read_text())
    last = next(h for h in reversed(state["log_history"]) if "train_runtime" in h)
    blocks = [json.loads(line) for line in (run / "blocks" / "blocks.jsonl").read_text().splitlines()]
    mean_chars = sum(len(b["text"]) for b in blocks) / len(blocks)
    samples = state["global_step"] * state["train_batch_size"]
    return {"train_samples_per_s": round(samples / last["train_runtime"], 2),
            "train_chars_per_s": round(samples * mean_chars / last["train_runtime"], 1)}


def vllm_tokens_per_s(model_dir: Path) -> float | None:
    """Sampling rate of polyfuse's vLLM backend: 64 prompts × 4 responses of up to 64 tokens."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm: not installed, skipped")
        return None
    from polyfuse.generate import SamplingParams, SourceSpec, make_backend

    spec = SourceSpec("smollm2", str(model_dir), SamplingParams(n=4, temperature=1.0, max_new_tokens=64))
    engine = make_backend("vllm", spec)
    prompts = [[{"role": "user", "content": f"Write a short poem about the number {i}."}] for i in range(64)]
    engine.generate(prompts[:4], spec.params, seed=0)  # warm-up
    start = time.perf_counter()
    out = engine.generate(prompts, spec.params, seed=1)
    seconds = time.perf_counter() - start
    tok = engine.tokenizer if hasattr(engine, "tokenizer") else None
    n_tokens = sum(len(tok.encode(r)) if tok else len(r.split()) for rs in out for r in rs)
    return round(n_tokens / seconds, 1)


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    models = out / "world" / "models"
    figures = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
               "versions": _versions(), **capture_over_forward(models / "smollm2", out / "scratch"),
               **train_tokens_per_s(out / "demo" / "real"), "vllm_tokens_per_s": vllm_tokens_per_s(models / "smollm2")}
    if "--accept-gemma-terms" in argv[1:] and (models / "gemma3").is_dir():
        figures["gemma3"] = capture_over_forward(models / "gemma3", out / "scratch")
    text = json.dumps(figures, indent=1)
    (out / "gpu_smoke.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
