"""SFT, DPO / length-normalised DPO and WRPO training of the target on built data (the ``sft``, ``dpo``, ``wrpo`` stages).

Thin functions over TRL: :func:`run_sft` (``SFTTrainer``), :func:`run_dpo` (``DPOTrainer`` with
``loss="sigmoid"`` or TRL's ``"sigmoid_norm"`` -- length-normalised DPO, FuseChat-3.0's LN-DPO, built into
TRL 1.x) and :func:`run_wrpo` (:class:`polyfuse.implicit.wrpo.WRPOTrainer`). Each takes a model path (a
directory, ``world:NAME`` or a hub id already in the local cache), a JSONL file written by
:mod:`polyfuse.implicit.build`, an output directory and a config dataclass, and returns a summary dict.

* **Defaults** are the published recipes (FuseChat-3.0 README; WRPO ``training_configs``): cosine schedule,
  warm-up 0.1, SFT lr 5e-6, DPO lr 1e-6 with beta 0.01 (``sigmoid``) or 10 (``sigmoid_norm``), WRPO lr 3e-7,
  beta 0.01, alpha 0 -> 0.1 -- and small, CPU-friendly batches. bf16 autocast only on a CUDA device that
  supports it; float32 weights always (no bf16 on CPU). Gradient checkpointing is off unless asked for.
* **LoRA** (``lora_r > 0``) goes through TRL's ``peft_config`` (the DPO/WRPO reference is then the base
  model with the adapter disabled); the merged model is saved by default. peft is an optional dependency:
  asking for LoRA without it raises :class:`PolyfuseError` saying how to install it.
* **Resumable**: checkpoints go to ``<output_dir>/checkpoint-N`` every ``save_steps``; a rerun with the same
  output directory resumes from the last one (``resume=True``). After a successful run the final model and
  tokenizer are saved to ``output_dir`` (checkpoints removed unless ``keep_checkpoints``) with
  ``train_result.json``. Wrap the call in ``workspace.run_stage(..., resumable=True)`` for an atomic stage
  directory: it hands the same persistent work directory to a rerun.
* **Chat template**: tokenizers without one get :data:`polyfuse.corpus.chat.DEFAULT_CHAT_TEMPLATE` (see
  :func:`ensure_chat_template`), which is saved with the trained model, so sampling and evaluation of the
  result use the same format.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from polyfuse.corpus.chat import ensure_chat_template
from polyfuse.errors import DataError, PolyfuseError
from polyfuse.models import load_tokenizer, resolve_bf16, resolve_model_ref
from polyfuse.trainer_bar import quiet_trainer
from polyfuse.workspace import atomic_write_json, read_jsonl

log = logging.getLogger(__name__)

__all__ = ["DPOTrainConfig", "SFTTrainConfig", "WRPOTrainConfig", "read_jsonl_rows", "run_dpo", "run_sft", "run_wrpo", "stage_runner"]

LOSSES = ("sigmoid", "sigmoid_norm")
#: FuseChat-3.0's DPO beta per loss: 0.01 without length normalisation (Qwen, Gemma), 10 with (Llama).
DEFAULT_BETA = {"sigmoid": 0.01, "sigmoid_norm": 10.0}


# --------------------------------------------------------------------------------------------------
# configs


@dataclass
class SFTTrainConfig:
    """Training settings shared by the three stages (``None`` means the stage's published default).

    Set either ``num_train_epochs`` or ``max_steps`` (``max_steps > 0`` wins). ``lora_r > 0`` trains a LoRA
    adapter (needs peft) on ``lora_target_modules`` (``all-linear`` by default); the adapter is saved to
    ``<output_dir>/adapter`` and, with ``merge_lora``, merged into a full model in ``output_dir`` so the
    next stage loads it like any other model. ``extra`` is passed to the
    TRL config as is (any ``SFTConfig`` / ``DPOConfig`` field).
    """

    learning_rate: float | None = None
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_length: int | None = 512
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int | None = 2
    resume: bool = True
    keep_checkpoints: bool = False
    gradient_checkpointing: bool = False
    bf16: bool | None = None
    chat_template: str | None = None
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    merge_lora: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    #: SFT only: loss on the assistant tokens only (``None``: when the chat template marks them).
    assistant_only_loss: bool | None = None

    default_lr = 5e-6


@dataclass
class DPOTrainConfig(SFTTrainConfig):
    """DPO settings: ``loss`` ``sigmoid`` (DPO) or ``sigmoid_norm`` (length-normalised DPO); ``beta`` defaults
    to FuseChat-3.0's value for the loss (:data:`DEFAULT_BETA`)."""

    loss: Literal["sigmoid", "sigmoid_norm"] = "sigmoid"
    beta: float | None = None
    precompute_ref_log_probs: bool = False
    #: Weight of an added NLL loss on the chosen answers (RPO, Pang et al. 2024; TRL's ``"sft"`` loss type);
    #: 0 is plain DPO.
    sft_weight: float = 0.0

    default_lr = 1e-6


@dataclass
class WRPOTrainConfig(SFTTrainConfig):
    """WRPO settings (the WRPO release: beta 0.01, alpha ramped linearly from 0 to 0.1, lr 3e-7)."""

    beta: float = 0.01
    alpha_max: float = 0.1
    alpha_schedule: Literal["linear", "constant"] = "linear"
    length_normalize: bool = False
    label_smoothing: float = 0.0
    precompute_ref_log_probs: bool = False
    #: Weight of the NLL of the chosen answers, alpha-weighted like their rewards (RPO's term); 0 is plain WRPO.
    sft_weight: float = 0.0

    default_lr = 3e-7


# --------------------------------------------------------------------------------------------------
# helpers


def read_jsonl_rows(path: str | Path, required: Sequence[str], stage: str) -> list[dict[str, Any]]:
    """Rows of a built JSONL file; each must hold the ``required`` keys (else :class:`DataError` with file:line)."""
    rows = []
    for where, row in read_jsonl(path, missing="no such file; run the build stage first (it writes "
                                 "sft/dpo/wrpo.jsonl)"):
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{where}: {stage} rows need {', '.join(required)}; missing {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows; the build stage kept nothing for {stage} (see its stats.json)")
    return rows


def _dataset(rows: list[dict[str, Any]], keep: Sequence[str]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{k: r[k] for k in keep} for r in rows])


def _peft_config(cfg: SFTTrainConfig) -> Any:
    if cfg.lora_r <= 0:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise PolyfuseError("lora_r > 0 needs the peft package: pip install peft (or set lora_r=0 for full "
                            "fine-tuning)") from None
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")


def _common_args(cfg: SFTTrainConfig, output_dir: Path) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "learning_rate": cfg.learning_rate if cfg.learning_rate is not None else cfg.default_lr,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_length": cfg.max_length,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "bf16": resolve_bf16(cfg.bf16),
        "fp16": False,
        "report_to": "none",
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning is for copies to a GPU (else a warning)
        **cfg.extra,
    }


def _trl_config(cls: type, kwargs: Mapping[str, Any]) -> Any:
    """``cls(**kwargs)`` without the deprecation warning TRL's own ``gradient_checkpointing`` field raises
    (TRL defaults it to True; polyfuse must pass it to keep it off unless asked)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        return cls(**kwargs)


def _prepare(model_path: str, cfg: SFTTrainConfig) -> tuple[str, Any]:
    resolved = resolve_model_ref(model_path)
    tokenizer = load_tokenizer(resolved)
    if ensure_chat_template(tokenizer, cfg.chat_template):
        log.debug("chat template set on the tokenizer of %s", model_path)
    return resolved.location, tokenizer


def _save_final(trainer: Any, cfg: SFTTrainConfig, output_dir: Path) -> None:
    """Save the trained model and tokenizer to ``output_dir``; a LoRA run saves its adapter to
    ``output_dir/adapter`` and, with ``merge_lora``, the merged full model to ``output_dir``."""
    from accelerate.utils import is_peft_model

    if not (is_peft_model(trainer.model) and cfg.merge_lora):
        trainer.save_model(str(output_dir))
        return
    trainer.save_model(str(output_dir / "adapter"))
    if trainer.is_world_process_zero():  # one writer under several processes (save_model takes care of itself)
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)


def _train(trainer: Any, cfg: SFTTrainConfig, output_dir: Path, stage: str, started: float) -> dict[str, Any]:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output_dir)) if cfg.resume and output_dir.is_dir() else None
    if last:
        log.info("%s: resuming from %s", stage, last)
    quiet_trainer(trainer, stage, progress=not cfg.extra.get("disable_tqdm", False))
    with warnings.catch_warnings():  # TRL reads the model's deprecated is_gradient_checkpointing when it generates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        result = trainer.train(resume_from_checkpoint=last)
    _save_final(trainer, cfg, output_dir)
    trainer.save_state()  # trainer_state.json: the logged values (log_history) next to the model
    main = trainer.is_world_process_zero()  # under several processes the other ranks write nothing here
    if not cfg.keep_checkpoints and main:
        for ckpt in output_dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"stage": stage, "output_dir": str(output_dir), "resumed_from": last,
               "global_step": trainer.state.global_step, "train_loss": result.training_loss,
               "losses": losses, "seconds": round(time.perf_counter() - started, 2),
               "config": {k: v for k, v in asdict(cfg).items() if k != "extra"} | {"extra": sorted(cfg.extra)}}
    if not all(math.isfinite(x) for x in losses):
        raise PolyfuseError(f"{stage}: the loss became NaN or infinite (logged {losses[-5:]}); lower the "
                            "learning rate or beta")
    if main:
        atomic_write_json(output_dir / "train_result.json", summary)
    return summary


class _Offline:
    """Mixin: no usage ping from TRL trainers (polyfuse makes no network calls at run time)."""

    def _send_telemetry(self) -> None:
        return None


def _trainer_classes() -> tuple[type, type]:
    from trl import DPOTrainer, SFTTrainer

    return (type("PolyfuseSFTTrainer", (_Offline, SFTTrainer), {}),
            type("PolyfuseDPOTrainer", (_Offline, DPOTrainer), {}))


# --------------------------------------------------------------------------------------------------
# the stages


def run_sft(model_path: str, data: str | Path, output_dir: str | Path, config: SFTTrainConfig | None = None,
            *, callbacks: list | None = None) -> dict[str, Any]:
    """Supervised fine-tuning on ``sft.jsonl`` rows ``{"messages": [...]}`` with TRL's ``SFTTrainer``.

    The loss covers the assistant tokens only when the chat template marks them (the default template does).
    Returns the summary also written to ``<output_dir>/train_result.json``.
    """
    from trl import SFTConfig
    from trl.chat_template_utils import has_generation_markers

    cfg = config or SFTTrainConfig()
    started, output_dir = time.perf_counter(), Path(output_dir)
    location, tokenizer = _prepare(model_path, cfg)
    dataset = _dataset(read_jsonl_rows(data, ["messages"], "sft"), ["messages"])
    assistant_only = (has_generation_markers(tokenizer.chat_template) if cfg.assistant_only_loss is None
                      else cfg.assistant_only_loss)
    args = _trl_config(SFTConfig, {"assistant_only_loss": assistant_only, **_common_args(cfg, output_dir)})
    sft_trainer, _ = _trainer_classes()
    trainer = sft_trainer(model=location, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=_peft_config(cfg), callbacks=callbacks)
    return _train(trainer, cfg, output_dir, "sft", started)


def run_dpo(model_path: str, data: str | Path, output_dir: str | Path, config: DPOTrainConfig | None = None,
            *, callbacks: list | None = None) -> dict[str, Any]:
    """DPO on ``dpo.jsonl`` rows ``{"prompt", "chosen", "rejected"}`` with TRL's ``DPOTrainer``.

    ``loss="sigmoid"``: ``-log sigmoid(beta (r_w - r_l))`` with summed log-ratios; ``loss="sigmoid_norm"``:
    each log-ratio divided by its answer's token count first (FuseChat-3.0's LN-DPO; TRL's own loss type).
    ``sft_weight > 0`` adds that weight times the mean NLL of the chosen answers' tokens (RPO).
    The reference model is a frozen copy of ``model_path`` (or the disabled LoRA adapter).
    """
    from trl import DPOConfig

    cfg = config or DPOTrainConfig()
    if cfg.loss not in LOSSES:
        raise PolyfuseError(f"dpo.loss={cfg.loss!r}: choose sigmoid (DPO) or sigmoid_norm (length-normalised)")
    started, output_dir = time.perf_counter(), Path(output_dir)
    location, tokenizer = _prepare(model_path, cfg)
    dataset = _dataset(read_jsonl_rows(data, ["prompt", "chosen", "rejected"], "dpo"),
                       ["prompt", "chosen", "rejected"])
    beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA[cfg.loss]
    losses = {"loss_type": [cfg.loss, "sft"], "loss_weights": [1.0, cfg.sft_weight]} if cfg.sft_weight > 0 else \
        {"loss_type": [cfg.loss]}
    args = _trl_config(DPOConfig, {**losses, "beta": beta, "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
                                   **_common_args(cfg, output_dir)})
    _, dpo_trainer = _trainer_classes()
    trainer = dpo_trainer(model=location, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=_peft_config(cfg), callbacks=callbacks)
    return _train(trainer, cfg, output_dir, "dpo", started)


def run_wrpo(model_path: str, data: str | Path, output_dir: str | Path, config: WRPOTrainConfig | None = None,
             *, callbacks: list | None = None) -> dict[str, Any]:
    """WRPO on ``wrpo.jsonl`` rows ``{"prompt", "chosen": [source, target], "rejected": [worst]}``.

    See :mod:`polyfuse.implicit.wrpo` for the loss; ``model_path`` is usually the SFT model, which is also
    the frozen reference.
    """
    from polyfuse.implicit.wrpo import WRPOConfig, WRPOTrainer

    cfg = config or WRPOTrainConfig()
    started, output_dir = time.perf_counter(), Path(output_dir)
    location, tokenizer = _prepare(model_path, cfg)
    dataset = _dataset(read_jsonl_rows(data, ["prompt", "chosen", "rejected"], "wrpo"),
                       ["prompt", "chosen", "rejected"])
    args = _trl_config(WRPOConfig, {"beta": cfg.beta, "alpha_max": cfg.alpha_max, "alpha_schedule": cfg.alpha_schedule,
                                    "length_normalize": cfg.length_normalize, "label_smoothing": cfg.label_smoothing,
                                    "sft_weight": cfg.sft_weight,
                                    "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
                                    **_common_args(cfg, output_dir)})
    trainer = WRPOTrainer(model=location, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=_peft_config(cfg), callbacks=callbacks)
    return _train(trainer, cfg, output_dir, "wrpo", started)


def stage_runner(stage: str) -> Callable[..., dict[str, Any]]:
    """The run function of a stage name (``sft``, ``dpo``, ``wrpo``)."""
    runners: Mapping[str, Callable[..., dict[str, Any]]] = {"sft": run_sft, "dpo": run_dpo, "wrpo": run_wrpo}
    if stage not in runners:
        raise PolyfuseError(f"unknown training stage {stage!r}; choose sft, dpo or wrpo")
    return runners[stage]
