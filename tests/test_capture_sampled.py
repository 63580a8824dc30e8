"""The sampled tail: the head's exact entries plus draws from the rest, an unbiased estimate of the full CE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from polyfuse.capture.hf import capture, sampled_tail
from polyfuse.capture.store import StoreReader
from polyfuse.corpus.tokens import encode_blocks
from polyfuse.models import load_model, load_tokenizer


def _logprobs(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=g) * 2, -1)


def test_entries_sum_to_one_head_is_exact_and_sorted() -> None:
    lp = _logprobs(6, 50)
    head = torch.topk(lp, 4, -1).indices
    values, ids = sampled_tail(lp.clone(), head, 16, torch.Generator().manual_seed(1))
    assert values.shape == ids.shape == (6, 20)
    w = values.exp()
    assert torch.allclose(w.sum(-1), torch.ones(6), atol=1e-5)  # head mass + r * sum(n_j) / S = 1
    assert torch.all(values[:, 1:] <= values[:, :-1])  # sorted descending, padding (-inf) last
    assert torch.all((ids >= 0) == torch.isfinite(values))  # padding is id -1 exactly where -inf
    for r in range(6):
        got = dict(zip(ids[r].tolist(), values[r].tolist(), strict=True))
        for j in head[r].tolist():
            assert got[j] == pytest.approx(lp[r, j].item(), abs=1e-5)  # the head keeps the true log-probs
        valid = [j for j in ids[r].tolist() if j >= 0]
        assert len(valid) == len(set(valid))  # every id once


def test_unbiased_for_the_full_cross_entropy() -> None:
    """Averaged over draws, -sum w log q equals -sum_V p log q for any student q (and the weights equal p)."""
    lp = _logprobs(1, 40, seed=3)
    student = _logprobs(1, 40, seed=4)[0]
    head = torch.topk(lp, 3, -1).indices
    g = torch.Generator().manual_seed(0)
    acc, est = torch.zeros(40), []
    trials = 4000
    for _ in range(trials):
        values, ids = sampled_tail(lp.clone(), head, 8, g)
        keep = ids[0] >= 0
        w = values[0][keep].exp()
        acc.index_add_(0, ids[0][keep], w)
        est.append(-(w * student[ids[0][keep]]).sum().item())
    full = -(lp[0].exp() * student).sum().item()
    assert np.mean(est) == pytest.approx(full, rel=0.01)
    assert torch.allclose(acc / trials, lp[0].exp(), atol=3e-3)


def test_whole_vocabulary_in_the_head_draws_nothing() -> None:
    lp = _logprobs(2, 5)
    values, ids = sampled_tail(lp.clone(), torch.topk(lp, 5, -1).indices, 4)
    assert torch.all(ids[:, 5:] == -1) and torch.all(torch.isneginf(values[:, 5:]))
    assert torch.allclose(values[:, :5].exp().sum(-1), torch.ones(2), atol=1e-5)


def test_capture_with_samples_is_deterministic_and_keeps_the_head(tiny_world: Path, tmp_path: Path) -> None:
    path = str(tiny_world / "models" / "prose")
    model, tok = load_model(path, device="cpu"), load_tokenizer(path)
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n", "1 + 2 = 3"]
    blocks = list(enumerate(texts))
    capture(model, tok, blocks, tmp_path / "a", k=4, samples=12, seed=7, shard_size=2, progress=False)
    capture(model, tok, blocks, tmp_path / "b", k=4, samples=12, seed=7, shard_size=2, progress=False)
    capture(model, tok, blocks, tmp_path / "top", k=4, progress=False)
    a, b, top = StoreReader(tmp_path / "a"), StoreReader(tmp_path / "b"), StoreReader(tmp_path / "top")
    assert a.k == 16 and a.meta["samples"] == 12 and a.meta["head_k"] == 4
    for (bid, _), enc in zip(blocks, encode_blocks(tok, texts), strict=True):
        ra, rb, rt = a[bid], b[bid], top[bid]
        assert np.array_equal(ra.ids, rb.ids) and np.array_equal(ra.logprobs, rb.logprobs)
        assert np.array_equal(ra.target_logprob, rt.target_logprob)
        mass = np.exp(ra.logprobs.astype(np.float64)).sum(-1)
        assert np.allclose(mass, 1.0, atol=5e-3)  # fp16 entries
        for p in range(len(enc) - 1):  # the top-4 ids are all among the stored entries
            assert set(rt.ids[p].tolist()) <= set(ra.ids[p].tolist())
