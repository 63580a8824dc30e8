"""Source vocabulary → target vocabulary maps: exact, MinED (FuseLLM) and statistics (FuseChat).

Every map is a :class:`VocabMap`: for each source id the target id it stands for (−1: none) and
how that was decided (:class:`MapKind`). Tokens are compared in the normal form of
:mod:`polyfuse.align.normalize` (UTF-8 bytes), so GPT-2's ``Ċ`` and Llama-2's ``<0x0A>`` are the
same token (FuseLLM swapped only the space markers, so these never matched) and specials are
matched by role.

* :func:`exact_map` — same bytes; specials by role (source eos → target eos, ...).
* :func:`mined_map` — exact first, every other source token → the target token at minimum
  Levenshtein distance (FuseLLM's MinED); bytes are read as latin-1 so that each byte
  is one character. Ties go to the lowest target id.
* :func:`stats_map` — FuseChat-2.0's mapping statistics: count how often source id ``s``
  and target id ``t`` are 1-1 aligned over a corpus (:func:`count_aligned_pairs`), map ``s`` to
  its most frequent ``t``; a sparse CSR of all candidates is kept. Never a dense V×V matrix.

Example (tiny vocabularies)::

    >>> src = TokenTable([None, b" the", b"\\n", b" cat"], {"eos": 0}, {0: "</s>"}, np.zeros(4, bool))
    >>> tgt = TokenTable([None, b"\\n", b" the", b" cats"], {"eos": 0}, {0: "<eos>"}, np.zeros(4, bool))
    >>> m = mined_map(src, tgt)
    >>> m.src_to_tgt.tolist(), m.kind.tolist()      # eos by role; " cat" → " cats" (distance 1)
    ([0, 2, 1, 3], [3, 1, 1, 2])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from polyfuse.align.normalize import TokenTable, _cached_table
from polyfuse.align.tokens import Alignment, one_to_one

__all__ = [
    "MapKind",
    "PairCounts",
    "VocabMap",
    "count_aligned_pairs",
    "exact_map",
    "group_map",
    "mined_map",
    "prefix_map",
    "stats_map",
    "vocab_map",
]

ROLE_PRIORITY = ("eos", "bos", "unk", "pad")
"""Role order for a special source token with several roles. GPT-2's ``<|endoftext|>`` is bos,
eos and unk at once; a model *predicts* it only as end of text, so eos comes first."""
_MAX_CELLS = 2**24
"""Distance-matrix cells computed at once by :func:`mined_map` (64 MiB of int32)."""
_NPZ, _JSON = "vocab_map.npz", "vocab_map.json"


class MapKind(IntEnum):
    """How a source id got its target id (stored as ``uint8``)."""

    NONE = 0
    EXACT = 1
    MINED = 2
    SPECIAL = 3
    STATS = 4
    PREFIX = 5
    GROUP = 6


@dataclass(eq=False)
class VocabMap:
    """A source → target vocabulary map; ``stats`` maps also carry the sparse candidate weights."""

    src_to_tgt: np.ndarray
    """[V_src] int64 target id per source id, −1 = unmapped."""
    kind: np.ndarray
    """[V_src] uint8 :class:`MapKind` per source id."""
    method: str
    """``exact``, ``mined`` or ``stats``."""
    n_tgt: int
    """|V_tgt| (``len`` of the target tokenizer)."""
    indptr: np.ndarray | None = None
    """[V_src + 1] int64 CSR row pointers (stats only)."""
    indices: np.ndarray | None = None
    """[nnz] int64 target ids; each row sorted by descending count, ties by target id."""
    weights: np.ndarray | None = None
    """[nnz] float32 P(target | source) from the co-alignment counts (each non-empty row sums to 1)."""
    counts: np.ndarray | None = None
    """[nnz] int64 raw co-alignment counts."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts written to the JSON side file (e.g. tokenizer names)."""
    tgt_group: np.ndarray | None = None
    """[V_tgt] int64 group of each target id, 0..G-1 (``groups`` maps only; :func:`group_map`)."""

    def __post_init__(self) -> None:
        self.src_to_tgt = np.asarray(self.src_to_tgt, dtype=np.int64)
        self.kind = np.asarray(self.kind, dtype=np.uint8)
        if self.src_to_tgt.shape != self.kind.shape or self.src_to_tgt.ndim != 1:
            raise ValueError(f"src_to_tgt {self.src_to_tgt.shape} and kind {self.kind.shape} must be equal 1-D")
        if self.src_to_tgt.size and (self.src_to_tgt.max() >= self.n_tgt or self.src_to_tgt.min() < -1):
            raise ValueError(f"target ids must lie in [-1, {self.n_tgt})")

    def __len__(self) -> int:
        return len(self.src_to_tgt)

    @property
    def has_stats(self) -> bool:
        return self.indptr is not None

    def __call__(self, src_ids: Any) -> np.ndarray:
        """Map an array of source ids (any shape) to target ids; −1 where unmapped."""
        return self.src_to_tgt[np.asarray(src_ids, dtype=np.int64)]

    def candidates(self, src_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Target ids ``[k]`` and weights ``[k]`` co-aligned with ``src_id`` (stats maps only)."""
        if self.indptr is None or self.indices is None or self.weights is None:
            raise ValueError(f"a {self.method!r} map has no statistics; build it with stats_map")
        lo, hi = self.indptr[src_id], self.indptr[src_id + 1]
        return self.indices[lo:hi], self.weights[lo:hi]

    def summary(self) -> dict[str, int]:
        """Source ids per kind, plus the sizes: ``{"exact": .., "mined": .., ..., "n_src": .., "n_tgt": ..}``."""
        counts = np.bincount(self.kind, minlength=len(MapKind))
        out = {k.name.lower(): int(counts[k]) for k in MapKind}
        out.update(n_src=len(self), n_tgt=self.n_tgt, nnz=0 if self.indices is None else len(self.indices))
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``vocab_map.npz`` (arrays) and ``vocab_map.json`` (method, sizes, summary, meta) into ``path``."""
        import io

        from polyfuse.workspace import atomic_write_bytes, atomic_write_json

        path = Path(path)
        arrays = {"src_to_tgt": self.src_to_tgt, "kind": self.kind}
        for name in ("indptr", "indices", "weights", "counts", "tgt_group"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        atomic_write_bytes(path / _NPZ, buf.getvalue())
        atomic_write_json(path / _JSON, {"method": self.method, "n_src": len(self), "n_tgt": self.n_tgt,
                                         "summary": self.summary(), "meta": self.meta})
        return path

    @classmethod
    def load(cls, path: str | Path) -> VocabMap:
        """Read a map written by :meth:`save`."""
        from polyfuse.errors import DataError

        path = Path(path)
        if not (path / _NPZ).is_file() or not (path / _JSON).is_file():
            raise DataError(f"{str(path)!r} holds no vocabulary map ({_NPZ} + {_JSON}); build it with VocabMap.save")
        info = json.loads((path / _JSON).read_text())
        with np.load(path / _NPZ) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(method=info["method"], n_tgt=int(info["n_tgt"]), meta=info.get("meta", {}), **arrays)


def _table(x: TokenTable | Any) -> TokenTable:
    return x if isinstance(x, TokenTable) else _cached_table(x)


def _preferred_ids(tgt: TokenTable) -> dict[bytes, int]:
    """Bytes → the target id a model would produce for them: a regular piece over a ``<0xNN>``
    byte-fallback piece, then the lowest id."""
    best: dict[bytes, int] = {}
    for token_id, piece in enumerate(tgt.pieces):
        if piece is None:
            continue
        old = best.get(piece)
        if old is None or (tgt.byte_fallback[old] and not tgt.byte_fallback[token_id]):
            best[piece] = token_id
    return best


def _special_target(src: TokenTable, tgt: TokenTable, src_id: int) -> int:
    """Target id of a special source token: by role (``ROLE_PRIORITY``), else by identical content."""
    roles = {role for role, token_id in src.roles.items() if token_id == src_id}
    for role in ROLE_PRIORITY:
        if role in roles and role in tgt.roles:
            return tgt.roles[role]
    content = src.special.get(src_id)
    if content is not None:
        for token_id, other in tgt.special.items():
            if other == content:
                return token_id
    return -1


def exact_map(src: TokenTable | Any, tgt: TokenTable | Any) -> VocabMap:
    """Map source ids whose bytes equal a target token's bytes; specials by role (tokenizers or tables).

    Several target ids with the same bytes (Llama-2's ``A`` and ``<0x41>``): the regular piece wins.
    """
    src, tgt = _table(src), _table(tgt)
    by_bytes = _preferred_ids(tgt)
    out = np.full(len(src), -1, dtype=np.int64)
    kind = np.zeros(len(src), dtype=np.uint8)
    for token_id, piece in enumerate(src.pieces):
        if piece is not None:
            hit = by_bytes.get(piece)
            if hit is not None:
                out[token_id], kind[token_id] = hit, MapKind.EXACT
        elif token_id in src.special:
            hit = _special_target(src, tgt, token_id)
            if hit >= 0:
                out[token_id], kind[token_id] = hit, MapKind.SPECIAL
    return VocabMap(out, kind, "exact", n_tgt=len(tgt))


def _nearest(queries: Sequence[str], choices: Sequence[str], workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """For each query: index of the first choice at minimum Levenshtein distance, and that distance.

    Length rings: ``|len(a) - len(b)|`` is a lower bound of the distance, so queries of length
    ``L`` meet the choices of length ``L``, then ``L ± 1``, ``L ± 2``, ... A query is final once
    its best distance ``d <= r`` after ring ``r`` (every later choice is farther than ``d``); most
    tokens finish after ring 1-3, so far fewer than |Q|·|C| distances are computed. Ties keep
    the lowest choice index.
    """
    qlen = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))
    clen = np.fromiter(map(len, choices), dtype=np.int64, count=len(choices))
    best = np.full(len(queries), -1, dtype=np.int64)
    dist = np.full(len(queries), np.iinfo(np.int64).max, dtype=np.int64)
    if not len(choices):
        return best, np.full(len(queries), -1, dtype=np.int64)
    for length in np.unique(qlen).tolist():
        pending = np.nonzero(qlen == length)[0]
        gap = np.abs(clen - length)  # [|C|] ring of each choice
        for r in range(int(gap.max()) + 1):
            cols = np.nonzero(gap == r)[0]
            if cols.size:
                sub = [choices[c] for c in cols.tolist()]
                step = max(1, _MAX_CELLS // len(sub))
                for lo in range(0, pending.size, step):
                    rows = pending[lo:lo + step]
                    d = process.cdist([queries[q] for q in rows.tolist()], sub, scorer=Levenshtein.distance,
                                      dtype=np.int32, workers=workers)  # [rows, |cols|]
                    arg = d.argmin(axis=1)
                    m, a = d[np.arange(rows.size), arg].astype(np.int64), cols[arg]
                    better = (m < dist[rows]) | ((m == dist[rows]) & (a < best[rows]))
                    best[rows[better]], dist[rows[better]] = a[better], m[better]
            pending = pending[dist[pending] > r]
            if not pending.size:
                break
    return best, dist


def mined_map(src: TokenTable | Any, tgt: TokenTable | Any, *, workers: int = -1) -> VocabMap:
    """FuseLLM's MinED: exact first, then each other source token → nearest target token by edit distance.

    Distances are Levenshtein over the normalised bytes read as latin-1 (one byte = one
    character), against the distinct target byte strings (one id per string, chosen as in
    :func:`exact_map`). Ties → the lowest target id, as FuseLLM's "first minimum in vocabulary
    order". Specials without a role or content match stay unmapped (−1). Unlike FuseChat's released
    ``soft`` map, which measures each token against the whole vocabulary list at once and so sends every
    non-exact token to the first vocabulary entry, every non-exact token gets its real nearest neighbour::

        >>> tgt = TokenTable([b"a", b" hello", b" help"], {}, {}, np.zeros(3, bool))
        >>> src = TokenTable([b" hellos", b" helo"], {}, {}, np.zeros(2, bool))
        >>> mined_map(src, tgt).src_to_tgt.tolist()      # " helo": " hello" and " help" tie at 1
        [1, 1]
    """
    src, tgt = _table(src), _table(tgt)
    base = exact_map(src, tgt)
    by_bytes = _preferred_ids(tgt)
    choice_ids = np.array(sorted(by_bytes.values()), dtype=np.int64)
    choices = [tgt.pieces[i].decode("latin-1") for i in choice_ids.tolist()]  # type: ignore[union-attr]
    todo = [i for i, p in enumerate(src.pieces) if p is not None and base.kind[i] == MapKind.NONE]
    unique = sorted({src.pieces[i] for i in todo})  # type: ignore[type-var]
    nearest, _ = _nearest([p.decode("latin-1") for p in unique], choices, workers=workers)  # type: ignore[union-attr]
    found = {p: int(choice_ids[k]) for p, k in zip(unique, nearest.tolist(), strict=True) if k >= 0}
    out, kind = base.src_to_tgt.copy(), base.kind.copy()
    for i in todo:
        hit = found.get(src.pieces[i])  # type: ignore[arg-type]
        if hit is not None:
            out[i], kind[i] = hit, MapKind.MINED
    return VocabMap(out, kind, "mined", n_tgt=len(tgt))


def _longest_prefix(piece: bytes, by_bytes: dict[bytes, int], longest: int, *, proper: bool = False) -> int:
    """The id of the longest key of ``by_bytes`` that ``piece`` starts with (shorter than ``piece`` when
    ``proper``), -1 when none; ``longest`` is the length of the longest key."""
    for n in range(min(len(piece) - int(proper), longest), 0, -1):
        hit = by_bytes.get(piece[:n])
        if hit is not None:
            return hit
    return -1


def prefix_map(src: TokenTable | Any, tgt: TokenTable | Any) -> VocabMap:
    """Exact first, then each other source token → the longest target piece its bytes start with.

    A source token's probability is the probability that the next text starts with its bytes; the
    target can only begin that text with a piece that is a prefix of it, so the mass goes to a
    token the target could really emit next (" therefore" → " there" when the target lacks the whole
    word). FuseLLM's MinED instead picks the nearest string, which may spell other text
    (" therefore" → " therefor", " helo" → " help")::

        >>> tgt = TokenTable([b"a", b" hello", b" help", b" h"], {}, {}, np.zeros(4, bool))
        >>> src = TokenTable([b" hellos", b" helo"], {}, {}, np.zeros(2, bool))
        >>> prefix_map(src, tgt).src_to_tgt.tolist()
        [1, 3]

    Source tokens with no target piece as a prefix stay unmapped (-1); a byte-level or byte-fallback
    target has every single byte, so it maps every non-special token.
    """
    src, tgt = _table(src), _table(tgt)
    base = exact_map(src, tgt)
    by_bytes = _preferred_ids(tgt)
    longest = max((len(p) for p in by_bytes), default=0)
    out, kind = base.src_to_tgt.copy(), base.kind.copy()
    for i, piece in enumerate(src.pieces):
        if piece is None or kind[i] != MapKind.NONE:
            continue
        hit = _longest_prefix(piece, by_bytes, longest, proper=True)
        if hit >= 0:
            out[i], kind[i] = hit, MapKind.PREFIX
    return VocabMap(out, kind, "prefix", n_tgt=len(tgt))


def group_map(src: TokenTable | Any, tgt: TokenTable | Any) -> VocabMap:
    """Prefix groups: each source token's probability goes to the set of target tokens it begins.

    Where two tokenizers cut text at the same place, a source token's probability is the probability
    that the next text starts with its bytes *and* the source spells that start with this token. Under
    the target's tokenizer the same event is "the next target token begins with those bytes, and no
    longer source token begins it": so each target token belongs to the source token that is the
    longest source piece its bytes start with (its *owner*), and a source token's mass goes to the
    *group* of target tokens it owns. The student's probability of the event is the sum of its
    probabilities over the group, so the teacher never credits the target's ``" the"`` with mass that
    belongs to ``" there"`` when the source has no ``" there"`` (a one-to-one map does).

    A source token that owns no target token (it is longer than any target piece that starts with it,
    e.g. ``" therefore"`` when the target stops at ``" there"``) goes to the group of the target piece
    the target would emit first (:func:`prefix_map`).

    The map stores, per source id, a representative target id of its group (``src_to_tgt``; kind
    ``EXACT`` when the target has the same bytes, ``GROUP`` when the group holds only longer pieces,
    ``PREFIX`` for a borrowed group) and, per target id, its dense group index (``tgt_group``). Target
    ids without an owner (specials without a role, pieces that start with bytes the source cannot
    spell) are groups of their own::

        >>> tgt = TokenTable([b" the", b" there", b" then", b" t", b"x"], {}, {}, np.zeros(5, bool))
        >>> src = TokenTable([b" the", b" then", b" th", b" therefore"], {}, {}, np.zeros(4, bool))
        >>> m = group_map(src, tgt)
        >>> m.tgt_group.tolist()              # " the" and " there" belong to " the"; " then" to " then"
        [0, 0, 1, 2, 3]
        >>> m.src_to_tgt.tolist()             # " th" owns nothing: " th..." text starts with " t"
        [0, 2, 3, 1]
    """
    src, tgt = _table(src), _table(tgt)
    exact = exact_map(src, tgt)
    by_src = _preferred_ids(src)
    longest = max((len(p) for p in by_src), default=0)
    owner = np.array([-1 if piece is None else _longest_prefix(piece, by_src, longest) for piece in tgt.pieces],
                     dtype=np.int64)
    special = exact.kind == MapKind.SPECIAL  # specials by role: the target special belongs to its source twin
    owner[exact.src_to_tgt[special]] = np.nonzero(special)[0]
    # dense group ids: owned target ids by owner, then every unowned target id alone
    owners, group = np.unique(owner[owner >= 0], return_inverse=True)
    tgt_group = np.empty(len(tgt), dtype=np.int64)
    tgt_group[owner >= 0] = group
    tgt_group[owner < 0] = len(owners) + np.arange(int((owner < 0).sum()))
    first = np.full(len(src), -1, dtype=np.int64)  # a representative target id per owning source id
    for t in np.nonzero(owner >= 0)[0][::-1].tolist():
        first[owner[t]] = t
    out, kind = exact.src_to_tgt.copy(), exact.kind.copy()
    owns = (first >= 0) & (kind == MapKind.NONE)
    out[owns], kind[owns] = first[owns], MapKind.GROUP
    prefix = prefix_map(src, tgt)
    borrow = (out < 0) & (prefix.src_to_tgt >= 0)
    out[borrow], kind[borrow] = prefix.src_to_tgt[borrow], MapKind.PREFIX
    return VocabMap(out, kind, "groups", n_tgt=len(tgt), tgt_group=tgt_group)


def vocab_map(src: TokenTable | Any, tgt: TokenTable | Any, method: str = "mined", **kwargs: Any) -> VocabMap:
    """``exact``, ``mined``, ``prefix`` or ``groups`` map by name (``stats`` needs aligned pairs: use
    :func:`stats_map`)."""
    builders = {"exact": exact_map, "mined": mined_map, "prefix": prefix_map, "groups": group_map}
    if method not in builders:
        raise ValueError(f"unknown vocabulary map method {method!r}; choose exact, mined, prefix or groups "
                         "(stats maps are built from a corpus with stats_map)")
    return builders[method](src, tgt, **kwargs)


class PairCounts:
    """Sparse co-alignment counts: ``count[k]`` times source id ``src[k]`` was 1-1 aligned to ``tgt[k]``.

    Unique (src, tgt) pairs sorted by (src, tgt), kept as COO arrays (never a V×V matrix)::

        >>> c = PairCounts()
        >>> c.add([5, 5, 7], [1, 1, 2]).add([5], [3]).total
        4
        >>> c.src.tolist(), c.tgt.tolist(), c.count.tolist()
        ([5, 5, 7], [1, 3, 2], [2, 1, 1])
    """

    _FLUSH = 2**22
    """Pending pairs reduced at once (32 MiB of int64 keys)."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)  # [nnz] (src << 32) | tgt, sorted
        self._count = np.zeros(0, dtype=np.int64)  # [nnz]
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def add(self, src_ids: Any, tgt_ids: Any) -> PairCounts:
        """Count one chunk of aligned (source id, target id) pairs; returns ``self``."""
        s = np.asarray(src_ids, dtype=np.int64).ravel()
        t = np.asarray(tgt_ids, dtype=np.int64).ravel()
        if s.shape != t.shape:
            raise ValueError(f"src_ids {s.shape} and tgt_ids {t.shape} must have the same length")
        if s.size and (min(s.min(), t.min()) < 0 or max(s.max(), t.max()) >= 2**31):
            raise ValueError("token ids must lie in [0, 2**31)")
        self._pending.append((s << 32) | t)
        self._pending_n += s.size
        if self._pending_n >= self._FLUSH:
            self._flush()
        return self

    def _flush(self) -> None:
        if not self._pending:
            return
        new, new_count = np.unique(np.concatenate(self._pending), return_counts=True)
        keys = np.concatenate([self._keys, new])
        uniq, inv = np.unique(keys, return_inverse=True)
        self._count = np.bincount(inv, weights=np.concatenate([self._count, new_count]),
                                  minlength=uniq.size).astype(np.int64)
        self._keys = uniq
        self._pending, self._pending_n = [], 0

    @property
    def src(self) -> np.ndarray:
        """[nnz] int64 source ids."""
        self._flush()
        return self._keys >> 32

    @property
    def tgt(self) -> np.ndarray:
        """[nnz] int64 target ids."""
        self._flush()
        return self._keys & 0xFFFFFFFF

    @property
    def count(self) -> np.ndarray:
        """[nnz] int64 counts."""
        self._flush()
        return self._count

    @property
    def total(self) -> int:
        """Number of aligned pairs counted."""
        return int(self.count.sum())


def count_aligned_pairs(src_blocks: Iterable[Any], tgt_blocks: Iterable[Any],
                        alignments: Iterable[Alignment], counts: PairCounts | None = None) -> PairCounts:
    """Count (source id, target id) over the 1-1 positions of each block's alignment.

    ``src_blocks``/``tgt_blocks`` are :class:`~polyfuse.corpus.tokens.EncodedBlock` (or id arrays)
    of the same texts; ``alignments[b]`` aligns block ``b`` (see :func:`~polyfuse.align.tokens.one_to_one`).
    Pass ``counts`` to keep counting into an existing :class:`PairCounts`.
    """
    counts = PairCounts() if counts is None else counts
    for s_block, t_block, alignment in zip(src_blocks, tgt_blocks, alignments, strict=True):
        s_ids = np.asarray(getattr(s_block, "ids", s_block), dtype=np.int64)
        t_ids = np.asarray(getattr(t_block, "ids", t_block), dtype=np.int64)
        if len(t_ids) != alignment.n_tgt or len(s_ids) != alignment.n_src:
            raise ValueError(f"alignment is {alignment.n_src}×{alignment.n_tgt} tokens but the blocks have "
                             f"{len(s_ids)} source and {len(t_ids)} target tokens")
        src_pos = one_to_one(alignment)  # [n_tgt]
        keep = np.nonzero(src_pos >= 0)[0]
        counts.add(s_ids[src_pos[keep]], t_ids[keep])
    return counts


def stats_map(pairs: PairCounts | Iterable[tuple[Any, Any]], n_src: int, n_tgt: int, *,
              fallback: VocabMap | None = None, min_count: int = 1, prefer_exact: bool = True) -> VocabMap:
    """FuseChat's statistics map: each source id → its most often co-aligned target id.

    ``pairs`` is a :class:`PairCounts` or an iterable of ``(src_ids, tgt_ids)`` chunks. A source
    id whose best count is ``>= min_count`` gets that target (ties → lowest target id, kind
    ``stats``); other ids keep ``fallback`` (an exact or mined map; −1 without one). With
    ``prefer_exact`` the fallback's exact and special entries win over the statistics (FuseChat
    also tries the exact string first)::

        >>> m = stats_map([([4, 4, 4, 4, 9], [1, 2, 2, 2, 7])], n_src=10, n_tgt=8)
        >>> m.src_to_tgt[[4, 9, 0]].tolist(), m.kind[[4, 9, 0]].tolist()
        ([2, 7, -1], [4, 4, 0])
        >>> ids, weights = m.candidates(4)          # most frequent first
        >>> ids.tolist(), weights.tolist()
        ([2, 1], [0.75, 0.25])
    """
    if not isinstance(pairs, PairCounts):
        counts = PairCounts()
        for s, t in pairs:
            counts.add(s, t)
        pairs = counts
    if pairs.src.size and (pairs.src.max() >= n_src or pairs.tgt.max() >= n_tgt):
        raise ValueError(f"pair ids exceed the vocabularies (n_src={n_src}, n_tgt={n_tgt})")
    if fallback is not None and (len(fallback) != n_src or fallback.n_tgt != n_tgt):
        raise ValueError(f"fallback map is {len(fallback)}→{fallback.n_tgt}, expected {n_src}→{n_tgt}")
    p_src, p_tgt, p_cnt = pairs.src, pairs.tgt, pairs.count
    order = np.lexsort((p_tgt, -p_cnt, p_src))  # by src, then count desc, then tgt
    src, indices, cnt = p_src[order], p_tgt[order], p_cnt[order]
    indptr = np.zeros(n_src + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n_src), out=indptr[1:])
    totals = np.add.reduceat(cnt, indptr[:-1][np.diff(indptr) > 0]) if cnt.size else cnt
    row_total = np.zeros(n_src, dtype=np.int64)
    row_total[np.diff(indptr) > 0] = totals
    weights = (cnt / row_total[src]).astype(np.float32) if cnt.size else np.zeros(0, np.float32)

    out = fallback.src_to_tgt.copy() if fallback is not None else np.full(n_src, -1, dtype=np.int64)
    kind = fallback.kind.copy() if fallback is not None else np.zeros(n_src, dtype=np.uint8)
    has = np.nonzero(np.diff(indptr) > 0)[0]
    first = indptr[has]
    take = cnt[first] >= min_count
    if prefer_exact:
        take &= ~np.isin(kind[has], (MapKind.EXACT, MapKind.SPECIAL))
    out[has[take]], kind[has[take]] = indices[first[take]], MapKind.STATS
    meta = {"pairs": pairs.total, "min_count": min_count, "prefer_exact": prefer_exact,
            "fallback": None if fallback is None else fallback.method}
    return VocabMap(out, kind, "stats", n_tgt=n_tgt, indptr=indptr, indices=indices, weights=weights,
                    counts=cnt, meta=meta)
