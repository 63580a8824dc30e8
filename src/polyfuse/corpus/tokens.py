"""The one tokenization convention every stage shares (capture, align, fuse, train).

A block's text is tokenized without special tokens and the model's context token (BOS, else
EOS; see :func:`polyfuse.models.bos_context_id`) is put in front, so that every token of the
text is predicted. Position ``t`` of a model's output predicts token ``t + 1``.

Example (byte-level BPE, BOS id 0)::

    >>> enc = encode_block(tok, "Hi there")
    >>> enc.ids          # [0, 17, 402]           ← <bos>, "Hi", "Ġthere"
    >>> enc.offsets      # [[0, 0], [0, 2], [2, 8]]   character spans in the block text
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EncodedBlock:
    """Token ids ``[n]`` (context token first, when the tokenizer has one) and character spans ``[n, 2]``."""

    ids: np.ndarray
    offsets: np.ndarray
    has_context: bool

    def __len__(self) -> int:
        return len(self.ids)


def _cover_combining_marks(text: str, off: np.ndarray) -> np.ndarray:
    """Give uncovered combining marks to the token before them.

    Tokenizers with an NFC normaliser (MPT, Qwen2) compose ``e`` + U+0301 into one ``é`` whose offsets
    cover only the ``e``; the mark then belongs to no token and a span-based alignment could not see
    that the source's ``é`` and the target's ``e`` + mark stand for the same text. The run of combining
    marks (Unicode categories Mn, Mc, Me) that starts an uncovered gap after a token is added to that
    token; the rest of a gap (spaces a tokenizer leaves out) stays uncovered.
    """
    import unicodedata

    real = np.nonzero(off[:, 1] > off[:, 0])[0]
    if real.size == 0:
        return off
    ends = off[real, 1]
    nexts = np.append(off[real[1:], 0], len(text))
    gaps = np.nonzero(nexts > ends)[0]
    if gaps.size == 0:
        return off
    off = off.copy()
    for g in gaps:
        a, b = int(ends[g]), int(nexts[g])
        end = a
        while end < b and unicodedata.category(text[end]).startswith("M"):
            end += 1
        off[real[g], 1] = end
    return off


def encode_blocks(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[EncodedBlock]:
    """Encode texts in one batched call (fast tokenizers' offsets are character offsets)."""
    from polyfuse.models import bos_context_id

    ctx = bos_context_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False,
                    split_special_tokens=True)  # "<s>" written in the text is text, not BOS
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids_arr = np.asarray(ids, dtype=np.int64)
        off = _cover_combining_marks(text, np.asarray(offsets, dtype=np.int32).reshape(-1, 2))
        if ctx is not None:
            ids_arr = np.concatenate([np.asarray([ctx], dtype=np.int64), ids_arr])
            off = np.concatenate([np.zeros((1, 2), dtype=np.int32), off])
        out.append(EncodedBlock(ids=ids_arr, offsets=off, has_context=ctx is not None))
    return out


def encode_block(tokenizer: PreTrainedTokenizerBase, text: str) -> EncodedBlock:
    """:func:`encode_blocks` for one text."""
    return encode_blocks(tokenizer, [text])[0]
