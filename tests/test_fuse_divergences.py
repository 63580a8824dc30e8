"""Every distillation divergence, sparse, equals its dense reference (values and gradients), both mass readings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from polyfuse.fuse.losses import (
    DISTILL_KINDS,
    IGNORE_INDEX,
    distill_loss,
    divergence,
    fusion_loss,
    shift_labels,
)

B, T, V, K = 3, 5, 11, 4
NEG = float("-inf")

# (kind, beta, alpha): every kind, with the edge values of beta and alpha
CASES = [("ce", 0.5, 0.1), ("kl", 0.5, 0.1), ("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1),
         ("jsd", 0.0, 0.1), ("jsd", 0.3, 0.1), ("jsd", 0.5, 0.1), ("jsd", 1.0, 0.1), ("tv", 0.5, 0.1),
         ("skew_forward_kl", 0.5, 0.0), ("skew_forward_kl", 0.5, 0.1), ("skew_forward_kl", 0.5, 1.0),
         ("skew_reverse_kl", 0.5, 0.0), ("skew_reverse_kl", 0.5, 0.3), ("skew_reverse_kl", 0.5, 1.0)]
IDS = [f"{k}-b{b}-a{a}" for k, b, a in CASES]


def _teacher(seed: int = 0, all_mass: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries [B, T, K] from dense teachers (not renormalised, so each leaves a tail), with padding, junk
    behind a -1 id, a position without entries, a valid id with a -inf log-prob and (``all_mass``, exact in
    float64 only) entries holding all the mass."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    dense = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5, -1)
    logprobs = dense.gather(-1, ids)
    ids[0, 1, 2:] = -1                                                 # padded entries
    logprobs[0, 1, 2:] = NEG
    ids[0, 4, 3] = -1                                                  # junk log-prob behind a -1 id
    logprobs[0, 4, 3] = -0.3
    ids[1, 3] = -1                                                     # a position without entries
    logprobs[1, 3] = NEG
    logprobs[2, 0, 3] = NEG                                            # a valid id with a -inf log-prob
    if all_mass:                                                       # the entries hold all the mass
        ids[2, 2] = torch.tensor([1, 4, 7, -1])
        logprobs[2, 2] = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64).log()
    return ids, logprobs


def _ref(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float, alpha: float) -> torch.Tensor:
    """Dense reference over the outcomes of 1-d ``p`` (teacher, may hold zeros) and ``q`` (student, > 0)."""
    s = p > 0

    def kl(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return (a[where] * (a[where].log() - b[where].log())).sum()

    def reverse() -> torch.Tensor:                                     # on the teacher's support
        qs = q[s] / q[s].sum()
        return (qs * (qs.log() - p[s].log())).sum()

    if kind == "ce":
        return -(p[s] * q[s].log()).sum()
    if kind in ("kl", "forward_kl") or (kind == "jsd" and beta == 0):
        return kl(p, q, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1) or (kind == "skew_reverse_kl" and alpha == 0):
        return reverse()
    if kind == "tv":
        return 0.5 * (p - q).abs().sum()
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m, s) + (1 - beta) * kl(q, m, q > 0)
    if kind == "skew_forward_kl":
        return kl(p, alpha * p + (1 - alpha) * q, s)
    return kl(q, (1 - alpha) * p + alpha * q, q > 0)                  # skew_reverse_kl


def _dense(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor, *, kind: str,
           beta: float, alpha: float, mass: str, temperature: float = 1.0) -> torch.Tensor:
    """Reference loss from full softmax distributions. ``renormalise``: the teacher softmax over its valid entries,
    0 elsewhere, against the student's full [V] softmax. ``tail``: both coarse-grained onto the K ids + the rest."""
    q_all = torch.softmax(logits.double() / temperature, -1)           # [B, T, V]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for t in range(T):
            valid = (ids[b, t] >= 0) & torch.isfinite(logprobs[b, t])
            if not valid.any() or not mask[b, t]:
                continue
            vid, vlp = ids[b, t][valid], logprobs[b, t][valid].double()
            if mass == "renormalise":
                p = torch.zeros(V, dtype=torch.float64)
                p[vid] = torch.softmax(vlp / temperature, -1)
                q = q_all[b, t]
            else:
                p = torch.cat([vlp.exp(), (1 - vlp.exp().sum()).clamp(min=0).view(1)])
                q = torch.cat([q_all[b, t, vid], (1 - q_all[b, t, vid].sum()).view(1)])
            total, count = total + _ref(p, q, kind, beta, alpha), count + 1
    return total / max(count, 1)


def _mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 4] = False                                                 # a position that does not count
    mask[0, 0] = False
    return mask


@pytest.mark.parametrize(("kind", "beta", "alpha"), CASES, ids=IDS)
@pytest.mark.parametrize(("mass", "temperature"), [("renormalise", 1.0), ("renormalise", 2.0), ("tail", 1.0)])
def test_divergence_value_and_gradient_match_dense_reference(kind, beta, alpha, mass, temperature):
    ids, logprobs = _teacher()
    mask = _mask()
    logits = (torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2)
    sparse_leaf, dense_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = distill_loss(sparse_leaf, ids, logprobs, mask, kind=kind, temperature=temperature, mass=mass,
                       beta=beta, alpha=alpha)
    ref = _dense(dense_leaf, ids, logprobs, mask, kind=kind, beta=beta, alpha=alpha, mass=mass,
                 temperature=temperature)
    assert out.count.item() == B * T - 3                               # two masked, one without entries
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10, rel=1e-9)
    out.loss.backward()
    ref.backward()
    assert torch.allclose(sparse_leaf.grad, dense_leaf.grad, atol=1e-10, rtol=1e-8)
    if (kind, alpha) not in (("skew_forward_kl", 1.0), ("skew_reverse_kl", 1.0)):
        assert out.loss.item() > 1e-3 and sparse_leaf.grad.abs().max() > 1e-4   # not a vacuous match


@pytest.mark.parametrize(("kind", "beta", "alpha"), CASES, ids=IDS)
@pytest.mark.parametrize("mass", ["renormalise", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divergence_in_low_precision_is_finite_and_close(kind, beta, alpha, mass, dtype):
    """float32 / bfloat16 logits (upcast to float32 inside) against the float64 reference of the same logits.

    (No position whose entries hold all the mass: rounded to float32 they leave a rest of about 1e-8, or none,
    and reverse KL is as sensitive to that as it should be.)"""
    ids, logprobs = _teacher(2, all_mass=False)
    mask = _mask()
    logits = (torch.randn(B, T, V, generator=torch.Generator().manual_seed(3)) * 2).to(dtype).requires_grad_()
    out = distill_loss(logits, ids, logprobs.float(), mask, kind=kind, mass=mass, beta=beta, alpha=alpha)
    leaf = logits.detach().double().requires_grad_()
    ref = _dense(leaf, ids, logprobs.float(), mask, kind=kind, beta=beta, alpha=alpha, mass=mass)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    out.loss.backward()
    ref.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.allclose(logits.grad.double(), leaf.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize(("kind", "beta", "alpha"), CASES, ids=IDS)
def test_both_readings_equal_the_plain_dense_divergence_when_the_entries_cover_the_vocabulary(kind, beta, alpha):
    g = torch.Generator().manual_seed(5)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T)]).view(B, T, V)   # K = V
    logprobs = teacher.gather(-1, ids)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    q = torch.softmax(leaf, -1)
    ref = torch.stack([_ref(teacher[b, t].exp(), q[b, t], kind, beta, alpha)
                       for b in range(B) for t in range(T)]).mean()
    ref.backward()
    for mass in ("renormalise", "tail"):
        sparse = logits.clone().requires_grad_()
        out = distill_loss(sparse, ids, logprobs, kind=kind, mass=mass, beta=beta, alpha=alpha)
        out.loss.backward()
        # the student's "rest" (0 here) is clamped at 1e-7 by log(1 - sum q): the only difference
        assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5)
        assert torch.allclose(sparse.grad, leaf.grad, atol=1e-6)


@pytest.mark.parametrize("mass", ["renormalise", "tail"])
def test_edge_values_are_the_named_divergences(mass):
    ids, logprobs = _teacher(4)
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def loss(kind: str, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
        return distill_loss(logits, ids, logprobs, kind=kind, mass=mass, beta=beta, alpha=alpha).loss

    assert torch.equal(loss("kl"), loss("forward_kl"))
    assert torch.allclose(loss("jsd", beta=0.0), loss("forward_kl"))
    assert torch.allclose(loss("jsd", beta=1.0), loss("reverse_kl"))
    assert torch.allclose(loss("skew_forward_kl", alpha=0.0), loss("forward_kl"))
    assert torch.allclose(loss("skew_reverse_kl", alpha=0.0), loss("reverse_kl"))
    assert loss("skew_forward_kl", alpha=1.0).item() == 0.0 == loss("skew_reverse_kl", alpha=1.0).item()
    # the generalised JSD vanishes towards both ends (TRL's 0 and 1 are the KLs, not limits)
    assert 0 < loss("jsd", beta=1e-4) < loss("jsd", beta=0.5) and 0 < loss("jsd", beta=1 - 1e-4) < loss("jsd")


@pytest.mark.parametrize("kind", DISTILL_KINDS)
def test_zero_count_masking_and_normalisation(kind):
    ids, logprobs = _teacher(7)
    logits = torch.randn(B, T, V, requires_grad=True)
    none = distill_loss(logits, ids, logprobs.float(), torch.zeros(B, T, dtype=torch.bool), kind=kind, mass="tail")
    assert none.loss.item() == 0.0 and none.count.item() == 0
    none.loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    for mass in ("renormalise", "tail"):
        empty = distill_loss(logits, torch.full((B, T, K), -1), torch.full((B, T, K), NEG), kind=kind, mass=mass)
        assert empty.loss.item() == 0.0 and empty.count.item() == 0
        mean = distill_loss(logits, ids, logprobs.float(), kind=kind, mass=mass)
        summed = distill_loss(logits, ids, logprobs.float(), kind=kind, mass=mass, num_items=100)
        assert torch.allclose(summed.loss * 100, mean.loss * mean.count)
        garbage = logprobs.float().clone()                             # junk behind every -1 id
        garbage[ids < 0] = 5.0
        wider = (torch.cat([ids, torch.full((B, T, 2), -1)], -1), torch.cat([garbage, torch.full((B, T, 2), 3.0)], -1))
        assert torch.allclose(distill_loss(logits, *wider, kind=kind, mass=mass).loss, mean.loss, atol=1e-6)


def test_divergence_ignores_invalid_outcomes_and_refuses_bad_arguments():
    logp = torch.tensor([[0.5, 0.5, 0.0, 0.3]]).log()                 # the 0.0 outcome: teacher has no mass
    logq = torch.tensor([[0.2, 0.6, 0.2, 0.7]]).log()
    valid = torch.tensor([[True, True, True, False]])                  # the last outcome does not exist
    want = 0.5 * (0.3 + 0.1 + 0.2)
    assert divergence(logp, logq, valid, "tv").item() == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown distillation loss 'mse'"):
        divergence(logp, logq, valid, "mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        divergence(logp, logq, valid, "jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        divergence(logp, logq, valid, "skew_forward_kl", alpha=-0.1)


@pytest.mark.parametrize(("kind", "beta", "alpha"), CASES, ids=IDS)
@pytest.mark.parametrize("mass", ["renormalise", "tail"])
def test_fusion_loss_with_groups_matches_dense_group_reference(kind, beta, alpha, mass):
    """Grouped entries (teacher * V + token): the student's outcome is its group's summed probability."""
    g = torch.Generator().manual_seed(8)
    row = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5])             # teacher 1: 6 groups of target tokens
    groups = torch.stack([torch.arange(V), row])
    first = [0, 2, 5, 6, 8, 9]                                         # one token of each group
    ids = torch.full((B, T, K), -1)
    logprobs = torch.full((B, T, K), NEG, dtype=torch.float64)
    for b in range(B):
        for t in range(T - 1):
            if (b + t) % 2:                                            # teacher 0: plain tokens
                ids[b, t] = torch.randperm(V, generator=g)[:K]
            else:                                                      # teacher 1: distinct groups
                ids[b, t] = V + torch.tensor(first)[torch.randperm(6, generator=g)[:K]]
            logprobs[b, t] = torch.log_softmax(torch.randn(K + 1, generator=g, dtype=torch.float64), -1)[:K]
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2] = IGNORE_INDEX
    sparse, leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = fusion_loss(sparse, labels, ids, logprobs, kind=kind, mass=mass, teacher_groups=groups,
                      beta=beta, alpha=alpha)
    mask = shift_labels(labels) != IGNORE_INDEX
    q_all = torch.softmax(leaf, -1)
    total = torch.zeros((), dtype=torch.float64)
    for b, t in torch.nonzero(mask & (ids >= 0).any(-1)).tolist():
        teacher, token = ids[b, t] // V, ids[b, t] % V
        q = torch.stack([q_all[b, t][groups[m] == groups[m, a]].sum() for m, a in zip(teacher, token, strict=True)])
        p = logprobs[b, t].exp()
        if mass == "renormalise":                                      # zero-padded teacher: the student's rest
            p, q = torch.cat([p / p.sum(), torch.zeros(1, dtype=p.dtype)]), torch.cat([q, 1 - q.sum().view(1)])
        else:
            p, q = torch.cat([p, 1 - p.sum().view(1)]), torch.cat([q, 1 - q.sum().view(1)])
        total = total + _ref(p, q, kind, beta, alpha)
    ref = total / mask.sum()
    assert out.distill.item() == pytest.approx(ref.item(), abs=1e-10, rel=1e-9)
    out.distill.backward()
    ref.backward()
    assert torch.allclose(sparse.grad, leaf.grad, atol=1e-10)


# ---- through the recipe and the trainer -----------------------------------------------------------------


def _rows(n: int, seed: int = 0, vocab: int = 512, k: int = 5) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = 20
        rows.append({"input_ids": np.concatenate([[0], rng.integers(1, vocab, length - 1)]),
                     "teacher_ids": np.stack([rng.choice(vocab, k, replace=False) for _ in range(length - 1)]),
                     "teacher_logprobs": np.log(rng.dirichlet(np.ones(k), length - 1) * 0.8).astype(np.float16)})
    return rows


def test_recipe_divergence_reaches_the_trainer(tiny_world: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from polyfuse.fuse.trainer import FusionCollator, FusionTrainer, train_fusion
    from polyfuse.recipe import parse_recipe
    from polyfuse.recipe.explicit import TrainSection
    from polyfuse.stages.fusion import fusion_config, train_config

    base = {"target": {"model": "world:target"}, "sources": [{"name": "a", "model": "world:prose"}]}
    recipe = parse_recipe(base, ["train.distill_loss=jsd", "train.divergence_beta=0.25", "train.max_steps=2",
                                 "train.batch_size=2", "train.lm_loss_weight=0", "train.bf16=false"])
    config = fusion_config(recipe, recipe.train, tmp_path / "run", with_teacher=True, progress=False)
    config = dataclasses.replace(config, use_cpu=True)
    assert (config.distill_loss, config.divergence_beta, config.teacher_mass) == ("jsd", 0.25, "tail")

    target = tiny_world / "models" / "target"
    rows = _rows(4)
    batch = FusionCollator(pad_token_id=0)(rows[:2])
    trainer = FusionTrainer(model=AutoModelForCausalLM.from_pretrained(target), args=config)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = trainer.compute_loss(trainer.model, batch)               # w = 0: the distillation part alone
    mask = batch["shift_labels"] != -100
    want = distill_loss(logits, batch["teacher_ids"], batch["teacher_logprobs"], mask, kind="jsd", beta=0.25,
                        mass="tail")
    ce = distill_loss(logits, batch["teacher_ids"], batch["teacher_logprobs"], mask, mass="tail")
    assert torch.allclose(got, want.loss, atol=1e-6) and not torch.allclose(got, ce.loss, atol=1e-3)

    res = train_fusion(target, rows, tmp_path / "run", config)
    logged = [h["distill_loss"] for h in res["log_history"] if "distill_loss" in h]
    assert res["global_step"] == 2 and logged and all(0 < x < 1 for x in logged)   # JSD(0.25) <= ln 2 nats

    # manifests: parameters a loss does not read are left out, so existing train runs stay current
    default = train_config(parse_recipe(base).train, with_teacher=True)
    assert set(default) == set(TrainSection.model_fields) - {"divergence_beta", "skew_alpha", "baseline_learning_rate"}
    assert train_config(recipe.train, with_teacher=True)["divergence_beta"] == 0.25
    assert "skew_alpha" not in train_config(recipe.train, with_teacher=True)
    skew = parse_recipe(base, ["train.distill_loss=skew_reverse_kl", "train.skew_alpha=0.2"]).train
    assert train_config(skew, with_teacher=True)["skew_alpha"] == 0.2
    forward = parse_recipe(base, ["train.distill_loss=forward_kl"]).train
    assert train_config(forward, with_teacher=True) == train_config(parse_recipe(base, ["train.distill_loss=kl"]).train,
                                                                     with_teacher=True)
    assert not {"distill_loss", "divergence_beta", "skew_alpha"} & set(train_config(recipe.train, with_teacher=False))


def test_fusion_config_checks_the_divergence_settings(tmp_path: Path):
    from polyfuse.fuse.trainer import FusionConfig

    cfg = FusionConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], distill_loss="skew_reverse_kl",
                       skew_alpha=0.2)
    assert (cfg.distill_loss, cfg.skew_alpha, cfg.divergence_beta) == ("skew_reverse_kl", 0.2, 0.5)
    with pytest.raises(ValueError, match=r"divergence_beta must be in \[0, 1\].*skew_alpha must be in \[0, 1\]"):
        FusionConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], divergence_beta=1.5, skew_alpha=-1)
    with pytest.raises(ValueError, match="distill_loss must be one of ce, kl, forward_kl, reverse_kl, jsd"):
        FusionConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], distill_loss="mse")


@pytest.mark.parametrize("kind", DISTILL_KINDS)
def test_tail_entries_rounded_above_one_are_rescaled(kind):
    """fp16 rounding can make the stored entries sum above 1: read as the entries rescaled to 1, no rest."""
    ids = torch.tensor([[[2, 5, 7]]])
    over = torch.tensor([[[0.6, 0.3, 0.2]]], dtype=torch.float64).log()
    logits = torch.randn(1, 1, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64,
                         requires_grad=True)
    got = distill_loss(logits, ids, over, kind=kind, mass="tail").loss
    q = torch.softmax(logits.detach()[0, 0], -1)[ids[0, 0]]
    p = torch.tensor([0.6, 0.3, 0.2, 0.0], dtype=torch.float64) / 1.1
    want = divergence(p.log(), torch.cat([q, 1 - q.sum().view(1)]).log(), torch.ones(4, dtype=torch.bool), kind)
    assert torch.allclose(got, want, atol=1e-12)
    got.backward()
    assert torch.isfinite(logits.grad).all()
