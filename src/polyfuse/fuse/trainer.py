"""Continual training with fused teacher targets on the Hugging Face ``Trainer`` (FuseLLM's stage 3).

``FusionConfig`` adds the fusion knobs to ``TrainingArguments``; ``FusionTrainer`` overrides only
``compute_loss`` (and ``log``, to report the two loss parts); ``FusionCollator`` pads rows of
``input_ids`` plus optional top-k teacher entries. Everything else (devices, DDP / FSDP / DeepSpeed
through ``accelerate launch``, checkpoints, resumption) is the stock ``Trainer``.

The loss of a step with teacher data is ``L = w * CLM + (1 - w) * distill`` (FuseLLM ``hard``), or
with ``distill_schedule="hard_and_decay"`` ``w_s = w + (1 - w) * step / max_steps`` (the teacher's share
decays linearly to 0). Without teacher data, or with ``fusion="none"``, ``L = CLM`` exactly, so the
baseline uses the same data, steps and seed.

Both parts are summed over supervised positions and divided by the number of supervised tokens in
the whole accumulated batch (``num_items_in_batch``, counted across devices), so the result does not
depend on how a batch is split into micro-batches or devices.

**Response-only training** (chat corpora, FuseChat): give each row ``labels`` with -100 on every
token that is not an assistant response token (:func:`training_row` builds them from a block's
response spans with :func:`polyfuse.corpus.spans.response_labels`, the one token rule). A position
is supervised, for the CLM part *and* the distillation part, exactly when its next token's label is
not -100; an accumulated batch without a single response token has loss 0 (not NaN).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from polyfuse.corpus.spans import Spans, response_labels
from polyfuse.corpus.tokens import EncodedBlock
from polyfuse.errors import DataError
from polyfuse.fuse.losses import DISTILL_KINDS, IGNORE_INDEX, TEACHER_MASS, fusion_loss, shift_labels
from polyfuse.fuse.strategies import STRATEGIES
from polyfuse.trainer_bar import quiet_trainer

if TYPE_CHECKING:
    from transformers import TrainerCallback

__all__ = ["FusionCollator", "FusionConfig", "FusionTrainer", "TeacherRows", "lm_weight_at", "train_fusion",
           "training_row"]

DISTILL_LOSSES = DISTILL_KINDS
SCHEDULES = ("hard", "hard_and_decay")
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")
_NOT_MODEL_INPUTS = ("labels", "shift_labels", *TEACHER_KEYS)


@dataclass
class FusionConfig(TrainingArguments):
    r"""Configuration of :class:`FusionTrainer`: ``TrainingArguments`` plus the fusion parameters.

    Parameters that control the fusion loss:
        lm_loss_weight (`float`, defaults to `0.9`): weight ``w`` of the causal-LM loss.
        distill_loss (`str`, defaults to `"ce"`): ``ce`` (cross-entropy), ``forward_kl`` (alias ``kl``),
            ``reverse_kl``, ``jsd``, ``tv``, ``skew_forward_kl`` or ``skew_reverse_kl``
            (:func:`polyfuse.fuse.losses.divergence`).
        divergence_beta (`float`, defaults to `0.5`): ``jsd``'s beta (0: forward KL, 1: reverse KL).
        skew_alpha (`float`, defaults to `0.1`): the skew KLs' alpha (0: the plain KL).
        distill_temperature (`float`, defaults to `1.0`): temperature of teacher and student in the
            distillation loss.
        distill_schedule (`str`, defaults to `"hard"`): ``hard`` or ``hard_and_decay``.
        teacher_mass (`str`, defaults to `"renormalise"`): how the teacher's top-k is read —
            ``renormalise`` (FuseLLM: softmax over the k) or ``tail`` (the k probabilities as captured
            plus one bucket for the rest; see :mod:`polyfuse.fuse.losses`).
        fusion (`str`, defaults to `"min_ce"`): the strategy that built the targets (informational;
            ``none`` trains plain causal LM even when teacher entries are present).

    Defaults that differ from ``TrainingArguments``: ``remove_unused_columns=False`` (the teacher
    columns are not arguments of the model's ``forward``) and ``logging_steps=10``.
    """

    lm_loss_weight: float = field(
        default=0.9,
        metadata={"help": "Weight w of the causal-LM loss: L = w * CLM + (1 - w) * distill (FuseLLM: 0.9)."},
    )
    distill_loss: str = field(
        default="ce",
        metadata={"help": "Distillation loss: 'ce' (-sum p log q), 'forward_kl' (alias 'kl'), 'reverse_kl', "
                          "'jsd' (generalised, divergence_beta), 'tv', 'skew_forward_kl' or 'skew_reverse_kl' "
                          "(skew_alpha).", "choices": list(DISTILL_LOSSES)},
    )
    divergence_beta: float = field(
        default=0.5,
        metadata={"help": "jsd: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; 0 is forward "
                          "KL, 1 reverse KL (TRL's GKD)."},
    )
    skew_alpha: float = field(
        default=0.1,
        metadata={"help": "skew_forward_kl: KL(p || alpha p + (1 - alpha) q), skew_reverse_kl: "
                          "KL(q || (1 - alpha) p + alpha q) (DistiLLM); 0 is the plain KL."},
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature applied to the teacher's top-k log-probs and the student's logits."},
    )
    distill_schedule: str = field(
        default="hard",
        metadata={"help": "'hard': fixed w; 'hard_and_decay': w_s = w + (1 - w) * step / max_steps.",
                  "choices": list(SCHEDULES)},
    )
    teacher_mass: str = field(
        default="renormalise",
        metadata={"help": "'renormalise': softmax over the teacher's top-k (FuseLLM); 'tail': the top-k "
                          "probabilities as captured plus one bucket for the rest.",
                  "choices": list(TEACHER_MASS)},
    )
    fusion: str = field(
        default="min_ce",
        metadata={"help": "Fusion strategy that built the targets (informational); 'none' ignores teacher "
                          "entries and trains plain causal LM.", "choices": list(STRATEGIES)},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep False: the teacher columns are not arguments of the model's forward."},
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X update steps (an integer, or a ratio of the total steps if < 1)."},
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.lm_loss_weight <= 1.0:
            problems.append(f"lm_loss_weight must be in [0, 1] (got {self.lm_loss_weight}); FuseLLM uses 0.9")
        if self.distill_loss not in DISTILL_LOSSES:
            problems.append(f"distill_loss must be one of {', '.join(DISTILL_LOSSES)} (got {self.distill_loss!r})")
        for name in ("divergence_beta", "skew_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if not self.distill_temperature > 0:
            problems.append(f"distill_temperature must be > 0 (got {self.distill_temperature}); 1.0 is FuseLLM's")
        if self.distill_schedule not in SCHEDULES:
            problems.append(f"distill_schedule must be one of {', '.join(SCHEDULES)} (got {self.distill_schedule!r})")
        if self.teacher_mass not in TEACHER_MASS:
            problems.append(f"teacher_mass must be one of {', '.join(TEACHER_MASS)} (got {self.teacher_mass!r})")
        elif self.teacher_mass == "tail" and self.distill_temperature != 1.0:
            problems.append("teacher_mass 'tail' needs distill_temperature 1.0 (the tail of a tempered teacher "
                            "was not captured)")
        if self.fusion not in STRATEGIES:
            problems.append(f"fusion must be one of {', '.join(STRATEGIES)} (got {self.fusion!r})")
        if problems:
            raise ValueError("; ".join(problems))
        super().__post_init__()


def lm_weight_at(step: int, max_steps: int, weight: float, schedule: str = "hard") -> float:
    """CLM weight at optimizer step ``step`` (0-based): ``w``, or ``w + (1 - w) * step / max_steps`` when decaying."""
    if schedule == "hard" or max_steps <= 0:
        return weight
    if schedule == "hard_and_decay":
        return weight + (1.0 - weight) * min(step, max_steps) / max_steps
    raise ValueError(f"unknown distill_schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass
class FusionCollator:
    """Pads rows to the longest in the batch; teacher entries are padded to ``[B, T, K]``.

    Each example has ``input_ids`` [n] (a BOS context token first), optionally ``labels`` [n]
    (default: ``input_ids``; -100 on tokens not trained on, e.g. everything but the responses of a
    chat block, see :func:`training_row`) and optionally ``teacher_ids`` [P, k] / ``teacher_logprobs`` [P, k] with
    ``P <= n`` (entry t predicts token t+1; normally ``P = n - 1``). The batch holds ``input_ids``,
    ``attention_mask``, ``labels`` (-100 on padding), ``shift_labels`` (label t+1 at t, which the
    ``Trainer`` uses to count supervised tokens) and, when some example has entries,
    ``teacher_ids`` (-1 pad) and ``teacher_logprobs`` (float32, -inf pad); rows without entries are
    all padding there. ``T`` = the longest ``n``, ``K`` = the largest ``k``.

    Example::

        >>> collator = FusionCollator(pad_token_id=0)
        >>> examples = [
        ...     {"input_ids": [1, 5, 6], "teacher_ids": [[5, 7], [6, -1]],
        ...      "teacher_logprobs": [[-0.1, -2.5], [-0.2, float("-inf")]]},
        ...     {"input_ids": [1, 8]},
        ... ]
        >>> batch = collator(examples)
        >>> batch["input_ids"], batch["attention_mask"], batch["labels"]
        (tensor([[1, 5, 6],
                [1, 8, 0]]), tensor([[1, 1, 1],
                [1, 1, 0]]), tensor([[   1,    5,    6],
                [   1,    8, -100]]))
        >>> batch["shift_labels"]
        tensor([[   5,    6, -100],
                [   8, -100, -100]])
        >>> batch["teacher_ids"]
        tensor([[[ 5,  7],
                 [ 6, -1],
                 [-1, -1]],
        <BLANKLINE>
                [[-1, -1],
                 [-1, -1],
                 [-1, -1]]])
        >>> batch["teacher_logprobs"][0]
        tensor([[-0.1000, -2.5000],
                [-0.2000,    -inf],
                [   -inf,    -inf]])
    """

    pad_token_id: int = 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("FusionCollator got an empty batch")
        ids = [_as_1d(ex, "input_ids") for ex in examples]
        b, t = len(ids), max(len(x) for x in ids)
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)    # [B, T]
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        for i, (ex, x) in enumerate(zip(examples, ids, strict=True)):
            n = len(x)
            input_ids[i, :n] = torch.from_numpy(x)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.from_numpy(_as_1d(ex, "labels", n) if "labels" in ex else x)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "shift_labels": shift_labels(labels)}

        teachers = [_teacher_arrays(ex, len(x)) for ex, x in zip(examples, ids, strict=True)]
        k = max((tid.shape[1] for tid, _ in filter(None, teachers)), default=0)
        if k == 0:
            return batch
        teacher_ids = torch.full((b, t, k), -1, dtype=torch.long)                # [B, T, K]
        teacher_logprobs = torch.full((b, t, k), float("-inf"), dtype=torch.float32)
        for i, entry in enumerate(teachers):
            if entry is not None:
                tid, tlp = entry
                teacher_ids[i, : tid.shape[0], : tid.shape[1]] = torch.from_numpy(tid)
                teacher_logprobs[i, : tlp.shape[0], : tlp.shape[1]] = torch.from_numpy(tlp)
        batch["teacher_ids"], batch["teacher_logprobs"] = teacher_ids, teacher_logprobs
        return batch


def training_row(enc: EncodedBlock, response_spans: Spans | None = None) -> dict[str, np.ndarray]:
    """A training example of one encoded block: ``input_ids`` and, for a chat block, response-only ``labels``.

    ``response_spans`` None (plain text): no ``labels`` key, every token is trained on. Otherwise
    ``labels`` is :func:`polyfuse.corpus.spans.response_labels` (-100 off the responses).
    """
    row = {"input_ids": np.asarray(enc.ids, dtype=np.int64)}
    if response_spans is not None:
        row["labels"] = response_labels(enc, response_spans)
    return row


class TeacherRows(Sequence[dict[str, np.ndarray]]):
    """Training rows whose fused teacher entries are read from a top-k store when a row is fetched.

    ``rows[i]`` is ``rows[i]`` of the given list (``input_ids``, optional ``labels``) plus ``teacher_ids``
    [P, k] and ``teacher_logprobs`` [P, k] float32 of block ``block_ids[i]`` in ``store`` (anything whose
    ``store[block_id]`` has ``ids`` and ``logprobs``, e.g. :class:`polyfuse.capture.store.StoreReader`,
    which memory-maps its shards). Nothing is read up front: under several processes each rank's data
    loader fetches only the rows of its share, so a rank reads only its share of the teacher store.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], store: Any, block_ids: Sequence[int]) -> None:
        if len(rows) != len(block_ids):
            raise ValueError(f"{len(rows)} rows but {len(block_ids)} block ids")
        self.rows, self.store, self.block_ids = rows, store, list(block_ids)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        entry = self.store[self.block_ids[i]]
        return {**self.rows[i], "teacher_ids": entry.ids, "teacher_logprobs": entry.logprobs.astype(np.float32)}


def _as_1d(example: Mapping[str, Any], key: str, length: int | None = None) -> np.ndarray:
    if key not in example:
        raise DataError(f"training row lacks {key!r}; got keys {sorted(example)}")
    x = np.asarray(example[key], dtype=np.int64)
    if x.ndim != 1 or len(x) == 0 or (length is not None and len(x) != length):
        want = f"[{length}]" if length is not None else "a non-empty 1-d list"
        raise DataError(f"training row {key!r} must be {want}; got shape {x.shape}")
    return x


def _teacher_arrays(example: Mapping[str, Any], n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ids [P, k] int64, logprobs [P, k] float32)`` of a row, or None when it has no entries."""
    present = [k for k in TEACHER_KEYS if example.get(k) is not None]
    if not present:
        return None
    if len(present) == 1:
        raise DataError(f"training row has {present[0]!r} but not its partner; give both {' and '.join(TEACHER_KEYS)}")
    tid = np.asarray(example["teacher_ids"], dtype=np.int64)
    tlp = np.asarray(example["teacher_logprobs"], dtype=np.float32)
    if tid.size == 0:
        return None
    if tid.ndim != 2 or tlp.shape != tid.shape or tid.shape[0] > n:
        raise DataError(
            f"teacher_ids and teacher_logprobs must both be [P, k] with P <= len(input_ids) = {n}; "
            f"got {tid.shape} and {tlp.shape}"
        )
    return tid, tlp


class FusionTrainer(Trainer):
    """``Trainer`` whose loss mixes causal LM with sparse distillation on fused top-k targets.

    Logs ``clm_loss``, ``distill_loss`` (per-token means over the logging window) and ``lm_weight``
    (the CLM weight of the window's last step; 1.0 without teacher data) next to ``loss``. Use
    :class:`FusionCollator` (the default) or any collator producing the same keys.
    """

    args: FusionConfig

    def __init__(self, model: Any = None, args: FusionConfig | None = None, *,
                 teacher_groups: np.ndarray | torch.Tensor | None = None, **kwargs: Any) -> None:
        if args is None:
            args = FusionConfig()
        if not isinstance(args, FusionConfig):
            raise TypeError(f"FusionTrainer needs a FusionConfig, got {type(args).__name__}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("FusionTrainer computes its own loss; do not pass compute_loss_func")
        if args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor is not supported by FusionTrainer; set it to 0")
        if kwargs.get("data_collator") is None:
            pad = _pad_token_id(kwargs.get("processing_class"), model)
            kwargs["data_collator"] = FusionCollator(pad_token_id=pad)
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(f"FusionTrainer does not support torch.nn.DataParallel over {self.args.n_gpu} GPUs; "
                             "start one process per GPU with `accelerate launch` or `torchrun`")
        # compute_loss normalises by the token count itself (it never passes it to the model), so have
        # the Trainer count supervised tokens over each accumulated batch (and across devices) for
        # every model; the returned loss is then already scaled for gradient accumulation.
        self.model_accepts_loss_kwargs = True
        self.teacher_groups = None if teacher_groups is None else torch.as_tensor(teacher_groups, dtype=torch.long)
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_steps: set[int] = set()                              # optimizer steps in the log window
        self._lm_weight_used = 1.0

    def lm_weight(self) -> float:
        """The CLM weight ``w_s`` at the current optimizer step."""
        return lm_weight_at(self.state.global_step, self.state.max_steps, self.args.lm_loss_weight,
                            self.args.distill_schedule)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``w * CLM + (1 - w) * distill`` (or CLM alone), summed and divided by ``num_items_in_batch``."""
        if "labels" not in inputs:
            raise DataError(f"FusionTrainer needs 'labels' in each batch (use FusionCollator); got {sorted(inputs)}")
        model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        outputs = model(**model_inputs, use_cache=False)
        use_teacher = self.args.fusion != "none" and inputs.get("teacher_ids") is not None
        parts = fusion_loss(
            outputs.logits,                                               # [B, T, V]
            inputs["labels"],
            inputs.get("teacher_ids") if use_teacher else None,          # [B, T, K]
            inputs.get("teacher_logprobs") if use_teacher else None,
            kind=self.args.distill_loss,  # type: ignore[arg-type]
            temperature=self.args.distill_temperature,
            num_items=num_items_in_batch,
            shifted_labels=inputs.get("shift_labels"),
            mass=self.args.teacher_mass,  # type: ignore[arg-type]
            teacher_groups=self.teacher_groups if use_teacher else None,
            beta=self.args.divergence_beta,
            alpha=self.args.skew_alpha,
        )
        w = self.lm_weight() if parts.distill is not None else 1.0
        loss = parts.clm if parts.distill is None else w * parts.clm + (1.0 - w) * parts.distill

        if num_items_in_batch is None:
            # Per-batch mean: the Trainer divides it by the accumulation steps (so do the logged parts).
            log_scale = 1.0 / max(getattr(self, "current_gradient_accumulation_steps", 1), 1)
        else:
            # As Trainer.compute_loss: the count is summed over devices, so undo DDP's gradient mean.
            log_scale = 1.0
            if self.args.average_tokens_across_devices:
                log_scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * log_scale
        if model.training:
            self._accumulate_parts(parts.clm, parts.distill, log_scale)
            self._lm_weight_used = w
        return (loss, outputs) if return_outputs else loss

    def _accumulate_parts(self, clm: torch.Tensor, distill: torch.Tensor | None, scale: float) -> None:
        names = ("clm_loss", "distill_loss") if self.args.fusion != "none" else ("clm_loss",)
        for name, value in zip(names, (clm, distill), strict=False):
            value = torch.zeros_like(clm) if value is None else value
            total = self._part_sums.get(name)
            contribution = value.detach() * scale
            self._part_sums[name] = contribution if total is None else total + contribution
        self._part_steps.add(self.state.global_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``clm_loss``, ``distill_loss`` and ``lm_weight`` to the training logs."""
        if "loss" in logs and self._part_sums:
            steps = len(self._part_steps)
            for name, total in self._part_sums.items():
                logs[name] = round(self.accelerator.gather(total.reshape(1)).mean().item() / steps, 6)
            logs["lm_weight"] = self._lm_weight_used                         # of the window's last step
            self._part_sums, self._part_steps = {}, set()
        super().log(logs, start_time)


def _pad_token_id(processing_class: Any, model: Any) -> int:
    """Padding id: the tokenizer's pad, else its EOS, else the model config's pad, else 0 (always masked)."""
    for owner, names in ((processing_class, ("pad_token_id", "eos_token_id")),
                         (getattr(model, "config", None), ("pad_token_id", "eos_token_id"))):
        for name in names:
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    return 0


class _Rows(torch.utils.data.Dataset):
    """A sequence of mapping rows as a map-style dataset."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.rows[i]


def train_fusion(
    model_path: str | Path,
    train_rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    config: FusionConfig,
    resume: bool = True,
    *,
    dtype: str = "float32",
    callbacks: Sequence[TrainerCallback] = (),
    keep_checkpoints: bool = False,
    teacher_groups: np.ndarray | None = None,
    description: str = "train",
) -> dict[str, Any]:
    """Train the model at ``model_path`` on ``train_rows`` and save model + tokenizer to ``out_dir``.

    Checkpoints go to ``out_dir/checkpoint-*`` (``config.output_dir`` is replaced by ``out_dir``); with
    ``resume`` the latest one is continued (``trainer.train(resume_from_checkpoint=True)``). ``dtype``
    is the dtype the weights are loaded in (mixed precision comes from ``config.bf16``/``fp16``). The
    checkpoints are deleted once training has finished and the model is saved, unless ``keep_checkpoints``.
    ``teacher_groups`` [M, V]: the fused entries are grouped (:func:`polyfuse.fuse.losses.grouped_log_probs`).
    ``description`` names the progress bar (:func:`polyfuse.trainer_bar.quiet_trainer`; none with ``disable_tqdm``).

    Returns ``{"metrics", "log_history", "global_step", "resumed_from", "out_dir"}``.
    """
    from polyfuse.models import load_model, load_tokenizer

    if len(train_rows) == 0:
        raise DataError("train_fusion got no training rows; build the fused dataset first")
    out = Path(out_dir)
    args = config
    if Path(config.output_dir or "") != out:
        args = copy.copy(config)
        args.output_dir = str(out)
    tokenizer = load_tokenizer(str(model_path))
    model = load_model(str(model_path), dtype=dtype, device="cpu").train()
    trainer = FusionTrainer(
        model=model,
        args=args,
        train_dataset=_Rows(train_rows),
        processing_class=tokenizer,
        data_collator=FusionCollator(pad_token_id=_pad_token_id(tokenizer, model)),
        callbacks=list(callbacks) or None,
        teacher_groups=teacher_groups,
    )
    quiet_trainer(trainer, description, keys=("loss", "clm_loss", "distill_loss"), progress=not args.disable_tqdm)
    checkpoint = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    result = trainer.train(resume_from_checkpoint=True if checkpoint else None)
    trainer.save_model(str(out))
    trainer.save_state()
    finished = trainer.state.global_step >= trainer.state.max_steps
    if finished and not keep_checkpoints and trainer.is_world_process_zero():  # resume points: dead weight
        for path in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(path, ignore_errors=True)
    return {
        "metrics": dict(result.metrics),
        "log_history": list(trainer.state.log_history),
        "global_step": trainer.state.global_step,
        "resumed_from": checkpoint,
        "out_dir": str(out),
    }
