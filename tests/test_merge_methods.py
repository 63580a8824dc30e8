"""Merge methods on small tensors: hand-computed results, chunked == whole, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from polyfuse.errors import PolyfuseError
from polyfuse.merge.blocks import stream_seed
from polyfuse.merge.methods import METHODS, merge_tensors
from polyfuse.merge.select import TopK


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---- hand-computed results ---------------------------------------------------------------------


def test_linear_weighted_mean_and_unnormalized_sum():
    a, b = t(1, 2), t(3, 6)
    assert merge_tensors("linear", [a, b], parameters={"weight": [1, 3]}).tolist() == [2.5, 5.0]
    out = merge_tensors("linear", [a, b], parameters={"weight": [1, 3], "normalize": False})
    assert out.tolist() == [10.0, 20.0]


def test_task_arithmetic_with_lambda():
    base = t(0, 1)
    out = merge_tensors("task_arithmetic", [t(1, 1), t(2, 3)], base=base,
                        parameters={"weight": [0.5, 1.0], "lambda": 2.0})
    # deltas [1, 0] and [2, 2]: base + 2 * (0.5 * [1, 0] + [2, 2])
    assert out.tolist() == [5.0, 5.0]


def test_ties_trim_elect_disjoint_mean():
    base = torch.zeros(4)
    d1, d2 = t(3, -1, 0.5, 2), t(-2, -4, 1, 1)
    # density 0.5 keeps |3|, |2| of d1 and |-4|, |-2| of d2: [3, 0, 0, 2] and [-2, -4, 0, 0]
    equal = merge_tensors("ties", [d1, d2], base=base, parameters={"weight": [1, 1], "density": 0.5})
    # elected signs of the sum [1, -4, 0, 2]: + - + +; agreeing entries averaged
    assert equal.tolist() == [3.0, -4.0, 0.0, 2.0]
    weighted = merge_tensors("ties", [d1, d2], base=base, parameters={"weight": [1, 3], "density": 0.5})
    # weighted sum [3 - 6, -12, 0, 2]: - - + +; [-6, -12, 0, 2] / [3, 3, 1, 1]
    assert weighted.tolist() == [-2.0, -4.0, 0.0, 2.0]


def test_ties_density_one_is_sign_consensus_only():
    base = torch.zeros(3)
    out = merge_tensors("ties", [t(1, -2, 3), t(3, 1, -1)], base=base, parameters={"weight": [1, 1]})
    # sums [4, -1, 2]: the entry 1 of the second model disagrees at position 1, -1 at position 2
    assert out.tolist() == [2.0, -2.0, 3.0]


def test_dare_linear_follows_its_documented_drop_stream():
    torch.manual_seed(0)
    base = torch.randn(64)
    deltas = [torch.randn(64), torch.randn(64)]
    density = [0.3, 0.7]
    out = merge_tensors("dare_linear", [base + d for d in deltas], base=base, name="w", seed=5,
                        parameters={"weight": [1.0, 2.0], "density": density, "rescale": False})
    expected = base.clone()
    for i, (d, rho, w) in enumerate(zip(deltas, density, [1.0, 2.0], strict=True)):
        u = torch.rand(64, generator=torch.Generator().manual_seed(stream_seed(5, "w", i)))
        expected += w * d * (u < rho)
    torch.testing.assert_close(out, expected)


def test_dare_rescale_keeps_the_l1_norm_of_each_task_vector():
    torch.manual_seed(1)
    base, delta = torch.randn(1000), torch.randn(1000)
    out = merge_tensors("dare_linear", [base + delta], base=base, parameters={"weight": 1.0, "density": 0.4})
    merged = out - base
    kept = merged != 0
    assert 0.3 < kept.float().mean() < 0.5
    torch.testing.assert_close(merged.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    ratio = merged[kept] / delta[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-4, atol=0)


def test_dare_ties_with_density_one_equals_ties():
    torch.manual_seed(2)
    base = torch.randn(20, 3)
    models = [base + torch.randn(20, 3) for _ in range(3)]
    params = {"weight": [0.2, 0.5, 0.3], "density": 1.0, "normalize": True}
    torch.testing.assert_close(merge_tensors("dare_ties", models, base=base, parameters=params),
                               merge_tensors("ties", models, base=base, parameters=params), rtol=0, atol=0)


def test_sce_without_selection_both_variants():
    base = torch.zeros(4)
    d1, d2 = t(1, 2, 0, -1), t(3, -2, 0, -1)
    # eta = mean squares [1.5, 3.5] / 5 = [0.3, 0.7]; signs of the sum [4, 0, 0, -2]: + + + -
    for variant in ("fusechat", "mergekit"):
        out = merge_tensors("sce", [d1, d2], base=base, parameters={"sce_variant": variant})
        torch.testing.assert_close(out, t(2.4, 2.0, 0.0, -1.0))


def test_sce_selection_sets_weights_only_in_fusechat_and_sparsifies_in_mergekit():
    base = torch.zeros(4)
    d1, d2 = t(1, 2, 0, -1), t(3, -2, 0, -1)
    # variances [1, 4, 0, 0]: nnz 2, select_topk 0.5 keeps 1 entry (position 1); eta = [0.5, 0.5]
    params = {"select_topk": 0.5}
    fusechat = merge_tensors("sce", [d1, d2], base=base, parameters={**params, "sce_variant": "fusechat"})
    torch.testing.assert_close(fusechat, t(2.0, 2.0, 0.0, -1.0))
    mergekit = merge_tensors("sce", [d1, d2], base=base, parameters={**params, "sce_variant": "mergekit"})
    torch.testing.assert_close(mergekit, t(0.0, 2.0, 0.0, 0.0))


def test_sce_mergekit_falls_back_to_uniform_weights_for_small_deltas():
    base = torch.zeros(2)
    d1, d2 = t(1e-4, 1e-4), t(3e-4, 3e-4)  # mean squares 1e-8 and 9e-8: below mergekit's 1e-6
    mergekit = merge_tensors("sce", [d1, d2], base=base, parameters={"sce_variant": "mergekit"})
    fusechat = merge_tensors("sce", [d1, d2], base=base, parameters={"sce_variant": "fusechat"})
    torch.testing.assert_close(mergekit, t(2e-4, 2e-4))  # (0.5 * 1e-4 + 0.5 * 3e-4) / 1
    torch.testing.assert_close(fusechat, t(2.8e-4, 2.8e-4))  # 0.1 * 1e-4 + 0.9 * 3e-4


def test_varm_weights_each_model_by_its_own_change():
    base = t(1, 1)
    out = merge_tensors("varm", [base + t(1, 1), base + t(0, 2)], base=base)
    # mean squared change 1 and 2 -> weights 1/3 and 2/3 (not the plain average [1.5, 2.5])
    torch.testing.assert_close(out, t(1 + 1 / 3, 1 + 1 / 3 + 4 / 3))


def test_varm_unchanged_tensor_is_the_base():
    base = t(1, 2, 3)
    assert torch.equal(merge_tensors("varm", [base.clone(), base.clone()], base=base), base)


# ---- chunking, determinism, errors -------------------------------------------------------------

CASES = {
    "linear": {"weight": [0.2, 0.5, 0.3]},
    "task_arithmetic": {"weight": [0.2, 0.5, 0.3], "lambda": 0.8, "normalize": True},
    "ties": {"weight": [0.2, 0.5, 0.3], "density": [0.3, 0.5, 0.7]},
    "dare_linear": {"weight": [0.2, 0.5, 0.3], "density": 0.5},
    "dare_ties": {"weight": [0.2, 0.5, 0.3], "density": [0.3, 0.6, 0.9]},
    "sce-fusechat": {"select_topk": 0.3, "sce_variant": "fusechat"},
    "sce-mergekit": {"select_topk": 0.3, "sce_variant": "mergekit"},
    "varm": {},
    "breadcrumbs": {"weight": [0.2, 0.5, 0.3], "density": [0.3, 0.5, 0.7], "gamma": [0.05, 0.2, 0.0]},
    "breadcrumbs_ties": {"weight": [0.2, 0.5, 0.3], "density": [0.3, 0.6, 0.9], "gamma": 0.1},
    "della": {"weight": [0.2, 0.5, 0.3], "density": [0.3, 0.5, 0.7], "epsilon": 0.1},
    "della_linear": {"weight": [0.2, 0.5, 0.3], "density": 0.4, "epsilon": [0.1, 0.2, 0.3]},
    "slerp": {"t": 0.3},
    "nuslerp-flat": {"weight": [0.3, 0.7]},
    "nuslerp-rows": {"weight": [0.3, 0.7], "nuslerp_flatten": False},
    "nuslerp-columns": {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True},
    "nuslerp-nobase": {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True},
    "model_stock": {},
    "model_stock-filter": {"filter_wise": True},
    "passthrough": {},
    "passthrough-scale": {"scale": 0.5},
}
MODELS = {"slerp": 1, "nuslerp": 2, "passthrough": 1}  # merged inputs besides the base (3 for the others)
NO_BASE = ("linear", "nuslerp-nobase", "passthrough", "passthrough-scale")


def test_every_registered_method_has_a_case():
    assert {case.split("-")[0] for case in CASES} == set(METHODS)


SELECTING = ("ties", "sce-fusechat", "sce-mergekit", "breadcrumbs", "breadcrumbs_ties")  # top-k: sorted or radix


@pytest.mark.parametrize(("case", "select"), [(c, "sorted") for c in sorted(CASES)] +
                         [(c, "histograms") for c in SELECTING])
@pytest.mark.parametrize("shape", [(37, 11), (53,), (13, 4, 3)])
def test_chunked_equals_whole(monkeypatch, case, shape, select):
    """The bounded-memory path (row chunks, statistics passes) gives the whole-tensor result exactly."""
    if select == "histograms":
        monkeypatch.setattr("polyfuse.merge.select.SMALL_BYTES", 0)
    method = case.split("-")[0]
    torch.manual_seed(3)
    base = torch.randn(shape)
    models = [base + 0.1 * torch.randn(shape) for _ in range(3)]
    models[1][: shape[0] // 3] = base[: shape[0] // 3]  # unchanged rows: ties and zero variance
    models = models[-MODELS.get(method, 3):]
    kwargs = {"base": None if case in NO_BASE else base, "parameters": CASES[case], "seed": 9}
    whole = merge_tensors(method, models, **kwargs)
    for rows in (1, 4, shape[0] - 1):
        assert torch.equal(whole, merge_tensors(method, models, chunk_rows=rows, **kwargs)), rows


def test_dare_is_deterministic_given_the_seed():
    torch.manual_seed(4)
    base = torch.randn(30, 5)
    models = [base + torch.randn(30, 5) for _ in range(2)]
    params = {"weight": [0.5, 0.5], "density": 0.5}
    run = lambda seed, name="w": merge_tensors("dare_ties", models, base=base, parameters=params,  # noqa: E731
                                               seed=seed, name=name)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert not torch.equal(run(1), run(1, name="other"))


def test_missing_required_weight_names_the_key():
    with pytest.raises(PolyfuseError, match=r"models\[0\]\.parameters\.weight: required by ties"):
        merge_tensors("ties", [torch.zeros(2)], base=torch.zeros(2), parameters={"density": 0.5})


def test_sce_variant_must_be_named():
    with pytest.raises(PolyfuseError, match=r"parameters\.sce_variant: required by sce"):
        merge_tensors("sce", [torch.zeros(2)], base=torch.zeros(2))


def test_out_of_range_density_is_rejected():
    with pytest.raises(PolyfuseError, match=r"density: must be between 0 and 1"):
        merge_tensors("ties", [torch.zeros(2)], base=torch.zeros(2), parameters={"weight": 1.0, "density": 1.5})


# ---- exact streaming top-k ---------------------------------------------------------------------


@pytest.mark.parametrize("small_bytes", [0, 1 << 22], ids=["histograms", "sorted"])
def test_streaming_topk_matches_a_stable_sort_with_ties(small_bytes):
    gen = torch.Generator().manual_seed(0)
    for trial in range(24):
        n = int(torch.randint(1, 200, (), generator=gen))
        values = torch.rand(3, n, generator=gen)
        if trial % 2:  # many ties, zeros included
            values = torch.randint(0, 5, (3, n), generator=gen).float() * 0.25
        ks = [int(torch.randint(-1, n + 2, (), generator=gen)) for _ in range(3)]
        chunks = torch.split(values, int(torch.randint(1, n + 1, (), generator=gen)), dim=1)
        select = TopK(3, small_bytes=small_bytes)
        for c in chunks:
            select.count_high(c)
        select.choose(ks)
        for c in chunks:
            select.count_low(c)
        select.finish()
        select.restart()
        got = torch.cat([select.keep(c) for c in chunks], dim=1)
        for s in range(3):
            expected = torch.zeros(n, dtype=torch.bool)
            expected[torch.argsort(values[s], descending=True, stable=True)[: max(0, min(ks[s], n))]] = True
            assert torch.equal(got[s], expected), (trial, s)


def test_sums_do_not_depend_on_the_chunking():
    from polyfuse.merge.blocks import RowSums

    values = torch.randn(3, 10_000, generator=torch.Generator().manual_seed(5))  # a 1-D tensor, 3 models
    totals = []
    for sizes in ([10_000], [1, 4095, 5904], [7] * 1428 + [4], [4096, 4096, 1808]):
        sums, offset = RowSums(), 0
        for size in sizes:
            sums.add(values[:, offset:offset + size])
            offset += size
        totals.append(sums.total())
    assert all(torch.equal(totals[0], t) for t in totals[1:])
    torch.testing.assert_close(totals[0], values.double().sum(1))
