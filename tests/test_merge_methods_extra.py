"""slerp, nuslerp, model_stock, breadcrumbs and della on small tensors, against direct formulas.

Every expected value is computed here from the method's definition (mergekit 0.1.5's), in float64,
independently of polyfuse's mergers; chunking is covered by ``test_merge_methods.py``'s CASES.
"""

from __future__ import annotations

import math

import pytest
import torch

from polyfuse.errors import PolyfuseError
from polyfuse.merge.blocks import ColumnSums, stream_seed, vector_sums
from polyfuse.merge.methods import merge_tensors

CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- slerp -----------------------------------------------------------------------------------------


def direct_slerp(x: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whole-tensor slerp: θ = acos(â·b̂); sin((1−x)θ)/sin θ · a + sin(xθ)/sin θ · b."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64 / a64.norm(), b64 / b64.norm()).clamp(-1, 1)
    theta = torch.acos(cos)
    out = (torch.sin((1 - x) * theta) * a64 + torch.sin(x * theta) * b64) / torch.sin(theta)
    return out.view(a.shape).float()


@pytest.mark.parametrize("x", [0.0, 0.3, 1.0, 1.4])
def test_slerp_follows_the_great_circle(x):
    base, other = randn(6, 5, seed=1), randn(6, 5, seed=2)
    out = merge_tensors("slerp", [other], base=base, parameters={"t": x})
    torch.testing.assert_close(out, direct_slerp(x, base, other), **CLOSE)


def test_slerp_of_orthogonal_unit_vectors_keeps_the_norm():
    out = merge_tensors("slerp", [t(0, 1)], base=t(1, 0), parameters={"t": 0.5})
    torch.testing.assert_close(out, t(math.sqrt(0.5), math.sqrt(0.5)))  # a lerp would give [0.5, 0.5]


def _at_angle(cos: float) -> tuple[torch.Tensor, torch.Tensor]:
    return t(2.0, 0.0), t(3 * cos, 3 * math.sqrt(1 - cos * cos))


@pytest.mark.parametrize(("cos", "linear"), [(0.9994, False), (0.9996, True), (-0.9996, True), (1.0, True)])
def test_slerp_is_linear_above_the_dot_threshold(cos, linear):
    base, other = _at_angle(cos)
    out = merge_tensors("slerp", [other], base=base, parameters={"t": 0.5})
    lerp = 0.5 * base + 0.5 * other
    if linear:
        torch.testing.assert_close(out, lerp, rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(out, direct_slerp(0.5, base, other), rtol=1e-6, atol=1e-7)
        assert (out - lerp).abs().max() > 1e-5


@pytest.mark.parametrize("tiny", [0.0, 1e-9])
def test_slerp_does_not_normalise_a_vector_with_a_norm_below_eps(tiny):
    base, other = t(tiny, 0), t(3, 4)
    out = merge_tensors("slerp", [other], base=base, parameters={"t": 0.25})
    # the norm counts as 1: cos θ = 3·tiny/5 ≈ 0, θ ≈ π/2, so the result is about sin(π/8) · other
    # (normalised, cos θ would be 3/5)
    torch.testing.assert_close(out, math.sin(0.25 * math.pi / 2) * other + math.cos(0.25 * math.pi / 2) * base)


def test_slerp_merges_exactly_one_model_and_needs_t():
    with pytest.raises(PolyfuseError, match=r"models: slerp merges exactly 1 model besides base_model, got 2"):
        merge_tensors("slerp", [t(1), t(2)], base=t(0), parameters={"t": 0.5})
    with pytest.raises(PolyfuseError, match=r"parameters\.t: required by slerp"):
        merge_tensors("slerp", [t(1)], base=t(0))


# ---- nuslerp ---------------------------------------------------------------------------------------


def direct_nuslerp(x: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's nuslerp over the last dim of [N, L]: norms clamped at 1e-7, lerp when 1 − cos² ≤ 1e-16."""
    a64, b64 = a.double(), b.double()
    au = a64 / a64.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    bu = b64 / b64.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (au * bu).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    out = (torch.sin((1 - x) * theta) * a64 + torch.sin(x * theta) * b64) / torch.sin(theta)
    out = torch.where(1 - cos * cos <= 1e-16, (1 - x) * a64 + x * b64, out)
    return out.float()


@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_vectors_and_task_vectors(mode, with_base):
    base, m0, m1 = randn(7, 5, seed=3), randn(7, 5, seed=4), randn(7, 5, seed=5)
    weights = [1.0, 3.0]
    x = 3.0 / 4.0  # t = w₁ / (w₀ + w₁)
    a, b = (m0 - base, m1 - base) if with_base else (m0, m1)
    if mode == "flatten":
        expected = direct_nuslerp(x, a.reshape(1, -1), b.reshape(1, -1)).view(7, 5)
    elif mode == "rows":
        expected = direct_nuslerp(x, a, b)
    else:
        expected = direct_nuslerp(x, a.T, b.T).T
    expected = expected + base if with_base else expected
    params = {"weight": weights, "nuslerp_flatten": mode == "flatten", "nuslerp_row_wise": mode == "columns"}
    out = merge_tensors("nuslerp", [m0, m1], base=base if with_base else None, parameters=params)
    torch.testing.assert_close(out, expected, **CLOSE)


def test_nuslerp_flatten_wins_over_row_wise_and_weights_summing_to_zero_mean_halfway():
    m0, m1 = randn(4, 6, seed=6), randn(4, 6, seed=7)
    out = merge_tensors("nuslerp", [m0, m1], parameters={"weight": [1.0, -1.0], "nuslerp_row_wise": True})
    expected = direct_nuslerp(0.5, m0.reshape(1, -1), m1.reshape(1, -1)).view(4, 6)
    torch.testing.assert_close(out, expected, **CLOSE)


@pytest.mark.parametrize(("other", "expected"), [(6.0, 5.25), (-6.0, -3.75)])
def test_nuslerp_is_linear_for_exactly_colinear_vectors(other, expected):
    # cos θ = ±1 exactly: sin θ = 0, so only the linear branch gives a number (t = 0.75)
    out = merge_tensors("nuslerp", [t(3, 0), t(other, 0)], parameters={"weight": [1.0, 3.0]})
    assert out.tolist() == [expected, 0.0]


def test_nuslerp_of_an_unchanged_model_is_not_linear():
    base, d = randn(3, 4, seed=8), randn(3, 4, seed=9)
    # δ₁ = 0: cos θ = 0, not colinear, so θ = π/2 and δ₀ is scaled by sin(0.25 · π/2), not by 0.25
    zero = merge_tensors("nuslerp", [base + d, base.clone()], base=base, parameters={"weight": [0.25, 0.75]})
    torch.testing.assert_close(zero, base + math.sin(0.25 * math.pi / 2) * ((base + d) - base), **CLOSE)


def test_nuslerp_merges_exactly_two_models():
    with pytest.raises(PolyfuseError, match=r"models: nuslerp merges exactly 2 models, got 3"):
        merge_tensors("nuslerp", [t(1), t(2), t(3)], parameters={"weight": 1.0})


# ---- model_stock -----------------------------------------------------------------------------------


def direct_stock(base: torch.Tensor, models: list[torch.Tensor], rows: bool) -> torch.Tensor:
    """t = k·cos / (1 + (k − 1)·cos), cos the mean pairwise cosine of the task vectors; t·mean + (1 − t)·θ₀."""
    k = len(models)
    flat = (lambda x: x.double()) if rows else (lambda x: x.double().reshape(1, -1))
    deltas = [flat(m) - flat(base) for m in models]
    cosines = [torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=-1, eps=0)
               for i in range(k) for j in range(i + 1, k)]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    ratio = k * cos / (1 + (k - 1) * cos)
    out = ratio * sum(flat(m) for m in models) / k + (1 - ratio) * flat(base)
    return out.view(base.shape).float()


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_interpolates_by_the_angle_between_task_vectors(filter_wise):
    base = randn(6, 8, seed=10)
    shared = randn(6, 8, seed=11)  # a common direction: positive cosines, 0 < t < 1
    models = [base + shared + randn(6, 8, seed=12 + i) for i in range(3)]
    out = merge_tensors("model_stock", models, base=base, parameters={"filter_wise": filter_wise})
    torch.testing.assert_close(out, direct_stock(base, models, rows=filter_wise), **CLOSE)


def test_model_stock_filter_wise_ratio_differs_per_row():
    base = torch.zeros(2, 2)
    models = [t(1, 0, 1, 0).view(2, 2), t(1, 0, 0, 1).view(2, 2)]
    # row 0: identical task vectors, cos 1, t = 1: the mean; row 1: orthogonal, cos 0, t = 0: the base
    out = merge_tensors("model_stock", models, base=base, parameters={"filter_wise": True})
    torch.testing.assert_close(out, t(1, 0, 0, 0).view(2, 2))
    whole = merge_tensors("model_stock", models, base=base)  # cos = 1/2 over the whole tensor: t = 2/3
    torch.testing.assert_close(whole, (2 / 3) * t(1, 0, 0.5, 0.5).view(2, 2))


def test_model_stock_keeps_the_base_where_the_ratio_is_singular():
    base = t(1, 2, 3)
    d = t(1, -1, 2)
    out = merge_tensors("model_stock", [base + d, base - d], base=base)  # cos = −1: 1 + (k − 1)·cos = 0
    assert torch.equal(out, base)


def test_model_stock_needs_two_models():
    with pytest.raises(PolyfuseError, match=r"model_stock merges at least 2 models besides base_model, got 1"):
        merge_tensors("model_stock", [t(1)], base=t(0))


# ---- breadcrumbs -----------------------------------------------------------------------------------

DELTA = t(3, -10, 1, 7, -5, 2, -9, 4, 8, -6)  # magnitudes 1..10, each once


@pytest.mark.parametrize(("density", "gamma", "kept"), [
    (0.5, 0.2, {4, 5, 6, 7, 8}),  # drop the 2 largest, keep the next 5, drop the 3 smallest
    (0.9, 0.2, set(range(1, 10))),  # 9 kept leaves room to drop only the largest
    (0.3, 0.0, {8, 9, 10}),  # no outliers: plain top-k
    (0.0, 0.1, set()),
    (1.0, 0.5, set(range(1, 11))),  # density 1: nothing is dropped
])
def test_breadcrumbs_keeps_the_band_below_the_outliers(density, gamma, kept):
    base = randn(10, seed=20)
    out = merge_tensors("breadcrumbs", [base + DELTA], base=base,
                        parameters={"weight": 1.0, "density": density, "gamma": gamma})
    expected = base + torch.where(torch.isin(DELTA.abs(), t(*kept)), DELTA, 0.0)
    torch.testing.assert_close(out, expected)


def test_breadcrumbs_ties_elects_signs_after_the_mask():
    base = torch.zeros(4)
    d1, d2 = t(2, -1, 4, 8), t(-3, -6, 5, 1)
    # density 0.5, gamma 0.25: drop the largest, keep the next 2 -> [2, 0, 4, 0] and [-3, 0, 5, 0]
    params = {"weight": [1.0, 2.0], "density": 0.5, "gamma": 0.25}
    plain = merge_tensors("breadcrumbs", [d1, d2], base=base, parameters=params)
    torch.testing.assert_close(plain, t(-4, 0, 14, 0))  # Σ wᵢ mask(δᵢ), normalize false
    ties = merge_tensors("breadcrumbs_ties", [d1, d2], base=base, parameters=params)
    # weighted [2, 0, 4, 0] and [-6, 0, 10, 0]: elected signs - + + +, so the 2 at position 0 is erased
    torch.testing.assert_close(ties, t(-6, 0, 14, 0))
    normalized = merge_tensors("breadcrumbs_ties", [d1, d2], base=base, parameters={**params, "normalize": True})
    torch.testing.assert_close(normalized, t(-3, 0, 14 / 3, 0))  # ÷ agreeing weights [2, -, 3, -]


def test_breadcrumbs_gamma_must_be_a_fraction():
    with pytest.raises(PolyfuseError, match=r"gamma: must be between 0 and 1"):
        merge_tensors("breadcrumbs", [t(1)], base=t(0), parameters={"weight": 1.0, "density": 0.5, "gamma": 2})


# ---- della -----------------------------------------------------------------------------------------


def della_keep(delta: torch.Tensor, density: float, epsilon: float, seed: int, name: str, i: int) -> torch.Tensor:
    """Rank |δ| ascending along dim 1 (the whole vector when 1-D), p = ρ − ε + 2ε·(rank−1)/(L−1), keep u < p."""
    ranked = delta.abs().double().reshape(1, -1) if delta.dim() == 1 else delta.abs().double()
    length = ranked.shape[1]
    ranks = torch.empty_like(ranked)
    for row in range(ranked.shape[0]):
        for position, index in enumerate(sorted(range(length), key=lambda j: (float(ranked[row, j]), j))):
            ranks[row, index] = position
    p = density - epsilon + 2 * epsilon * ranks / (length - 1)
    u = torch.rand(delta.numel(), generator=torch.Generator().manual_seed(stream_seed(seed, name, i)))
    return (u.double().view(ranked.shape) < p).view(delta.shape)


def direct_della(base, models, weights, density, epsilon, *, consensus: bool, normalize: bool, seed, name):
    kept = []
    for i, (m, w, rho, eps) in enumerate(zip(models, weights, density, epsilon, strict=True)):
        delta = (m - base).double()
        masked = delta * della_keep(delta, rho, eps, seed, name, i)
        kept.append(w * masked * (delta.abs().sum() / masked.abs().sum()))  # L1 rescale
    stacked = torch.stack(kept)
    weights = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * base.dim())
    if consensus:
        agree = stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        mixed, divisor = (stacked * agree).sum(0), (weights * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = stacked.sum(0), weights.sum()
    return (base.double() + (mixed / divisor if normalize else mixed)).float()


@pytest.mark.parametrize("shape", [(8, 30), (60,)])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_samples_by_magnitude_rank_from_the_documented_stream(method, shape):
    base = randn(*shape, seed=30)
    models = [base + randn(*shape, seed=31 + i) for i in range(3)]
    weights, density, epsilon = [0.5, 0.3, 0.2], [0.3, 0.5, 0.6], [0.1, 0.2, 0.3]
    params = {"weight": weights, "density": density, "epsilon": epsilon}
    out = merge_tensors(method, models, base=base, parameters=params, seed=4, name="w")
    expected = direct_della(base, models, weights, density, epsilon, consensus=method == "della",
                            normalize=method == "della", seed=4, name="w")
    torch.testing.assert_close(out, expected, **CLOSE)


def test_della_keeps_large_entries_more_often():
    base = torch.zeros(200, 100)
    delta = torch.arange(1, 101, dtype=torch.float32).repeat(200, 1)  # rank = column
    out = merge_tensors("della_linear", [base + delta], base=base,
                        parameters={"weight": 1.0, "density": 0.5, "epsilon": 0.4, "rescale": False})
    kept = (out != 0).float().mean(0)  # about 0.1 for the smallest column, 0.9 for the largest
    assert kept[:10].mean() < 0.2 and kept[-10:].mean() > 0.8 and abs(kept.mean() - 0.5) < 0.02


def test_della_without_sparsification_is_ties_consensus():
    base = randn(5, 6, seed=40)
    models = [base + randn(5, 6, seed=41 + i) for i in range(3)]
    params = {"weight": [0.2, 0.5, 0.3]}
    torch.testing.assert_close(merge_tensors("della", models, base=base, parameters=params),
                               merge_tensors("ties", models, base=base, parameters=params), rtol=0, atol=0)


def test_della_checks_density_and_epsilon():
    base = torch.zeros(4, 3)
    with pytest.raises(PolyfuseError, match=r"density 0.1 ± epsilon 0.15 must stay inside \(0, 1\)"):
        merge_tensors("della", [base + 1], base=base, parameters={"weight": 1.0, "density": 0.1})
    with pytest.raises(PolyfuseError, match=r"ranks entries along dim 1"):
        merge_tensors("della", [torch.ones(4, 1)], base=torch.zeros(4, 1),
                      parameters={"weight": 1.0, "density": 0.5})
    merge_tensors("della", [base + 1], base=base, parameters={"weight": 1.0, "density": 1.0, "epsilon": 0.9})


# ---- building blocks -------------------------------------------------------------------------------


def test_column_sums_do_not_depend_on_the_chunking():
    values = torch.randn(2, 50, 7, generator=torch.Generator().manual_seed(50))
    totals = []
    for sizes in ([50], [1] * 50, [3, 30, 17]):
        sums, offset = ColumnSums(), 0
        for size in sizes:
            sums.add(values[:, offset:offset + size])
            offset += size
        totals.append(sums.total())
    assert all(torch.equal(totals[0], x) for x in totals[1:])
    torch.testing.assert_close(totals[0], values.double().sum(1))


def test_vector_sums_of_one_long_vector_equal_those_of_many():
    many = torch.randn(4, 200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(51))
    together = vector_sums(many)
    assert all(torch.equal(vector_sums(many[i:i + 1]), together[i:i + 1]) for i in range(4))


# ---- passthrough -----------------------------------------------------------------------------------


def test_passthrough_copies_or_scales_one_model():
    x = randn(3, 4, seed=60)
    assert torch.equal(merge_tensors("passthrough", [x]), x)
    torch.testing.assert_close(merge_tensors("passthrough", [x], parameters={"scale": 0.25}), 0.25 * x)
    with pytest.raises(PolyfuseError, match=r"models: passthrough merges exactly 1 model, got 2"):
        merge_tensors("passthrough", [x, x])


def test_layer_stack_names_and_config():
    from polyfuse.merge.passthrough import layer_of, stack_slices, stacked_config

    assert layer_of("transformer.h.3.attn.c_attn.weight") == ("transformer.h", 3, "attn.c_attn.weight")
    assert layer_of("model.embed_tokens.weight") is None
    names = ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w",
             "model.norm.weight", "lm_head.weight"]
    first, second = {n: "x" for n in names}, {n: "y" for n in names}
    stacked, layers = stack_slices([first, second], [(1, 3), (0, 1)], ["s0", "s1"])
    assert [(s.name, s.source, s.slice) for s in stacked] == [
        ("model.embed_tokens.weight", "model.embed_tokens.weight", 0),
        ("model.layers.0.w", "model.layers.1.w", 0), ("model.layers.1.w", "model.layers.2.w", 0),
        ("model.layers.2.w", "model.layers.0.w", 1),
        ("model.norm.weight", "model.norm.weight", 1), ("lm_head.weight", "lm_head.weight", 1)]
    assert layers == [1, 2, 0]
    with pytest.raises(PolyfuseError, match=r"s1\.layer_range: \[0, 4\] but the model has 3 layers"):
        stack_slices([first, second], [(1, 3), (0, 4)], ["s0", "s1"])
    config = {"num_hidden_layers": 3, "layer_types": ["full", "sliding", "full"], "vocab_size": 9}
    assert stacked_config(config, layers) == {"num_hidden_layers": 3, "layer_types": ["sliding", "full", "full"],
                                              "vocab_size": 9}
    nested = stacked_config({"text_config": {"num_hidden_layers": 3}}, [0, 1, 2, 2, 1])
    assert nested == {"text_config": {"num_hidden_layers": 5}}
