"""Building blocks shared by mergers: exact chunk-independent statistics and masks.

:class:`RowSums` sums per model in float64 independently of the chunking, :class:`ColumnSums`
sums over rows per column (per position of a row); :class:`Uniforms` draws U[0, 1) per model from
a stream seeded by (seed, tensor name, model) (:func:`stream_seed`) in flat element order, which
DARE's drop mask (:class:`RandomKeep`) and DELLA's sampling use; :func:`sign_consensus` is TIES'
sign election; :func:`per_model` broadcasts one value per model; :func:`vector_sums` sums along
the last dim the same way for one vector as for many.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ColumnSums", "RandomKeep", "RowSums", "Uniforms", "per_model", "sign_consensus", "stream_seed", "vector_sums"]


def vector_sums(values: Tensor, *, keepdim: bool = False) -> Tensor:
    """Sums over the last dim, each computed the same way however many vectors ``values`` holds.

    torch splits a long reduction with a single output across threads (another summation order);
    a second, zero vector keeps one vector on the per-vector path that many vectors take.
    """
    if values.numel() == values.shape[-1]:
        return torch.stack([values, torch.zeros_like(values)]).sum(-1, keepdim=keepdim)[0]
    return values.sum(-1, keepdim=keepdim)


def per_model(values: Sequence[float], like: Tensor) -> Tensor:
    """[K] values as a [K, 1, ...] float32 tensor that broadcasts against ``like`` ([K, rows, ...])."""
    return torch.tensor(values, dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


class RowSums:
    """Per-model sums of a chunked tensor, in float64, independent of the chunking.

    Each row (or, for 1-D tensors, each block of ``block`` consecutive elements — a carry holds a
    partial block between chunks) is summed on its own; the row sums are summed once at the end.
    Memory: one float64 per row (per block) and model.
    """

    def __init__(self, block: int = 4096) -> None:
        self._parts: list[Tensor] = []
        self._block = block
        self._carry: Tensor | None = None

    def add(self, values: Tensor) -> None:
        """Add the values [K, rows, ...] of one chunk (chunks in order)."""
        values = values.to(torch.float64)
        if values.dim() > 2:
            self._parts.append(vector_sums(values.reshape(values.shape[0], values.shape[1], -1)))
            return
        if self._carry is not None:
            values = torch.cat([self._carry, values], dim=1)
        full = values.shape[1] // self._block * self._block
        if full:
            self._parts.append(values[:, :full].reshape(values.shape[0], -1, self._block).sum(-1))
        self._carry = values[:, full:].clone()

    def total(self) -> Tensor:
        """[K] float64 sums over every chunk added so far."""
        parts = self._parts + ([self._carry.sum(1, keepdim=True)] if self._carry is not None else [])
        return torch.cat(parts, dim=1).sum(1)


class ColumnSums:
    """Per-model sums over the rows of a chunked tensor, for every position of a row, in float64.

    The rows are added one after the other (a running ``cumsum`` through each chunk), so the sums
    do not depend on the chunking. Memory: one float64 row per model.
    """

    def __init__(self) -> None:
        self._total: Tensor | None = None

    def add(self, values: Tensor) -> None:
        """Add the values [K, rows, ...] of one chunk (chunks in order)."""
        values = values.to(torch.float64)
        if self._total is not None:
            values = torch.cat([self._total.unsqueeze(1), values], dim=1)
        self._total = values.cumsum(1)[:, -1].clone()

    def total(self) -> Tensor:
        """[K, ...] float64 sums (one row's shape) over every chunk added so far."""
        assert self._total is not None, "no chunk was added"
        return self._total


def stream_seed(seed: int, tensor: str, model: int) -> int:
    """The seed of model ``model``'s random stream for tensor ``tensor`` under the merge seed ``seed``."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Uniforms:
    """u ~ U[0, 1) for model i in flat element order, from a ``torch.Generator`` seeded by
    (seed, tensor name, i). Row chunks draw consecutive pieces of the same stream, so the values do
    not depend on the chunking; offset 0 restarts a model's stream (a new pass over the tensor)."""

    def __init__(self, seed: int, tensor: str, models: int) -> None:
        self._seeds = [stream_seed(seed, tensor, i) for i in range(models)]
        self._generators: list[torch.Generator | None] = [None] * models
        self._next = [0] * models

    def draw(self, model: int, offset: int, n: int) -> Tensor:
        """[n] float32 values for the elements ``[offset, offset + n)`` of ``model``'s stream."""
        if offset == 0:
            self._generators[model] = torch.Generator().manual_seed(self._seeds[model])
            self._next[model] = 0
        generator = self._generators[model]
        if generator is None or offset != self._next[model]:
            raise RuntimeError(f"random stream out of order: expected offset {self._next[model]}, got {offset}")
        self._next[model] = offset + n
        return torch.rand(n, generator=generator)


class RandomKeep:
    """DARE's drop mask: entry j of model i is kept when uᵢⱼ < ρᵢ (:class:`Uniforms`; nothing is
    drawn for a model with ρᵢ ≥ 1), so the mask does not depend on the chunking."""

    def __init__(self, seed: int, tensor: str, density: Sequence[float]) -> None:
        self._uniforms = Uniforms(seed, tensor, len(density))
        self._density = list(density)

    def keep(self, offset: int, n: int) -> Tensor:
        """[K, n] boolean mask for the elements ``[offset, offset + n)`` (offset 0 restarts the stream)."""
        masks = []
        for i, density in enumerate(self._density):
            if density >= 1:
                masks.append(torch.ones(n, dtype=torch.bool))
            else:
                masks.append(self._uniforms.draw(i, offset, n) < density)
        return torch.stack(masks)


def sign_consensus(values: Tensor) -> Tensor:
    """TIES' erase mask [K, ...]: the sign of each entry agrees with the sign of the column sum
    (a zero sum counts as positive; zero entries never agree)."""
    majority = torch.where(values.sum(0) >= 0, 1.0, -1.0)
    return values.sign() == majority
