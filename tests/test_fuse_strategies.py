"""Fusion strategies against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyfuse.errors import DataError, PolyfuseError
from polyfuse.fuse.strategies import (
    STRATEGIES,
    FusionStats,
    TeacherBlock,
    fuse_block,
    get_strategy,
    register,
)

NAN, NEG = float("nan"), float("-inf")


def teacher(ids, probs, token_nll, valid=None, seq_nll=0.0, dtype=np.float32) -> TeacherBlock:
    """Teacher from probabilities (0 -> padding, written as id -1 / -inf)."""
    ids, probs = np.asarray(ids), np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logprobs = np.where(probs > 0, np.log(probs), NEG).astype(dtype)
    valid = np.ones(len(ids), dtype=bool) if valid is None else valid
    return TeacherBlock(np.where(probs > 0, ids, -1), logprobs, token_nll, valid, seq_nll)


def probs_of(fused, row: int) -> dict[int, float]:
    return {int(i): float(np.exp(lp)) for i, lp in zip(fused.ids[row], fused.logprobs[row], strict=True) if i >= 0}


# Two positions; teacher 0 is the target itself.
T0 = teacher([[3, 4], [7, 8]], [[0.6, 0.3], [0.5, 0.4]], [0.9, 1.2], seq_nll=30.0)
T1 = teacher([[4, 5], [8, 9]], [[0.7, 0.2], [0.9, 0.05]], [0.4, 2.0], seq_nll=20.0)
T2 = teacher([[5, 6], [9, 1]], [[0.8, 0.1], [0.6, 0.3]], [0.1, 0.5], valid=np.array([False, True]),
             seq_nll=NAN)


def test_min_ce_sequence_picks_lowest_total_nll():
    fused = fuse_block([T0, T1, T2], strategy="min_ce", level="sequence")
    assert fused.ids.tolist() == [[4, 5], [8, 9]]                     # T1 (T2 has NaN: never chosen)
    assert np.allclose(np.exp(fused.logprobs), [[0.7, 0.2], [0.9, 0.05]])
    assert fused.ids.dtype == np.int64 and fused.logprobs.dtype == np.float32
    assert fused.stats.weight.tolist() == [0.0, 2.0, 0.0] and fused.stats.fallback == 0


def test_min_ce_sequence_ties_and_all_nan_go_to_teacher_0():
    tie = teacher([[4, 5], [8, 9]], [[0.7, 0.2], [0.9, 0.05]], [0.4, 2.0], seq_nll=30.0)
    assert fuse_block([T0, tie], strategy="min_ce").ids.tolist() == [[3, 4], [7, 8]]
    nan0 = teacher([[3, 4], [7, 8]], [[0.6, 0.3], [0.5, 0.4]], [0.9, 1.2], seq_nll=NAN)
    fused = fuse_block([nan0, T2], strategy="min_ce")
    assert fused.ids.tolist() == [[3, 4], [7, 8]] and fused.stats.fallback == 2


def test_min_ce_token_picks_lowest_valid_token_nll():
    fused = fuse_block([T0, T1, T2], strategy="min_ce", level="token", k_out=3)
    # position 0: T2 has the lowest NLL (0.1) but is invalid -> T1 (0.4); position 1: T2 (0.5)
    assert fused.ids.tolist() == [[4, 5, -1], [9, 1, -1]]
    assert fused.logprobs[0, 2] == NEG
    assert fused.stats.weight.tolist() == [0.0, 1.0, 1.0]


def test_min_ce_token_without_any_usable_teacher_falls_back_to_teacher_0():
    t0 = teacher([[3, 4]], [[0.6, 0.3]], [NAN])
    t1 = teacher([[4, 5]], [[0.7, 0.2]], [0.1], valid=np.array([False]))
    fused = fuse_block([t0, t1], strategy="min_ce", level="token")
    assert fused.ids.tolist() == [[3, 4]] and fused.stats.fallback == 1
    tie = fuse_block([teacher([[3, 4]], [[0.6, 0.3]], [0.5]), t1.__class__(t1.ids, t1.logprobs, [0.5], [True], 0)],
                     strategy="min_ce", level="token")
    assert tie.ids.tolist() == [[3, 4]]                                # equal NLL -> first teacher


def test_avg_ce_token_weights_and_union():
    fused = fuse_block([T0, T1, T2], strategy="avg_ce", level="token", k_out=4)
    # position 0: T2 invalid -> w = softmax(-[0.9, 0.4]) over T0, T1
    w0, w1 = (np.exp(-0.9), np.exp(-0.4)) / (np.exp(-0.9) + np.exp(-0.4))
    expected0 = {3: w0 * 0.6, 4: w0 * 0.3 + w1 * 0.7, 5: w1 * 0.2}
    got0 = probs_of(fused, 0)
    assert got0.keys() == expected0.keys() and all(math.isclose(got0[k], v, rel_tol=1e-6) for k, v in expected0.items())
    assert fused.ids[0].tolist() == [4, 3, 5, -1]                      # most probable first, then padding
    # position 1: all three valid
    w = np.exp(-np.array([1.2, 2.0, 0.5]))
    w /= w.sum()
    expected1 = {7: w[0] * 0.5, 8: w[0] * 0.4 + w[1] * 0.9, 9: w[1] * 0.05 + w[2] * 0.6, 1: w[2] * 0.3}
    got1 = probs_of(fused, 1)
    assert got1.keys() == expected1.keys() and all(math.isclose(got1[k], v, rel_tol=1e-6) for k, v in expected1.items())
    assert np.allclose(fused.stats.weight, [w0 + w[0], w1 + w[1], w[2]])


def test_avg_ce_keeps_top_k_out():
    fused = fuse_block([T0, T1], strategy="avg_ce", level="token", k_out=1)
    assert fused.ids.shape == (2, 1) and fused.ids[:, 0].tolist() == [4, 8]


def test_avg_ce_sequence_uses_softmax_of_minus_ce_per_byte():
    fused = fuse_block([T0, T1, T2], strategy="avg_ce", level="sequence", n_bytes=10, k_out=6)
    w0, w1 = np.exp(-3.0), np.exp(-2.0)                               # CE = 30/10, 20/10; T2 NaN -> 0
    w0, w1 = w0 / (w0 + w1), w1 / (w0 + w1)
    assert np.allclose(fused.stats.share, [w0, w1, 0.0])
    got = probs_of(fused, 0)
    assert math.isclose(got[4], w0 * 0.3 + w1 * 0.7, rel_tol=1e-6) and 6 not in got
    # the reference's softmax(exp(-CE)) would be near-uniform: (0.488, 0.512); ours is not
    assert w1 > 0.7
    # without a byte count the divisor is the number of positions (2)
    by_positions = fuse_block([T0, T1], strategy="avg_ce", level="sequence")
    assert np.allclose(by_positions.stats.share[1], 1 / (1 + np.exp(-5.0)))


def test_duplicate_ids_within_a_teacher_are_summed():
    dup = teacher([[4, 4, 2]], [[0.2, 0.3, 0.4]], [0.1], seq_nll=1.0)
    fused = fuse_block([dup], strategy="min_ce", k_out=3)
    assert fused.ids.tolist() == [[4, 2, -1]]
    assert np.allclose(np.exp(fused.logprobs[0, :2]), [0.5, 0.4])


def test_float16_inputs_and_different_k():
    t0 = teacher([[3, 4, 5]], [[0.5, 0.3, 0.1]], [0.2], dtype=np.float16)
    t1 = teacher([[4]], [[0.9]], [0.2])
    fused = fuse_block([t0, t1], strategy="avg_ce", level="token")
    assert fused.ids.shape == (1, 3) and fused.logprobs.dtype == np.float32
    assert fused.ids[0].tolist() == [4, 3, 5]


def test_none_strategy_is_empty():
    fused = fuse_block([T0, T1], strategy="none")
    assert fused.ids.shape == (2, 0) and fused.training_fields() == {}
    assert fuse_block([], strategy="none").ids.shape == (0, 0)
    assert set(fuse_block([T0], strategy="min_ce").training_fields()) == {"teacher_ids", "teacher_logprobs"}


def test_registry():
    assert {"min_ce", "avg_ce", "none"} <= set(STRATEGIES)
    assert get_strategy("min_ce").reference
    with pytest.raises(PolyfuseError, match="choose one of min_ce, avg_ce, none"):
        get_strategy("max_ce")
    with pytest.raises(ValueError, match="already registered"):
        register("min_ce", pretty_name="dup")(lambda *a, **k: None)


def test_input_validation_and_mappings():
    with pytest.raises(DataError, match="disagree"):
        fuse_block([T0, teacher([[1]], [[1.0]], [0.1])])
    with pytest.raises(DataError, match="token_nll and valid"):
        TeacherBlock(np.zeros((2, 1)), np.zeros((2, 1)), [0.1], [True, True], 1.0)
    with pytest.raises(DataError, match="lacks seq_nll"):
        TeacherBlock.from_mapping({"ids": [[1]], "logprobs": [[0.0]], "token_nll": [0.1], "valid": [True]})
    with pytest.raises(PolyfuseError, match="level"):
        fuse_block([T0], level="block")  # type: ignore[arg-type]
    row = {"ids": T1.ids, "logprobs": T1.logprobs, "token_nll": T1.token_nll, "valid": T1.valid, "seq_nll": 1.0}
    assert fuse_block([T0, row], strategy="min_ce").ids.tolist() == T1.ids.tolist()


def test_stats_add_up_over_blocks():
    a = fuse_block([T0, T1], strategy="min_ce", level="token").stats
    b = fuse_block([T0, T1], strategy="min_ce", level="sequence").stats
    total = a + b
    assert isinstance(total, FusionStats) and total.positions == 4
    assert total.weight.tolist() == [1.0, 3.0]
    assert total.as_dict()["share"] == [0.25, 0.75]


@pytest.mark.parametrize("seed", range(5))
def test_avg_ce_matches_a_dictionary_reference(seed):
    """Random teachers with duplicates, padding and invalid positions vs a per-position dict sum."""
    rng = np.random.default_rng(seed)
    p, k, vocab, m = 6, 4, 9, 3
    teachers = []
    for _ in range(m):
        ids = rng.integers(0, vocab, (p, k))                            # duplicates likely
        probs = rng.dirichlet(np.ones(k), p) * rng.uniform(0.5, 1.0)
        probs[rng.random((p, k)) < 0.2] = 0.0                           # padding
        nll = rng.uniform(0.1, 3.0, p)
        nll[rng.random(p) < 0.2] = NAN
        teachers.append(teacher(ids, probs, nll, valid=rng.random(p) < 0.8, seq_nll=rng.uniform(5, 9)))
    fused = fuse_block(teachers, strategy="avg_ce", level="token", k_out=5)
    for t in range(p):
        usable = [i for i, tb in enumerate(teachers) if tb.valid[t] and np.isfinite(tb.token_nll[t])]
        w = np.exp(-np.array([teachers[i].token_nll[t] for i in usable])) if usable else np.ones(1)
        usable, w = usable or [0], w / w.sum()                          # no usable teacher: teacher 0 alone
        ref: dict[int, float] = {}
        for wi, i in zip(w, usable, strict=True):
            for tid, lp in zip(teachers[i].ids[t], teachers[i].logprobs[t], strict=True):
                if tid >= 0:
                    ref[int(tid)] = ref.get(int(tid), 0.0) + wi * float(np.exp(np.float64(lp)))
        top = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        got = probs_of(fused, t)
        assert list(got) == [i for i, _ in top]
        assert np.allclose(list(got.values()), [v for _, v in top], rtol=1e-6)


def test_fusion_teachers_order_fallback_target_sources_and_store_padding() -> None:
    import numpy as np

    from polyfuse.capture.store import BlockTopK
    from polyfuse.fuse.strategies import fuse_block
    from polyfuse.fuse.teachers import fused_store_row, fusion_teachers, lead_teachers, teacher_names

    lp = np.log(np.array([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2]], dtype=np.float16))
    target = BlockTopK(0, np.array([[1, 2], [3, 4], [5, 6]]), lp, np.log(np.array([0.6, 0.5, 0.7])), 1.2)
    source = BlockTopK(0, np.array([[1, 7], [3, 8], [-1, -1]]), lp, np.array([np.log(0.6), np.log(0.4), np.nan]), 0.9)
    label = fusion_teachers(target, [source], fallback="label", include_target=True, next_ids=np.array([1, 3, 5]))
    assert len(label) == 3 == lead_teachers("label", True) + 1
    assert teacher_names("t", ["s"], "label", True) == ["label", "t", "s"]
    assert not label[0].valid.any() and (label[0].ids[:, 0] == [1, 3, 5]).all()   # the one-hot, never valid
    assert label[1].valid.tolist() == [True, True, False]       # the target: only where a source reaches
    assert label[2].valid.tolist() == [True, True, False]
    plain = fusion_teachers(target, [source], fallback="target", include_target=True)
    assert len(plain) == 2 and plain[0].valid.all() and teacher_names("t", ["s"], "target", True) == ["t", "s"]
    alone = fusion_teachers(target, [source], fallback="target", include_target=False)
    assert len(alone) == 2 and not alone[0].valid.any() and np.isnan(alone[0].seq_nll)
    fused = fuse_block(plain, strategy="min_ce", level="token", k_out=2, n_bytes=3)
    row = fused_store_row(0, fused, target, k=4)
    assert row.ids.shape == (3, 4) and (row.ids[:, 2:] == -1).all() and np.isneginf(row.logprobs[:, 2:]).all()
    assert row.nll_sum == 1.2
