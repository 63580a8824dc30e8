"""Prefix masses: the exact probability that the next token extends each byte prefix of the actual one,
stored by the capture and used to condition positions inside a source token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from polyfuse.capture.prefix import PrefixRanges
from polyfuse.capture.store import BlockTopK, StoreReader, StoreWriter


def _brute(pieces, logprobs: np.ndarray, target: int, max_bytes: int) -> list[float]:
    """log P(u*) by definition: every token whose bytes start with u and are longer."""
    out = []
    piece = pieces[target]
    for n in range(1, max_bytes + 1):
        if piece is None or n >= len(piece):
            out.append(np.nan)
            continue
        u = piece[:n]
        mass = sum(np.exp(logprobs[v]) for v, p in enumerate(pieces) if p is not None and len(p) > n and p.startswith(u))
        out.append(np.log(mass))
    return out


def test_prefix_ranges_equal_the_definition_on_a_random_vocabulary() -> None:
    rng = np.random.default_rng(0)
    alphabet = [b"a", b"b", b"\xff", b"\x00", b" "]
    pieces: list[bytes | None] = [None]
    while len(pieces) < 120:
        piece = b"".join(rng.choice(alphabet) for _ in range(int(rng.integers(1, 6))))
        pieces.append(piece)                     # duplicates on purpose (byte fallback spells text twice)
    vocab = len(pieces) + 3                      # head rows past the tokenizer: never a piece
    ranges = PrefixRanges(pieces, vocab, max_bytes=4)
    logits = torch.from_numpy(rng.normal(size=(30, vocab)) * 2)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    targets = torch.from_numpy(rng.integers(0, len(pieces), size=30))
    got = ranges.logmass(logits.float(), targets, lse.float()).numpy()
    lp = (logits - lse).numpy()
    for r in range(30):
        want = _brute(pieces, lp[r], int(targets[r]), 4)
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert np.all(np.isnan(got[r]) | (got[r] >= lp[r, int(targets[r])] - 1e-5))   # at least its own


def test_store_round_trips_prefix_masses_and_refuses_rows_without_them(tmp_path: Path) -> None:
    masses = np.array([[-0.5, np.nan], [-1.0, -2.0]], dtype=np.float16)
    row = BlockTopK(7, np.array([[1, 2], [3, -1]]), np.log(np.array([[0.6, 0.4], [1.0, 0.0]])).astype(np.float16),
                    np.array([-0.5, -0.1], dtype=np.float16), 0.6, prefix_logmass=masses)
    writer = StoreWriter(tmp_path / "s", k=2, vocab_size=10, meta={}, prefix_bytes=2)
    with pytest.raises(ValueError, match="prefix_logmass"):
        writer.write_shard(0, [BlockTopK(7, row.ids, row.logprobs, row.target_logprob, 0.6)])
    writer.write_shard(0, [row])
    writer.finalize()
    got = StoreReader(tmp_path / "s")[7].prefix_logmass
    assert got.shape == (2, 2) and np.array_equal(got, masses, equal_nan=True)
    plain = StoreWriter(tmp_path / "p", k=2, vocab_size=10, meta={})   # without: no column, None on read
    plain.write_shard(0, [row])
    plain.finalize()
    assert StoreReader(tmp_path / "p")[7].prefix_logmass is None


def test_inside_positions_use_the_exact_mass_instead_of_the_stored_entries() -> None:
    """The stored entries hold only the actual ".\\n" (0.06), so summed from them the target's "\\n" after
    "." is certain; the capture says tokens extending "." have 0.3 in all, so it is 0.2."""
    from tests.test_align_transfer import _inside_world

    from polyfuse.align.transfer import RemainderMap, inside_token_entries, shared_start_positions

    src_table, tgt_table, src, tgt = _inside_world()
    pos = shared_start_positions(src, tgt)
    lp = np.log(np.array([[0.5, 0.3]] * 4, dtype=np.float32)).astype(np.float16)
    row = BlockTopK(3, np.array([[1, 5]] * 4), lp, np.array([-0.7, np.log(0.06), -0.5, -0.4], dtype=np.float16), 5.0)
    guessed = inside_token_entries(row, src, tgt, "end.\nok", src_table, RemainderMap(tgt_table), pos)
    assert guessed.probs.tolist() == [1.0]                         # the label, not the teacher
    row.prefix_logmass = np.full((4, 2), np.nan, dtype=np.float16)
    row.prefix_logmass[1, 0] = np.log(0.3)                        # position 1 predicts ".\n": P(".*") = 0.3
    exact = inside_token_entries(row, src, tgt, "end.\nok", src_table, RemainderMap(tgt_table), pos)
    assert exact.positions.tolist() == [2] and exact.ids.tolist() == [3]
    assert exact.probs[0] == pytest.approx(0.2, rel=3e-3)
    assert float(exact.target_logprob[0]) == pytest.approx(np.log(0.2), rel=3e-3)


def test_capture_stores_prefix_masses_that_match_the_model(tiny_world: Path, tmp_path: Path) -> None:
    from polyfuse.align.normalize import token_table
    from polyfuse.capture.hf import capture
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_model, load_tokenizer

    path = str(tiny_world / "models" / "code")
    model, tok = load_model(path, device="cpu"), load_tokenizer(path)
    texts = ["def shallow_copy(items):\n    return list(items)\n", "The quick brown fox."]
    pieces = token_table(tok).pieces
    with pytest.raises(ValueError, match="pieces"):
        capture(model, tok, list(enumerate(texts)), tmp_path / "s", k=4, prefix_bytes=3, progress=False)
    capture(model, tok, list(enumerate(texts)), tmp_path / "s", k=4, samples=8, prefix_bytes=3, pieces=pieces,
            progress=False)
    store = StoreReader(tmp_path / "s")
    assert store.prefix_bytes == 3
    for bid, enc in enumerate(encode_blocks(tok, texts)):
        ids = torch.from_numpy(enc.ids)[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()     # [T, V]
        got = store[bid].prefix_logmass.astype(np.float64)
        assert got.shape == (len(enc) - 1, 3) and np.isfinite(got).any()
        for t in range(len(enc) - 1):
            want = _brute(pieces + [None] * (lp.shape[1] - len(pieces)), lp[t], int(enc.ids[t + 1]), 3)
            np.testing.assert_allclose(got[t], want, atol=2e-2, rtol=5e-3, equal_nan=True)   # fp16 storage
