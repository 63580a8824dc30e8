"""Token alignment: which source positions cover each target position of the same text.

An :class:`Alignment` lists, for every TARGET position ``j``, the SOURCE positions paired with
it (CSR: ``src[indptr[j]:indptr[j + 1]]``, ascending). Two ways to build one:

* :func:`align_offsets` — exact, from the character spans the tokenizers report: target ``j``
  pairs with every source token whose span overlaps ``j``'s span by at least one character.
  Vectorised (two ``searchsorted`` passes, the array form of a two-pointer sweep).
* :func:`align_dtw` — FuseLLM's dynamic time warping over token strings, for
  tokenizations without offsets; :func:`align_dtw_reference` is the plain double loop it must
  equal.

Worked example, text ``" unbelievable cats!"``::

    source  " unbelievable" " ca"  "ts"  "!"          spans (0,13) (13,16) (16,18) (18,19)
    target  " un" "believ" "able"  " cats"  "!"       spans (0,3) (3,9) (9,13) (13,18) (18,19)

    >>> al = align_offsets([[0, 13], [13, 16], [16, 18], [18, 19]],
    ...                    [[0, 3], [3, 9], [9, 13], [13, 18], [18, 19]])
    >>> al.to_lists()            # many-to-one: targets 0-2 share source 0; one-to-many: target 3
    [[0], [0], [0], [1, 2], [3]]
    >>> one_to_one(al).tolist()  # only "!" is paired mutually and exclusively
    [-1, -1, -1, -1, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

if TYPE_CHECKING:
    from polyfuse.corpus.tokens import EncodedBlock

__all__ = [
    "Alignment",
    "align_blocks",
    "align_dtw",
    "align_dtw_reference",
    "align_offsets",
    "one_to_one",
]


@dataclass(frozen=True, eq=False)
class Alignment:
    """For each target position, the source positions paired with it (CSR arrays).

    ``spans`` are kept when the alignment was built from offsets; :func:`one_to_one` then also
    requires identical spans.
    """

    indptr: np.ndarray
    """[n_tgt + 1] int64 row pointers."""
    src: np.ndarray
    """[nnz] int64 source positions, ascending within each target row."""
    n_src: int
    """Number of source positions."""
    src_spans: np.ndarray | None = None
    """[n_src, 2] character spans of the source tokens (offset alignments only)."""
    tgt_spans: np.ndarray | None = None
    """[n_tgt, 2] character spans of the target tokens (offset alignments only)."""

    def __post_init__(self) -> None:
        if self.indptr.ndim != 1 or self.indptr.size < 1 or self.indptr[0] != 0 or self.indptr[-1] != self.src.size:
            raise ValueError("indptr must be 1-D, start at 0 and end at len(src)")
        if self.src.size and (self.src.min() < 0 or self.src.max() >= self.n_src):
            raise ValueError(f"source positions must lie in [0, {self.n_src})")

    @property
    def n_tgt(self) -> int:
        """Number of target positions."""
        return self.indptr.size - 1

    def __len__(self) -> int:
        return self.n_tgt

    def __getitem__(self, j: int) -> np.ndarray:
        """Source positions paired with target position ``j``."""
        return self.src[self.indptr[j]:self.indptr[j + 1]]

    def to_lists(self) -> list[list[int]]:
        """``[[source positions of target 0], [..of target 1], ...]``."""
        flat = self.src.tolist()
        bounds = self.indptr.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], n_src: int) -> Alignment:
        """Build from per-target lists of source positions (each list is sorted)."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        src = np.fromiter((i for row in rows for i in sorted(row)), dtype=np.int64, count=int(indptr[-1]))
        return cls(indptr, src, n_src)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All pairs as ``(tgt_pos [nnz], src_pos [nnz])``."""
        return np.repeat(np.arange(self.n_tgt, dtype=np.int64), np.diff(self.indptr)), self.src

    def src_degree(self) -> np.ndarray:
        """[n_src] number of target positions each source position is paired with."""
        return np.bincount(self.src, minlength=self.n_src)

    def tgt_degree(self) -> np.ndarray:
        """[n_tgt] number of source positions each target position is paired with."""
        return np.diff(self.indptr)


def one_to_one(alignment: Alignment) -> np.ndarray:
    """[n_tgt] int64: for each target position the source position paired mutually and exclusively, else −1.

    Target ``j`` is 1-1 with source ``i`` when ``j`` pairs only with ``i`` and ``i`` pairs only
    with ``j``; for offset alignments the two spans must also be identical. In the module
    example, targets ``" un" "believ" "able"`` all pair with source ``" unbelievable"``
    (many-to-one: that source is not exclusive), target ``" cats"`` pairs with ``" ca" "ts"``
    (one-to-many), and only ``"!"`` ↔ ``"!"`` is 1-1::

        >>> one_to_one(Alignment.from_lists([[0], [0], [0], [1, 2], [3]], n_src=4)).tolist()
        [-1, -1, -1, -1, 3]
    """
    t_deg = alignment.tgt_degree()
    out = np.full(alignment.n_tgt, -1, dtype=np.int64)
    rows = np.nonzero(t_deg == 1)[0]
    cand = alignment.src[alignment.indptr[rows]]
    ok = alignment.src_degree()[cand] == 1
    if alignment.src_spans is not None and alignment.tgt_spans is not None:
        ok &= np.all(alignment.src_spans[cand] == alignment.tgt_spans[rows], axis=1)
    out[rows[ok]] = cand[ok]
    return out


def _spans(offsets: Any, name: str) -> np.ndarray:
    arr = np.asarray(offsets, dtype=np.int64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2] (start, end), got {arr.shape}")
    if np.any(arr[:, 1] < arr[:, 0]):
        raise ValueError(f"{name} has spans that end before they start")
    return arr


def align_offsets(src_offsets: Any, tgt_offsets: Any, *, context: bool = True) -> Alignment:
    """Exact alignment by character spans: target ``j`` pairs with every source ``i`` whose span
    overlaps ``j``'s by a positive length.

    Zero-width tokens pair with nothing, except the context tokens: with ``context`` and both
    sequences starting with a ``(0, 0)`` token (the BOS put in front by
    :func:`~polyfuse.corpus.tokens.encode_blocks`), positions 0 and 0 form a 1-1 pair. The
    result keeps the spans, so :func:`one_to_one` pairs only identical spans::

        >>> al = align_offsets([[0, 0], [0, 5], [5, 11]], [[0, 0], [0, 2], [2, 5], [5, 11]])
        >>> al.to_lists(), one_to_one(al).tolist()      # <bos> "Hello" " world" vs <bos> "He" "llo" " world"
        ([[0], [1], [1], [2]], [0, -1, -1, 2])

    Source spans must have non-decreasing starts and ends (true of every HF fast tokenizer); other
    inputs fall back to an O(n·m) vectorised sweep with the same result.
    """
    s, t = _spans(src_offsets, "src_offsets"), _spans(tgt_offsets, "tgt_offsets")
    n, m = len(s), len(t)
    s_start, s_end, t_start, t_end = s[:, 0], s[:, 1], t[:, 0], t[:, 1]
    if n and m and np.all(np.diff(s_start) >= 0) and np.all(np.diff(s_end) >= 0):
        lo = np.searchsorted(s_end, t_start, side="right")  # [m] first i with s_end > t_start
        hi = np.searchsorted(s_start, t_end, side="left")  # [m] first i with s_start >= t_end
        cnt = np.where(t_end > t_start, np.maximum(hi - lo, 0), 0)
        row = np.repeat(np.arange(m, dtype=np.int64), cnt)  # [nnz0]
        first = np.cumsum(cnt) - cnt
        idx = np.arange(row.size, dtype=np.int64) - first[row] + lo[row]  # [nnz0] source positions
        keep = s_end[idx] > s_start[idx]  # zero-width sources overlap nothing
        row, idx = row[keep], idx[keep]
    else:
        rows, idxs = [], []
        step = max(1, 2**22 // max(n, 1))
        for a in range(0, m, step):
            b = min(m, a + step)
            inter = np.minimum(t_end[a:b, None], s_end[None]) - np.maximum(t_start[a:b, None], s_start[None])
            r, i = np.nonzero(inter > 0)  # [b - a, n] positive-length intersections
            rows.append(r + a)
            idxs.append(i)
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        idx = np.concatenate(idxs) if idxs else np.zeros(0, np.int64)
    if context and n and m and not s[0].any() and not t[0].any():
        row, idx = np.concatenate([[0], row]), np.concatenate([[0], idx])
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=m), out=indptr[1:])
    return Alignment(indptr, idx.astype(np.int64), n, src_spans=s, tgt_spans=t)


def _strip(tokens: Sequence[str], strip: str) -> list[str]:
    return [tok.replace(strip, "") for tok in tokens] if strip else list(tokens)


def _unique(tokens: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct strings (first-seen order) and, per token, its index among them."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(tok, len(index)) for tok in tokens), dtype=np.int64, count=len(tokens))
    return list(index), inverse


def _from_path(tgt_pos: list[int], src_pos: list[int], n_src: int, n_tgt: int) -> Alignment:
    """CSR from a backtracked path (listed end → start)."""
    t = np.asarray(tgt_pos[::-1], dtype=np.int64)
    s = np.asarray(src_pos[::-1], dtype=np.int64)
    order = np.lexsort((s, t))
    indptr = np.zeros(n_tgt + 1, dtype=np.int64)
    np.cumsum(np.bincount(t, minlength=n_tgt), out=indptr[1:])
    return Alignment(indptr, s[order], n_src)


def _empty(n_src: int, n_tgt: int) -> Alignment:
    return Alignment(np.zeros(n_tgt + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), n_src)


def align_dtw(src_tokens: Sequence[str], tgt_tokens: Sequence[str], *, strip: str = " ") -> Alignment:
    """FuseLLM's DTW alignment, vectorised; equal to :func:`align_dtw_reference`.

    ``cost(i, j) = Levenshtein(src[i] without strip, tgt[j] without strip)`` (normalised texts,
    :func:`~polyfuse.align.normalize.token_texts`, where the space is the old word marker);
    ``D[i, j] = cost + min(D[i-1, j], D[i, j-1], D[i-1, j-1])``; backtrack from the last cell,
    ties diag > up > left. Every position of both sides ends up paired::

        >>> align_dtw([" un", "believ", "able"], [" unbelievable"]).to_lists()
        [[0, 1, 2]]
        >>> align_dtw([" Hello", " world"], [" Hel", "lo", " world"]).to_lists()
        [[0], [0], [1]]

    It is a heuristic: edit distance favours short-for-short pairs, so a long token split into
    pieces is often misaligned::

        >>> align_dtw([" Hello", " wor", "ld", "!"], [" Hel", "lo", " world", "!"]).to_lists()
        [[0], [1], [2], [3]]

    Prefer :func:`align_offsets` whenever both tokenizers report offsets.

    The cost matrix comes from ``rapidfuzz.process.cdist`` over the distinct strings; each DP row
    is solved in closed form: with ``t_j = min(D[i-1, j], D[i-1, j-1])`` and ``S`` the running
    sum of the row's costs, ``D[i, j] = S_j + min_{k<=j}(t_k - S_{k-1})`` (a cumulative minimum).
    Integer costs keep it exact. Memory: the int64 D matrix, 32 MiB for 2048 × 2048 tokens.
    """
    n, m = len(src_tokens), len(tgt_tokens)
    if not n or not m:
        return _empty(n, m)
    a, c = _strip(src_tokens, strip), _strip(tgt_tokens, strip)
    ua, ia = _unique(a)
    uc, ic = _unique(c)
    dist = process.cdist(ua, uc, scorer=Levenshtein.distance, dtype=np.int64, workers=-1)  # [|ua|, |uc|]
    # Row costs depend only on the source string: cumulative sums per distinct source string.
    cost_u = np.take(dist, ic, axis=1)  # [|ua|, m]
    cum_u = np.cumsum(cost_u, axis=1)  # [|ua|, m] S_j
    excl_u = cum_u - cost_u  # [|ua|, m] S_{j-1}
    # int64 throughout: numpy's minimum.accumulate is several times faster on int64 than on int32.
    inf = np.iinfo(np.int64).max // 4
    d = np.empty((n + 1, m + 1), dtype=np.int64)  # [n+1, m+1] D with the inf border row/column
    d[0, :] = inf
    d[:, 0] = inf
    d[0, 0] = 0
    import torch  # lazily: importing the alignment module stays cheap

    v = np.empty(m, dtype=np.int64)  # [m] scratch row
    prefix_min = np.empty(m, dtype=np.int64)  # [m]
    # torch.cummin runs the cumulative minimum about twice as fast as np.minimum.accumulate (which
    # stores and reloads every element); both tensors share these arrays' memory, nothing is copied.
    v_t, prefix_t, arg_t = torch.from_numpy(v), torch.from_numpy(prefix_min), torch.empty(m, dtype=torch.int64)
    cums, excls, rows = list(cum_u), list(excl_u), ia.tolist()
    minimum, subtract, add, cummin, outs = np.minimum, np.subtract, np.add, torch.cummin, (prefix_t, arg_t)
    for up, diag, out, r in zip(d[:-1, 1:], d[:-1, :-1], d[1:, 1:], rows, strict=True):
        minimum(up, diag, out=v)  # t_j
        subtract(v, excls[r], out=v)  # t_j - S_{j-1}
        cummin(v_t, 0, out=outs)  # min over k <= j
        add(prefix_min, cums[r], out=out)  # + S_j
    return _backtrack(d[1:, 1:], n, m)


def _backtrack(e: np.ndarray, n: int, m: int) -> Alignment:
    """FuseLLM's backtrack over the DP matrix without its border row/column; ties diag > up > left."""
    inf = float("inf")
    at = e.item  # Python scalars: far faster than e[i, j] in a loop
    i, j = n - 1, m - 1
    tgt_pos, src_pos = [], []
    while i > 0 or j > 0:
        tgt_pos.append(j)
        src_pos.append(i)
        diag = at(i - 1, j - 1) if i > 0 and j > 0 else inf
        up = at(i - 1, j) if i > 0 else inf
        left = at(i, j - 1) if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    tgt_pos.append(0)
    src_pos.append(0)
    return _from_path(tgt_pos, src_pos, n, m)


def align_dtw_reference(src_tokens: Sequence[str], tgt_tokens: Sequence[str], *, strip: str = " ") -> Alignment:
    """FuseLLM's ``dtw`` as shipped: a Python double loop, one edit distance per cell.

    Kept as the ground truth that :func:`align_dtw` must equal and as the benchmark baseline; it
    takes seconds on 2048×2048 tokens.
    """
    n, m = len(src_tokens), len(tgt_tokens)
    if not n or not m:
        return _empty(n, m)
    a, c = _strip(src_tokens, strip), _strip(tgt_tokens, strip)
    matrix = np.zeros((n + 1, m + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, s_tok in enumerate(a):
        for j, t_tok in enumerate(c):
            cost = Levenshtein.distance(s_tok, t_tok)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    return _backtrack(matrix[1:, 1:], n, m)


def align_blocks(src: EncodedBlock, tgt: EncodedBlock, *, method: str = "offsets",
                 src_tokenizer: Any = None, tgt_tokenizer: Any = None) -> Alignment:
    """Align two :class:`~polyfuse.corpus.tokens.EncodedBlock` of the same text.

    ``offsets`` (default) uses the character spans and pairs the context tokens when both blocks
    have one; ``dtw`` needs both tokenizers for :func:`~polyfuse.align.normalize.token_texts`.
    """
    if method == "offsets":
        return align_offsets(src.offsets, tgt.offsets, context=src.has_context and tgt.has_context)
    if method == "dtw":
        if src_tokenizer is None or tgt_tokenizer is None:
            raise ValueError("method='dtw' needs src_tokenizer and tgt_tokenizer (to read the token texts)")
        from polyfuse.align.normalize import token_texts

        return align_dtw(token_texts(src_tokenizer, src.ids), token_texts(tgt_tokenizer, tgt.ids))
    raise ValueError(f"unknown alignment method {method!r}; choose offsets or dtw")
