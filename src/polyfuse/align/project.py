"""A source's whole store projected onto the target's positions and vocabulary, block by block.

:func:`project_store` is what the ``align`` stage runs for one source: for every block it picks the target
positions that receive the source's distribution (``align.method``), adds the source's prediction at
positions inside its tokens (``inside``, :func:`~polyfuse.align.transfer.inside_token_entries`), drops
entries that break the target's cut (``cuts``, :class:`~polyfuse.align.transfer.TargetCuts`), maps the ids
(:func:`~polyfuse.align.transfer.transfer_block`) and writes the result shard by shard.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from polyfuse.align.normalize import TokenTable, token_table
from polyfuse.align.tokens import align_blocks
from polyfuse.align.transfer import (
    RemainderMap,
    TargetCuts,
    TransferStats,
    aligned_source_positions,
    consistent_entries,
    drop_special_mismatches,
    inside_token_entries,
    shared_start_positions,
    transfer_block,
)
from polyfuse.align.vocab import VocabMap
from polyfuse.capture.store import StoreReader, StoreWriter
from polyfuse.corpus.tokens import EncodedBlock
from polyfuse.workspace import Ranks, map_in_processes

__all__ = ["ShardProjector", "project_store", "source_positions"]


def source_positions(method: str, src: EncodedBlock, tgt: EncodedBlock, vmap: VocabMap, src_tokenizer: Any,
                     tgt_tokenizer: Any, src_table: TokenTable, tgt_table: TokenTable) -> np.ndarray:
    """[P_tgt] the source position whose distribution each target position receives (−1: none), by ``method``
    (``starts``: shared token starts; ``offsets`` / ``dtw`` / ...: :func:`polyfuse.align.tokens.align_blocks`).
    The tables are :func:`polyfuse.align.normalize.token_table` of the two tokenizers."""
    if method == "starts":
        return drop_special_mismatches(shared_start_positions(src, tgt), src, tgt, src_table, tgt_table)
    alignment = align_blocks(src, tgt, method=method, src_tokenizer=src_tokenizer, tgt_tokenizer=tgt_tokenizer)
    return aligned_source_positions(alignment, src, tgt, vmap if method == "dtw" else None)


@dataclass
class ShardProjector:
    """Everything one source's projection needs, and :meth:`project` for one shard of blocks.

    Picklable (the store reader travels as its path), so worker processes can project shards of their own;
    a worker builds its memoised cut filter and remainder map once and keeps them across its shards.
    """

    store: Path
    writer: StoreWriter
    blocks: Sequence[tuple[int, str]]
    src_enc: Sequence[EncodedBlock]
    tgt_enc: Sequence[EncodedBlock]
    method: str
    vmap: VocabMap
    src_tokenizer: Any
    tgt_tokenizer: Any
    inside: bool
    cuts: bool
    shard_size: int

    def __post_init__(self) -> None:
        self._reader: StoreReader | None = None
        self._tables: tuple[TokenTable, TokenTable, RemainderMap | None, TargetCuts | None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_tables": None}

    @property
    def n_shards(self) -> int:
        return (len(self.blocks) + self.shard_size - 1) // self.shard_size

    def shard_blocks(self, shard: int) -> range:
        """Indices into ``blocks`` of shard ``shard``."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.blocks)))

    @property
    def filters_cuts(self) -> bool:
        """Whether the cut filter runs (a source with the target's own vocabulary follows its cuts already)."""
        return self._prepared()[3] is not None

    def _prepared(self) -> tuple[TokenTable, TokenTable, RemainderMap | None, TargetCuts | None]:
        if self._tables is None:
            src_table, tgt_table = token_table(self.src_tokenizer), token_table(self.tgt_tokenizer)
            remainder = RemainderMap(tgt_table) if self.inside else None
            cut_filter = (TargetCuts(self.tgt_tokenizer)
                          if self.cuts and src_table.pieces != tgt_table.pieces else None)
            self._tables = (src_table, tgt_table, remainder, cut_filter)
        return self._tables

    def project(self, shard: int, advance: Callable[..., None] = lambda **_: None) -> TransferStats:
        """Project the blocks of ``shard``, write the shard; return its statistics."""
        if self._reader is None:
            self._reader = StoreReader(self.store)
        reader, (src_table, tgt_table, remainder, cut_filter) = self._reader, self._prepared()
        stats, rows = TransferStats(), []
        for i in self.shard_blocks(shard):
            block_id, text = self.blocks[i]
            src, tgt = self.src_enc[i], self.tgt_enc[i]
            pos = source_positions(self.method, src, tgt, self.vmap, self.src_tokenizer, self.tgt_tokenizer,
                                   src_table, tgt_table)
            src_row = reader[block_id]
            extra = (inside_token_entries(src_row, src, tgt, text, src_table, remainder, pos, cut_filter)
                     if remainder is not None else None)
            keep = (consistent_entries(src_row, pos, src, tgt, text, src_table, cut_filter)
                    if cut_filter is not None else None)
            rows.append(transfer_block(src_row, pos, self.vmap, reader.k, extra, keep))
            stats.add(src_row, pos, rows[-1], tgt.ids[1:], extra)
            advance()
        self.writer.write_shard(shard, rows)
        return stats


def project_store(reader: StoreReader, writer: StoreWriter, blocks: Sequence[tuple[int, str]],
                  src_enc: Sequence[EncodedBlock], tgt_enc: Sequence[EncodedBlock], *, method: str, vmap: VocabMap,
                  src_tokenizer: Any, tgt_tokenizer: Any, inside: bool, cuts: bool, shard_size: int,
                  ranks: Ranks | None = None, workers: int = 1,
                  advance: Callable[..., None] = lambda **_: None) -> dict[str, Any]:
    """Project every block ``(block_id, text)`` of ``reader`` (the source's capture) into ``writer`` and
    finalise it; returns the :class:`~polyfuse.align.transfer.TransferStats` plus ``cuts`` (whether the cut
    filter ran: a source with the target's own vocabulary already follows the target's cuts).

    ``workers`` > 1 projects that many shards at once in worker processes (:func:`polyfuse.workspace.
    map_in_processes`); under several ranks (``ranks``, every rank calling with the same arguments) each
    rank projects its share of the shards (:meth:`~polyfuse.workspace.Ranks.shards`), rank 0 finalises the
    store. The statistics are summed shard by shard in shard order, so the shards and the statistics are
    the same whatever the number of ranks and workers.
    """
    ranks = ranks or Ranks()
    projector = ShardProjector(reader.path, writer, blocks, src_enc, tgt_enc, method, vmap, src_tokenizer,
                               tgt_tokenizer, inside, cuts, shard_size)
    with ranks.together("align"):  # a collective: every rank's shards are written after it
        mine = ranks.shards(projector.n_shards)
        if min(workers, len(mine)) > 1:  # a worker's progress shows shard by shard
            stats = map_in_processes(projector.project, mine, workers=workers,
                                     done=lambda shard, _: [advance() for _ in projector.shard_blocks(shard)])
        else:
            stats = [projector.project(shard, advance) for shard in mine]
        per_shard = dict(zip(mine, stats, strict=True))
    every: dict[int, TransferStats] = {}
    for part in ranks.gather(per_shard):
        every.update(part)
    total = reduce(operator.add, (every[s] for s in sorted(every)), TransferStats())
    if ranks.main:
        writer.finalize(projector.n_shards)
    return {**total.as_dict(), "cuts": projector.filters_cuts}
