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
  valid entries; the student uses the same temperature. Right when the top-k holds nearly all the
  mass (large models); with flat teachers it makes the target sharper than any teacher.
* ``tail``: the K probabilities are taken as captured and the rest, ``r = 1 - sum_k p_k``, is one
  more bucket: the loss compares the teacher's and the student's distributions over K + 1 outcomes
  (the K ids, "anything else")::

      ce = -sum_k p_k log q_k - r log(1 - sum_k q_k)

  Exact for what was stored, calibrated, and equal to ``renormalise`` when ``r = 0``. Temperature 1
  only (the tail of a tempered teacher was not captured).

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

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "TEACHER_MASS",
    "DistillKind",
    "FusionLoss",
    "SparseLoss",
    "TeacherMass",
    "clm_loss",
    "distill_loss",
    "fusion_loss",
    "grouped_log_probs",
    "selective_log_softmax",
    "shift_labels",
    "teacher_distribution",
]

IGNORE_INDEX = -100
DistillKind = Literal["ce", "kl"]
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


def _distill_per_position(logq: torch.Tensor, p: torch.Tensor, logp: torch.Tensor, kind: DistillKind) -> torch.Tensor:
    """[B, T, K] student log-probs at the teacher ids -> [B, T] loss per position."""
    if kind == "ce":
        return -(p * logq).sum(-1)
    if kind == "kl":
        return (p * (logp - logq)).sum(-1)
    raise ValueError(f"unknown distillation loss {kind!r}; choose 'ce' or 'kl'")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable on both sides of ``-log 2``; ``x`` is clamped below 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _tail_per_position(logq: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                       kind: DistillKind) -> tuple[torch.Tensor, torch.Tensor]:
    """``tail`` reading (module docstring): [B, T, K] -> ([B, T] loss, [B, T] has an entry)."""
    entry = (ids >= 0) & torch.isfinite(logprobs)                       # [B, T, K]
    p = torch.where(entry, logprobs.to(logq.dtype).exp(), 0.0)
    p_sum = p.sum(-1)
    scale = torch.where(p_sum > 1, 1 / p_sum, 1.0)                       # fp16 rounding: never above 1
    p = p * scale.unsqueeze(-1)
    rest = (1 - p_sum * scale).clamp(min=0)                             # [B, T]
    logq_in = torch.where(entry, logq, float("-inf")).logsumexp(-1)     # log sum_k q_k
    logq_rest = _log1mexp(logq_in)
    loss = -(p * torch.where(entry, logq, 0.0)).sum(-1) - rest * logq_rest
    if kind == "kl":
        logp = torch.where(entry, p.clamp(min=1e-30).log(), 0.0)
        loss = loss + (p * logp).sum(-1) + torch.where(rest > 0, rest * rest.clamp(min=1e-30).log(), 0.0)
    elif kind != "ce":
        raise ValueError(f"unknown distillation loss {kind!r}; choose 'ce' or 'kl'")
    return loss, entry.any(-1)


def _teacher_terms(logq: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, *, kind: DistillKind,
                   temperature: float, mass: TeacherMass) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position distillation loss [B, T] and the positions with teacher entries [B, T]."""
    if mass == "tail":
        if temperature != 1.0:
            raise ValueError("teacher mass 'tail' needs temperature 1 (the tail of a tempered teacher "
                             "was not captured); use mass 'renormalise' for another temperature")
        return _tail_per_position(logq, ids, logprobs, kind)
    if mass != "renormalise":
        raise ValueError(f"unknown teacher mass {mass!r}; choose one of {', '.join(TEACHER_MASS)}")
    p, logp, has_entry = teacher_distribution(ids, logprobs, temperature, logq.dtype)
    return _distill_per_position(logq, p, logp, kind), has_entry


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
) -> SparseLoss:
    """Sparse distillation loss, no shift: student ``logits`` [B, T, V] at t vs teacher entries [B, T, K] at t.

    ``ce``: ``-sum_k p_k log q_k``; ``kl``: ``sum_k p_k (log p_k - log q_k)``, with ``p`` the renormalised
    teacher top-k and ``q = softmax(logits / temperature)`` (``mass="tail"``: plus the rest bucket,
    see the module docstring). Positions count where ``mask`` [B, T] is
    True (default: all) and the teacher has at least one valid entry. The result is the sum over
    those positions divided by ``num_items`` (e.g. the tokens of a whole accumulated batch), or
    their mean when ``num_items`` is None; 0 (not NaN) when nothing counts.
    """
    z = _upcast(logits)
    if temperature != 1.0:
        z = z / temperature
    logq = selective_log_softmax(z, teacher_ids)                        # [B, T, K]
    per_position, has_entry = _teacher_terms(logq, teacher_ids, teacher_logprobs, kind=kind,
                                             temperature=temperature, mass=mass)
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
    temperature 1 only.
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
                                             temperature=temperature, mass=mass)
    distill = _reduce(per_position, mask & has_entry, denominator)
    return FusionLoss(clm.loss, distill.loss, clm.count, distill.count)
