"""Fusion strategies: turn several aligned teacher distributions into one top-k target per position.

Every strategy is a pure numpy function over one block, registered by name (mergekit's registry)::

    fused = fuse_block(teachers, strategy="min_ce", level="token", k_out=10)
    fused.ids        # [P, k_out] int64 target-vocabulary ids, -1 = padding
    fused.logprobs   # [P, k_out] float32 log of the fused probabilities, -inf = padding
    fused.stats      # which teacher was used how often

Inputs are :class:`TeacherBlock` values in the *target's* tokenization: position ``t = 0..P-1`` holds the
distribution over target token ``t + 1``. Teacher 0 is, by convention, the target model itself; it
wins ties and is the fallback wherever no teacher has a usable prediction.

Comparing teachers
------------------
The sequence-level criterion is ``seq_nll``, the teacher's **total** negative log-likelihood of the block
text in its own tokenization. Totals are comparable across tokenizers because every teacher scores
the same text: each total is ``-log p(text)``. Per-token means are not: a teacher with a finer
tokenizer divides a similar total by more (easier) tokens and looks better than it is. AvgCE needs a
per-unit cross-entropy as a softmax argument (totals of hundreds of nats would make the softmax
one-hot); it divides every total by the **same** number, the block's UTF-8 byte count (nats per
byte, tokenizer-free and stable across blocks), or the number of target positions when the byte
count is not given. Token-level criteria use ``token_nll``, which is already measured on the target's
next token at each position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from polyfuse.errors import DataError, PolyfuseError

__all__ = [
    "STRATEGIES",
    "FusedBlock",
    "FusionStats",
    "Level",
    "Strategy",
    "TeacherBlock",
    "avg_ce",
    "fuse_block",
    "get_strategy",
    "min_ce",
    "no_fusion",
    "register",
    "tag_teacher",
]

Level = Literal["sequence", "token"]
LEVELS: tuple[str, ...] = ("sequence", "token")


@dataclass(frozen=True)
class TeacherBlock:
    """One teacher's view of a block, aligned to the target's tokens (``P`` positions, ``k`` entries each).

    Attributes:
        ids: ``[P, k]`` int64 target-vocabulary ids; ``-1`` pads.
        logprobs: ``[P, k]`` float log-probs as captured at temperature 1 (not renormalised over the k);
            ``-inf`` pads.
        token_nll: ``[P]`` the teacher's ``-log p`` of the actual next target token; NaN where the
            teacher has no valid aligned prediction.
        valid: ``[P]`` False where the entry is a fallback one-hot (no real prediction).
        seq_nll: the teacher's total NLL of the block text in its own tokenization.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    token_nll: np.ndarray
    valid: np.ndarray
    seq_nll: float

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64)
        logprobs = np.asarray(self.logprobs)
        if ids.ndim != 2 or logprobs.shape != ids.shape:
            raise DataError(
                f"teacher ids and logprobs must both be [positions, k]; got {ids.shape} and {logprobs.shape}"
            )
        positions = ids.shape[0]
        token_nll = np.asarray(self.token_nll, dtype=np.float64)
        valid = np.asarray(self.valid, dtype=bool)
        if token_nll.shape != (positions,) or valid.shape != (positions,):
            raise DataError(
                f"teacher token_nll and valid must be [{positions}] like ids {ids.shape}; "
                f"got {token_nll.shape} and {valid.shape}"
            )
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "logprobs", logprobs)
        object.__setattr__(self, "token_nll", token_nll)
        object.__setattr__(self, "valid", valid)
        object.__setattr__(self, "seq_nll", float(self.seq_nll))

    @property
    def positions(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> TeacherBlock:
        """Build from a mapping with the keys ``ids``, ``logprobs``, ``token_nll``, ``valid``, ``seq_nll``."""
        missing = [k for k in ("ids", "logprobs", "token_nll", "valid", "seq_nll") if k not in row]
        if missing:
            raise DataError(f"teacher entry lacks {', '.join(missing)}; got keys {sorted(row)}")
        return cls(row["ids"], row["logprobs"], row["token_nll"], row["valid"], row["seq_nll"])


def tag_teacher(teacher: TeacherBlock, index: int, n_tgt: int) -> TeacherBlock:
    """The teacher with its entries' ids moved to ``index * n_tgt + id``: fused entries then remember
    which teacher's grouping (:func:`polyfuse.align.vocab.group_map`) gives them their meaning."""
    ids = np.where(teacher.ids >= 0, teacher.ids + index * n_tgt, -1)
    return TeacherBlock(ids, teacher.logprobs, teacher.token_nll, teacher.valid, teacher.seq_nll)


@dataclass
class FusionStats:
    """How much each teacher contributed; add stats of several blocks with ``+``.

    ``weight[m]`` is, summed over positions, teacher m's fusion weight: the number of positions where
    it was chosen (MinCE) or the sum of its softmax weights (AvgCE).
    """

    weight: np.ndarray
    positions: int = 0
    fallback: int = 0
    """Positions where no teacher was usable and teacher 0 was used."""

    @property
    def share(self) -> np.ndarray:
        """Per teacher, ``weight / positions`` (zeros for an empty block)."""
        return self.weight / max(self.positions, 1)

    def __add__(self, other: FusionStats) -> FusionStats:
        if len(self.weight) != len(other.weight):
            raise ValueError(f"cannot add stats of {len(self.weight)} and {len(other.weight)} teachers")
        return FusionStats(self.weight + other.weight, self.positions + other.positions,
                           self.fallback + other.fallback)

    def as_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "share": self.share.tolist(),
                "positions": self.positions, "fallback": self.fallback}


@dataclass(frozen=True)
class FusedBlock:
    """The fused target of one block: ``ids`` [P, k_out] int64 (-1 pad), ``logprobs`` [P, k_out] float32."""

    ids: np.ndarray
    logprobs: np.ndarray
    stats: FusionStats = field(compare=False)

    def training_fields(self) -> dict[str, np.ndarray]:
        """The fields :class:`~polyfuse.fuse.trainer.FusionCollator` reads (empty for ``none``)."""
        if self.ids.shape[1] == 0:
            return {}
        return {"teacher_ids": self.ids, "teacher_logprobs": self.logprobs}


StrategyFn = Callable[..., FusedBlock]


@dataclass(frozen=True)
class Strategy:
    """A registered fusion strategy: ``fn(teachers, *, level, k_out, n_bytes) -> FusedBlock``."""

    name: str
    fn: StrategyFn
    pretty_name: str
    reference: str | None = None


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, pretty_name: str, reference: str | None = None) -> Callable[[StrategyFn], StrategyFn]:
    """Register a strategy function under ``name``."""

    def wrap(fn: StrategyFn) -> StrategyFn:
        if name in STRATEGIES:
            raise ValueError(f"fusion strategy {name!r} is already registered")
        STRATEGIES[name] = Strategy(name, fn, pretty_name, reference)
        return fn

    return wrap


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``; PolyfuseError listing the choices otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PolyfuseError(f"unknown fusion strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def fuse_block(
    teachers: Sequence[TeacherBlock | Mapping[str, Any]],
    *,
    strategy: str = "min_ce",
    level: Level = "sequence",
    k_out: int | None = None,
    n_bytes: int | None = None,
) -> FusedBlock:
    """Fuse one block's teachers (teacher 0 = the target itself) with the named strategy.

    Args:
        teachers: aligned teachers, all with the same number of positions P.
        strategy: a name in :data:`STRATEGIES` (``min_ce``, ``avg_ce``, ``none``).
        level: ``sequence`` (one decision per block) or ``token`` (one per position).
        k_out: entries kept per position (default: the largest teacher k).
        n_bytes: UTF-8 bytes of the block text; the common divisor of the sequence-level AvgCE criterion.
    """
    if level not in LEVELS:
        raise PolyfuseError(f"unknown fusion level {level!r}; choose one of {', '.join(LEVELS)}")
    blocks = [t if isinstance(t, TeacherBlock) else TeacherBlock.from_mapping(t) for t in teachers]
    if len({b.positions for b in blocks}) > 1:
        raise DataError(f"teachers disagree on the number of positions: {[b.positions for b in blocks]}")
    if k_out is not None and k_out < 1:
        raise PolyfuseError(f"k_out must be >= 1 (got {k_out})")
    if not blocks and strategy != "none":
        raise DataError(f"fusion strategy {strategy!r} needs at least one teacher (teacher 0 = the target)")
    return get_strategy(strategy).fn(blocks, level=level, k_out=k_out, n_bytes=n_bytes)


# ---- helpers -------------------------------------------------------------------------------------------


def _stack(teachers: Sequence[TeacherBlock]) -> tuple[np.ndarray, np.ndarray]:
    """Teachers' entries padded to a common k: ids [M, P, k] int64, probs [M, P, k] float64 (0 on padding)."""
    k = max(t.ids.shape[1] for t in teachers)
    m, p = len(teachers), teachers[0].positions
    ids = np.full((m, p, k), -1, dtype=np.int64)
    probs = np.zeros((m, p, k), dtype=np.float64)
    for i, t in enumerate(teachers):
        kt = t.ids.shape[1]
        prob = np.exp(t.logprobs.astype(np.float64))                  # -inf -> 0
        keep = (t.ids >= 0) & np.isfinite(prob)
        ids[i, :, :kt] = np.where(keep, t.ids, -1)
        probs[i, :, :kt] = np.where(keep, prob, 0.0)
    return ids, probs


def _merge_topk(ids: np.ndarray, probs: np.ndarray, k_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum duplicate ids per row and keep the ``k_out`` most probable (ties: smaller id first).

    ``ids`` [P, E] (-1 pad), ``probs`` [P, E] -> ids [P, k_out] int64 (-1 pad), log-probs [P, k_out] float32.
    Entries with probability 0 are dropped.
    """
    p, e = ids.shape
    pad = (ids < 0) | ~(probs > 0)
    big = np.iinfo(np.int64).max
    key = np.where(pad, big, ids)                                    # [P, E]
    order = np.argsort(key, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(key, order, axis=1)
    sorted_probs = np.take_along_axis(np.where(pad, 0.0, probs), order, axis=1)
    new = np.ones((p, e), dtype=bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    seg = np.cumsum(new, axis=1) - 1                                 # [P, E] run index per row
    flat = (np.arange(p)[:, None] * e + seg).ravel()
    summed = np.bincount(flat, weights=sorted_probs.ravel(), minlength=p * e).reshape(p, e)
    seg_ids = np.full((p, e), big, dtype=np.int64)
    seg_ids[np.arange(p)[:, None], seg] = sorted_ids
    rank = np.lexsort((seg_ids, -summed), axis=-1)[:, :k_out]         # most probable first
    top_ids = np.take_along_axis(seg_ids, rank, axis=1)
    top_probs = np.take_along_axis(summed, rank, axis=1)
    out_ids = np.full((p, k_out), -1, dtype=np.int64)
    out_lp = np.full((p, k_out), -np.inf, dtype=np.float32)
    kept = top_probs > 0
    width = top_ids.shape[1]
    out_ids[:, :width] = np.where(kept, top_ids, -1)
    with np.errstate(divide="ignore"):
        out_lp[:, :width] = np.where(kept, np.log(top_probs), -np.inf)
    return out_ids, out_lp


def _fuse_weighted(teachers: Sequence[TeacherBlock], weights: np.ndarray, k_out: int | None,
                   fallback: int) -> FusedBlock:
    """``sum_m weights[m, t] * p_m(t)`` over the union of ids, kept as the top ``k_out``; weights [M, P]."""
    ids, probs = _stack(teachers)                                     # [M, P, k]
    m, p, k = ids.shape
    mixed = probs * weights[:, :, None]                               # [M, P, k]
    used = weights > 0                                                # skip zero-weight teachers' entries
    flat_ids = np.where(used[:, :, None], ids, -1).transpose(1, 0, 2).reshape(p, m * k)
    flat_probs = mixed.transpose(1, 0, 2).reshape(p, m * k)
    out_ids, out_lp = _merge_topk(flat_ids, flat_probs, k_out or k)
    stats = FusionStats(weights.sum(axis=1), positions=p, fallback=fallback)
    return FusedBlock(out_ids, out_lp, stats)


def _usable_nll(teachers: Sequence[TeacherBlock]) -> np.ndarray:
    """[M, P] token NLL where the teacher is valid and finite, +inf elsewhere."""
    nll = np.stack([t.token_nll for t in teachers])                  # [M, P]
    valid = np.stack([t.valid for t in teachers]) & np.isfinite(nll)
    return np.where(valid, nll, np.inf)


def _seq_nll(teachers: Sequence[TeacherBlock]) -> np.ndarray:
    """[M] total NLL, +inf where NaN/inf (never chosen)."""
    seq = np.array([t.seq_nll for t in teachers], dtype=np.float64)
    return np.where(np.isfinite(seq), seq, np.inf)


def _one_hot(choice: np.ndarray, m: int) -> np.ndarray:
    """choice [P] -> weights [M, P] with a 1 at the chosen teacher."""
    return (np.arange(m)[:, None] == choice[None, :]).astype(np.float64)


def _softmax_neg(ce: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """softmax(-ce) over axis 0 ignoring +inf; columns with no finite entry -> one-hot on teacher 0.

    Returns (weights [M, ...], fallback mask [...]).
    """
    finite = np.isfinite(ce)
    none = ~finite.any(axis=0)
    shifted = np.where(finite, -ce, -np.inf)
    shifted = shifted - np.where(none, 0.0, shifted.max(axis=0, initial=-np.inf, where=finite))
    w = np.where(finite, np.exp(shifted), 0.0)
    w[0] = np.where(none, 1.0, w[0])
    return w / w.sum(axis=0, keepdims=True), none


# ---- strategies ----------------------------------------------------------------------------------------


@register("min_ce", pretty_name="MinCE (FuseLLM)", reference="https://arxiv.org/abs/2401.10491")
def min_ce(teachers: Sequence[TeacherBlock], *, level: Level = "sequence", k_out: int | None = None,
           n_bytes: int | None = None) -> FusedBlock:
    """Use the distribution of the teacher with the lowest cross-entropy.

    ``sequence``: one teacher per block, the lowest total ``seq_nll`` (NaN never wins; ties and the
    all-NaN case go to the first teacher). ``token``: per position the valid teacher with the lowest
    ``token_nll``; invalid or NaN entries never win, and a position without any usable teacher uses
    teacher 0. ``n_bytes`` is unused (argmin does not depend on a common divisor).

    Example (two teachers, one position)::

        t0: ids [[3, 4]] probs [.6, .3], token_nll [0.9], seq_nll 10
        t1: ids [[4, 5]] probs [.7, .2], token_nll [0.4], seq_nll 12
        sequence -> t0: ids [[3, 4]];  token -> t1: ids [[4, 5]]
    """
    m, p = len(teachers), teachers[0].positions
    if level == "sequence":
        seq = _seq_nll(teachers)
        best = int(np.argmin(seq)) if np.isfinite(seq).any() else 0
        choice = np.full(p, best, dtype=np.int64)
        fallback = 0 if np.isfinite(seq).any() else p
    else:
        nll = _usable_nll(teachers)                                   # [M, P]
        choice = np.argmin(nll, axis=0)                               # [P]; all +inf -> teacher 0
        fallback = int((~np.isfinite(nll).any(axis=0)).sum())
    return _fuse_weighted(teachers, _one_hot(choice, m), k_out, fallback)


@register("avg_ce", pretty_name="AvgCE (FuseLLM, fixed weights)", reference="https://arxiv.org/abs/2401.10491")
def avg_ce(teachers: Sequence[TeacherBlock], *, level: Level = "sequence", k_out: int | None = None,
           n_bytes: int | None = None) -> FusedBlock:
    """Mix the teachers' probabilities with weights ``w_m = softmax_m(-CE_m)``.

    The reference code uses ``softmax(exp(-CE))``: rewards in (0, 1] give near-uniform weights;
    here the softmax is taken of ``-CE`` itself. ``sequence``: ``CE_m = seq_nll_m / n_bytes`` (nats
    per byte; the number of positions P when ``n_bytes`` is None), one weight vector for the block and
    every position (fallback entries included, as in FuseLLM). ``token``: per position over the
    valid teachers with finite ``token_nll`` (teacher 0 alone where none is). The fused distribution
    ``sum_m w_m p_m`` is built over the union of ids in probability space (duplicates summed) and
    the top ``k_out`` entries are kept.

    Example (token level, one position)::

        t0: ids [[3, 4]] probs [.6, .3], token_nll [1.0]
        t1: ids [[4, 5]] probs [.7, .2], token_nll [1.0]      -> w = (.5, .5)
        fused: {4: .5, 3: .3, 5: .1}  (k_out=2 -> ids [[4, 3]])
    """
    p = teachers[0].positions
    if level == "sequence":
        divisor = float(n_bytes) if n_bytes else float(max(p, 1))
        w, none = _softmax_neg(_seq_nll(teachers) / divisor)          # [M]
        weights = np.repeat(w[:, None], p, axis=1)                    # [M, P]
        fallback = p if bool(none) else 0
    else:
        weights, none = _softmax_neg(_usable_nll(teachers))           # [M, P]
        fallback = int(none.sum())
    return _fuse_weighted(teachers, weights, k_out, fallback)


@register("none", pretty_name="no fusion (plain causal-LM baseline)")
def no_fusion(teachers: Sequence[TeacherBlock], *, level: Level = "sequence", k_out: int | None = None,
              n_bytes: int | None = None) -> FusedBlock:
    """No teacher: empty ``[P, 0]`` entries, so training on the block is plain causal LM."""
    p = teachers[0].positions if teachers else 0
    stats = FusionStats(np.zeros(len(teachers)), positions=p)
    return FusedBlock(np.zeros((p, 0), dtype=np.int64), np.zeros((p, 0), dtype=np.float32), stats)
