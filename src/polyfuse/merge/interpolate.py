"""Spherical and geometric interpolation: ``slerp``, ``nuslerp`` and ``model_stock`` (mergekit 0.1.5).

All three weigh whole vectors by their norms and the angle between them. A vector is the whole
tensor, a row's last dimension, or a column across rows, depending on the method and its options;
whole-tensor and per-column figures (Σa², Σb², Σab, in float64) come from a statistics pass, per
row figures from the chunk itself, so the result does not depend on the chunking. The coefficients
are computed in float64 and applied to the float32 rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from polyfuse.merge.blocks import ColumnSums, RowSums, vector_sums
from polyfuse.merge.registry import Chunk, TensorJob

__all__ = ["DOT_THRESHOLD", "SLERP_EPS", "ModelStock", "NuSlerp", "Slerp", "nuslerp_coefficients", "slerp_coefficients",
           "stock_ratio"]

DOT_THRESHOLD = 0.9995
"""``slerp``: above this |cos θ| the vectors count as colinear and are interpolated linearly."""
SLERP_EPS = 1e-8
"""``slerp``: a norm at or below this is taken as 1 (the vector is not normalised)."""
_NUSLERP_NORM_EPS = 1e-7  # nuslerp: norms are clamped at this before normalising
_NUSLERP_EPS = 1e-8  # nuslerp: colinear when 1 − cos²θ ≤ eps²


def _products(a: Tensor, b: Tensor) -> Tensor:
    """[3, ...] float64: a², b² and ab elementwise."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return torch.stack([a * a, b * b, a * b])


def slerp_coefficients(t: float, aa: Tensor, bb: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
    """``slerp``'s (c₀, c₁) with θ = c₀a + c₁b from Σa², Σb², Σab (float64 tensors, any matching shape).

    cos θ = Σab / (‖a‖‖b‖) (a norm ≤ :data:`SLERP_EPS` counts as 1), clamped to [−1, 1];
    c₀ = sin((1 − t)θ) / sin θ, c₁ = sin(tθ) / sin θ, or 1 − t and t when |cos θ| > :data:`DOT_THRESHOLD`.
    """
    na, nb = aa.sqrt(), bb.sqrt()
    na = torch.where(na > SLERP_EPS, na, 1.0)
    nb = torch.where(nb > SLERP_EPS, nb, 1.0)
    dot = (ab / (na * nb)).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin = torch.sin(theta)
    return (torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin),
            torch.where(linear, t, torch.sin(t * theta) / sin))


def nuslerp_coefficients(t: float, aa: Tensor, bb: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
    """``nuslerp``'s (c₀, c₁) from Σa², Σb², Σab (float64 tensors, any matching shape).

    cos θ = Σab / (max(‖a‖, 1e-7) · max(‖b‖, 1e-7)), clamped to [−1, 1]; colinear (1 − cos²θ ≤ 1e-16):
    1 − t and t; otherwise sin((1 − t)θ) / sin θ and sin(tθ) / sin θ.
    """
    na = aa.sqrt().clamp(min=_NUSLERP_NORM_EPS)
    nb = bb.sqrt().clamp(min=_NUSLERP_NORM_EPS)
    cos = (ab / (na * nb)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.sin(theta)
    return (torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin),
            torch.where(colinear, t, torch.sin(t * theta) / sin))


class Slerp:
    """SLERP from the base θ₀ (t = 0) to the one other model θ₁ (t = 1), over the whole tensor.

    θ = c₀θ₀ + c₁θ₁ with :func:`slerp_coefficients` from one statistics pass (‖θ₀‖², ‖θ₁‖², θ₀·θ₁).
    """

    def __init__(self, job: TensorJob) -> None:
        self.job = job
        t = job.params["t"]
        self.t = t
        self.coefficients = (1.0 - t, t)  # an empty tensor interpolates linearly

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        if self.job.numel == 0:
            return
        sums = RowSums()
        yield lambda chunk: sums.add(_products(chunk.base, chunk.models[0]))
        aa, bb, ab = sums.total()
        c0, c1 = slerp_coefficients(self.t, aa, bb, ab)
        self.coefficients = (float(c0), float(c1))

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        c0, c1 = (torch.tensor(c, dtype=torch.float32) for c in self.coefficients)
        return c0 * chunk.base + c1 * chunk.models[0]


class NuSlerp:
    """NuSLERP of two models with t = w₁ / (w₀ + w₁) (0.5 when |w₀ + w₁| < 1e-6).

    With a base: θ₀ + slerp(δ₀, δ₁) (task vectors); without: slerp(θ₀, θ₁). The vectors are the
    whole tensor (``nuslerp_flatten``, the default), else the columns — vectors along dim 0 —
    (``nuslerp_row_wise``), else the rows — vectors along the last dim. Coefficients:
    :func:`nuslerp_coefficients`.
    """

    def __init__(self, job: TensorJob) -> None:
        w0, w1 = job.model_params["weight"]
        total = w0 + w1
        self.t = 0.5 if abs(total) < 1e-6 else w1 / total
        if job.params["nuslerp_flatten"]:
            self.mode = "whole"
        elif job.params["nuslerp_row_wise"]:
            self.mode = "columns"  # along dim 0; for a 1-D tensor the whole vector
        else:
            self.mode = "rows" if len(job.shape) >= 2 else "whole"  # along the last dim
        self.empty = job.numel == 0
        self.coefficients: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _pair(chunk: Chunk) -> tuple[Tensor, Tensor]:
        a, b = chunk.models
        return (a, b) if chunk.base is None else (a - chunk.base, b - chunk.base)

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        if self.mode == "rows" or self.empty:
            return
        sums = RowSums() if self.mode == "whole" else ColumnSums()
        yield lambda chunk: sums.add(_products(*self._pair(chunk)))
        aa, bb, ab = sums.total()
        c0, c1 = nuslerp_coefficients(self.t, aa, bb, ab)
        self.coefficients = (c0.to(torch.float32), c1.to(torch.float32))

    def merge(self, chunk: Chunk) -> Tensor:
        a, b = self._pair(chunk)
        if self.mode == "rows":
            aa, bb, ab = vector_sums(_products(a, b), keepdim=True)
            c0, c1 = (c.to(torch.float32) for c in nuslerp_coefficients(self.t, aa, bb, ab))
        elif self.coefficients is None:  # empty tensor
            c0, c1 = torch.tensor(1 - self.t), torch.tensor(self.t)
        else:
            c0, c1 = self.coefficients
        out = c0 * a + c1 * b
        return out if chunk.base is None else out.add_(chunk.base)


def stock_ratio(products: dict[tuple[int, int], Tensor], k: int) -> Tensor:
    """Model Stock's interpolation ratio t from Σδᵢδⱼ (i ≤ j, float64) of k task vectors.

    cos θ = the mean over pairs i < j of Σδᵢδⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), each clamped to [−1, 1];
    t = k cos θ / (1 + (k − 1) cos θ), or 0 (the base) where |1 + (k − 1) cos θ| < 1e-6.
    """
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = products[i, i].sqrt() * products[j, j].sqrt()
            cosines.append((products[i, j] / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))


class ModelStock:
    """Model Stock: θ = t · mean(θᵢ) + (1 − t) · θ₀ with t from the angles between the task vectors
    (:func:`stock_ratio`): one t for the whole tensor, or with ``filter_wise`` one per row — per
    vector along the last dim (a 1-D tensor is one vector)."""

    def __init__(self, job: TensorJob) -> None:
        self.per_row = job.params["filter_wise"] and len(job.shape) >= 2
        self.t: Tensor | None = None

    @staticmethod
    def _pairs(k: int) -> list[tuple[int, int]]:
        return [(i, j) for i in range(k) for j in range(i, k)]

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        if self.per_row:
            return
        sums: dict[tuple[int, int], RowSums] = {}

        def observe(chunk: Chunk) -> None:
            deltas = chunk.deltas().to(torch.float64)
            for i, j in self._pairs(len(deltas)):
                sums.setdefault((i, j), RowSums()).add((deltas[i] * deltas[j]).unsqueeze(0))

        yield observe
        if sums:
            k = math.isqrt(8 * len(sums) + 1) // 2  # k(k + 1) / 2 pairs
            self.t = stock_ratio({key: s.total()[0] for key, s in sums.items()}, k).to(torch.float32)

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        k = len(chunk.models)
        if self.per_row:
            deltas = chunk.deltas().to(torch.float64)
            products = {(i, j): vector_sums(deltas[i] * deltas[j], keepdim=True) for i, j in self._pairs(k)}
            t = stock_ratio(products, k).to(torch.float32)
        else:
            assert self.t is not None, "statistics first"
            t = self.t
        average = sum(chunk.models) / k
        return t * average + (1 - t) * chunk.base
