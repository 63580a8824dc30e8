"""Sparsification of task vectors for the task-arithmetic family, as mergekit 0.1.5's ``sparsify``.

Each sparsifier decides which entries of every task vector δᵢ are kept, as a boolean mask per
chunk (:meth:`Sparsifier.keep`), after the statistics passes it declares (:meth:`Sparsifier.statistics`):

=========================  =====================================================================
``magnitude`` (TIES)       keep the top ⌊ρᵢ·n⌋ (at least 1) entries of |δᵢ| over the whole tensor
``random`` (DARE)          keep each entry with probability ρᵢ
``magnitude_outliers``     Model Breadcrumbs: drop the ⌊γᵢ·n⌋ largest |δᵢ| (fewer if needed to keep
                           ⌊ρᵢ·n⌋), keep the next ⌊ρᵢ·n⌋, drop the rest
``della_magprune``         DELLA's MagPrune: rank |δᵢ| within each vector along dim 1 (the whole
                           tensor when it is 1-D); keep with probability pᵢ = ρᵢ − εᵢ + 2εᵢ·r,
                           r = (rank − 1) / (length − 1) from the smallest (0) to the largest (1)
=========================  =====================================================================

A model with ρᵢ ≥ 1 keeps everything; with ρᵢ ≤ 0 nothing. Equal magnitudes are ordered by
position (mergekit's sorts are not stable, so its order among them is arbitrary): the top-k
selections count the first of equal values as larger, DELLA's ranks (a stable ascending sort) as
smaller. Masks therefore do not depend on the chunking; random draws come from
:class:`~polyfuse.merge.blocks.Uniforms` (seeded by seed, tensor name and model). Memory: the top-k
selections keep two histograms each; DELLA ranks within rows need nothing beyond the chunk, but a
1-D tensor is ranked as a whole, so its K magnitude vectors (then keep probabilities) are held —
1-D tensors are norms and biases, far below the chunk budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from polyfuse.merge.blocks import RandomKeep, Uniforms
from polyfuse.merge.registry import Chunk, TensorJob
from polyfuse.merge.select import TopK

__all__ = ["SPARSIFIERS", "MagnitudeSampling", "MagnitudeWindow", "RandomDrop", "Sparsifier", "della_check",
           "make_sparsifier"]


class Sparsifier(Protocol):
    """Which entries of each task vector a tensor keeps."""

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        """Yield one ``observe(chunk)`` per statistics pass (as :meth:`Merger.statistics`)."""
        ...

    def keep(self, chunk: Chunk, deltas: Tensor) -> Tensor:
        """Boolean mask [K, rows, ...] of the chunk's kept entries (chunks in order, from offset 0)."""
        ...


class MagnitudeWindow:
    """Keep the entries ranked ``[lo, hi)`` by descending magnitude of each task vector (whole tensor).

    ``lo`` = 0 is a plain top-``hi`` (TIES); ``lo`` > 0 also drops the ``lo`` largest (Breadcrumbs'
    outliers): a second top-k selection over the same magnitudes, subtracted (both order ties by
    position, so the top-``lo`` is a prefix of the top-``hi``).
    """

    def __init__(self, windows: Sequence[tuple[int, int]]) -> None:
        self.windows = list(windows)
        self._selections: list[TopK] = []

    @staticmethod
    def _magnitudes(deltas: Tensor) -> Tensor:
        return deltas.abs().reshape(deltas.shape[0], -1)

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        counts = [[hi for _, hi in self.windows]]
        if any(lo > 0 for lo, _ in self.windows):
            counts.append([lo for lo, _ in self.windows])
        selections = [TopK(len(self.windows)) for _ in counts]

        def high(chunk: Chunk) -> None:
            magnitudes = self._magnitudes(chunk.deltas())
            for selection in selections:
                selection.count_high(magnitudes)

        yield high
        pending = [s for s, k in zip(selections, counts, strict=True) if s.choose(k)]
        if pending:

            def low(chunk: Chunk) -> None:
                magnitudes = self._magnitudes(chunk.deltas())
                for selection in pending:
                    selection.count_low(magnitudes)

            yield low
        for selection in selections:
            selection.finish()
        self._selections = selections

    def keep(self, chunk: Chunk, deltas: Tensor) -> Tensor:
        assert self._selections, "statistics first"
        magnitudes = self._magnitudes(deltas)
        kept = None
        for selection in self._selections:
            if chunk.offset == 0:
                selection.restart()
            mask = selection.keep(magnitudes)
            kept = mask if kept is None else kept.logical_and_(mask.logical_not_())
        assert kept is not None
        return kept.view(deltas.shape)


def magnitude_windows(job: TensorJob) -> list[tuple[int, int]]:
    """TIES' top-k per model: ⌊ρ·n⌋, at least 1 (all for ρ ≥ 1, none for ρ ≤ 0)."""
    n = job.numel
    return [(0, n if d >= 1 else 0 if d <= 0 else max(1, int(d * n))) for d in job.model_params["density"]]


def outlier_windows(job: TensorJob) -> list[tuple[int, int]]:
    """Breadcrumbs per model: keep ⌊ρ·n⌋ after dropping ⌊γ·n⌋ largest (fewer when the kept ones would not fit)."""
    n, windows = job.numel, []
    for density, gamma in zip(job.model_params["density"], job.model_params["gamma"], strict=True):
        if density >= 1:
            windows.append((0, n))
            continue
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)  # dropped smallest, as mergekit's ascending slice
        windows.append((n - bottom - target, n - bottom))
    return windows


class RandomDrop:
    """DARE: keep each entry of δᵢ when uᵢⱼ < ρᵢ (:class:`~polyfuse.merge.blocks.RandomKeep`)."""

    def __init__(self, job: TensorJob) -> None:
        self._random = RandomKeep(job.seed, job.name, job.model_params["density"])

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        return iter(())

    def keep(self, chunk: Chunk, deltas: Tensor) -> Tensor:
        return self._random.keep(chunk.offset, deltas[0].numel()).view(deltas.shape)


def _della_probabilities(magnitudes: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune's keep probabilities for ``magnitudes`` [A, L, ...], ranked along dim 1 (float32)."""
    order = torch.argsort(magnitudes, dim=1, stable=True)
    length = order.shape[1]
    places = torch.arange(1, length + 1, dtype=torch.float32).view(1, length, *[1] * (order.dim() - 2))
    ranks = torch.empty(order.shape, dtype=torch.float32).scatter_(1, order, places.expand(order.shape))
    rank_norm = ((ranks - 1) / (length - 1)).clamp(0, 1)  # ranks are 1 ... length in every vector
    return (density - epsilon) + rank_norm * 2 * epsilon


def _ranked_length(shape: tuple[int, ...]) -> int:
    """Length of the vectors MagPrune ranks: dim 1, or the whole tensor when it has fewer than 2 dims."""
    return shape[1] if len(shape) >= 2 else math.prod(shape)


def della_check(job: TensorJob) -> str | None:
    """Why DELLA cannot sparsify ``job`` (ρ ± ε outside (0, 1), or a single ranked entry); None when it can."""
    for i, (density, epsilon) in enumerate(zip(job.model_params["density"], job.model_params["epsilon"],
                                               strict=True)):
        if not 0 < density < 1:
            continue
        if density + epsilon >= 1 or density - epsilon <= 0:
            return (f"model {i}: density {density:g} ± epsilon {epsilon:g} must stay inside (0, 1); "
                    "lower epsilon or move density away from 0 and 1")
        if _ranked_length(job.shape) < 2:
            return (f"DELLA ranks entries along dim 1, and shape {list(job.shape)} has one entry there "
                    "(mergekit fails on it too); set density: 1 for this tensor with a filter")
    return None


class MagnitudeSampling:
    """DELLA's MagPrune: keep entry j of δᵢ when uᵢⱼ < pᵢⱼ, pᵢⱼ = ρᵢ − εᵢ + 2εᵢ·rᵢⱼ (module docstring).

    u comes from :class:`~polyfuse.merge.blocks.Uniforms` in flat element order (drawn only for
    models with 0 < ρᵢ < 1). Tensors with 2+ dims are ranked within each row chunk; a 1-D tensor
    is ranked as a whole in one statistics pass that keeps its keep probabilities.
    """

    def __init__(self, job: TensorJob) -> None:
        self.density = job.model_params["density"]
        self.epsilon = job.model_params["epsilon"]
        self.whole = len(job.shape) < 2
        self._uniforms = Uniforms(job.seed, job.name, len(self.density))
        self._probabilities: list[Tensor | None] = [None] * len(self.density)

    def _sampled(self) -> list[int]:
        return [i for i, d in enumerate(self.density) if 0 < d < 1]

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        if not self.whole or not self._sampled():
            return
        parts: list[Tensor] = []
        yield lambda c: parts.append(c.deltas().abs().reshape(len(self.density), -1))
        magnitudes = torch.cat(parts, dim=1)
        for i in self._sampled():
            self._probabilities[i] = _della_probabilities(magnitudes[i:i + 1], self.density[i], self.epsilon[i])[0]

    def keep(self, chunk: Chunk, deltas: Tensor) -> Tensor:
        kept = torch.ones(deltas.shape, dtype=torch.bool)
        n = deltas[0].numel()
        for i, density in enumerate(self.density):
            if density >= 1:
                continue
            if density <= 0:
                kept[i] = False
                continue
            if self.whole:
                probabilities = self._probabilities[i]
                assert probabilities is not None, "statistics first"
                probabilities = probabilities[chunk.offset:chunk.offset + n].view(deltas.shape[1:])
            else:
                probabilities = _della_probabilities(deltas[i].abs(), density, self.epsilon[i])
            kept[i] = self._uniforms.draw(i, chunk.offset, n).view(deltas.shape[1:]) < probabilities
        return kept


SPARSIFIERS: dict[str, Callable[[TensorJob], Sparsifier]] = {
    "magnitude": lambda job: MagnitudeWindow(magnitude_windows(job)),
    "random": RandomDrop,
    "magnitude_outliers": lambda job: MagnitudeWindow(outlier_windows(job)),
    "della_magprune": MagnitudeSampling,
}
"""mergekit's sparsification methods by name."""


def make_sparsifier(kind: str, job: TensorJob) -> Sparsifier:
    """The sparsifier called ``kind`` (a key of :data:`SPARSIFIERS`) for one tensor."""
    return SPARSIFIERS[kind](job)
