"""The built-in merge methods, registered by name, and :func:`merge_tensors` to run one in memory.

Notation: θ₀ the base (pivot), θᵢ the K merged models, δᵢ = θᵢ − θ₀ their task vectors, wᵢ the
per-model ``weight``, ρᵢ the ``density``, γᵢ the ``gamma``, εᵢ the ``epsilon``, λ the global
``lambda``, t the global ``t``.

====================  =======================================================================
``linear``            θ = Σ wᵢθᵢ / Σ wᵢ (``normalize``, default true); no base needed
``task_arithmetic``   θ = θ₀ + λ Σ wᵢδᵢ (÷ Σ wᵢ with ``normalize``)
``ties``              keep the top-ρᵢ fraction of |δᵢ|; elect the sign of Σ wᵢδᵢ; disjoint weighted mean
``dare_linear``       keep each entry of δᵢ with probability ρᵢ, rescale (L1, as mergekit); task arithmetic
``dare_ties``         the DARE drop, then TIES' sign election and disjoint mean
``breadcrumbs``       drop the largest γᵢ fraction of |δᵢ| and keep the next ρᵢ; task arithmetic
``breadcrumbs_ties``  the Breadcrumbs mask, then TIES' sign election and disjoint mean
``della``             keep with probability ρᵢ ± εᵢ by magnitude rank in each row, rescale; TIES' election
``della_linear``      DELLA's sampling and rescale; task arithmetic
``slerp``             spherical interpolation from the base (t = 0) to the one other model (t = 1)
``nuslerp``           slerp of two models (or of their task vectors with a base), t = w₁ / (w₀ + w₁)
``model_stock``       θ = t·mean(θᵢ) + (1 − t)·θ₀, t from the mean cosine between the δᵢ
``passthrough``       θ = θ₁ (times ``scale``); with ``slices``, layer ranges of models stacked
``sce``               select by variance across models, calculate per-matrix weights, erase by sign
``varm``              θ = θ₀ + Σ Wᵢδᵢ with Wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) per matrix (FuseChat v1)
====================  =======================================================================

The definitions follow mergekit 0.1.5 (parameter names, defaults and edge cases), so a mergekit
YAML means the same here. Every merger sees a tensor as a stream of row chunks
(:class:`Chunk`): methods that need whole-tensor statistics (TIES' and Breadcrumbs' magnitude
thresholds, DARE's and DELLA's L1 rescale, SCE's variance top-k and weights, VaRM's weights, the
norms and dot products of SLERP, NuSLERP and Model Stock) declare statistics passes
(:meth:`Merger.statistics`) that the engine feeds with every chunk before the merge pass. All
statistics are exact and independent of the chunk size: top-k by radix select
(:mod:`polyfuse.merge.select`), sums accumulated per row (or row by row, per column) in float64,
DARE's drop mask and DELLA's samples drawn in flat element order from a generator seeded by
(seed, tensor name, model).

Where things live: the registry and the types every merger shares in :mod:`polyfuse.merge.registry`
(re-exported here), the shared statistics and masks in :mod:`polyfuse.merge.blocks`, the linear
family's mergers in :mod:`polyfuse.merge.linear` with their sparsifiers in
:mod:`polyfuse.merge.sparsify`, SLERP, NuSLERP and Model Stock in :mod:`polyfuse.merge.interpolate`,
SCE and VaRM in :mod:`polyfuse.merge.fusechat`, passthrough and layer stacking in
:mod:`polyfuse.merge.passthrough`; this module declares each method's parameters and
registers it.

    >>> base = torch.zeros(2, 2)
    >>> merge_tensors("task_arithmetic", [torch.ones(2, 2), 3 * torch.ones(2, 2)], base=base,
    ...               parameters={"weight": [0.5, 0.5]}).tolist()
    [[2.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polyfuse.errors import PolyfuseError
from polyfuse.merge.fusechat import SCE, VaRM
from polyfuse.merge.interpolate import ModelStock, NuSlerp, Slerp
from polyfuse.merge.linear import Linear, TaskArithmetic, linear_check
from polyfuse.merge.passthrough import Passthrough
from polyfuse.merge.registry import (
    METHODS,
    Chunk,
    MergeMethod,
    Merger,
    Param,
    TensorJob,
    get_method,
    register,
    run_merger,
)
from polyfuse.merge.sparsify import della_check

__all__ = [
    "METHODS",
    "Chunk",
    "MergeMethod",
    "Merger",
    "Param",
    "TensorJob",
    "get_method",
    "merge_tensors",
    "register",
    "run_merger",
]


# --------------------------------------------------------------------------------------------------
# the built-in methods

_WEIGHT = Param(float, help="weight of this model")
_DENSITY = Param(float, 1.0, "fraction of the task vector kept", low=0.0, high=1.0)
_LAMBDA = Param(float, 1.0, "scale of the merged task vector")
_INT8 = Param(bool, False, "accepted for mergekit compatibility; no effect")


def _task_method(name: str, pretty: str, url: str, *, sparsify: str | None, consensus: bool,
                 normalize: bool, rescale: bool, extra: dict[str, Param] | None = None,
                 check: Callable[[TensorJob], str | None] | None = None) -> MergeMethod:
    params = {"lambda": _LAMBDA, "normalize": Param(bool, normalize, "divide by the sum of the weights"),
              "int8_mask": _INT8}
    model_params = {"weight": _WEIGHT}
    if sparsify:
        params["rescale"] = Param(bool, rescale, "rescale kept entries to the task vector's L1 norm")
        model_params["density"] = _DENSITY
    model_params.update(extra or {})
    return MergeMethod(name, pretty, url, True, params, model_params,
                       lambda job: TaskArithmetic(job, sparsify=sparsify, consensus=consensus),
                       check or (lambda job: None))


register(MergeMethod("linear", "Linear", "https://arxiv.org/abs/2203.05482", False,
                     {"normalize": Param(bool, True, "divide by the sum of the weights")},
                     {"weight": _WEIGHT}, Linear, linear_check))
register(_task_method("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                      sparsify=None, consensus=False, normalize=False, rescale=False))
register(_task_method("ties", "TIES", "https://arxiv.org/abs/2306.01708",
                      sparsify="magnitude", consensus=True, normalize=True, rescale=False))
register(_task_method("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
                      sparsify="random", consensus=False, normalize=False, rescale=True))
register(_task_method("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
                      sparsify="random", consensus=True, normalize=False, rescale=True))
_GAMMA = {"gamma": Param(float, 0.01, "fraction of the largest |δ| dropped as outliers", low=0.0, high=1.0)}
register(_task_method("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
                      sparsify="magnitude_outliers", consensus=False, normalize=False, rescale=False, extra=_GAMMA))
register(_task_method("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
                      sparsify="magnitude_outliers", consensus=True, normalize=False, rescale=False, extra=_GAMMA))
_EPSILON = {"epsilon": Param(float, 0.15, "keep probabilities span density ± epsilon by magnitude rank")}
register(_task_method("della", "DELLA", "https://arxiv.org/abs/2406.11617", sparsify="della_magprune",
                      consensus=True, normalize=True, rescale=True, extra=_EPSILON, check=della_check))
register(_task_method("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617", sparsify="della_magprune",
                      consensus=False, normalize=False, rescale=True, extra=_EPSILON, check=della_check))
register(MergeMethod("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp", True,
                     {"t": Param(float, help="interpolation factor: 0 the base, 1 the other model")},
                     {}, Slerp, min_models=1, max_models=1))
register(MergeMethod("nuslerp", "NuSLERP", "https://github.com/arcee-ai/mergekit", False,
                     {"nuslerp_flatten": Param(bool, True, "one vector per tensor (else per row or column)"),
                      "nuslerp_row_wise": Param(bool, False, "without flatten: vectors along dim 0 (else the last)")},
                     {"weight": _WEIGHT}, NuSlerp, optional_base=True, min_models=2, max_models=2))
register(MergeMethod("model_stock", "Model Stock", "https://arxiv.org/abs/2403.19522", True,
                     {"filter_wise": Param(bool, False, "one ratio per row (vector along the last dim)")},
                     {}, ModelStock, min_models=2))
register(MergeMethod("passthrough", "Passthrough", "https://github.com/arcee-ai/mergekit", False, {},
                     {"scale": Param(float, None, "multiply the tensor by this (default: copied as is)")},
                     Passthrough, min_models=1, max_models=1))
register(MergeMethod("sce", "SCE", "https://arxiv.org/abs/2408.07990", True,
                     {"select_topk": Param(float, 1.0, "fraction of entries selected by variance", low=0.0, high=1.0),
                      "sce_variant": Param(str, help="fusechat or mergekit (see the docs)",
                                           choices=("fusechat", "mergekit")),
                      "int8_mask": _INT8},
                     {}, SCE))
register(MergeMethod("varm", "VaRM", "https://arxiv.org/abs/2402.16107", True, {}, {}, VaRM))


# --------------------------------------------------------------------------------------------------
# in-memory entry point


def merge_tensors(method: str, tensors: Sequence[Tensor], *, base: Tensor | None = None,
                  parameters: Mapping[str, Any] | None = None, name: str = "tensor", seed: int = 0,
                  chunk_rows: int | None = None) -> Tensor:
    """Merge one tensor in memory with the same mergers the streaming engine uses.

    Args:
        method: a registered method name.
        tensors: the merged inputs, each [rows, ...] (the base excluded).
        base: the base tensor: required by every method but ``linear`` and ``nuslerp`` (optional:
            task vectors against it), ignored by ``linear``.
        parameters: method-wide values as scalars; per-model values as a list (one per input) or a
            scalar broadcast to every input.
        name: the tensor name (seeds DARE's and DELLA's random masks).
        chunk_rows: process this many rows at a time (default: all at once).

    Returns:
        The merged tensor, float32, the inputs' shape.
    """
    spec = get_method(method)
    if spec.needs_base and base is None:
        raise PolyfuseError(f"{method} needs a base tensor")
    with_base = base is not None and spec.uses_base(True)
    spec.check_count(len(tensors), with_base)
    values = dict(parameters or {})
    global_values = {k: v for k, v in values.items() if not isinstance(v, list | tuple)}
    model_values = [{k: v[i] for k, v in values.items() if isinstance(v, list | tuple)} for i in range(len(tensors))]
    labels = [f"models[{i}]" for i in range(len(tensors))]
    spec.check_keys(list(global_values), [list(v) for v in model_values], labels)
    shape = tuple(tensors[0].shape)
    params, model_params = spec.resolve(name, global_values, model_values, labels)
    job = TensorJob(name, shape, seed, params, model_params)
    problem = spec.check(job)
    if problem:
        raise PolyfuseError(f"{name}: {problem}")
    flat = [t.to(torch.float32).reshape(shape or (1,)) for t in tensors]
    base_flat = base.to(torch.float32).reshape(shape or (1,)) if base is not None and spec.uses_base(True) else None
    rows = flat[0].shape[0]
    step = max(1, chunk_rows or rows)
    per_row = flat[0][0].numel() if rows else 0

    def chunks() -> Iterator[Chunk]:
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield Chunk(None if base_flat is None else base_flat[r0:r1], [t[r0:r1] for t in flat], r0 * per_row)

    parts = list(run_merger(spec.make(job), chunks))
    return torch.cat(parts).reshape(shape) if parts else torch.empty(shape)
