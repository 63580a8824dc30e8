"""Prefix masses: how likely the next token is to *extend* each byte prefix of the actual next token.

When a target's next token starts inside a source token ``j`` (the target has already emitted ``u``,
the first bytes of ``j``), what the source says comes next is its distribution before ``j``
conditioned on "the token starts with ``u`` and goes on past it". That conditional needs the
denominator ``P(u*) = sum of p(v) over tokens v whose bytes start with u and are longer``. A sparse
store (top-k plus a sampled tail) cannot give it: the actual token is always known while the other
tokens that extend ``u`` appear only when drawn, so a denominator summed from the stored entries is
usually just ``p(j)`` and the conditional comes out near 1 -- the label, not the teacher.

The capture has the whole distribution, so it stores ``log P(u*)`` for every byte prefix ``u`` of the
actual next token, up to ``max_bytes`` bytes (:class:`PrefixRanges`). Sorted by their bytes, the
tokens that extend ``u`` form one run, so each mass is a difference of two prefix sums.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["PrefixRanges"]

_ROWS_ELEMENTS = 1 << 22
"""Rows of ``[rows, V]`` float64 prefix sums built at once: 32 MiB."""


class PrefixRanges:
    """For every token id and byte length ``l`` (1..``max_bytes``): where, in byte order, the tokens
    that start with the first ``l`` bytes of that token's piece and are longer than them lie.

    Args:
        pieces: the bytes each id stands for in text (``None`` for special tokens), e.g.
            :attr:`polyfuse.align.normalize.TokenTable.pieces`.
        vocab_size: rows of the model's output head (ids past ``len(pieces)`` are treated as specials).
        max_bytes: the longest prefix measured.

    Example::

        >>> r = PrefixRanges([b"a", b"ab", b"abc", b"b", None], 5, max_bytes=2)
        >>> lp = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]]))
        >>> r.logmass(lp, torch.tensor([2])).exp()   # after "a": ab + abc; after "ab": abc
        tensor([[0.5000, 0.3000]], dtype=torch.float64)
    """

    def __init__(self, pieces: Sequence[bytes | None], vocab_size: int, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        real = [i for i in range(min(len(pieces), vocab_size)) if pieces[i]]
        real.sort(key=lambda i: pieces[i])
        keys = [pieces[i] for i in real]
        self.order = torch.tensor(real, dtype=torch.long)                 # [V'] ids in byte order
        lo = np.zeros((vocab_size, max_bytes), dtype=np.int64)
        hi = np.zeros((vocab_size, max_bytes), dtype=np.int64)             # lo == hi: nothing measured
        for i in real:
            piece = pieces[i]
            for n in range(1, min(len(piece) - 1, max_bytes) + 1):
                u = piece[:n]
                start = bisect.bisect_right(keys, u)                       # past u itself (ends inside u)
                lo[i, n - 1] = start
                hi[i, n - 1] = _end_of_prefix(keys, u, start)
        self.lo, self.hi = torch.from_numpy(lo), torch.from_numpy(hi)

    def logmass(self, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, max_bytes]`` float64: log ``P(u*)`` for each prefix ``u`` of ``targets`` [N] under
        ``logits - lse`` ([N, V], [N, 1]; ``lse`` None: ``logits`` are log-probs already); NaN where the
        target has no prefix of that length (or is special).

        Each mass is at least the target's own probability (the target extends its own prefixes).
        """
        n, device = logits.shape[0], logits.device
        out = torch.full((n, self.max_bytes), float("nan"), dtype=torch.float64, device=device)
        if n == 0 or self.order.numel() == 0:
            return out
        order = self.order.to(device)
        lo, hi = self.lo.to(device)[targets], self.hi.to(device)[targets]  # [N, L]
        rows = max(1, _ROWS_ELEMENTS // order.numel())
        for s in range(0, n, rows):
            lp = logits[s:s + rows].double()
            if lse is not None:
                lp = lp - lse[s:s + rows].double()
            probs = lp.exp()[:, order]                                                 # [r, V'] byte order
            sums = torch.nn.functional.pad(probs.cumsum(-1), (1, 0))                   # [r, V' + 1]
            mass = sums.gather(1, hi[s:s + rows]) - sums.gather(1, lo[s:s + rows])     # [r, L]
            own = lp.gather(1, targets[s:s + rows, None]).exp()
            mass = torch.maximum(mass, own)
            out[s:s + rows] = torch.where(hi[s:s + rows] > lo[s:s + rows], mass.log(), out[s:s + rows])
        return out


def _end_of_prefix(keys: list[bytes], u: bytes, start: int) -> int:
    """The end of the run of ``keys`` (sorted, from ``start``) that start with ``u``."""
    stem = u.rstrip(b"\xff")
    if not stem:                                                           # u is all 0xFF bytes
        return len(keys)
    bound = stem[:-1] + bytes([stem[-1] + 1])                              # the first string past u's run
    return bisect.bisect_left(keys, bound, lo=start)
