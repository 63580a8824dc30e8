"""Alignment of heterogeneous tokenizers: token normal form, vocabulary maps, token alignment.

Pure functions over tokenizers' vocabularies, token arrays and character offsets; nothing here
loads a model. ``transfer`` (source top-k → target vocabulary at target positions) builds on it.
"""

from polyfuse.align.normalize import (
    ROLES,
    TokenTable,
    special_roles,
    token_bytes,
    token_table,
    token_texts,
)
from polyfuse.align.tokens import (
    Alignment,
    align_blocks,
    align_dtw,
    align_dtw_reference,
    align_offsets,
    one_to_one,
)
from polyfuse.align.vocab import (
    MapKind,
    PairCounts,
    VocabMap,
    count_aligned_pairs,
    exact_map,
    mined_map,
    prefix_map,
    stats_map,
    vocab_map,
)

__all__ = [
    "ROLES",
    "Alignment",
    "MapKind",
    "PairCounts",
    "TokenTable",
    "VocabMap",
    "align_blocks",
    "align_dtw",
    "align_dtw_reference",
    "align_offsets",
    "count_aligned_pairs",
    "exact_map",
    "mined_map",
    "prefix_map",
    "one_to_one",
    "special_roles",
    "stats_map",
    "token_bytes",
    "token_table",
    "token_texts",
    "vocab_map",
]
