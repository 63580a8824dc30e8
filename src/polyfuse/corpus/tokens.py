"""The one tokenization convention every stage shares (capture, align, fuse, train).

A block's text is tokenized without adding special tokens and the model's context token (BOS,
else EOS; see :func:`polyfuse.models.bos_context_id`) is put in front, so that every token of the
text is predicted. Position ``t`` of a model's output predicts token ``t + 1``.

Special-token strings inside the text: a **plain-text** block keeps them text (``"<s>"`` written in
a document is the characters ``<``, ``s``, ``>``, not BOS; ``split_special_tokens=True``). A **chat**
block (``parse_special``; every caller passes ``block.response_spans is not None``) parses them, so
the markers its chat template wrote (``<|im_start|>``, ``<|im_end|>``, ``<|eot_id|>``, EOS) are the
model's own special tokens, as when the model was chat-trained. A special token matched in the
text has the offsets of its marker's characters (``"<|im_end|>"`` at 19..29 → ``[19, 29]``), so
spans, response tokens and offset alignment treat it like any other token; a model whose
tokenizer lacks that special reads the marker as text, in several tokens, so a target position
predicting it has no one-to-one source token (:mod:`polyfuse.align.transfer`).

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
    token, and so is every character NFC composes into the token's last character (NFD Hangul: the
    medial and final jamo, category Lo, that NFC joins to the initial one into a syllable); the rest
    of a gap (spaces a tokenizer leaves out) stays uncovered.
    """
    import unicodedata

    def absorbed(start: int, end: int) -> bool:
        """Whether NFC composes ``text[end]`` into what ``text[start:end]`` ends with."""
        return len(unicodedata.normalize("NFC", text[start:end + 1])) <= len(unicodedata.normalize("NFC", text[start:end]))

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
        end, last = a, max(a - 1, int(off[real[g], 0]))
        while end < b and (unicodedata.category(text[end]).startswith("M") or absorbed(last, end)):
            end += 1
        off[real[g], 1] = end
    return off


def encode_blocks(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                  parse_special: bool | Sequence[bool] = False) -> list[EncodedBlock]:
    """Encode texts in batched calls (fast tokenizers' offsets are character offsets).

    ``parse_special``: one flag for all texts or one per text; True parses the tokenizer's
    special-token strings in the text as special tokens (chat blocks), False keeps them text
    (plain-text blocks; the module docstring).
    """
    from polyfuse.models import bos_context_id

    texts = list(texts)
    if isinstance(parse_special, bool | np.bool_):
        flags = [bool(parse_special)] * len(texts)
    else:
        flags = [bool(f) for f in parse_special]
        if len(flags) != len(texts):
            raise ValueError(f"parse_special has {len(flags)} flags for {len(texts)} texts; pass one per text")
    ctx = bos_context_id(tokenizer)
    ids_of: list[list[int]] = [[] for _ in texts]
    offsets_of: list[list] = [[] for _ in texts]
    for parse in (False, True):
        idx = [i for i, f in enumerate(flags) if f is parse]
        if not idx:
            continue
        enc = tokenizer([texts[i] for i in idx], add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False, split_special_tokens=not parse)  # plain text: "<s>" is text, not BOS
        for i, ids, offsets in zip(idx, enc["input_ids"], enc["offset_mapping"], strict=True):
            ids_of[i], offsets_of[i] = ids, offsets
    out = []
    for text, ids, offsets in zip(texts, ids_of, offsets_of, strict=True):
        ids_arr = np.asarray(ids, dtype=np.int64)
        off = _cover_combining_marks(text, np.asarray(offsets, dtype=np.int32).reshape(-1, 2))
        if ctx is not None:
            ids_arr = np.concatenate([np.asarray([ctx], dtype=np.int64), ids_arr])
            off = np.concatenate([np.zeros((1, 2), dtype=np.int32), off])
        out.append(EncodedBlock(ids=ids_arr, offsets=off, has_context=ctx is not None))
    return out


def encode_block(tokenizer: PreTrainedTokenizerBase, text: str, parse_special: bool = False) -> EncodedBlock:
    """:func:`encode_blocks` for one text."""
    return encode_blocks(tokenizer, [text], parse_special)[0]
