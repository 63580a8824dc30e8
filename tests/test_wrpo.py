"""The WRPO loss, its alpha schedule, and WRPOTrainer on TRL's DPOTrainer with the tiny world's target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from polyfuse.errors import DataError
from polyfuse.implicit.wrpo import (
    DataCollatorForWRPO,
    WRPOConfig,
    WRPOTrainer,
    alpha_at,
    chosen_nll,
    tokenize_wrpo_row,
    wrpo_loss,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------------------------------
# the loss against hand-computed values


def test_wrpo_loss_hand_computed() -> None:
    policy = torch.tensor([[-10.0, -12.0, -15.0], [-4.0, -3.0, -2.0]])
    ref = torch.tensor([[-11.0, -12.5, -14.0], [-4.0, -3.5, -2.5]])
    beta, alpha = 0.5, 0.25
    out = wrpo_loss(policy, ref, beta=beta, alpha=alpha)
    # row 0: r = (1, 0.5, -1); weighted = 0.25 + 0.375 = 0.625; margin = 1.625
    # row 1: r = (0, 0.5, 0.5); weighted = 0.375; margin = -0.125
    expected = [-logsig(beta * 1.625), -logsig(beta * -0.125)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.rewards.flatten().tolist() == pytest.approx([0.5, 0.25, -0.5, 0.0, 0.25, 0.25])
    assert out.weighted_rewards.tolist() == pytest.approx([0.3125, 0.1875])


def test_wrpo_loss_label_smoothing_and_length_normalisation() -> None:
    policy = torch.tensor([[-10.0, -12.0, -15.0]])
    ref = torch.tensor([[-11.0, -12.5, -14.0]])
    lengths = torch.tensor([[4, 2, 5]])
    out = wrpo_loss(policy, ref, beta=2.0, alpha=0.5, label_smoothing=0.1, lengths=lengths)
    # r / |y| = (0.25, 0.25, -0.2); weighted = 0.25; margin = beta * 0.45 = 0.9
    expected = -0.9 * logsig(0.9) - 0.1 * logsig(-0.9)
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    assert out.rewards.flatten().tolist() == pytest.approx([0.5, 0.5, -0.4])


def test_wrpo_loss_reduces_to_dpo_at_the_ends() -> None:
    policy = torch.tensor([[-3.0, -5.0, -6.0]])
    ref = torch.tensor([[-4.0, -4.0, -4.0]])
    # alpha = 0: DPO of the target answer against the rejected one; alpha = 1: of the source answer
    assert wrpo_loss(policy, ref, beta=1.0, alpha=0.0).losses.item() == pytest.approx(-logsig(-1.0 + 2.0))
    assert wrpo_loss(policy, ref, beta=1.0, alpha=1.0).losses.item() == pytest.approx(-logsig(1.0 + 2.0))


# --------------------------------------------------------------------------------------------------
# the alpha schedule


def test_alpha_schedule_start_middle_end() -> None:
    assert alpha_at(0, 100, 0.1) == 0.0
    assert alpha_at(50, 100, 0.1) == pytest.approx(0.05)
    assert alpha_at(25, 100, 0.4) == pytest.approx(0.1)
    assert alpha_at(100, 100, 0.1) == pytest.approx(0.1)
    assert alpha_at(130, 100, 0.1) == pytest.approx(0.1)  # never past alpha_max
    assert alpha_at(0, 100, 0.3, "constant") == 0.3
    assert alpha_at(7, 0, 0.3) == 0.3  # unknown length: alpha_max
    with pytest.raises(ValueError, match="alpha_schedule"):
        alpha_at(1, 10, 0.1, "cosine")


# --------------------------------------------------------------------------------------------------
# gradient direction


def test_gradient_direction() -> None:
    policy = torch.tensor([[-10.0, -12.0, -11.0]], requires_grad=True)
    ref = torch.tensor([[-10.0, -12.0, -11.0]])
    alpha = 0.3
    wrpo_loss(policy, ref, beta=0.5, alpha=alpha).losses.sum().backward()
    g_source, g_target, g_rejected = policy.grad[0].tolist()
    # descending the loss raises both chosen answers' log-probs and lowers the rejected one's
    assert g_source < 0 and g_target < 0 and g_rejected > 0
    assert g_source / g_target == pytest.approx(alpha / (1 - alpha))
    assert g_source + g_target == pytest.approx(-g_rejected)
    zero = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    wrpo_loss(zero, zero.detach(), beta=0.5, alpha=0.0).losses.sum().backward()
    assert zero.grad[0, 0].item() == 0.0  # at step 0 the source answer has no weight


# --------------------------------------------------------------------------------------------------
# data handling


def test_collator_stacks_source_target_rejected_blocks() -> None:
    rows = [{"prompt_ids": [1, 2], "source_ids": [3, 4, 5], "target_ids": [6], "rejected_ids": [7, 8]},
            {"prompt_ids": [9], "source_ids": [10], "target_ids": [11, 12], "rejected_ids": [13],
             }]
    for r, (chosen, rejected) in zip(rows, [([-1.0, -2.0], -3.0), ([-4.0, -5.0], -6.0)], strict=True):
        r["ref_chosen_logps"], r["ref_rejected_logps"] = chosen, rejected
    batch = DataCollatorForWRPO(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [9, 10, 0, 0, 0],
                                           [1, 2, 6, 0, 0], [9, 11, 12, 0, 0],
                                           [1, 2, 7, 8, 0], [9, 13, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0],
                                                 [0, 0, 1, 0, 0], [0, 1, 1, 0, 0],
                                                 [0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 3, 3, 4, 2]
    assert batch["ref_chosen_logps"].shape == (2, 2) and batch["ref_rejected_logps"].tolist() == [-3.0, -6.0]
    cut = DataCollatorForWRPO(pad_token_id=0, max_length=3)(rows)
    assert cut["input_ids"].shape == (6, 3) and cut["completion_mask"][0].tolist() == [0, 0, 1]


@pytest.fixture(scope="module")
def target(tiny_world: Path) -> Path:
    return tiny_world / "models" / "target"


@pytest.fixture(scope="module")
def tokenizer(target: Path):
    from transformers import AutoTokenizer

    from polyfuse.corpus.chat import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(target)
    ensure_chat_template(tok)
    return tok


def rows(n: int = 4) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i + 2, 2 * i + 3
        out.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                    "chosen": [{"role": "assistant", "content": f"{a}+{b} = {a + b}."},
                               {"role": "assistant", "content": f"{a + b}"}],
                    "rejected": [{"role": "assistant", "content": f"{a + b + 1}"}]})
    return out


def test_tokenize_row_splits_prompt_and_three_answers(tokenizer) -> None:
    row = rows(1)[0]
    ids = tokenize_wrpo_row(row, tokenizer)
    prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids["prompt_ids"]) == prompt_text
    assert tokenizer.decode(ids["source_ids"]) == "2+3 = 5." + tokenizer.eos_token
    assert tokenizer.decode(ids["target_ids"]) == "5" + tokenizer.eos_token
    assert tokenizer.decode(ids["rejected_ids"]) == "6" + tokenizer.eos_token
    with pytest.raises(DataError, match="'chosen' must be a list of 2 answers"):
        tokenize_wrpo_row({**row, "chosen": row["chosen"][:1]}, tokenizer)


def test_config_rejects_what_wrpo_does_not_compute(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss_type"):
        WRPOConfig(str(tmp_path), loss_type=["sigmoid"], bf16=False)
    with pytest.raises(ValueError, match="ld_alpha"):
        WRPOConfig(str(tmp_path), ld_alpha=0.5, bf16=False)
    with pytest.raises(ValueError, match="alpha_max"):
        WRPOConfig(str(tmp_path), alpha_max=1.5, bf16=False)
    with pytest.raises(ValueError, match="sft_weight"):
        WRPOConfig(str(tmp_path), sft_weight=-1.0, bf16=False)


def test_chosen_nll_weights_the_two_chosen_blocks_by_alpha() -> None:
    """Each chosen block's NLL is a mean over its answer tokens; the rejected block never counts."""
    logps = torch.tensor([[-1.0, -2.0, 0.0],   # source, row 0: tokens -1, -2
                          [-4.0, 0.0, 0.0],    # source, row 1: token -4
                          [-0.5, -0.5, -0.5],  # target, row 0
                          [-2.0, -9.0, 0.0],   # target, row 1: token -2 (the -9 is padding)
                          [-50.0, -50.0, 0.0],  # rejected
                          [-50.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    source, target = 7.0 / 3, 3.5 / 4
    assert chosen_nll(logps, mask, alpha=0.25).item() == pytest.approx(0.25 * source + 0.75 * target)
    assert chosen_nll(logps, mask, alpha=0.0).item() == pytest.approx(target)


# --------------------------------------------------------------------------------------------------
# the trainer


def args(tmp_path: Path, **kw) -> WRPOConfig:
    base = {"bf16": False, "report_to": "none", "gradient_checkpointing": False, "per_device_train_batch_size": 4,
            "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-3, "warmup_steps": 0,
            "lr_scheduler_type": "constant", "disable_tqdm": True}
    return WRPOConfig(str(tmp_path), **{**base, **kw})


def perturbed(target: Path, seed: int):
    """The target with noise on every weight: a reference model that differs from the policy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def batch_loss(trainer) -> float:
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


@pytest.mark.parametrize("sft_weight", [0.0, 0.8])
@pytest.mark.parametrize(("alpha", "chosen_index"), [(0.0, 1), (1.0, 0)])
def test_wrpo_matches_trl_dpo_when_alpha_is_0_or_1(alpha: float, chosen_index: int, sft_weight: float, target: Path,
                                                   tokenizer, tmp_path: Path) -> None:
    """alpha = 0 is DPO of the target answer vs the rejected one; alpha = 1 DPO of the source answer; with
    ``sft_weight``, TRL's DPO plus its ``sft`` loss (RPO) at that weight."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = rows(4)
    wrpo = WRPOTrainer(model=str(target), ref_model=perturbed(target, 0),
                       args=args(tmp_path / "w", beta=0.7, alpha_max=alpha, alpha_schedule="constant",
                                 sft_weight=sft_weight),
                       train_dataset=Dataset.from_list(data), processing_class=tokenizer)
    dpo_rows = [{"prompt": r["prompt"], "chosen": [r["chosen"][chosen_index]], "rejected": r["rejected"]}
                for r in data]
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}
    dpo_args = DPOConfig(str(tmp_path / "d"), beta=0.7, bf16=False, report_to="none", gradient_checkpointing=False,
                         per_device_train_batch_size=4, **losses)
    dpo = DPOTrainer(model=str(target), ref_model=perturbed(target, 0), args=dpo_args,
                     train_dataset=Dataset.from_list(dpo_rows), processing_class=tokenizer)
    got, want = batch_loss(wrpo), batch_loss(dpo)
    assert abs(got - math.log(2)) > 1e-3  # the reference differs from the policy: a real test
    assert got == pytest.approx(want, rel=1e-5)


def test_wrpo_trains_logs_alpha_and_saves(target: Path, tokenizer, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    steps = 6
    trainer = WRPOTrainer(model=str(target), args=args(tmp_path, beta=0.5, alpha_max=0.3, max_steps=steps),
                          train_dataset=Dataset.from_list(rows(4)), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == steps
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert losses[-1] < losses[0] - 0.05
    # step s is computed at global_step s - 1: alpha = 0.3 * (s - 1) / steps
    assert [h["alpha"] for h in logs] == pytest.approx([0.3 * i / steps for i in range(steps)])
    assert logs[-1]["rewards/accuracies"] > 0.5 and logs[-1]["rewards/margins"] > 0
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    before = AutoModelForCausalLM.from_pretrained(target)
    assert not torch.equal(reloaded.model.embed_tokens.weight, before.model.embed_tokens.weight)


def test_precomputed_reference_gives_the_same_losses(target: Path, tokenizer, tmp_path: Path) -> None:
    from datasets import Dataset

    def losses(precompute: bool) -> list[float]:
        trainer = WRPOTrainer(model=str(target),
                              args=args(tmp_path / str(precompute), beta=0.5, alpha_max=0.5, max_steps=3,
                                        precompute_ref_log_probs=precompute),
                              train_dataset=Dataset.from_list(rows(4)), processing_class=tokenizer)
        assert (trainer.ref_model is None) is precompute
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    live, pre = losses(False), losses(True)
    assert pre == pytest.approx(live, rel=1e-4) and len(pre) == 3
