"""Documents → blocks that fit every participating tokenizer, cut on character offsets.

A block is a substring ``text[start:end]`` of one document. Blocks are never decoded and
re-encoded (the reference code's round trip changes whitespace at the cuts): the cut points
are character offsets, chosen so that the block tokenizes to at most ``max_tokens`` tokens
(context token included) under *every* tokenizer.

Cut rule: from ``start``, take the largest end such that every tokenizer's tokens of the
whole document that lie inside ``[start, end)`` number at most ``max_tokens - margin``; move
the end back to the last newline, else the last whitespace, in the second half of the
candidate (so words are not split when avoidable); then re-tokenize the substring with each
tokenizer and shrink by 10% until it fits. A document shorter than the limit is one block.

A chat document's response spans (:mod:`polyfuse.corpus.spans`) go with its blocks, clipped to
each block's character range and made relative to the block's start; a block of a text document
has ``response_spans = None`` (every token counts), and its JSON row has no such key. Token counts
follow :func:`~polyfuse.corpus.tokens.encode_blocks`: a chat document's special-token strings (its
template's markers) count as special tokens, a text document's as text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from polyfuse.corpus.documents import Document
from polyfuse.corpus.spans import Spans, clip_spans, normalise_spans, span_bytes
from polyfuse.corpus.tokens import encode_blocks
from polyfuse.errors import DataError


@dataclass(frozen=True)
class Block:
    """One block: ``text == document.text[start:end]``; ``response_spans`` relative to ``text`` (chat only)."""

    block_id: int
    doc_id: str
    domain: str
    start: int
    end: int
    text: str
    response_spans: Spans | None = None

    def __post_init__(self) -> None:
        spans = normalise_spans(self.response_spans)
        if spans is not None and any(b > len(self.text) for _, b in spans):
            raise DataError(f"block {self.block_id}: a response span ends past the block's {len(self.text)} "
                            "characters; rebuild the blocks")
        object.__setattr__(self, "response_spans", spans)

    @property
    def metric_bytes(self) -> int:
        """UTF-8 bytes the sequence metric covers: the response characters, or the whole text."""
        return span_bytes(self.text, self.response_spans)

    def to_json(self) -> dict:
        """The JSON row (``response_spans`` only for chat blocks, so text blocks read as before)."""
        row = asdict(self)
        if self.response_spans is None:
            del row["response_spans"]
        else:
            row["response_spans"] = [list(s) for s in self.response_spans]
        return row


def _token_ends(tok: PreTrainedTokenizerBase, text: str, parse_special: bool) -> np.ndarray:
    """Character end offset of every token of ``text`` (context token excluded)."""
    enc = encode_blocks(tok, [text], parse_special)[0]
    ends = enc.offsets[1:, 1] if enc.has_context else enc.offsets[:, 1]
    return np.maximum.accumulate(ends) if len(ends) else ends


def _n_tokens(tok: PreTrainedTokenizerBase, text: str, parse_special: bool) -> int:
    return len(encode_blocks(tok, [text], parse_special)[0])


def _soft_cut(text: str, start: int, end: int) -> int:
    """Move ``end`` back to a newline or whitespace in the second half of ``[start, end)``."""
    half = start + (end - start) // 2
    for sep in ("\n", " ", "\t"):
        pos = text.rfind(sep, half, end)
        if pos > start:
            return pos + 1
    return end


def split_document(text: str, tokenizers: Sequence[PreTrainedTokenizerBase], max_tokens: int,
                   margin: int = 8, *, parse_special: bool = False) -> list[tuple[int, int]]:
    """Character spans ``[(start, end), ...]`` covering ``text`` whose blocks fit every tokenizer.

    ``parse_special``: count special-token strings as special tokens (chat documents; see
    :func:`~polyfuse.corpus.tokens.encode_blocks`).
    """
    if max_tokens <= margin + 2:
        raise ValueError(f"max_tokens {max_tokens} is too small; use at least {margin + 3}")
    if all(_n_tokens(tok, text, parse_special) <= max_tokens for tok in tokenizers):
        return [(0, len(text))] if text else []
    ends = [_token_ends(tok, text, parse_special) for tok in tokenizers]
    budget = max_tokens - margin
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(text):
        candidate = len(text)
        for e in ends:
            first = int(np.searchsorted(e, start, side="right"))  # first token ending after start
            last = first + budget - 1
            if last < len(e):
                candidate = min(candidate, int(e[last - 1]) if last > first else int(e[first]))
        end = candidate if candidate >= len(text) else _soft_cut(text, start, candidate)
        end = max(end, start + 1)
        while end - start > 1 and any(_n_tokens(tok, text[start:end], parse_special) > max_tokens
                                           for tok in tokenizers):
            end = start + max(1, int((end - start) * 0.9))
        spans.append((start, end))
        start = end
    return spans


def make_blocks(docs: Iterable[tuple[str, Document]], tokenizers: Sequence[PreTrainedTokenizerBase],
                max_tokens: int) -> Iterator[Block]:
    """Blocks of ``(domain, document)`` pairs, numbered in order."""
    block_id = 0
    for domain, doc in docs:
        for start, end in split_document(doc.text, tokenizers, max_tokens,
                                         parse_special=doc.response_spans is not None):
            yield Block(block_id, doc.id, domain, start, end, doc.text[start:end],
                        clip_spans(doc.response_spans, start, end))
            block_id += 1


def write_blocks(path: Path, blocks: Iterable[Block]) -> dict[str, int]:
    """Blocks as JSONL, one object per line; returns counts."""
    n = chars = 0
    with path.open("w", encoding="utf-8") as fh:
        for block in blocks:
            fh.write(json.dumps(block.to_json(), ensure_ascii=False) + "\n")
            n += 1
            chars += len(block.text)
    return {"blocks": n, "chars": chars}


def read_blocks(path: str | Path) -> list[Block]:
    """Blocks written by :func:`write_blocks`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no blocks file; run the blocks stage first (polyfuse blocks RECIPE)")
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                out.append(Block(**json.loads(line)))
            except (json.JSONDecodeError, TypeError, DataError) as exc:
                raise DataError(f"{path}:{lineno}: not a block row ({exc}); rerun the blocks stage") from None
    return out
