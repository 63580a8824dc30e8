"""The linear family: ``linear`` and mergekit's generalized task arithmetic.

:class:`TaskArithmetic` covers ``task_arithmetic``, ``ties`` (magnitude top-k + sign consensus),
``dare_linear`` (random drop + L1 rescale), ``dare_ties`` (random drop + sign consensus),
``breadcrumbs`` / ``breadcrumbs_ties`` (outliers and small entries dropped) and ``della`` /
``della_linear`` (magnitude-ranked sampling); the sparsifiers live in :mod:`polyfuse.merge.sparsify`,
the registered parameters of each method in :mod:`polyfuse.merge.methods`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from polyfuse.merge.blocks import RowSums, per_model
from polyfuse.merge.registry import Chunk, TensorJob
from polyfuse.merge.sparsify import Sparsifier, make_sparsifier

__all__ = ["Linear", "TaskArithmetic", "linear_check"]


class Linear:
    """θ = Σ wᵢθᵢ / Σ wᵢ (the division only with ``normalize``)."""

    def __init__(self, job: TensorJob) -> None:
        self.weights = job.model_params["weight"]
        self.normalize = job.params["normalize"]

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        return iter(())

    def merge(self, chunk: Chunk) -> Tensor:
        out = torch.zeros_like(chunk.models[0])
        for x, w in zip(chunk.models, self.weights, strict=True):
            out.add_(x, alpha=w)
        return out / sum(self.weights) if self.normalize else out


def linear_check(job: TensorJob) -> str | None:
    """Why ``linear`` cannot merge ``job`` (normalize with weights summing to 0); None when it can."""
    if job.params["normalize"] and sum(job.model_params["weight"]) == 0:
        return "the weights sum to 0, so normalize divides by 0; change a weight or set normalize: false"
    return None


class TaskArithmetic:
    """θ₀ + λ · combine(wᵢ · sparsify(δᵢ)), as mergekit's generalized task arithmetic.

    ``sparsify``: None or a kind of :data:`~polyfuse.merge.sparsify.SPARSIFIERS` (``magnitude``,
    ``random``, ``magnitude_outliers``, ``della_magprune``), applied only when some ρᵢ < 1; with
    ``rescale`` the kept entries are scaled by Σ|δᵢ| / Σ|kept δᵢ| (L1 norm preserved; not when
    either is below 1e-7). ``consensus``: keep only entries whose sign agrees with sign(Σ wᵢδᵢ) and
    divide by the sum of the agreeing weights; without it divide by Σ wᵢ. The division happens only
    with ``normalize``.
    """

    def __init__(self, job: TensorJob, *, sparsify: str | None, consensus: bool) -> None:
        self.job = job
        self.weights = job.model_params["weight"]
        k = len(self.weights)
        self.density = job.model_params.get("density", [1.0] * k)
        self.sparsify = sparsify if sparsify and any(d < 1 for d in self.density) else None
        self.consensus = consensus
        self.scale = [1.0] * k
        self._sparsifier: Sparsifier | None = None

    def _keep(self, chunk: Chunk, deltas: Tensor) -> Tensor:
        assert self._sparsifier is not None
        return self._sparsifier.keep(chunk, deltas)

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        if self.sparsify:
            self._sparsifier = make_sparsifier(self.sparsify, self.job)
            yield from self._sparsifier.statistics()
        if self.sparsify and self.job.params["rescale"]:
            before, after = RowSums(), RowSums()

            def observe(chunk: Chunk) -> None:
                deltas = chunk.deltas()
                before.add(deltas.abs())
                after.add((deltas * self._keep(chunk, deltas)).abs())

            yield observe
            eps = 1e-7  # mergekit: no rescale when either L1 norm is below this
            self.scale = [float(b / a) if b >= eps and a >= eps else 1.0
                          for b, a in zip(before.total().tolist(), after.total().tolist(), strict=True)]

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        weighted = chunk.deltas()  # [K, rows, ...], updated in place below
        if self.sparsify:
            weighted.mul_(self._keep(chunk, weighted))
            if any(s != 1.0 for s in self.scale):
                weighted.mul_(per_model(self.scale, weighted))
        weighted.mul_(per_model(self.weights, weighted))
        if self.consensus:
            # entries agreeing with the elected sign s: s * wᵢδᵢ > 0; their sum is s * Σ relu(s * wᵢδᵢ)
            sign = (weighted.sum(0) >= 0).to(torch.float32).mul_(2).sub_(1)
            weighted.mul_(sign)
            agree = weighted > 0
            mixed = weighted.clamp_(min=0).sum(0).mul_(sign)
            divisor = torch.zeros_like(mixed)
            for i, w in enumerate(self.weights):
                divisor.add_(agree[i], alpha=w)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = weighted.sum(0)
            total = sum(self.weights)
            divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total)
        if self.job.params["normalize"]:
            mixed.div_(divisor)
        if self.job.params["lambda"] != 1:
            mixed.mul_(self.job.params["lambda"])
        return mixed.add_(chunk.base)

