"""The ``vllm`` capture backend: the store of :mod:`polyfuse.capture.hf`, from vLLM's prompt log-probs.

An optional extra (``pip install 'polyfuse[vllm]'``, on a CUDA machine); vLLM is imported on first
use and a missing install is a :class:`~polyfuse.errors.PolyfuseError` naming the extra.

Per shard (same shards, same block order as ``hf``):

1. encode the blocks with :func:`polyfuse.corpus.tokens.encode_blocks` (context token first,
   nothing else added: the ids go to vLLM as ``TokensPrompt(prompt_token_ids=ids)``);
2. ``llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0))`` over
   calls of at most ``_TOKENS_PER_CALL`` prompt tokens (vLLM batches and schedules them itself;
   ``batch_size`` is recorded in the meta as for ``hf`` but splits nothing; the bound keeps the
   Python log-prob objects of one call in memory);
3. map ``RequestOutput.prompt_logprobs`` to rows: entry ``j`` (``None`` at ``j = 0``) is a dict
   token id -> ``Logprob(logprob, rank, decoded_token)`` of the distribution predicted after
   tokens ``0..j-1``, holding vLLM's top-k plus the actual token ``j`` (``k`` entries when that
   token is among the top-k, else ``k + 1``). Store position ``t`` (predicting token ``t + 1``) is
   entry ``t + 1``, for ``t = 0..n-2``; the top-k are the entries less the actual token when there
   are ``k + 1``, sorted by log-prob (ties by vLLM's rank, then id), and ``target_logprob`` is the
   actual token's entry;
4. rows, ``nll_sum`` (response positions only for chat blocks), resume, ranks, finalize: the code
   ``hf`` uses (:mod:`polyfuse.capture.common`), so the same float32 log-probs give byte-identical
   shards and the same ``store.json`` fields (``meta.backend`` says ``vllm``; a store begun by one
   backend is refused by the other instead of being mixed).

**The last position.** A block of ``n`` tokens has ``P = n - 1`` positions in both backends: the
last token's prediction (beyond the block) is never stored by ``hf``, and vLLM has no prompt
log-probs for it; nothing differs.

**Semantics: raw log-probs, temperature 1.** ``hf`` stores ``log_softmax`` of the model's logits as
its forward returns them (the architecture's own transforms, e.g. Gemma's soft-capping, included),
at temperature 1, with no sampling processors. The engine is built with
``logprobs_mode="raw_logprobs"`` (vLLM's default, set explicitly): prompt log-probs are then
``log_softmax`` (float32) of the output of the model's ``compute_logits`` before temperature,
penalties, logit bias or top-k/top-p, the same quantity; the store records temperature 1.0 as
``hf``'s do. (``processed_logprobs`` would apply the request's processors, which is why it is not
used.)

**Unavoidable differences.** Numerical only: vLLM's kernels (fused attention, its own model
implementations, bf16 matmuls) differ from transformers' in the last bits, so values agree to bf16
noise, not bit for bit, and the order of exactly tied entries may differ from ``torch.topk``'s.
``hf``'s probe of the output head has no counterpart (vLLM's model code is its own); instead every
output's structure is checked (length, the actual token present, k or k + 1 entries).

**Devices.** vLLM places the model itself on the GPUs ``CUDA_VISIBLE_DEVICES`` shows
(``tensor_parallel_size`` and other engine options via ``llm_kwargs``); ``device`` may only be
``None``, ``auto`` or ``cuda``. Under a launcher each process must see its own GPU. The engine is
built only when a shard is left to capture (a finished store is finalized without one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from polyfuse.capture.common import (
    block_parts,
    block_rows,
    blocks_digest,
    check_unique,
    empty_row,
    fp16_logprobs,
    ranks,
    run_shards,
)
from polyfuse.capture.store import BlockTopK
from polyfuse.corpus.spans import Spans
from polyfuse.corpus.tokens import EncodedBlock
from polyfuse.errors import ModelLoadError, PolyfuseError
from polyfuse.models import (
    ResolvedModel,
    bos_context_id,
    context_length,
    pick_dtype,
    resolve_model_ref,
    vocab_facts,
)

__all__ = ["capture", "capture_ref", "import_vllm", "position_topk", "vllm_meta"]

logger = logging.getLogger(__name__)

_TOKENS_PER_CALL = 1 << 17  # prompt tokens per llm.generate call
_DEVICES = (None, "auto", "cuda")


def import_vllm() -> tuple[ModuleType, Any]:
    """``(vllm, TokensPrompt)``; PolyfuseError naming the extra when vLLM is not installed."""
    try:
        import vllm
    except ImportError as err:
        raise PolyfuseError(
            f"capture.backend=vllm needs the vllm package, which is not installed ({err}); install the extra "
            "with pip install 'polyfuse[vllm]' (on a CUDA machine), or use capture.backend=hf"
        ) from err
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:
        TokensPrompt = getattr(vllm, "TokensPrompt", None)  # noqa: N806
        if TokensPrompt is None:
            raise PolyfuseError(
                f"vllm {getattr(vllm, '__version__', '?')} has no TokensPrompt (vllm.inputs); "
                "upgrade it with pip install -U 'polyfuse[vllm]'"
            ) from None
    return vllm, TokensPrompt


def _hf_config(resolved: ResolvedModel) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the config of {resolved}: {err}") from err


def _dtype_name(dtype: str | torch.dtype) -> str:
    """The dtype vLLM gets: ``auto`` is hf's auto on CUDA (bfloat16 where supported, else float32)."""
    return str(pick_dtype(dtype, "cuda")).removeprefix("torch.")


def vllm_meta(resolved: ResolvedModel, config: Any, tokenizer: Any, dtype: str) -> dict[str, Any]:
    """The store meta of :func:`polyfuse.capture.hf.capture_meta` (same keys) for a vLLM capture."""
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    return {
        "backend": "vllm",
        "model": str(resolved),
        "model_revision": getattr(config, "_commit_hash", None),
        "architecture": str(architectures[0]),
        "dtype": dtype,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_len": len(tokenizer),
        "context_token": bos_context_id(tokenizer),
        "temperature": 1.0,
    }


def position_topk(
    prompt_logprobs: Sequence[Any] | None, ids: np.ndarray, k: int, block_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(top ids [P, k] int64, log-probs [P, k] float32 descending, target log-probs [P] float32)`` of one prompt.

    ``prompt_logprobs`` is vLLM's list for the prompt ``ids`` (``n`` tokens, ``P = n - 1``): entry
    ``t + 1`` becomes position ``t`` (module docstring).

    Raises:
        PolyfuseError: the output does not have the documented shape (naming the block and position).
    """
    n = len(ids)
    where = f"capture (vllm): block {block_id}"
    if prompt_logprobs is None or len(prompt_logprobs) != n:
        got = "none" if prompt_logprobs is None else len(prompt_logprobs)
        raise PolyfuseError(f"{where}: expected prompt log-probs for {n} tokens, got {got}; vLLM must be "
                            "asked with SamplingParams(prompt_logprobs=k)")
    P = n - 1
    top_ids = np.empty((P, k), dtype=np.int64)
    values = np.empty((P, k), dtype=np.float32)
    target = np.empty(P, dtype=np.float32)
    for t in range(P):
        entries = prompt_logprobs[t + 1]
        actual = int(ids[t + 1])
        if entries is None or actual not in entries:
            raise PolyfuseError(f"{where}, position {t}: vLLM's prompt log-probs lack the actual token {actual}")
        target[t] = entries[actual].logprob
        items = [(int(tid), float(lp.logprob), lp.rank if lp.rank is not None else 0) for tid, lp in entries.items()]
        if len(items) == k + 1:
            items = [item for item in items if item[0] != actual]
        elif len(items) != k:
            raise PolyfuseError(f"{where}, position {t}: {len(items)} prompt log-probs, expected {k} or {k + 1} "
                                "(the top-k plus the actual token)")
        items.sort(key=lambda item: (-item[1], item[2], item[0]))
        top_ids[t] = [item[0] for item in items]
        values[t] = [item[1] for item in items]
    return top_ids, values, target


def _calls(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose lengths sum to at most ``budget`` (a longer one alone)."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, n in enumerate(lengths):
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def capture(
    model: str | ResolvedModel,
    tokenizer: Any,
    blocks: Sequence[tuple[int, str] | tuple[int, str, Spans | None]],
    out_dir: str | Path,
    *,
    k: int = 10,
    batch_size: int = 8,
    shard_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    wait_s: float = 3600.0,
    dtype: str = "auto",
    seed: int = 0,
    llm: Any = None,
    llm_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Capture the top-k next-token log-probs of ``model`` with vLLM into a store at ``out_dir``.

    The contract of :func:`polyfuse.capture.hf.capture` (blocks, store, resume, ranks, stats,
    errors), except:

    Args:
        model: the model reference (a directory, a hub id, ``org/name@rev``) or its
            :class:`~polyfuse.models.ResolvedModel`; vLLM loads it.
        tokenizer: the model's (fast) tokenizer, which encodes the blocks.
        batch_size: recorded in the meta only (vLLM batches itself).
        device: ``None``, ``auto`` or ``cuda`` (vLLM places the model; module docstring).
        dtype: ``auto`` (bfloat16 on CUDA where supported, else float32: hf's auto), ``float32``,
            ``bfloat16`` or ``float16``.
        seed: the engine's seed (prompt log-probs do not sample).
        llm: an engine already built for ``model`` (with ``max_logprobs >= k`` and raw log-probs), reused.
        llm_kwargs: more ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``tensor_parallel_size``, ...).

    Raises:
        PolyfuseError: vLLM is not installed (naming the extra), or its output has another shape.
        DataError: duplicate block ids, a block longer than the model's context, or ``out_dir``
            holding a store made with other settings (the other backend's included).
    """
    if k < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(f"k, batch_size and shard_size must be >= 1 (got {k}, {batch_size}, {shard_size})")
    if (str(device) if device is not None else None) not in _DEVICES:
        raise PolyfuseError(f"capture.backend=vllm places the model itself (on the GPUs CUDA_VISIBLE_DEVICES "
                            f"shows); device={device!r} is not supported, use device=auto")
    vllm, tokens_prompt = import_vllm()
    resolved = model if isinstance(model, ResolvedModel) else resolve_model_ref(str(model))
    config = _hf_config(resolved)
    rank, world_size, barrier, _ = ranks(rank, world_size)
    blocks = block_parts(blocks)
    check_unique(blocks)
    facts = vocab_facts(config, tokenizer)
    facts.check(str(resolved))
    vocab = facts.embedding_rows
    if k > vocab:
        raise ValueError(f"k={k} is larger than the vocabulary ({vocab})")
    dtype_name = _dtype_name(dtype)
    full_meta = {
        **vllm_meta(resolved, config, tokenizer, dtype_name),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "blocks_sha256": blocks_digest(blocks),
        **(meta or {}),
    }
    engine = llm
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0, seed=seed)

    def get_engine() -> Any:
        nonlocal engine
        if engine is None:
            options = {
                "model": resolved.location,
                "revision": resolved.revision,
                "tokenizer": str(getattr(tokenizer, "name_or_path", "") or resolved.location),
                "dtype": dtype_name,
                "seed": seed,
                "max_logprobs": k,
                "logprobs_mode": "raw_logprobs",
                **(llm_kwargs or {}),
            }
            engine = vllm.LLM(**options)
        return engine

    def capture_shard(
        encoded: Sequence[EncodedBlock],
        block_ids: Sequence[int],
        spans: Sequence[Spans | None],
        advance: Callable[..., None],
    ) -> list[BlockTopK]:
        rows: list[tuple] = [empty_row(k)] * len(encoded)
        scored = [i for i, e in enumerate(encoded) if len(e) > 1]
        for group in _calls([len(encoded[i]) for i in scored], _TOKENS_PER_CALL):
            picked = [scored[j] for j in group]
            prompts = [tokens_prompt(prompt_token_ids=encoded[i].ids.tolist()) for i in picked]
            outputs = get_engine().generate(prompts, params, use_tqdm=False)
            if len(outputs) != len(prompts):
                raise PolyfuseError(f"capture (vllm): {len(outputs)} outputs for {len(prompts)} prompts")
            parts = []
            for i, out in zip(picked, outputs, strict=True):
                returned = getattr(out, "prompt_token_ids", None)
                if returned is not None and list(returned) != encoded[i].ids.tolist():
                    raise PolyfuseError(f"capture (vllm): block {block_ids[i]}: vLLM changed the prompt tokens; "
                                        "capture needs them exactly as given (TokensPrompt)")
                parts.append(position_topk(out.prompt_logprobs, encoded[i].ids, k, block_ids[i]))
            top_ids = np.concatenate([p[0] for p in parts])  # [N, k]
            values = np.concatenate([p[1] for p in parts])  # [N, k]
            target = np.concatenate([p[2] for p in parts])  # [N]
            made = block_rows([encoded[i] for i in picked], [spans[i] for i in picked], top_ids,
                              fp16_logprobs(torch.from_numpy(values)), target)
            for i, row in zip(picked, made, strict=True):
                rows[i] = row
            for i in picked:
                advance(tokens=len(encoded[i]) - 1)
        for e in encoded:
            if len(e) <= 1:
                advance(tokens=0)
        return [
            BlockTopK(block_id=int(bid), ids=r[0], logprobs=r[1], target_logprob=r[2], nll_sum=r[3])
            for bid, r in zip(block_ids, rows, strict=True)
        ]

    return run_shards(
        capture_shard, tokenizer, blocks, out_dir, k=k, vocab_size=vocab, shard_size=shard_size, meta=full_meta,
        max_len=context_length(config), rank=rank, world_size=world_size, barrier=barrier, wait_s=wait_s,
        progress=progress, log=logger,
    )


def capture_ref(model: str | ResolvedModel, tokenizer: str | None,
                blocks: Sequence[tuple[int, str] | tuple[int, str, Spans | None]], out_dir: str | Path, *,
                samples: int = 0, prefix_bytes: int = 0, pieces: Sequence[bytes | None] | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """:func:`capture` with the registry's signature (:func:`polyfuse.capture.hf.capture_ref`): ``tokenizer``
    is a reference loaded here. vLLM returns only top-k prompt log-probs, so a sampled tail (``samples``) is
    refused and prefix masses (``prefix_bytes``, ``pieces``) are not captured."""
    from polyfuse.models import load_tokenizer

    import_vllm()  # fail before anything is read, naming the extra
    if samples:
        raise PolyfuseError("capture.samples needs the hf backend (vLLM returns only top-k prompt log-probs); "
                            "set capture.samples=0 or capture.backend=hf")
    return capture(model, load_tokenizer(model, tokenizer), blocks, out_dir, **kwargs)

