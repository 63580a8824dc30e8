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
from functools import reduce
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
from polyfuse.workspace import Ranks

__all__ = ["project_store", "source_positions"]


def source_positions(method: str, src: EncodedBlock, tgt: EncodedBlock, vmap: VocabMap, src_tokenizer: Any,
                     tgt_tokenizer: Any, src_table: TokenTable, tgt_table: TokenTable) -> np.ndarray:
    """[P_tgt] the source position whose distribution each target position receives (−1: none), by ``method``
    (``starts``: shared token starts; ``offsets`` / ``dtw`` / ...: :func:`polyfuse.align.tokens.align_blocks`).
    The tables are :func:`polyfuse.align.normalize.token_table` of the two tokenizers."""
    if method == "starts":
        return drop_special_mismatches(shared_start_positions(src, tgt), src, tgt, src_table, tgt_table)
    alignment = align_blocks(src, tgt, method=method, src_tokenizer=src_tokenizer, tgt_tokenizer=tgt_tokenizer)
    return aligned_source_positions(alignment, src, tgt, vmap if method == "dtw" else None)


def project_store(reader: StoreReader, writer: StoreWriter, blocks: Sequence[tuple[int, str]],
                  src_enc: Sequence[EncodedBlock], tgt_enc: Sequence[EncodedBlock], *, method: str, vmap: VocabMap,
                  src_tokenizer: Any, tgt_tokenizer: Any, inside: bool, cuts: bool, shard_size: int,
                  ranks: Ranks | None = None, advance: Callable[..., None] = lambda **_: None) -> dict[str, Any]:
    """Project every block ``(block_id, text)`` of ``reader`` (the source's capture) into ``writer`` and
    finalise it; returns the :class:`~polyfuse.align.transfer.TransferStats` plus ``cuts`` (whether the cut
    filter ran: a source with the target's own vocabulary already follows the target's cuts).

    Under several processes (``ranks``, every rank calling with the same arguments) each rank projects its
    share of the shards (:meth:`~polyfuse.workspace.Ranks.shards`), the statistics are summed over the
    ranks and rank 0 finalises the store; the shards are the same bytes whatever the number of ranks.
    """
    ranks = ranks or Ranks()
    src_table, tgt_table = token_table(src_tokenizer), token_table(tgt_tokenizer)
    remainder = RemainderMap(tgt_table) if inside else None
    cut_filter = TargetCuts(tgt_tokenizer) if cuts and src_table.pieces != tgt_table.pieces else None
    stats = TransferStats()
    n_shards = (len(blocks) + shard_size - 1) // shard_size
    with ranks.together("align"):  # a collective: every rank's shards are written after it
        for shard in ranks.shards(n_shards):
            rows = []
            for i in range(shard * shard_size, min((shard + 1) * shard_size, len(blocks))):
                block_id, text = blocks[i]
                pos = source_positions(method, src_enc[i], tgt_enc[i], vmap, src_tokenizer, tgt_tokenizer,
                                       src_table, tgt_table)
                src_row = reader[block_id]
                extra = (inside_token_entries(src_row, src_enc[i], tgt_enc[i], text, src_table, remainder, pos,
                                              cut_filter) if remainder is not None else None)
                keep = (consistent_entries(src_row, pos, src_enc[i], tgt_enc[i], text, src_table, cut_filter)
                        if cut_filter is not None else None)
                rows.append(transfer_block(src_row, pos, vmap, reader.k, extra, keep))
                stats.add(src_row, pos, rows[-1], tgt_enc[i].ids[1:], extra)
                advance()
            writer.write_shard(shard, rows)
    stats = reduce(operator.add, ranks.gather(stats))
    if ranks.main:
        writer.finalize(n_shards)
    return {**stats.as_dict(), "cuts": cut_filter is not None}
