"""FuseChat's merge methods: SCE (FuseChat 2.0, both variants) and VaRM (FuseChat v1).

Both weight each model per matrix by its mean squared change from the base; SCE first selects
entries by variance across models and erases entries that disagree with the elected sign.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from polyfuse.merge.blocks import RowSums, per_model, sign_consensus
from polyfuse.merge.registry import Chunk, TensorJob
from polyfuse.merge.select import TopK

__all__ = ["SCE", "VaRM"]


class SCE:
    """SCE (FuseChat 2.0): Select by variance, Calculate per-matrix weights, Erase by sign.

    1. select: if 0 < τ (``select_topk``) < 1, keep the ⌊τ·nnz⌋ entries with the largest
       variance of δ across models (nnz: entries with non-zero variance); τ = 0 keeps none;
    2. calculate: ηᵢ = mean(sel(δᵢ)²) / Σⱼ mean(sel(δⱼ)²), computed on the selected deltas;
    3. erase: keep entries whose sign agrees with sign(Σᵢ δᵢ);
    4. θ = θ₀ + Σ ηᵢ eᵢ δᵢ / Σ ηᵢ eᵢ.

    ``sce_variant`` says which deltas steps 3-4 use:

    * ``mergekit`` (upstream mergekit's ``sce``): the selected deltas (the merge is sparsified);
      the denominator is clamped at 1e-6, and the weights fall back to uniform when
      Σⱼ mean(δⱼ²) < 1e-6 — note that fine-tuning deltas of about 1e-3 or less always fall back;
    * ``fusechat`` (FuseChat/FuseO1's released ``sce_merging.py``): the full, unselected deltas —
      the selection only sets the weights; a zero denominator becomes 1, and the weights fall back
      to uniform only when every selected delta is exactly zero.
    """

    def __init__(self, job: TensorJob) -> None:
        self.job = job
        self.tau = job.params["select_topk"]
        self.variant = job.params["sce_variant"]
        self.eta: list[float] = []
        self._topk: TopK | None = None

    def _selected(self, chunk: Chunk, deltas: Tensor) -> Tensor | None:
        """Selection mask [rows, ...] of the chunk (None: everything selected)."""
        if self.tau >= 1:
            return None
        if self._topk is None:  # select_topk 0 or no non-zero variance: nothing is selected
            return torch.zeros(deltas.shape[1:], dtype=torch.bool)
        if chunk.offset == 0:
            self._topk.restart()
        variance = torch.var(deltas, dim=0, unbiased=False)
        return self._topk.keep(variance.reshape(1, -1)).view(deltas.shape[1:])

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        if 0 < self.tau < 1:
            topk, nonzero = TopK(1), []

            def count(chunk: Chunk) -> None:
                variance = torch.var(chunk.deltas(), dim=0, unbiased=False).reshape(1, -1)
                nonzero.append(int(torch.count_nonzero(variance)))
                topk.count_high(variance)

            yield count
            k = int(torch.tensor(sum(nonzero)) * self.tau)  # float32 product, as mergekit and FuseChat
            if k > 0:
                if topk.choose([k]):
                    yield lambda c: topk.count_low(torch.var(c.deltas(), dim=0, unbiased=False).reshape(1, -1))
                topk.finish()
                self._topk = topk
        sums = RowSums()

        def squares(chunk: Chunk) -> None:
            deltas = chunk.deltas()
            mask = self._selected(chunk, deltas)
            sums.add((deltas if mask is None else deltas * mask).square())

        yield squares
        means = (sums.total() / self.job.numel).tolist()
        total = sum(means)
        uniform = abs(total) < 1e-6 if self.variant == "mergekit" else total == 0
        self.eta = [1.0 / len(means)] * len(means) if uniform else [m / total for m in means]

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        deltas = chunk.deltas()
        mask = self._selected(chunk, deltas)
        if self.variant == "mergekit" and mask is not None:
            deltas = deltas * mask
        weights = per_model(self.eta, deltas) * sign_consensus(deltas)
        mixed = (deltas * weights).sum(0)
        divisor = weights.sum(0)
        if self.variant == "mergekit":
            divisor = divisor.clamp(min=1e-6)
        else:
            divisor[divisor == 0] = 1
        return chunk.base + mixed / divisor


class VaRM:
    """VaRM (FuseChat v1): θ = θ₀ + Σ Wᵢδᵢ with Wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) per tensor (uniform when
    no model changed it). Each model's statistic is its own change from the base — the released
    FuseChat script read one shared statistics file for every model and so averaged uniformly."""

    def __init__(self, job: TensorJob) -> None:
        self.weights: list[float] = []

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        sums = RowSums()
        yield lambda chunk: sums.add(chunk.deltas().square())
        squares = sums.total().tolist()
        total = sum(squares)
        self.weights = [1.0 / len(squares)] * len(squares) if total == 0 else [s / total for s in squares]

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        deltas = chunk.deltas()
        return chunk.base + (deltas * per_model(self.weights, deltas)).sum(0)

