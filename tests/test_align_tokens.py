"""Token alignment: offsets (exact spans), FuseLLM DTW (vectorised = reference), one_to_one."""

from __future__ import annotations

import doctest
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

import polyfuse.align.tokens as tokens_mod
from polyfuse.align import (
    Alignment,
    align_blocks,
    align_dtw,
    align_dtw_reference,
    align_offsets,
    one_to_one,
    token_texts,
)
from polyfuse.corpus.tokens import EncodedBlock, encode_block


def _same(a: Alignment, b: Alignment) -> bool:
    return a.n_src == b.n_src and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.src, b.src)


def test_docstring_examples() -> None:
    result = doctest.testmod(tokens_mod)
    assert result.attempted >= 8 and result.failed == 0


# -- Alignment and one_to_one -------------------------------------------------------------------------

def test_worked_example_one_to_one() -> None:
    """1-1, many-to-one (several targets share one source) and one-to-many (one target, several sources)."""
    al = Alignment.from_lists([[0], [0], [0], [1, 2], [3], []], n_src=5)
    assert one_to_one(al).tolist() == [-1, -1, -1, -1, 3, -1]
    assert al.tgt_degree().tolist() == [1, 1, 1, 2, 1, 0]
    assert al.src_degree().tolist() == [3, 1, 1, 1, 0]
    t, s = al.pairs()
    assert t.tolist() == [0, 1, 2, 3, 3, 4] and s.tolist() == [0, 0, 0, 1, 2, 3]
    assert al[3].tolist() == [1, 2] and len(al) == 6 and al.n_tgt == 6


def test_alignment_validates() -> None:
    with pytest.raises(ValueError, match="source positions"):
        Alignment.from_lists([[0], [4]], n_src=3)
    with pytest.raises(ValueError, match="indptr"):
        Alignment(np.array([0, 3]), np.array([0, 1]), 2)


# -- offsets -------------------------------------------------------------------------------------------

def test_offsets_module_example() -> None:
    al = align_offsets([[0, 13], [13, 16], [16, 18], [18, 19]], [[0, 3], [3, 9], [9, 13], [13, 18], [18, 19]])
    assert al.to_lists() == [[0], [0], [0], [1, 2], [3]]
    assert one_to_one(al).tolist() == [-1, -1, -1, -1, 3]


def test_offsets_context_pair_and_zero_width() -> None:
    src = [[0, 0], [0, 5], [5, 5], [5, 11]]  # <bos> "Hello" <zero-width> " world"
    tgt = [[0, 0], [0, 2], [2, 5], [5, 11]]
    al = align_offsets(src, tgt)
    assert al.to_lists() == [[0], [1], [1], [3]]  # the zero-width source token pairs with nothing
    assert one_to_one(al).tolist() == [0, -1, -1, 3]
    assert align_offsets(src, tgt, context=False).to_lists() == [[], [1], [1], [3]]
    # only one side has a context token: it pairs with nothing
    assert align_offsets(src[1:], tgt).to_lists() == [[], [0], [0], [2]]


def test_offsets_overlapping_byte_pieces() -> None:
    """Byte-level pieces of one character share its span: many-to-many, never 1-1."""
    src = [[0, 1], [1, 3], [2, 3]]  # "a", "Ġð..", ".."  (a space + emoji split in two)
    tgt = [[0, 1], [1, 2], [2, 3], [2, 3], [2, 3], [2, 3]]  # "a", "▁", four <0xNN>
    al = align_offsets(src, tgt)
    assert al.to_lists() == [[0], [1], [1, 2], [1, 2], [1, 2], [1, 2]]
    assert one_to_one(al).tolist() == [0, -1, -1, -1, -1, -1]


def test_one_to_one_requires_identical_spans() -> None:
    """Mutual and exclusive but different spans (a gap in the source): not 1-1 for offsets."""
    al = align_offsets([[0, 3], [5, 6]], [[0, 4], [4, 6]])
    assert al.to_lists() == [[0], [1]]
    assert one_to_one(al).tolist() == [-1, -1]
    assert one_to_one(Alignment(al.indptr, al.src, al.n_src)).tolist() == [0, 1]  # without spans


def test_offsets_non_monotone_fallback_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        src = np.sort(rng.integers(0, 30, (rng.integers(0, 12), 2)), axis=1)
        tgt = np.sort(rng.integers(0, 30, (rng.integers(0, 12), 2)), axis=1)
        al = align_offsets(src, tgt, context=False)
        expect = [[i for i, (ss, se) in enumerate(src) if min(te, se) - max(ts, ss) > 0] for ts, te in tgt]
        assert al.to_lists() == expect


def test_offsets_sorted_path_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        cuts = np.sort(rng.integers(0, 40, rng.integers(1, 15)))
        starts = np.concatenate([[0], cuts])
        src = np.stack([starts, np.concatenate([cuts, [40]])], axis=1)
        tgt = np.sort(rng.integers(0, 40, (rng.integers(1, 15), 2)), axis=1)
        al = align_offsets(src, tgt, context=False)
        expect = [[i for i, (ss, se) in enumerate(src) if min(te, se) - max(ts, ss) > 0] for ts, te in tgt]
        assert al.to_lists() == expect


def test_offsets_validates_and_handles_empty() -> None:
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        align_offsets([[0, 1, 2]], [[0, 1]])
    with pytest.raises(ValueError, match="end before"):
        align_offsets([[3, 1]], [[0, 1]])
    assert align_offsets([], [[0, 2]]).to_lists() == [[]]
    assert align_offsets([[0, 2]], []).n_tgt == 0


def test_align_blocks_real_tokenizers(gpt2: GPT2TokenizerFast, llama2: PreTrainedTokenizerFast) -> None:
    text = "Hello world,\n\tnaïve café 😀!"
    s, t = encode_block(gpt2, text), encode_block(llama2, text)
    al = align_blocks(s, t)
    pos = one_to_one(al)
    assert pos[0] == 0  # <|endoftext|> ↔ <s>
    g_texts, l_texts = token_texts(gpt2, s.ids), token_texts(llama2, t.ids)
    pairs = {(g_texts[i], l_texts[j]) for j, i in enumerate(pos.tolist()) if i >= 0}
    assert {("", ""), (" world", " world"), ("\n", "\n"), ("\t", "\t"), ("!", "!")} <= pairs
    # identical spans ⇒ identical text, up to the space a metaspace tokenizer prepends to the first word
    assert ("Hello", " Hello") in pairs
    assert all(a.lstrip(" ") == b.lstrip(" ") for a, b in pairs)
    dtw = align_blocks(s, t, method="dtw", src_tokenizer=gpt2, tgt_tokenizer=llama2)
    assert dtw.n_tgt == len(t) and (dtw.tgt_degree() >= 1).all()
    no_ctx = EncodedBlock(ids=s.ids[1:], offsets=s.offsets[1:], has_context=False)
    assert align_blocks(no_ctx, t)[0].size == 0
    with pytest.raises(ValueError, match="src_tokenizer"):
        align_blocks(s, t, method="dtw")
    with pytest.raises(ValueError, match="offsets or dtw"):
        align_blocks(s, t, method="bogus")


# -- DTW -------------------------------------------------------------------------------------------------

def test_dtw_spec_worked_example() -> None:
    """Spec §1.5.1: base ``▁unbelievable`` vs blending ``Ġun believ able`` → one base position, 3 sources."""
    al = align_dtw([" un", "believ", "able"], [" unbelievable"])
    assert al.to_lists() == [[0, 1, 2]] and one_to_one(al).tolist() == [-1]
    back = align_dtw([" unbelievable"], [" un", "believ", "able"])  # n-to-1: every base token → source 0
    assert back.to_lists() == [[0], [0], [0]] and one_to_one(back).tolist() == [-1, -1, -1]


def test_dtw_markers_are_stripped_for_the_cost() -> None:
    al = align_dtw(["", " Hello", " world"], ["", "Hello", "world"])
    assert one_to_one(al).tolist() == [0, 1, 2]
    assert _same(align_dtw([" a", "b"], ["a", " b"]), align_dtw(["a", "b"], ["a", "b"], strip=""))


def test_dtw_equals_reference_on_random_inputs() -> None:
    rng = np.random.default_rng(0)
    pieces = ["", " ", "a", "b", "ab", " ab", "ba", "abc", "\n", "é", " the", "th", "e"]
    for _ in range(200):
        a = list(rng.choice(pieces, rng.integers(1, 14)))
        c = list(rng.choice(pieces, rng.integers(1, 14)))
        assert _same(align_dtw(a, c), align_dtw_reference(a, c)), (a, c)


def test_dtw_ties_prefer_diag_then_up_then_left() -> None:
    # all costs equal: the backtrack goes diagonally, then up (source) before left (target)
    assert align_dtw(["x"] * 3, ["x"] * 3).to_lists() == [[0], [1], [2]]
    assert align_dtw(["x"] * 3, ["x"] * 2).to_lists() == [[0, 1], [2]]
    assert align_dtw(["x"] * 2, ["x"] * 3).to_lists() == [[0], [0], [1]]
    for n, m in [(3, 2), (2, 3), (4, 1), (1, 4), (1, 1)]:
        a, c = ["x"] * n, ["x"] * m
        assert _same(align_dtw(a, c), align_dtw_reference(a, c))


def test_dtw_empty() -> None:
    assert align_dtw([], ["a"]).to_lists() == [[]]
    assert align_dtw(["a"], []).n_tgt == 0
    assert align_dtw_reference([], []).n_tgt == 0


def test_dtw_on_real_tokens_equals_reference(gpt2: GPT2TokenizerFast, llama2: PreTrainedTokenizerFast) -> None:
    text = "def f(x):\n    return x ** 2  # naïve 😀\n\nprint(f(3))"
    a = token_texts(gpt2, encode_block(gpt2, text).ids)
    c = token_texts(llama2, encode_block(llama2, text).ids)
    assert _same(align_dtw(a, c), align_dtw_reference(a, c))


@pytest.mark.slow
def test_dtw_vectorised_is_100x_faster(gpt2: GPT2TokenizerFast, llama2: PreTrainedTokenizerFast) -> None:
    """2048 × 2048 real tokens: the vectorised DTW against FuseLLM's double loop (same result)."""
    root = Path(tokens_mod.__file__).parents[1]
    text = "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))
    a = token_texts(gpt2, gpt2(text, add_special_tokens=False)["input_ids"][:2048])
    c = token_texts(llama2, llama2(text, add_special_tokens=False)["input_ids"][:2048])
    assert len(a) == len(c) == 2048
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fast = align_dtw(a, c)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = align_dtw_reference(a, c)
    t_ref = time.perf_counter() - t0
    t_fast = min(times)
    print(f"\nDTW 2048x2048: vectorised {t_fast * 1e3:.1f} ms, reference {t_ref:.2f} s, {t_ref / t_fast:.0f}x")
    assert _same(fast, ref)
    assert t_ref / t_fast >= 100
