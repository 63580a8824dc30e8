"""Sparse losses equal their dense references on a tiny vocabulary (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polyfuse.fuse.losses import (
    IGNORE_INDEX,
    clm_loss,
    distill_loss,
    fusion_loss,
    grouped_log_probs,
    selective_log_softmax,
    shift_labels,
    teacher_distribution,
)

B, T, V, K = 3, 5, 11, 4


def _teacher(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k entries [B, T, K] with distinct ids, some padding, and one position without entries."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    logprobs = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, ids)  # not renormalised
    ids[0, 1, 2:] = -1                                                 # padded entries
    logprobs[0, 1, 2:] = float("-inf")
    ids[1, 3] = -1                                                     # a position without entries
    logprobs[1, 3] = float("-inf")
    logprobs[2, 0, 3] = float("-inf")                                  # a valid id with a -inf log-prob
    return ids, logprobs


def _dense_distill(logits, ids, logprobs, mask, kind, temperature):
    """Reference: dense [B, T, V] teacher from a softmax over the vocabulary with -inf off the top-k."""
    logq = torch.log_softmax(logits.double() / temperature, -1)       # [B, T, V]
    dense = torch.full(logits.shape, float("-inf"), dtype=torch.float64)
    for b, t, k in torch.nonzero(ids >= 0).tolist():
        dense[b, t, ids[b, t, k]] = logprobs[b, t, k].double() / temperature
    has = torch.isfinite(dense).any(-1)
    p = torch.softmax(torch.where(has[..., None], dense, 0.0), -1) * has[..., None]
    if kind == "ce":
        per = -(p * logq).sum(-1)
    else:
        per = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - logq), 0.0).sum(-1)
    keep = has & mask
    return (per * keep).sum() / keep.sum().clamp(min=1)


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-10), (torch.float32, 1e-5),
                                             (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_distill_loss_matches_dense_reference(kind, temperature, dtype, atol):
    torch.manual_seed(0)
    logits = (torch.randn(B, T, V) * 3).to(dtype).requires_grad_()
    ids, logprobs = _teacher()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, -1] = False
    out = distill_loss(logits, ids, logprobs, mask, kind=kind, temperature=temperature)
    ref = _dense_distill(logits.detach().double().requires_grad_(), ids, logprobs, mask, kind, temperature)
    # the reference sees the same (rounded) logits, so only the arithmetic precision differs
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.loss.item() == pytest.approx(ref.item(), abs=atol, rel=atol)
    assert out.count.item() == B * T - 2                              # one masked, one without entries

    leaf = logits.detach().double().requires_grad_()
    _dense_distill(leaf, ids, logprobs, mask, kind, temperature).backward()
    out.loss.backward()
    assert torch.allclose(logits.grad.double(), leaf.grad, atol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6)


def test_padding_entries_are_ignored():
    logits = torch.randn(B, T, V)
    ids, logprobs = _teacher()
    base = distill_loss(logits, ids, logprobs).loss
    garbage = logprobs.clone()
    garbage[ids < 0] = 5.0                                             # junk log-probs behind -1 ids
    assert torch.equal(distill_loss(logits, ids, garbage).loss, base)
    wider_ids = torch.cat([ids, torch.full((B, T, 3), -1)], -1)        # extra padded columns
    wider_lp = torch.cat([logprobs, torch.full((B, T, 3), float("-inf"))], -1)
    assert torch.allclose(distill_loss(logits, wider_ids, wider_lp).loss, base)


def test_teacher_distribution_renormalises_top_k():
    ids = torch.tensor([[[2, 5, -1]]])
    logprobs = torch.tensor([[[math.log(0.3), math.log(0.1), float("-inf")]]])
    p, logp, has = teacher_distribution(ids, logprobs)
    assert torch.allclose(p, torch.tensor([[[0.75, 0.25, 0.0]]]))
    assert torch.isfinite(logp).all() and has.tolist() == [[True]]
    p2, _, _ = teacher_distribution(ids, logprobs, temperature=2.0)   # p^(1/2) renormalised
    a, b = math.sqrt(0.3), math.sqrt(0.1)
    assert torch.allclose(p2, torch.tensor([[[a / (a + b), b / (a + b), 0.0]]]))


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_all_masked_returns_zero_without_nan(kind):
    logits = torch.randn(B, T, V, requires_grad=True)
    ids, logprobs = _teacher()
    out = distill_loss(logits, ids, logprobs, torch.zeros(B, T, dtype=torch.bool), kind=kind)
    assert out.loss.item() == 0.0 and out.count.item() == 0
    out.loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    empty = distill_loss(logits, torch.full((B, T, K), -1), torch.full((B, T, K), float("-inf")), kind=kind)
    assert empty.loss.item() == 0.0 and not torch.isnan(empty.loss)


def test_kl_is_ce_minus_teacher_entropy():
    logits = torch.randn(B, T, V)
    ids, logprobs = _teacher()
    p, logp, has = teacher_distribution(ids, logprobs)
    entropy = (-(p * logp).sum(-1))[has].mean()
    ce, kl = (distill_loss(logits, ids, logprobs, kind=k).loss for k in ("ce", "kl"))
    assert torch.allclose(kl, ce - entropy, atol=1e-6)


def test_num_items_normalisation():
    logits = torch.randn(B, T, V)
    ids, logprobs = _teacher()
    mean = distill_loss(logits, ids, logprobs)
    summed = distill_loss(logits, ids, logprobs, num_items=100)
    assert torch.allclose(summed.loss * 100, mean.loss * mean.count)


def test_selective_log_softmax_matches_naive():
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T, K))
    naive = torch.log_softmax(logits, -1).gather(-1, ids)
    assert torch.allclose(selective_log_softmax(logits, ids), naive, atol=1e-6)


def test_clm_loss_matches_cross_entropy():
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[1, 3:] = IGNORE_INDEX
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    out = clm_loss(logits, labels)
    assert torch.allclose(out.loss, ref)
    assert out.count.item() == B * (T - 1) - 2
    assert shift_labels(labels)[1].tolist() == [*labels[1, 1:3].tolist(), IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_fusion_loss_parts_equal_separate_losses(temperature):
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[2, 4] = IGNORE_INDEX
    ids, logprobs = _teacher()
    out = fusion_loss(logits, labels, ids, logprobs, kind="kl", temperature=temperature)
    mask = shift_labels(labels) != IGNORE_INDEX
    clm = clm_loss(logits, labels)
    distill = distill_loss(logits, ids, logprobs, mask, kind="kl", temperature=temperature, num_items=clm.count)
    assert torch.allclose(out.clm, clm.loss) and out.count == clm.count
    assert torch.allclose(out.distill, distill.loss) and out.distill_count == distill.count
    # gradients of the mix equal those of the separate losses
    (0.9 * out.clm + 0.1 * out.distill).backward()
    fused_grad = logits.grad.clone()
    logits.grad = None
    (0.9 * clm_loss(logits, labels).loss + 0.1 * distill_loss(
        logits, ids, logprobs, mask, kind="kl", temperature=temperature, num_items=clm.count).loss).backward()
    assert torch.allclose(fused_grad, logits.grad, atol=1e-6)


def test_fusion_loss_without_teacher_is_clm():
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    out = fusion_loss(logits, labels, num_items=7)
    assert out.distill is None
    assert torch.allclose(out.clm, clm_loss(logits, labels, num_items=7).loss)


def _dense_tail(logits, ids, logprobs, mask, kind):
    """Reference for mass='tail': K + 1 buckets (the K ids, the rest) for teacher and student, dense."""
    logq = torch.log_softmax(logits.double(), -1)                       # [B, T, V]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            entries = [(int(i), float(lp)) for i, lp in zip(ids[b, t], logprobs[b, t], strict=True)
                       if i >= 0 and math.isfinite(float(lp))]
            if not entries or not mask[b, t]:
                continue
            p = torch.tensor([math.exp(lp) for _, lp in entries], dtype=torch.float64)
            q = logq[b, t, [i for i, _ in entries]].exp()
            p_all = torch.cat([p, (1 - p.sum()).clamp(min=0).view(1)])
            q_all = torch.cat([q, (1 - q.sum()).view(1)])
            per = -(p_all * q_all.log()).sum()
            if kind == "kl":
                per = per + (p_all * p_all.clamp_min(1e-300).log()).sum()
            total, count = total + per, count + 1
    return total / max(count, 1)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_tail_mass_matches_dense_k_plus_one_buckets(kind):
    ids, logprobs = _teacher(3)
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 4] = False
    got = distill_loss(logits, ids, logprobs, mask, kind=kind, mass="tail")
    assert torch.allclose(got.loss, _dense_tail(logits, ids, logprobs, mask, kind), atol=1e-10)
    # the tail term matters: the renormalised reading gives another value on these flat teachers
    other = distill_loss(logits, ids, logprobs, mask, kind=kind, mass="renormalise")
    assert not torch.allclose(got.loss, other.loss, atol=1e-3)


def test_tail_equals_renormalise_when_the_top_k_holds_all_mass():
    ids, logprobs = _teacher(5)
    full = torch.where(ids >= 0, torch.log_softmax(torch.where(ids >= 0, logprobs, float("-inf")), -1),
                       float("-inf"))                                   # each row sums to 1 already
    full = torch.where(torch.isfinite(full), full, float("-inf"))
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for kind in ("ce", "kl"):
        a = distill_loss(logits, ids, full, kind=kind, mass="tail").loss
        b = distill_loss(logits, ids, full, kind=kind, mass="renormalise").loss
        assert torch.allclose(a, b, atol=1e-9)


def test_tail_gradient_is_finite_and_kl_is_zero_at_the_teacher():
    """A student equal to the teacher on the K ids and the rest has zero KL and finite gradients."""
    teacher = torch.log_softmax(torch.randn(1, 1, V, generator=torch.Generator().manual_seed(7)), -1)
    ids = teacher.topk(K, -1).indices                                  # [1, 1, K]
    logits = teacher.clone().requires_grad_(True)
    kl = distill_loss(logits, ids, teacher.gather(-1, ids), kind="kl", mass="tail").loss
    kl.backward()
    assert abs(float(kl.detach())) < 1e-6 and torch.isfinite(logits.grad).all()


def test_fusion_loss_tail_part_equals_distill_loss():
    ids, logprobs = _teacher(8)
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(9))
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(10))
    parts = fusion_loss(logits, labels, ids, logprobs, mass="tail")
    mask = shift_labels(labels) != IGNORE_INDEX
    alone = distill_loss(logits, ids, logprobs, mask, mass="tail", num_items=mask.sum())
    assert torch.allclose(parts.distill, alone.loss, atol=1e-6)


def test_tail_refuses_another_temperature():
    ids, logprobs = _teacher(0)
    with pytest.raises(ValueError, match="temperature 1"):
        distill_loss(torch.randn(B, T, V), ids, logprobs, mass="tail", temperature=2.0)


def test_grouped_log_probs_sum_each_group_and_keep_gradients():
    """An entry of a grouped teacher is the log of its group's summed probability (dense reference)."""
    torch.manual_seed(0)
    V = 6
    logits = torch.randn(1, 2, V, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    groups = torch.tensor([[0, 1, 2, 3, 4, 5],                 # teacher 0: the target itself
                           [0, 0, 1, 1, 1, 2]])                # teacher 1: tokens {0,1}, {2,3,4}, {5}
    ids = torch.tensor([[[1, V + 3, V + 5], [V + 0, 4, -1]]])  # teacher * V + token
    out = grouped_log_probs(logp, ids, groups)
    p = logp.exp()[0]
    want = torch.stack([
        torch.stack([p[0, 1], p[0, 2:5].sum(), p[0, 5]]).log(),
        torch.stack([p[1, 0:2].sum(), p[1, 4], torch.tensor(1.0)]).log(),
    ])
    assert torch.allclose(out[0, :, :2], want[:, :2], atol=1e-6) and torch.allclose(out[0, 0, 2], want[0, 2])
    assert out[0, 1, 2] == 0  # padding
    out[0, 0, 1].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_fusion_loss_with_identity_groups_equals_plain_entries():
    torch.manual_seed(1)
    B, T, V, K = 2, 5, 11, 4
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    ids = torch.randint(0, V, (B, T, K))
    lp = torch.log_softmax(torch.randn(B, T, K), -1) - 0.5
    plain = fusion_loss(logits, labels, ids, lp, mass="tail")
    grouped = fusion_loss(logits, labels, ids + V, lp, mass="tail",
                          teacher_groups=torch.stack([torch.arange(V), torch.arange(V)]))
    assert torch.allclose(plain.distill, grouped.distill) and torch.allclose(plain.clm, grouped.clm)
