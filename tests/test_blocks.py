"""Blocks: character-offset cuts that fit every tokenizer, with no decode/re-encode round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from polyfuse.corpus.blocks import make_blocks, read_blocks, split_document, write_blocks
from polyfuse.corpus.documents import Document, domain_path, read_documents
from polyfuse.corpus.tokens import encode_block


@pytest.fixture(scope="module")
def tokenizers(tiny_world: Path) -> list:
    return [AutoTokenizer.from_pretrained(tiny_world / "models" / m) for m in ("prose", "code", "math", "target")]


@pytest.mark.parametrize("max_tokens", [24, 64, 200])
def test_blocks_cover_documents_and_fit_every_tokenizer(tiny_world: Path, tokenizers: list, max_tokens: int) -> None:
    docs = [d for dom in ("prose", "code", "math")
            for d in list(read_documents(domain_path(tiny_world / "corpus", "heldout", dom)))[:4]]
    for doc in docs:
        spans = split_document(doc.text, tokenizers, max_tokens)
        assert spans[0][0] == 0 and spans[-1][1] == len(doc.text)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert "".join(doc.text[s:e] for s, e in spans) == doc.text  # exact text, whitespace kept
        for s, e in spans:
            for tok in tokenizers:
                assert len(encode_block(tok, doc.text[s:e])) <= max_tokens


def test_short_document_is_one_block(tokenizers: list) -> None:
    assert split_document("a short text.\n", tokenizers, 64) == [(0, 14)]
    assert split_document("", tokenizers, 64) == []


def test_cuts_prefer_line_breaks(tokenizers: list) -> None:
    text = "".join(f"line number {i} says hello\n" for i in range(40))
    spans = split_document(text, tokenizers, 48)
    assert len(spans) > 2
    assert all(text[e - 1] == "\n" for _, e in spans[:-1])


def test_blocks_round_trip(tmp_path: Path, tokenizers: list) -> None:
    docs = [("prose", Document("d1", "x " * 300)), ("code", Document("d2", "def f():\n    return 1\n"))]
    blocks = list(make_blocks(docs, tokenizers, 64))
    assert [b.block_id for b in blocks] == list(range(len(blocks)))
    assert {b.domain for b in blocks} == {"prose", "code"}
    write_blocks(tmp_path / "blocks.jsonl", blocks)
    assert read_blocks(tmp_path / "blocks.jsonl") == blocks
