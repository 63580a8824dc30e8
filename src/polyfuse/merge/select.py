"""Exact streaming top-k selection with memory bounded by two histograms, not by the tensor size.

TIES keeps the ``k`` entries of each task vector with the largest magnitude, SCE the ``k`` entries
with the largest variance across models. Both are whole-tensor decisions, but the engine sees a
tensor only in row chunks. Non-negative float32 values order exactly like their IEEE-754 bit
patterns read as integers, so a two-pass radix select finds the k-th largest value exactly:

1. :meth:`TopK.count_high` over every chunk: histogram of the high 16 bits -> the bin that holds
   the k-th largest value;
2. :meth:`TopK.count_low` over every chunk: histogram of the low 16 bits inside that bin -> the
   exact k-th largest value ``T`` and how many values equal to ``T`` are kept;
3. :meth:`TopK.keep` over every chunk, in stream order: values above ``T``, plus the first values
   equal to ``T`` until exactly ``k`` are kept (ties are broken by position, so the result does not
   depend on the chunking).

Streams small enough to hold (``small_bytes``, :data:`SMALL_BYTES` by default) are simply sorted after phase 1,
which gives the same result and skips phase 2.

Naive equivalent for one stream ``x`` (a flat tensor): ``keep = zeros_like(x, bool);
keep[argsort(x, descending=True, stable=True)[:k]] = True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SMALL_BYTES", "TopK"]

SMALL_BYTES = 1 << 22
"""Streams that fit this many bytes in all are sorted instead of histogrammed (the default of ``TopK``)."""
_BINS = 1 << 16
_HIGH_BINS = 1 << 15  # the sign bit is 0 for non-negative values


def _bits(values: Tensor) -> Tensor:
    """int32 view of non-negative float32 values [S, n]."""
    return values.to(torch.float32).contiguous().view(torch.int32)


def _count(histogram: Tensor, keys: Tensor) -> None:
    """histogram[key] += 1 for every key (index_add_: no allocation of the size of the histogram)."""
    histogram.index_add_(0, keys, torch.ones(1, dtype=histogram.dtype).expand(keys.numel()))


class TopK:
    """Select the ``k[s]`` largest of each of ``S`` streams of non-negative float32 values.

    Every call takes a chunk ``values`` of shape [S, n] (the next ``n`` values of every stream);
    the three phases each see all chunks, in the same order.
    """

    def __init__(self, streams: int, *, small_bytes: int | None = None) -> None:
        self.streams = streams
        self.total = torch.zeros(streams, dtype=torch.int64)
        self._small_bytes = SMALL_BYTES if small_bytes is None else small_bytes
        self._kept: list[Tensor] | None = []  # phase-1 values while they fit small_bytes (then sorted)
        self._high: Tensor | None = None
        self._low: Tensor | None = None
        self._bin = torch.zeros(streams, dtype=torch.int32)
        self._need = [0] * streams  # values still to keep inside the chosen high bin
        self._mode = ["some"] * streams  # some | all | none
        self.threshold = torch.zeros(streams, dtype=torch.float32)
        self._quota = [0] * streams  # values equal to the threshold that are kept
        self._ties = [0] * streams  # values equal to the threshold in all
        self._seen = [0] * streams  # values equal to the threshold met so far in the keep pass

    def count_high(self, values: Tensor) -> None:
        """Phase 1: histogram the high 16 bits of a chunk [S, n].

        Small streams (up to ``small_bytes`` in all) are kept instead and sorted at :meth:`choose`,
        which is exact as well and skips phase 2.
        """
        self.total += values.shape[1]
        if self._kept is not None:
            if int(self.total.sum()) * 4 <= self._small_bytes:
                self._kept.append(values.to(torch.float32).clone())
                return
            self._high = torch.zeros(self.streams * _HIGH_BINS, dtype=torch.int64)
            for kept in self._kept:
                self._histogram_high(kept)
            self._kept = None
        self._histogram_high(values)

    def _histogram_high(self, values: Tensor) -> None:
        assert self._high is not None
        keys = _bits(values) >> 16
        keys += torch.arange(self.streams, dtype=torch.int32).unsqueeze(1) * _HIGH_BINS
        _count(self._high, keys.reshape(-1))

    def _choose_sorted(self, k: list[int]) -> None:
        """Exact thresholds of small streams by sorting their values."""
        assert self._kept is not None
        values = torch.cat(self._kept, dim=1) if self._kept else torch.zeros(self.streams, 0)
        self._kept = None
        for s, ks in enumerate(k):
            if self._mode[s] != "some":
                continue
            ordered = values[s].sort(descending=True).values
            threshold = ordered[ks - 1]
            self.threshold[s] = threshold
            self._quota[s] = ks - int((ordered > threshold).sum())
            self._ties[s] = int((ordered == threshold).sum())

    def choose(self, k: list[int]) -> bool:
        """After phase 1: fix ``k`` per stream; returns whether phase 2 is needed (some stream has 0 < k < n)."""
        for s, ks in enumerate(k):
            n = int(self.total[s])
            self._mode[s] = "all" if ks >= n else "none" if ks <= 0 else "some"
        if self._kept is not None:
            self._choose_sorted(k)
            return False
        assert self._high is not None
        high = self._high.view(self.streams, _HIGH_BINS)
        below = high.cumsum(1) - high  # [S, bins]: values whose high bits are < bin
        for s, ks in enumerate(k):
            n = int(self.total[s])
            if self._mode[s] == "some":  # the highest bin with at least ks values at or above it
                b = int(torch.searchsorted(below[s], n - ks, right=True)) - 1
                self._bin[s] = b
                self._need[s] = ks - (n - int(below[s, b]) - int(high[s, b]))
        return "some" in self._mode

    def count_low(self, values: Tensor) -> None:
        """Phase 2: histogram the low 16 bits of the values inside each stream's chosen high bin."""
        if self._high is None:  # small streams: already decided at choose()
            return
        if self._low is None:
            self._low = torch.zeros(self.streams * _BINS, dtype=torch.int64)
        bits = _bits(values)
        inside = (bits >> 16) == self._bin.unsqueeze(1)
        picked = bits[inside]  # stream-major: the values of stream 0 first; few in all
        stream = torch.repeat_interleave(torch.arange(self.streams, dtype=torch.int32), inside.sum(1))
        _count(self._low, (picked & 0xFFFF) + stream * _BINS)

    def finish(self) -> None:
        """After phase 2: the exact threshold of every stream."""
        if self._low is None:  # decided at choose() (small streams), or no stream needed phase 2
            return
        low = self._low.view(self.streams, _BINS)
        below = low.cumsum(1) - low
        for s in range(self.streams):
            if self._mode[s] != "some":
                continue
            need, inside = self._need[s], int(below[s, -1] + low[s, -1])
            lo = int(torch.searchsorted(below[s], inside - need, right=True)) - 1
            key = (int(self._bin[s]) << 16) | lo
            self.threshold[s] = torch.tensor(key, dtype=torch.int32).view(torch.float32)
            self._quota[s] = need - (inside - int(below[s, lo]) - int(low[s, lo]))
            self._ties[s] = int(low[s, lo])

    def restart(self) -> None:
        """Begin a new phase-3 sweep over the stream (the tie counters go back to zero)."""
        self._seen = [0] * self.streams

    def keep(self, values: Tensor) -> Tensor:
        """Phase 3: boolean mask [S, n] of the kept values of this chunk (call chunks in stream order)."""
        keep = values >= self.threshold.unsqueeze(1)
        for s, mode in enumerate(self._mode):
            if mode == "all":
                keep[s] = True
            elif mode == "none":
                keep[s] = False
            elif self._quota[s] < self._ties[s]:  # only the first `quota` ties are kept
                if self._seen[s] >= self._quota[s]:  # quota used up: no more ties
                    keep[s] = values[s] > self.threshold[s]
                    continue
                tie = values[s] == self.threshold[s]
                count = int(tie.sum())
                if self._seen[s] + count > self._quota[s]:  # the chunk where the quota runs out
                    rank = tie.cumsum(0) + self._seen[s]
                    keep[s] &= ~tie | (rank <= self._quota[s])
                self._seen[s] += count
        return keep
