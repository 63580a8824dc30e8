"""What every capture backend shares: block checks, rows from log-probs, the shard loop, ranks, finalize.

A backend computes, per shard, the top-k log-probs of its blocks (:class:`ShardFn`); everything
else — which shards are this process's, resume, the context-length check, the store writer,
rank 0's finalize and the stats — is :func:`run_shards`, so every backend writes the same store
(same ``store.json`` fields, same shard layout, the same bytes for the same log-probs).

Rows are built by :func:`block_rows` from float32 values: log-probs clamped to the smallest
finite fp16 (-inf marks padding in a store) and cast to fp16, the actual next token's log-prob
cast to fp16, and ``nll_sum`` summed in float64 from the float32 values (over the response
positions only for blocks with response spans; :mod:`polyfuse.capture.hf`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from polyfuse.capture.store import BlockTopK, StoreReader, StoreWriter, shard_name
from polyfuse.corpus.spans import Spans, normalise_spans, response_positions
from polyfuse.corpus.tokens import EncodedBlock, encode_blocks
from polyfuse.errors import DataError
from polyfuse.progress import progress_bar
from polyfuse.workspace import NO_ACCELERATE, Ranks, start_process_group

__all__ = [
    "FP16_MIN",
    "ShardFn",
    "block_parts",
    "block_rows",
    "blocks_digest",
    "check_unique",
    "empty_row",
    "fp16_logprobs",
    "ranks",
    "run_shards",
    "wait_for_shards",
]

FP16_MIN = float(torch.finfo(torch.float16).min)
_POLL_S = 1.0

Row = tuple[np.ndarray, np.ndarray, np.ndarray, float]
"""``(ids [P, k] int64, logprobs [P, k] f16, target_logprob [P] f16, nll_sum)``."""


# --------------------------------------------------------------------------------------------------
# rows


def fp16_logprobs(values: torch.Tensor, ids: torch.Tensor | None = None) -> np.ndarray:
    """float32 log-probs ``[N, k]`` (any device) as fp16 numpy, clamped to the smallest finite fp16.

    A real entry stays finite: -inf marks padding in a store (probability 0 either way); with
    ``ids`` [N, k], the entries whose id is -1 are padding and stay -inf.
    """
    out = values.clamp(min=FP16_MIN).to(torch.float16)
    if ids is not None:
        out = out.masked_fill(ids.to(out.device) < 0, float("-inf"))
    return out.cpu().numpy()


def block_rows(
    encoded: Sequence[EncodedBlock],
    spans: Sequence[Spans | None],
    top_ids: np.ndarray,
    values16: np.ndarray,
    target32: np.ndarray,
) -> list[Row]:
    """Cut the positions of several blocks (concatenated in block order, ``P = len - 1`` each) into rows.

    ``top_ids [N, k]``, ``values16 [N, k]`` (from :func:`fp16_logprobs`) and ``target32 [N]``
    float32; ``nll_sum`` covers the response positions of blocks whose spans are not None, else all.
    """
    out, start = [], 0
    for enc, block_spans in zip(encoded, spans, strict=True):
        P = max(len(enc) - 1, 0)
        sl = slice(start, start + P)
        counted = target32[sl].astype(np.float64)
        if block_spans is not None:
            counted = counted[response_positions(enc, block_spans)]
        nll = float(-counted.sum())
        out.append((top_ids[sl], values16[sl], target32[sl].astype(np.float16), nll))
        start += P
    return out


def empty_row(k: int) -> Row:
    """The row of a block with no scored position (empty, or only the context token)."""
    return np.zeros((0, k), np.int64), np.zeros((0, k), np.float16), np.zeros(0, np.float16), 0.0


# --------------------------------------------------------------------------------------------------
# blocks


def block_parts(blocks: Sequence[tuple]) -> list[tuple[int, str, Spans | None]]:
    """``(block_id, text)`` or ``(block_id, text, response_spans)`` tuples as triples (spans checked)."""
    out = []
    for n, block in enumerate(blocks):
        if len(block) not in (2, 3):
            raise DataError(f"capture: block {n} must be (block_id, text) or (block_id, text, response_spans); "
                            f"got {len(block)} items")
        out.append((int(block[0]), block[1], normalise_spans(block[2]) if len(block) == 3 else None))
    return out


def blocks_digest(blocks: Sequence[tuple[int, str, Spans | None]]) -> str:
    """sha256 of the block ids, texts and spans (recorded in a store's meta)."""
    digest = hashlib.sha256()
    for block_id, text, spans in blocks:
        digest.update(f"{int(block_id)}\0{len(text)}\0".encode())
        digest.update(text.encode("utf-8"))
        if spans is not None:  # text blocks hash as they always have
            digest.update(f"\0spans{list(spans)}".encode())
    return digest.hexdigest()


def check_unique(blocks: Sequence[tuple[int, str, Spans | None]]) -> None:
    """Raise DataError when two blocks share an id."""
    ids_seen = [b for b, _, _ in blocks]
    if len(set(ids_seen)) != len(ids_seen):
        raise DataError("capture: block ids are not unique; give each block its own id")


# --------------------------------------------------------------------------------------------------
# processes


def ranks(
    rank: int | None, world_size: int | None
) -> tuple[int, int, Callable[[], None] | None, torch.device | None]:
    """``(rank, world_size, barrier or None, this rank's device or None)``.

    Explicit arguments win (no barrier). Otherwise, under a launcher (``WORLD_SIZE`` > 1)
    :func:`polyfuse.workspace.start_process_group` sets up the process group if nobody has yet, and rank and
    world size come from ``torch.distributed`` (accelerate reports a CPU-only torchrun as one
    process although it initialises the group); without accelerate the ``RANK`` / ``WORLD_SIZE``
    environment is used, without a barrier.
    """
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(
                f"give both rank and world_size with 0 <= rank < world_size (got {rank}, {world_size})"
            )
        return rank, world_size, None, None
    import torch.distributed as dist

    device = start_process_group(accelerate_optional=True)
    if device is NO_ACCELERATE:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]), None, None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if torch.cuda.is_available() and (device is None or device.type != "cuda"):
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return dist.get_rank(), dist.get_world_size(), dist.barrier, device
    return 0, 1, None, None


def wait_for_shards(writer: StoreWriter, n_shards: int, wait_s: float) -> None:
    """Poll until shards ``0..n_shards-1`` all exist; DataError naming the fix after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = sorted(set(range(n_shards)) - set(writer.existing_shards()))
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise DataError(
                f"{writer.out_dir}: rank 0 waited {wait_s:.0f}s but {len(missing)} shard(s) are still "
                f"missing (first: {shard_name(missing[0])}); when the other ranks are done (or dead), rerun "
                "the capture with world_size=1 to capture what is missing and finalize"
            )
        time.sleep(_POLL_S)


# --------------------------------------------------------------------------------------------------
# the shard loop


class ShardFn(Protocol):
    """A backend's work on one shard: rows in the given block order."""

    def __call__(
        self,
        encoded: Sequence[EncodedBlock],
        block_ids: Sequence[int],
        spans: Sequence[Spans | None],
        advance: Callable[..., None],
    ) -> list[BlockTopK]:
        """``advance(tokens=P)`` once per block as it is done."""
        ...


def run_shards(
    capture_shard: ShardFn,
    tokenizer: Any,
    blocks: Sequence[tuple[int, str, Spans | None]],
    out_dir: str | Path,
    *,
    k: int,
    vocab_size: int,
    shard_size: int,
    meta: dict[str, Any],
    prefix_bytes: int = 0,
    max_len: int | None,
    rank: int,
    world_size: int,
    barrier: Callable[[], None] | None,
    wait_s: float,
    progress: bool,
    log: logging.Logger,
) -> dict[str, Any]:
    """Capture this process's missing shards with ``capture_shard``, then (rank 0) finalize; return stats.

    ``meta`` is the store's full meta; see :func:`polyfuse.capture.hf.capture` for the stats and
    the rank protocol.
    """
    writer = StoreWriter(out_dir, k=k, vocab_size=vocab_size, meta=meta, prefix_bytes=prefix_bytes)
    n_shards = (len(blocks) + shard_size - 1) // shard_size
    mine = Ranks(rank, world_size).shards(n_shards)
    todo = [s for s in mine if not writer.has_shard(s)]
    n_todo = sum(len(blocks[s * shard_size : (s + 1) * shard_size]) for s in todo)
    name = Path(str(meta.get("model", ""))).name or "model"

    start, tokens = time.perf_counter(), 0
    with progress_bar(f"capture {name}", total=n_todo, enabled=progress) as advance:

        def step(**fields: Any) -> None:
            nonlocal tokens
            tokens += fields["tokens"]
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            advance(tok_s=f"{rate:,.0f}")

        for s in todo:
            chunk = blocks[s * shard_size : (s + 1) * shard_size]
            encoded = encode_blocks(tokenizer, [text for _, text, _ in chunk],
                                    parse_special=[spans is not None for _, _, spans in chunk])
            too_long = [
                (bid, len(e))
                for (bid, _, _), e in zip(chunk, encoded, strict=True)
                if max_len is not None and len(e) > max_len
            ]
            if too_long:
                bid, n = too_long[0]
                raise DataError(
                    f"capture: block {bid} has {n} tokens (context token included) but the model's "
                    f"context is {max_len}; rebuild the blocks with max_tokens <= {max_len}"
                )
            rows = capture_shard(encoded, [bid for bid, _, _ in chunk], [spans for _, _, spans in chunk], step)
            writer.write_shard(s, rows)
    seconds = time.perf_counter() - start

    stats: dict[str, Any] = {
        "blocks": n_todo,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "shards_written": len(todo),
        "shards_skipped": len(mine) - len(todo),
        "finalized": False,
    }
    if barrier is not None:
        barrier()
    if rank == 0:
        if world_size > 1 and barrier is None:
            wait_for_shards(writer, n_shards, wait_s)
        writer.finalize(n_shards)
    if barrier is not None:
        barrier()
    if rank == 0 or barrier is not None:
        reader = StoreReader(out_dir)
        stats.update(
            finalized=True,
            store_blocks=len(reader),
            store_tokens=reader.n_positions,
            bytes_per_token=round(reader.bytes_per_token(), 3),
        )
    log.debug(
        "capture %s: %d blocks, %d tokens in %.1fs (%s tok/s) -> %s%s",
        name,
        n_todo,
        tokens,
        seconds,
        stats["tokens_per_s"],
        out_dir,
        f", {stats['bytes_per_token']} B/token" if stats["finalized"] else "",
    )
    return stats
