"""FusionCollator, FusionConfig, FusionTrainer.compute_loss and train_fusion on the tiny target."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from polyfuse.errors import DataError
from polyfuse.fuse.losses import distill_loss
from polyfuse.fuse.trainer import FusionCollator, FusionConfig, FusionTrainer, lm_weight_at, train_fusion

NEG = float("-inf")


def make_rows(n: int, lengths: tuple[int, ...] = (24, 40, 17), k: int = 5, vocab: int = 512, seed: int = 0,
              teacher: bool = True) -> list[dict]:
    """Rows with a BOS (id 0) first and random top-k teacher entries at positions 0..n-2."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        row = {"input_ids": np.concatenate([[0], rng.integers(1, vocab, length - 1)])}
        if teacher:
            row["teacher_ids"] = np.stack([rng.choice(vocab, k, replace=False) for _ in range(length - 1)])
            # top-k of a distribution, not renormalised (mass 0.8), stored as float16 like a capture
            row["teacher_logprobs"] = np.log(rng.dirichlet(np.ones(k), length - 1) * 0.8).astype(np.float16)
        rows.append(row)
    return rows


def config(out: Path, **kw) -> FusionConfig:
    defaults = {"use_cpu": True, "report_to": [], "max_steps": 3, "per_device_train_batch_size": 2,
                "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "seed": 0}
    return FusionConfig(output_dir=str(out), **{**defaults, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ---- collator -------------------------------------------------------------------------------------------


def test_collator_exact_tensors():
    examples = [
        {"input_ids": [1, 5, 6], "teacher_ids": [[5, 7], [6, -1]],
         "teacher_logprobs": [[-0.5, -2.0], [-0.25, NEG]]},
        {"input_ids": [1, 8]},                                           # baseline row in a fused batch
        {"input_ids": [1, 9, 4, 3], "labels": [-100, 9, 4, 3], "teacher_ids": [[9], [4], [3]],
         "teacher_logprobs": np.array([[-1.0], [-0.5], [-0.125]], dtype=np.float16)},
    ]
    batch = FusionCollator(pad_token_id=0)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "shift_labels", "teacher_ids", "teacher_logprobs"}
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 0], [1, 8, 0, 0], [1, 9, 4, 3]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))
    assert torch.equal(batch["labels"], torch.tensor([[1, 5, 6, -100], [1, 8, -100, -100], [-100, 9, 4, 3]]))
    assert torch.equal(batch["shift_labels"],
                       torch.tensor([[5, 6, -100, -100], [8, -100, -100, -100], [9, 4, 3, -100]]))
    assert torch.equal(batch["teacher_ids"], torch.tensor([
        [[5, 7], [6, -1], [-1, -1], [-1, -1]],
        [[-1, -1], [-1, -1], [-1, -1], [-1, -1]],
        [[9, -1], [4, -1], [3, -1], [-1, -1]],
    ]))
    assert batch["teacher_logprobs"].dtype == torch.float32
    assert torch.equal(batch["teacher_logprobs"], torch.tensor([
        [[-0.5, -2.0], [-0.25, NEG], [NEG, NEG], [NEG, NEG]],
        [[NEG, NEG], [NEG, NEG], [NEG, NEG], [NEG, NEG]],
        [[-1.0, NEG], [-0.5, NEG], [-0.125, NEG], [NEG, NEG]],
    ]))


def test_collator_docstring_example():
    import polyfuse.fuse.trainer as module

    assert doctest.testmod(module).failed == 0


def test_collator_baseline_rows_and_errors():
    batch = FusionCollator(pad_token_id=7)([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "shift_labels"}
    assert batch["input_ids"].tolist() == [[1, 2], [3, 7]]
    empty = FusionCollator()([{"input_ids": [1, 2], "teacher_ids": np.zeros((1, 0)), "teacher_logprobs": np.zeros((1, 0))}])
    assert "teacher_ids" not in empty
    with pytest.raises(DataError, match="not its partner"):
        FusionCollator()([{"input_ids": [1, 2], "teacher_ids": [[1]]}])
    with pytest.raises(DataError, match=r"P <= len\(input_ids\) = 2"):
        FusionCollator()([{"input_ids": [1, 2], "teacher_ids": [[1]] * 3, "teacher_logprobs": [[0.0]] * 3}])
    with pytest.raises(DataError, match="lacks 'input_ids'"):
        FusionCollator()([{"text": "hi"}])


# ---- config and schedule --------------------------------------------------------------------------------


def test_lm_weight_schedule():
    assert lm_weight_at(5, 10, 0.9, "hard") == 0.9
    assert [lm_weight_at(s, 4, 0.6, "hard_and_decay") for s in range(5)] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    with pytest.raises(ValueError, match="hard_and_decay"):
        lm_weight_at(0, 4, 0.6, "soft")


def test_config_validation(tmp_path):
    cfg = config(tmp_path)
    assert cfg.lm_loss_weight == 0.9 and cfg.distill_loss == "ce" and cfg.remove_unused_columns is False
    with pytest.raises(ValueError, match=r"lm_loss_weight must be in \[0, 1\].*distill_loss must be one of ce, kl"):
        config(tmp_path, lm_loss_weight=1.5, distill_loss="mse")
    with pytest.raises(ValueError, match="fusion must be one of min_ce, avg_ce, none"):
        config(tmp_path, fusion="max_ce")


# ---- compute_loss ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tiny_world: Path) -> Path:
    return tiny_world / "models" / "target"


def _trainer(target: Path, tmp_path: Path, **kw) -> FusionTrainer:
    model = AutoModelForCausalLM.from_pretrained(target)
    return FusionTrainer(model=model, args=config(tmp_path, **kw))


def test_compute_loss_parts(target, tmp_path):
    batch = FusionCollator(pad_token_id=0)(make_rows(3))
    trainer = _trainer(target, tmp_path, lm_loss_weight=1.0)
    model = trainer.model.eval()
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        clm = trainer.compute_loss(model, batch)
        assert torch.allclose(clm, own.loss, atol=1e-6)                 # w = 1: the model's own CLM loss

        trainer.args.lm_loss_weight = 0.0
        mask = batch["shift_labels"] != -100
        ref = distill_loss(own.logits, batch["teacher_ids"], batch["teacher_logprobs"], mask)
        distill = trainer.compute_loss(model, batch)
        assert torch.allclose(distill, ref.loss, atol=1e-6)             # w = 0: the losses module
        assert ref.count == mask.sum()

        trainer.args.lm_loss_weight = 0.9
        assert torch.allclose(trainer.compute_loss(model, batch), 0.9 * own.loss + 0.1 * ref.loss, atol=1e-6)
        trainer.args.distill_loss = "kl"
        kl = distill_loss(own.logits, batch["teacher_ids"], batch["teacher_logprobs"], mask, kind="kl")
        assert torch.allclose(trainer.compute_loss(model, batch), 0.9 * own.loss + 0.1 * kl.loss, atol=1e-6)

        trainer.args.fusion = "none"                                    # baseline: CLM exactly, any w
        assert torch.allclose(trainer.compute_loss(model, batch), own.loss, atol=1e-6)
        trainer.args.fusion = "min_ce"
        plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
        assert torch.allclose(trainer.compute_loss(model, plain), own.loss, atol=1e-6)

        n = int(mask.sum())                                              # normalised by num_items_in_batch
        halved = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(2 * n))
        assert torch.allclose(halved, 0.5 * (0.9 * own.loss + 0.1 * kl.loss), atol=1e-6)

    metrics = trainer.evaluate(make_rows(3))                           # the prediction_step path
    assert math.isclose(metrics["eval_loss"], (0.9 * own.loss + 0.1 * kl.loss).item(), rel_tol=1e-5)


# ---- training -------------------------------------------------------------------------------------------


def test_training_changes_parameters_and_logs_the_parts(target, tmp_path):
    before = weights(target)
    out = tmp_path / "run"
    res = train_fusion(target, make_rows(6), out, config(out, lm_loss_weight=0.5, distill_schedule="hard_and_decay"))
    after = weights(out)
    assert res["global_step"] == 3 and res["resumed_from"] is None
    assert all(not torch.equal(before[name], after[name]) for name in before), "every tensor must change"
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    logs = [h for h in res["log_history"] if "loss" in h]
    assert [h["lm_weight"] for h in logs] == pytest.approx([0.5, 0.5 + 0.5 / 3, 0.5 + 1 / 3])
    for h in logs:
        mix = h["lm_weight"] * h["clm_loss"] + (1 - h["lm_weight"]) * h["distill_loss"]
        assert math.isclose(h["loss"], mix, rel_tol=1e-4)
        assert 0 < h["distill_loss"] < 20 and 0 < h["clm_loss"] < 20


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resumed_run_matches_uninterrupted(target, tmp_path):
    rows = make_rows(8)
    kw = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full = train_fusion(target, rows, tmp_path / "full", config(tmp_path / "full", **kw))
    part = tmp_path / "part"
    first = train_fusion(target, rows, part, config(part, **kw), callbacks=[_StopAt(2)])
    assert first["global_step"] == 2 and (part / "checkpoint-2").is_dir()
    second = train_fusion(target, rows, part, config(part, **kw))
    assert second["resumed_from"].endswith("checkpoint-2") and second["global_step"] == 4
    assert not list(part.glob("checkpoint-*"))                         # finished: checkpoints removed
    a, b = weights(tmp_path / "full"), weights(part)
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)
    losses = [h["loss"] for h in full["log_history"] if "loss" in h]
    resumed = [h for h in second["log_history"] if "loss" in h][-2:]
    assert [h["loss"] for h in resumed] == pytest.approx(losses[-2:], rel=1e-5)
    full_parts = [h["clm_loss"] for h in full["log_history"] if "loss" in h][-2:]
    assert [h["clm_loss"] for h in resumed] == pytest.approx(full_parts, rel=1e-4)  # per-step, not per-window


def test_gradient_accumulation_invariance(target, tmp_path):
    rows = make_rows(6, lengths=(30, 12, 21, 9))                       # unequal lengths: padding differs
    runs = {}
    for name, (bs, ga) in {"2x1": (2, 1), "1x2": (1, 2)}.items():
        out = tmp_path / name
        cfg = config(out, per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        res = train_fusion(target, rows, out, cfg)
        runs[name] = ([h["loss"] for h in res["log_history"] if "loss" in h], weights(out))
    (loss_a, w_a), (loss_b, w_b) = runs["2x1"], runs["1x2"]
    assert len(loss_a) == 3 and loss_a == pytest.approx(loss_b, rel=1e-4)
    assert all(torch.allclose(w_a[n], w_b[n], atol=1e-5) for n in w_a)
