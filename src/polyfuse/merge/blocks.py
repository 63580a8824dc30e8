"""Building blocks shared by mergers: exact chunk-independent statistics and masks.

:class:`RowSums` sums per model in float64 independently of the chunking; :class:`RandomKeep`
draws DARE's drop mask from a stream seeded by (seed, tensor name, model) (:func:`stream_seed`);
:func:`sign_consensus` is TIES' sign election; :func:`per_model` broadcasts one value per model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["RandomKeep", "RowSums", "per_model", "sign_consensus", "stream_seed"]


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
            self._parts.append(values.reshape(values.shape[0], values.shape[1], -1).sum(-1))
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


def stream_seed(seed: int, tensor: str, model: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RandomKeep:
    """DARE's drop mask: entry j of model i is kept when uᵢⱼ < ρᵢ, with uᵢⱼ ~ U[0, 1) drawn in flat
    element order from a ``torch.Generator`` seeded by (seed, tensor name, i). Row chunks draw
    consecutive pieces of the same stream, so the mask does not depend on the chunking."""

    def __init__(self, seed: int, tensor: str, density: Sequence[float]) -> None:
        self._seeds = [stream_seed(seed, tensor, i) for i in range(len(density))]
        self._density = list(density)
        self._generators: list[torch.Generator] = []
        self._next = 0

    def keep(self, offset: int, n: int) -> Tensor:
        """[K, n] boolean mask for the elements ``[offset, offset + n)`` (offset 0 restarts the stream)."""
        if offset == 0:
            self._generators = [torch.Generator().manual_seed(s) for s in self._seeds]
            self._next = 0
        if offset != self._next:
            raise RuntimeError(f"DARE chunks out of order: expected offset {self._next}, got {offset}")
        self._next = offset + n
        masks = []
        for density, generator in zip(self._density, self._generators, strict=True):
            if density >= 1:
                masks.append(torch.ones(n, dtype=torch.bool))
            else:
                masks.append(torch.rand(n, generator=generator) < density)
        return torch.stack(masks)


def sign_consensus(values: Tensor) -> Tensor:
    """TIES' erase mask [K, ...]: the sign of each entry agrees with the sign of the column sum
    (a zero sum counts as positive; zero entries never agree)."""
    majority = torch.where(values.sum(0) >= 0, 1.0, -1.0)
    return values.sign() == majority
