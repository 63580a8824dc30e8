"""Fusing whole stores: the target's capture and the aligned sources, block by block, into a fused store.

:func:`fuse_stores` is what the ``fuse`` stage (and FuseChat's pairwise fusion) runs: for every block it
builds the teachers in fusion order (:func:`polyfuse.fuse.teachers.fusion_teachers`), tags them with their
teacher index when the sources use ``groups`` maps, fuses them (:func:`polyfuse.fuse.strategies.fuse_block`)
and writes the result shard by shard, counting which teacher was chosen, overall and per domain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from polyfuse.capture.store import StoreReader, StoreWriter
from polyfuse.fuse.strategies import FusionStats, fuse_block, tag_teacher
from polyfuse.fuse.teachers import fused_store_row, fusion_teachers
from polyfuse.workspace import Ranks

__all__ = ["FusedBlockSource", "fuse_stores"]


class FusedBlockSource(Protocol):
    """What :func:`fuse_stores` reads of a block (:class:`polyfuse.corpus.blocks.Block` has it)."""

    @property
    def block_id(self) -> int: ...

    @property
    def domain(self) -> str: ...

    @property
    def metric_bytes(self) -> int: ...


def fuse_stores(blocks: Sequence[FusedBlockSource], own: StoreReader, aligned: Sequence[StoreReader],
                writer: StoreWriter, *, strategy: str, level: str, k_out: int, fallback: str, include_target: bool,
                groups: np.ndarray | None = None, n_tgt: int = 0,
                next_ids: Mapping[int, np.ndarray] | None = None,
                source_nll: Mapping[int, Sequence[np.ndarray]] | None = None, shard_size: int = 256,
                ranks: Ranks | None = None,
                advance: Callable[..., None] = lambda **_: None) -> tuple[FusionStats | None, dict[str, FusionStats]]:
    """Fuse ``own`` (the target's capture) with the ``aligned`` sources into ``writer`` and finalise it.

    Under several processes (``ranks``, every rank calling with the same arguments) each rank fuses its share
    of the shards, the statistics are summed over the ranks and rank 0 finalises the store.

    ``groups`` [teachers, n_tgt]: entries are tagged ``teacher * n_tgt + id``. ``next_ids`` per block: the
    target's next tokens (the ``label`` fallback); ``source_nll`` per block: each source's NLL of the text of
    the target's next token (``criterion: span``). Returns the teacher statistics overall and per domain.
    """
    ranks = ranks or Ranks()
    stats: FusionStats | None = None
    by_domain: dict[str, FusionStats] = {}
    n_shards = (len(blocks) + shard_size - 1) // shard_size
    with ranks.together("fuse"):  # a collective: every rank's shards are written after it
        for shard in ranks.shards(n_shards):
            rows = []
            for b in blocks[shard * shard_size:(shard + 1) * shard_size]:
                t_row = own[b.block_id]
                teachers: list[Any] = fusion_teachers(
                    t_row, [a[b.block_id] for a in aligned], fallback=fallback, include_target=include_target,
                    next_ids=next_ids[b.block_id] if fallback == "label" and next_ids is not None else None,
                    source_nll=source_nll[b.block_id] if source_nll is not None else None)
                if groups is not None:
                    teachers = [tag_teacher(t, m, n_tgt) for m, t in enumerate(teachers)]
                fused = fuse_block(teachers, strategy=strategy, level=level, k_out=k_out, n_bytes=b.metric_bytes)
                stats = fused.stats if stats is None else stats + fused.stats
                seen = by_domain.get(b.domain)
                by_domain[b.domain] = fused.stats if seen is None else seen + fused.stats
                rows.append(fused_store_row(b.block_id, fused, t_row, k_out))
                advance()
            writer.write_shard(shard, rows)
    if ranks.world_size > 1:  # every rank's statistics, summed in rank order
        shares = ranks.gather((stats, by_domain))
        stats, by_domain = None, {}
        for rank_stats, rank_domains in shares:
            if rank_stats is not None:
                stats = rank_stats if stats is None else stats + rank_stats
            for domain, share in rank_domains.items():
                by_domain[domain] = share if domain not in by_domain else by_domain[domain] + share
    if ranks.main:
        writer.finalize(n_shards)
    return stats, by_domain
