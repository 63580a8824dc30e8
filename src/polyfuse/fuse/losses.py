"""Sparse distillation losses on top-k teacher entries, plus the causal-LM loss sharing the same work.

The teacher is never densified: its K entries per position are compared with the student's
log-probabilities *at those ids*, gathered from the logits and normalised by one logsumexp
(the trick of TRL's ``selective_log_softmax``)::

    naive:  log_softmax(logits, -1).gather(-1, ids)        # builds [B, T, V] log-probs
    here:   logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True)

Shapes: ``B`` batch, ``T`` positions, ``V`` student vocabulary, ``K`` teacher entries per position.
Teacher entries are ``ids`` [B, T, K] (``-1`` pads) and ``logprobs`` [B, T, K] (``-inf`` pads); the
entry at position t is a distribution over token t+1, like the student's logits at t.

Two readings of the teacher's K entries (``mass``):

* ``renormalise`` (FuseLLM): the teacher distribution is ``softmax(logprobs / temperature)`` over its
  valid entries and 0 elsewhere; the student uses the same temperature. Right when the top-k holds
  nearly all the mass (large models); with flat teachers it makes the target sharper than any teacher.
* ``tail``: the K probabilities are taken as captured and the rest, ``r = 1 - sum_k p_k``, is one
  more bucket ("anything else"). Exact for what was stored, calibrated, and equal to ``renormalise``
  when ``r = 0``. Temperature 1 only (the tail of a tempered teacher was not captured).

Both readings become one pair of distributions over K + 1 outcomes, the K ids and the rest (teacher:
``r``, 0 under ``renormalise``; student: ``1 - sum_k q_k``), and one :func:`divergence` of them is the
loss (``kind``): ``ce``, ``forward_kl`` (alias ``kl``), ``reverse_kl``, ``jsd`` (generalised, ``beta``),
``tv``, ``skew_forward_kl`` / ``skew_reverse_kl`` (``alpha``), e.g.::

    ce = -sum_k p_k log q_k - r log(1 - sum_k q_k)

Under ``renormalise`` nothing is lost by pooling the student's other tokens, as the teacher has 0
there: every loss equals the dense one between the zero-padded teacher and the student's full
softmax (``ce`` is FuseLLM's loss), except ``reverse_kl`` (also ``jsd`` at beta 1, ``skew_reverse_kl`` at
alpha 0), which is infinite wherever the teacher is 0 and the student is not, and is therefore taken
on the teacher's support with the student renormalised over it (under ``renormalise``: both
renormalised over the K valid entries; under ``tail`` it matters only where ``r = 0``).

No ``temperature**2`` factor is applied (FuseLLM trains at temperature 1).

**Which positions count.** Position t counts when its shifted label (label t+1) is not
``IGNORE_INDEX``; the distillation part also needs a valid teacher entry there. Response-only
training (FuseChat, chat corpora) is therefore nothing but labels: the training rows carry
``IGNORE_INDEX`` on every token that is not an assistant response token
(:func:`polyfuse.corpus.spans.response_labels`), which zeroes both the CLM and the distillation
mask at the positions that predict them. A batch where nothing counts has loss 0, never NaN (the
normaliser is at least 1, ``num_items`` included).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "DISTILL_KINDS",
    "DIVERGENCE_ALIASES",
    "IGNORE_INDEX",
    "TEACHER_MASS",
    "DistillKind",
    "FusionLoss",
    "SparseLoss",
    "TeacherMass",
    "clm_loss",
    "distill_loss",
    "divergence",
    "fusion_loss",
    "grouped_log_probs",
    "selective_log_softmax",
    "shift_labels",
    "teacher_distribution",
]

IGNORE_INDEX = -100
DistillKind = Literal["ce", "kl", "forward_kl", "reverse_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl"]
DISTILL_KINDS: tuple[str, ...] = get_args(DistillKind)
DIVERGENCE_ALIASES: dict[str, str] = {"kl": "forward_kl"}
TeacherMass = Literal["renormalise", "tail"]
TEACHER_MASS: tuple[str, ...] = ("renormalise", "tail")


class SparseLoss(NamedTuple):
    """A loss normalised by ``num_items`` (or by ``count`` when not given) and its token count."""

    loss: torch.Tensor
    """Scalar: sum of per-position losses / normaliser (0 when no position counts)."""
    count: torch.Tensor
    """Scalar int64: positions that contributed."""


class FusionLoss(NamedTuple):
    """Both parts of a fused step, each a normalised scalar, and the supervised-position count."""

    clm: torch.Tensor
    distill: torch.Tensor | None
    """None when there was no teacher data."""
    count: torch.Tensor
    distill_count: torch.Tensor | None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses in half precision lose too much); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels`` [B, T] -> [B, T] where position t holds label t+1 (the last position is ignored)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(logits, -1).gather(-1, ids)`` without the [..., V] log-softmax.

    ``logits`` [..., V], ``ids`` [..., K] (negative ids read id 0; mask them yourself), optional
    ``lse`` [...] = ``logits.logsumexp(-1)`` to share it between calls. Half precision is upcast.
    """
    logits = _upcast(logits)
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)                           # [...]
    return logits.gather(-1, ids.clamp(min=0)) - lse.unsqueeze(-1)     # [..., K]


def teacher_distribution(
    ids: torch.Tensor, logprobs: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Renormalise the valid top-k entries: ``softmax(logprobs / temperature)`` over them.

    Returns ``p`` [B, T, K] (0 on padding), ``log p`` [B, T, K] (0 on padding, never -inf) and
    ``has_entry`` [B, T] (at least one valid entry). An entry is valid when its id is >= 0 and its
    log-prob finite.
    """
    entry = (ids >= 0) & torch.isfinite(logprobs)                       # [B, T, K]
    scaled = torch.where(entry, logprobs.to(dtype) / temperature, float("-inf"))
    logp = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)      # NaN on rows without entries
    logp = torch.where(entry, logp, 0.0)
    p = torch.where(entry, logp.exp(), 0.0)
    return p, logp, entry.any(dim=-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable on both sides of ``-log 2``; ``x`` is clamped below 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _outcomes(logq: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, *, temperature: float,
              mass: TeacherMass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student over the K + 1 outcomes of a position: the K entries and "anything else".

    ``logq`` [B, T, K]: the student's log-probs at the entries. Returns teacher log-probs [B, T, K + 1]
    (``-inf`` where the teacher has no mass: the rest under ``renormalise``, or when the entries hold it
    all), student log-probs [B, T, K + 1], ``valid`` [B, T, K + 1] (outcomes that exist; padded entries
    do not) and ``has_entry`` [B, T].
    """
    entry = (ids >= 0) & torch.isfinite(logprobs)                       # [B, T, K]
    has_entry = entry.any(-1)
    if mass == "renormalise":
        _, logp, _ = teacher_distribution(ids, logprobs, temperature, logq.dtype)
        logp = torch.where(entry, logp, float("-inf"))
        logp_rest = torch.full_like(logp[..., 0], float("-inf"))
    elif mass == "tail":
        if temperature != 1.0:
            raise ValueError("teacher mass 'tail' needs temperature 1 (the tail of a tempered teacher "
                             "was not captured); use mass 'renormalise' for another temperature")
        logp = torch.where(entry, logprobs.to(logq.dtype), float("-inf"))
        p_sum = torch.where(entry, logp.exp(), 0.0).sum(-1)              # [B, T]
        over = p_sum > 1                                                # fp16 rounding: never above 1
        logp = logp - torch.where(over, p_sum, 1.0).log().unsqueeze(-1)
        rest = torch.where(over, 0.0, 1 - p_sum).clamp(min=0)
        logp_rest = torch.where(rest > 0, rest.clamp(min=1e-30).log(), float("-inf"))
    else:
        raise ValueError(f"unknown teacher mass {mass!r}; choose one of {', '.join(TEACHER_MASS)}")
    logq_rest = _log1mexp(torch.where(entry, logq, float("-inf")).logsumexp(-1))  # log(1 - sum_k q_k)
    return (torch.cat([logp, logp_rest.unsqueeze(-1)], -1), torch.cat([logq, logq_rest.unsqueeze(-1)], -1),
            torch.cat([entry, has_entry.unsqueeze(-1)], -1), has_entry)


def _kl(logx: torch.Tensor, logy: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``sum x (log x - log y)`` over the outcomes in ``where`` (finite log-probs there), [..., N] -> [...]."""
    logx, logy = torch.where(where, logx, 0.0), torch.where(where, logy, 0.0)
    return torch.where(where, logx.exp() * (logx - logy), 0.0).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, support: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w p + (1 - w) q)`` for ``0 < w < 1`` (``p = 0`` off the teacher's support)."""
    mixed = torch.logaddexp(math.log(w) + torch.where(support, logp, 0.0), math.log1p(-w) + logq)
    return torch.where(support, mixed, math.log1p(-w) + logq)


def _reverse_kl(logp: torch.Tensor, logq: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``KL(q || p)`` on the teacher's support, the student renormalised over it (infinite otherwise)."""
    norm = torch.where(support, logq, float("-inf")).logsumexp(-1, keepdim=True)
    norm = torch.where(support.any(-1, keepdim=True), norm, 0.0)
    return _kl(logq - norm, logp, support)


def divergence(logp: torch.Tensor, logq: torch.Tensor, valid: torch.Tensor, kind: DistillKind = "forward_kl",
               *, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """The distillation loss of teacher ``P`` and student ``Q`` over the outcomes on the last axis.

    ``logp``, ``logq`` [..., N] log-probabilities (``logp`` may be ``-inf``: the teacher has no mass
    there; ``logq`` must be finite on ``valid``), ``valid`` [..., N] the outcomes that exist (others,
    whatever they hold, add nothing). Returns [...]:

    * ``ce`` ``-sum p log q``; ``forward_kl`` (``kl``) ``KL(P || Q)``;
    * ``reverse_kl`` ``KL(Q || P)``, taken on the teacher's support with ``Q`` renormalised over it
      (it is infinite wherever ``P`` is 0 and ``Q`` is not);
    * ``jsd`` the generalised JSD of GKD, ``beta KL(P || M) + (1 - beta) KL(Q || M)`` with
      ``M = beta P + (1 - beta) Q``; ``beta`` 0 is ``forward_kl`` and 1 ``reverse_kl`` (TRL's convention);
    * ``tv`` ``sum |p - q| / 2``;
    * ``skew_forward_kl`` ``KL(P || alpha P + (1 - alpha) Q)`` and ``skew_reverse_kl``
      ``KL(Q || (1 - alpha) P + alpha Q)`` (DistiLLM): ``alpha`` 0 is the plain KL, 1 gives 0.
    """
    name = _canonical(kind)
    for param, value in (("beta", beta), ("alpha", alpha)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"divergence {param} must be in [0, 1], got {value}")
    support = valid & (logp > float("-inf"))                            # p > 0
    logq = torch.where(valid, logq, 0.0)
    if name == "jsd" and beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
    if name in ("skew_forward_kl", "skew_reverse_kl") and alpha in (0.0, 1.0):
        if alpha == 1.0:
            return 0.0 * logq.sum(-1)                                   # KL(x || x), kept in the graph
        name = name.removeprefix("skew_")
    if name == "ce":
        return -torch.where(support, torch.where(support, logp, 0.0).exp() * logq, 0.0).sum(-1)
    if name == "forward_kl":
        return _kl(logp, logq, support)
    if name == "reverse_kl":
        return _reverse_kl(logp, logq, support)
    if name == "tv":
        p = torch.where(support, torch.where(support, logp, 0.0).exp(), 0.0)
        return 0.5 * torch.where(valid, (p - logq.exp()).abs(), 0.0).sum(-1)
    if name == "jsd":
        logm = _mix(logp, logq, support, beta)
        return beta * _kl(logp, logm, support) + (1 - beta) * _kl(logq, logm, valid)
    if name == "skew_forward_kl":
        return _kl(logp, _mix(logp, logq, support, alpha), support)
    return _kl(logq, _mix(logp, logq, support, 1 - alpha), valid)    # skew_reverse_kl


def _canonical(kind: str) -> str:
    """``kind`` with aliases resolved (``kl`` is ``forward_kl``); unknown kinds raise ValueError."""
    if kind not in DISTILL_KINDS:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(DISTILL_KINDS)}")
    return DIVERGENCE_ALIASES.get(kind, kind)


def _teacher_terms(logq: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, *, kind: DistillKind,
                   temperature: float, mass: TeacherMass, beta: float = 0.5,
                   alpha: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position distillation loss [B, T] and the positions with teacher entries [B, T]."""
    logp, logq_all, valid, has_entry = _outcomes(logq, ids, logprobs, temperature=temperature, mass=mass)
    return divergence(logp, logq_all, valid, kind, beta=beta, alpha=alpha), has_entry


def grouped_log_probs(logp: torch.Tensor, ids: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The student's log-probability of each teacher entry's *group* of target tokens.

    ``logp`` [B, T, V] student log-probs; ``ids`` [B, T, K] entries as ``teacher * V + token`` (-1 pads);
    ``groups`` [M, V] int64, each teacher's group index of every target token
    (:func:`polyfuse.align.vocab.group_map`; an identity row means one token per group). An entry of
    teacher ``m`` for token ``a`` gets ``log sum_{t: groups[m, t] == groups[m, a]} exp(logp[..., t])``.
    Returns [B, T, K] (0 on padding; mask it yourself). Teachers whose row is the identity cost one
    gather; every other teacher one scatter-add of ``[B, T, V]`` probabilities into its groups.
    """
    n_teachers, vocab = groups.shape
    entry = ids >= 0
    teacher = torch.where(entry, ids // vocab, 0)
    token = torch.where(entry, ids % vocab, 0)
    out = torch.zeros(ids.shape, dtype=logp.dtype, device=logp.device)
    probs = None
    identity = torch.arange(vocab, device=groups.device)
    for m in range(n_teachers):
        mine = entry & (teacher == m)
        if not bool(mine.any()):
            continue
        row = groups[m].to(logp.device)
        if torch.equal(row, identity.to(logp.device)):
            value = logp.gather(-1, token)
        else:
            if probs is None:
                probs = logp.exp()
            n_groups = int(row.max()) + 1
            summed = probs.new_zeros((*probs.shape[:-1], n_groups)).scatter_add_(
                -1, row.expand_as(probs), probs)                          # [B, T, G]
            value = summed.gather(-1, row[token]).clamp(min=1e-30).log()
        out = torch.where(mine, value, out)
    return out


def _denominator(count: torch.Tensor, num_items: torch.Tensor | int | None) -> torch.Tensor | int:
    """``num_items`` (default: ``count``), at least 1: a batch where nothing counts gives 0, not NaN."""
    if num_items is None:
        return count.clamp(min=1)
    return num_items.clamp(min=1) if isinstance(num_items, torch.Tensor) else max(int(num_items), 1)


def _reduce(per_position: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int | None) -> SparseLoss:
    """Masked sum over positions divided by ``num_items`` (default: the masked count), at least 1."""
    count = mask.sum()
    total = torch.where(mask, per_position, 0.0).sum()
    return SparseLoss(total / _denominator(count, num_items), count)


def distill_loss(
    logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: DistillKind = "ce",
    temperature: float = 1.0,
    num_items: torch.Tensor | int | None = None,
    mass: TeacherMass = "renormalise",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> SparseLoss:
    """Sparse distillation loss, no shift: student ``logits`` [B, T, V] at t vs teacher entries [B, T, K] at t.

    ``kind`` is any of :data:`DISTILL_KINDS` (:func:`divergence`; ``beta`` for ``jsd``, ``alpha`` for the
    skew KLs), e.g. ``ce``: ``-sum_k p_k log q_k``, with ``p`` the renormalised teacher top-k and
    ``q = softmax(logits / temperature)`` (``mass="tail"``: plus the rest bucket, see the module
    docstring). Positions count where ``mask`` [B, T] is
    True (default: all) and the teacher has at least one valid entry. The result is the sum over
    those positions divided by ``num_items`` (e.g. the tokens of a whole accumulated batch), or
    their mean when ``num_items`` is None; 0 (not NaN) when nothing counts.
    """
    z = _upcast(logits)
    if temperature != 1.0:
        z = z / temperature
    logq = selective_log_softmax(z, teacher_ids)                        # [B, T, K]
    per_position, has_entry = _teacher_terms(logq, teacher_ids, teacher_logprobs, kind=kind,
                                             temperature=temperature, mass=mass, beta=beta, alpha=alpha)
    keep = has_entry if mask is None else has_entry & mask.bool()
    return _reduce(per_position, keep, num_items)


def clm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> SparseLoss:
    """Causal-LM loss: logits [B, T, V] at t predict ``labels`` [B, T] at t+1 (shift done here).

    Equals Hugging Face's ``ForCausalLMLoss`` (mean over labels != ``ignore_index``, or sum / ``num_items``).
    """
    z = _upcast(logits)
    target = shift_labels(labels, ignore_index)                         # [B, T]
    mask = target != ignore_index
    logq = selective_log_softmax(z, target.unsqueeze(-1)).squeeze(-1)   # [B, T]
    return _reduce(-logq, mask, num_items)


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    *,
    kind: DistillKind = "ce",
    temperature: float = 1.0,
    num_items: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shifted_labels: torch.Tensor | None = None,
    mass: TeacherMass = "renormalise",
    teacher_groups: torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> FusionLoss:
    """CLM and distillation from one log-softmax and one gather (a fused step costs about a CLM step).

    ``logits`` [B, T, V]; ``labels`` [B, T] (or ``shifted_labels`` [B, T], label t+1 at t); teacher
    entries [B, T, K] or None. Both parts are summed over supervised positions (shifted label !=
    ``ignore_index``; the distillation part also needs a valid teacher entry) and divided by the same
    ``num_items`` (default: the supervised count), so positions without teacher entries add 0 to the
    distillation part. With complete teacher data the two counts agree and each part is a mean.

    The student's [B, T, V] log-softmax is the one the CLM loss needs anyway (``cross_entropy`` builds
    it too); the label and the K teacher ids are read from it by a single gather, which on CPU is
    faster than ``gather - logsumexp`` (one fused log-softmax backward). With a temperature other
    than 1 the distillation part uses ``selective_log_softmax(logits / temperature, ids)``.

    ``teacher_groups`` [M, V] (entries written by a fuse stage over ``groups`` vocabulary maps): the
    student's probability of an entry is that of its group of target tokens (:func:`grouped_log_probs`);
    temperature 1 only. ``kind``, ``beta``, ``alpha``, ``mass``: as :func:`distill_loss`.
    """
    z = _upcast(logits)
    target = shift_labels(labels, ignore_index) if shifted_labels is None else shifted_labels  # [B, T]
    mask = target != ignore_index
    denominator = _denominator(mask.sum(), num_items)
    logp = torch.log_softmax(z, dim=-1)                                 # [B, T, V]
    if teacher_ids is None or teacher_logprobs is None:
        clm = _reduce(-logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1), mask, denominator)
        return FusionLoss(clm.loss, None, clm.count, None)

    # One gather for the label and the K teacher ids: [B, T, 1 + K].
    # (grouped entries hold teacher * V + token ids: only the label is gathered here)
    gathered = target.unsqueeze(-1) if teacher_groups is not None else torch.cat([target.unsqueeze(-1), teacher_ids], -1)
    picked = logp.gather(-1, gathered.clamp(min=0))
    clm = _reduce(-picked[..., 0], mask, denominator)
    if teacher_groups is not None:
        if temperature != 1.0:
            raise ValueError("grouped teacher entries need temperature 1")
        logq = grouped_log_probs(logp, teacher_ids, teacher_groups)
    elif temperature == 1.0:
        logq = picked[..., 1:]
    else:
        logq = selective_log_softmax(z / temperature, teacher_ids)
    per_position, has_entry = _teacher_terms(logq, teacher_ids, teacher_logprobs, kind=kind,
                                             temperature=temperature, mass=mass, beta=beta, alpha=alpha)
    distill = _reduce(per_position, mask & has_entry, denominator)
    return FusionLoss(clm.loss, distill.loss, clm.count, distill.count)
