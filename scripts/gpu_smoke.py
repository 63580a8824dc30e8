"""The figures of ``scripts/gpu_smoke.sh`` (run it, not this): ``python scripts/gpu_smoke.py OUT [--accept-gemma-terms]``.

Reads the real-family run in ``OUT/demo/real`` and the converted models in ``OUT/world/models``; prints
each figure as it is measured and writes them all to ``OUT/gpu_smoke.json`` (rewritten after each step, so
a failure in a later step keeps the earlier figures). Exits 1 if the vLLM step failed (vllm imports but
polyfuse's backend does not run), after writing the file.
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

DEVICE = "cuda"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "accelerate", "vllm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def capture_over_forward(model_dir: Path, scratch: Path, *, n_blocks: int = 64, max_tokens: int = 512,
                         batch_size: int = 16, reps: int = 3) -> dict[str, float | str]:
    """``polyfuse bench fusion``'s capture_over_forward (hf capture, top-10, vs a bare forward of the same
    longest-first padded batches; median of per-pair ratios after a warm-up pair) on ``DEVICE`` with the
    model in its auto dtype (bf16 on CUDA), at GPU-sized inputs. The bench itself runs on the CPU only."""
    import shutil

    from polyfuse.bench.fusion import _capture_blocks, _paired
    from polyfuse.capture.hf import capture
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_model, load_tokenizer

    model = load_model(str(model_dir), device=DEVICE)
    tok = load_tokenizer(str(model_dir))
    blocks = _capture_blocks(tok, n_blocks, max_tokens)  # the bench's text (CPython's pydoc topics) and cut
    encoded = encode_blocks(tok, [text for _, text in blocks])
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))  # capture's batch order
    batches = []
    for start in range(0, len(order), batch_size):
        part = [encoded[i] for i in order[start:start + batch_size]]
        ids = torch.zeros((len(part), max(len(e) for e in part)), dtype=torch.long)  # [B, T]
        mask = torch.zeros_like(ids)
        for row, e in enumerate(part):
            ids[row, :len(e)] = torch.from_numpy(e.ids)
            mask[row, :len(e)] = 1
        batches.append((ids.to(model.device), mask.to(model.device)))
    store = scratch / f"capture-{model_dir.name}"

    def run_capture() -> None:
        shutil.rmtree(store, ignore_errors=True)
        capture(model, tok, blocks, store, k=10, batch_size=batch_size, shard_size=len(blocks), progress=False,
                meta={"model": str(model_dir)})
        _sync()

    @torch.inference_mode()
    def forward() -> None:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        _sync()  # kernels are queued asynchronously: time them, not their launch

    ratio, t_capture, t_forward = _paired(run_capture, forward, reps=reps, warmup=1)
    tokens = sum(len(e) for e in encoded)
    dtype = str(model.dtype).removeprefix("torch.")
    return {"capture_over_forward": round(ratio, 3), "capture_tokens_per_s": round(tokens / t_capture, 1),
            "forward_tokens_per_s": round(tokens / t_forward, 1), "capture_dtype": dtype,
            "capture_input": f"{len(blocks)} blocks, {tokens} tokens, batch {batch_size}, top-10"}


def train_tokens_per_s(run: Path) -> dict[str, float]:
    """Tokens/s of the fused training of ``run``: samples/s from its trainer_state.json (steps x batch x
    accumulation / train_runtime) times the mean target-token length of its blocks (num_input_tokens_seen
    is not recorded; the sampler draws the blocks uniformly, so the mean is the expected length)."""
    from polyfuse.corpus.blocks import read_blocks
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_tokenizer

    train = run / "train" / "fused"
    state = json.loads((train / "trainer_state.json").read_text())
    last = next(h for h in reversed(state["log_history"]) if "train_runtime" in h)
    accumulation = json.loads((train / "manifest.json").read_text())["config"]["train"]["gradient_accumulation_steps"]
    blocks = read_blocks(run / "blocks" / "blocks.jsonl")
    encoded = encode_blocks(load_tokenizer(str(train)), [b.text for b in blocks],
                            [b.response_spans is not None for b in blocks])
    mean_tokens = sum(len(e) for e in encoded) / len(encoded)
    samples_per_s = state["global_step"] * state["train_batch_size"] * accumulation / last["train_runtime"]
    return {"train_tokens_per_s": round(samples_per_s * mean_tokens, 1),
            "train_samples_per_s": round(samples_per_s, 3), "train_runtime_s": round(last["train_runtime"], 1),
            "train_steps": state["global_step"], "train_mean_tokens_per_block": round(mean_tokens, 1)}


def vllm_rate(model_dir: Path, *, n_prompts: int = 64, n: int = 4, max_new_tokens: int = 64) -> dict[str, object]:
    """Sampling rate of polyfuse's vLLM backend (polyfuse.generate): n_prompts x n responses of up to
    max_new_tokens, after a warm-up batch; response tokens counted with the model's tokenizer."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm: not installed, skipped", flush=True)
        return {"vllm_tokens_per_s": None}
    _free()  # vLLM sizes its cache from the free GPU memory
    from polyfuse.generate import SamplingParams, SourceSpec, make_backend

    spec = SourceSpec("smollm2", str(model_dir), SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens))
    engine = make_backend("vllm", spec)
    prompts = [[{"role": "user", "content": f"Write a short poem about the number {i}."}] for i in range(n_prompts)]
    engine.generate(prompts[:4], spec.params, seed=0)  # warm-up
    start = time.perf_counter()
    out = engine.generate(prompts, spec.params, seed=1)
    seconds = time.perf_counter() - start
    tok = engine.tokenizer
    n_tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for rs in out for r in rs)
    return {"vllm_tokens_per_s": round(n_tokens / seconds, 1),
            "vllm_responses_per_s": round(sum(len(rs) for rs in out) / seconds, 1),
            "vllm_input": f"{n_prompts} prompts x {n} responses, up to {max_new_tokens} new tokens"}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    models = out / "world" / "models"
    figures: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                                  "device": torch.cuda.get_device_name(), "versions": _versions()}

    def record(new: dict) -> None:
        for key, value in new.items():
            print(f"{key}: {value}", flush=True)
        figures.update(new)
        (out / "gpu_smoke.json").write_text(json.dumps(figures, indent=1) + "\n")

    record({})
    record(capture_over_forward(models / "smollm2", out / "scratch"))
    if "--accept-gemma-terms" in argv[1:] and (models / "gemma3").is_dir():
        record({"gemma3": capture_over_forward(models / "gemma3", out / "scratch")})
    record(train_tokens_per_s(out / "demo" / "real"))
    try:
        record(vllm_rate(models / "smollm2"))
    except Exception as exc:  # vllm imports but the backend fails: keep the other figures, say why
        record({"vllm_tokens_per_s": None, "vllm_error": f"{type(exc).__name__}: {exc}"})
        return 1
    print(f"gpu_smoke: wrote {out / 'gpu_smoke.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
