r"""WRPO: Weighted-Reward Preference Optimization (Yang et al., 2024, arXiv 2412.03187) on TRL's ``DPOTrainer``.

Each example has one prompt ``x``, two chosen answers -- the best *source* answer ``y_ws`` and the target's own
best ``y_wt`` -- and one rejected answer ``y_l`` (the target's worst). With ``r(y) = log pi(y|x) - log
pi_ref(y|x)`` (the sum of the answer's token log-probs, or their mean with ``length_normalize``)::

    L = -log sigmoid(beta * [alpha * r(y_ws) + (1 - alpha) * r(y_wt) - r(y_l)])

and, with label smoothing ``eps``, ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)`` as in the
reference code. ``sft_weight = lambda > 0`` adds ``lambda * [alpha * NLL(y_ws) + (1 - alpha) * NLL(y_wt)]``, each NLL the
mean over the batch's answer tokens (:func:`chosen_nll`; RPO's term, as ``dpo.sft_weight`` adds to DPO). Without
it the margin grows mostly by pushing the rejected answer down, and on short answers that share their ending with
the chosen ones that also pushes down the end-of-turn token: the model stops stopping. ``alpha`` ramps linearly from 0 at step 0 to ``alpha_max`` at the last step
(:func:`alpha_at`; the reference code's "LinearDecay" scheduler, which in fact increases alpha).

Why a subclass of ``DPOTrainer`` works with few overrides: TRL's preference batch is ``[chosen; rejected]``
stacked along the batch, and WRPO's is ``[source; target; rejected]``. ``WRPOTrainer`` replaces

* ``_prepare_dataset`` -- tokenizes the three answers (columns ``prompt_ids``, ``source_ids``,
  ``target_ids``, ``rejected_ids``), with TRL's prompt-boundary rule (``common_prefix_length``);
* the collator (:class:`DataCollatorForWRPO`) -- three stacked blocks of ``B`` rows each;
* ``compute_ref_log_probs`` -- TRL's reference pass, re-split into three blocks: it returns ``(ref_chosen
  [B, 2], ref_rejected [B])``, so TRL's own ``_precompute_ref_logps`` stores the (source, target) pair as one
  list column ``ref_chosen_logps``;
* ``_compute_loss`` -- the WRPO loss and its metrics.

Everything else is TRL's: model and reference loading (a frozen copy, the disabled PEFT adapter, or
``precompute_ref_log_probs``), the fused LM head that never builds ``[batch, length, vocab]`` logits,
dropout disabling, DeepSpeed/FSDP preparation, logging of the metrics, checkpoints and resumption.
Not supported (they assume two blocks): ``ld_alpha``, ``use_weighting``, f-divergences other than
``reverse_kl``, vision data.

Data (``wrpo.jsonl`` from :mod:`polyfuse.implicit.build`; the SLIT-AI/WRPO layout)::

    {"prompt": [messages] | str,
     "chosen": [answer_source, answer_target],   # each {"role": "assistant", "content": ...} or a str
     "rejected": [answer_rejected]}
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length, is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from polyfuse.errors import DataError

__all__ = ["ALPHA_SCHEDULES", "DataCollatorForWRPO", "WRPOConfig", "WRPOLoss", "WRPOTrainer", "alpha_at",
           "chosen_nll", "tokenize_wrpo_row", "wrpo_loss"]

ALPHA_SCHEDULES = ("linear", "constant")
COMPLETION_KEYS = ("source_ids", "target_ids", "rejected_ids")
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


# --------------------------------------------------------------------------------------------------
# the loss


def alpha_at(step: int, total_steps: int, alpha_max: float, schedule: str = "linear") -> float:
    """The source weight at optimizer step ``step`` of ``total_steps``.

    ``linear``: ``alpha_max * min(1, step / total_steps)`` (0 at step 0, ``alpha_max`` at the end);
    ``constant``: ``alpha_max`` throughout. ``total_steps <= 0`` (unknown) gives ``alpha_max``.
    """
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha_schedule={schedule!r}: choose one of {', '.join(ALPHA_SCHEDULES)}")
    if schedule == "constant" or total_steps <= 0:
        return float(alpha_max)
    return float(alpha_max) * min(1.0, max(0, step) / total_steps)


class WRPOLoss(NamedTuple):
    """Per-example outputs of :func:`wrpo_loss` (``B`` = batch size)."""

    losses: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B, 3]: beta * r for (source, target, rejected)
    weighted_rewards: torch.Tensor  # [B]: beta * (alpha * r_source + (1 - alpha) * r_target)


def wrpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float, alpha: float,
              label_smoothing: float = 0.0, lengths: torch.Tensor | None = None) -> WRPOLoss:
    """WRPO loss from sequence log-probs.

    Args:
        policy_logps: ``[B, 3]`` summed answer log-probs under the policy, columns (source, target, rejected).
        ref_logps: ``[B, 3]`` the same under the reference model.
        beta: inverse temperature of the Bradley-Terry sigmoid.
        alpha: weight of the source answer's reward in the chosen reward.
        label_smoothing: ``eps``, the assumed probability that a preference is flipped (0: plain WRPO).
        lengths: ``[B, 3]`` answer token counts; when given, ``r`` is divided by them (length-normalised).
    """
    logratios = policy_logps - ref_logps
    if lengths is not None:
        logratios = logratios / lengths.to(logratios.dtype).clamp(min=1.0)
    weighted = alpha * logratios[:, 0] + (1.0 - alpha) * logratios[:, 1]
    margin = beta * (weighted - logratios[:, 2])
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return WRPOLoss(losses, beta * logratios.detach(), beta * weighted.detach())


def chosen_nll(per_token_logps: torch.Tensor, mask: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """``alpha * NLL(source) + (1 - alpha) * NLL(target)``, each the mean NLL over that block's answer tokens.

    Args:
        per_token_logps: ``[3B, T]`` token log-probs, blocks (source, target, rejected) of ``B`` rows each.
        mask: ``[3B, T]`` 1 on answer tokens.
    """
    logps, weights = per_token_logps.chunk(3, dim=0), mask.chunk(3, dim=0)
    nll = [-(lp * m).sum() / m.sum().clamp(min=1) for lp, m in zip(logps[:2], weights[:2], strict=True)]
    return alpha * nll[0] + (1.0 - alpha) * nll[1]


# --------------------------------------------------------------------------------------------------
# data


def _three_answers(example: Mapping[str, Any]) -> list[Any]:
    chosen, rejected = example.get("chosen"), example.get("rejected")
    where = f"WRPO row {example.get('prompt_id', '?')}"
    if not isinstance(chosen, list) or len(chosen) != 2:
        raise DataError(f"{where}: 'chosen' must be a list of 2 answers [source, target] "
                        f"(got {type(chosen).__name__} of length {len(chosen) if isinstance(chosen, list) else '-'});"
                        " build it with polyfuse.implicit.build")
    if not isinstance(rejected, list) or len(rejected) != 1:
        raise DataError(f"{where}: 'rejected' must be a list of 1 answer; build it with polyfuse.implicit.build")
    return [chosen[0], chosen[1], rejected[0]]


def tokenize_wrpo_row(example: Mapping[str, Any], processing_class: Any) -> dict[str, list[int]]:
    """Token ids of one WRPO row: ``prompt_ids`` and the three answers' ``source_ids``/``target_ids``/``rejected_ids``.

    Conversational rows go through the chat template (the prompt with the generation prompt, each answer
    rendered after the prompt); text rows are plain ``prompt + answer + eos``. The answers start where the
    prompt's ids and all three prompt+answer ids first differ (TRL's rule), so template quirks at the
    boundary never leak prompt tokens into an answer.
    """
    answers = _three_answers(example)
    prompt = example["prompt"]
    if is_conversational(example):
        def ids(messages: list, **kw: Any) -> list[int]:
            return list(processing_class.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                             **kw)["input_ids"])
        prompt_ids = ids(prompt, add_generation_prompt=True)
        full = [ids([*prompt, a if isinstance(a, dict) else {"role": "assistant", "content": a}]) for a in answers]
    else:
        eos = processing_class.eos_token or ""
        prompt_ids = list(processing_class(text=prompt)["input_ids"])
        full = [list(processing_class(text=prompt + (a if a.endswith(eos) else a + eos))["input_ids"])
                for a in answers]
    n = min(common_prefix_length(prompt_ids, f) for f in full)
    return {"prompt_ids": prompt_ids[:n], **{k: f[n:] for k, f in zip(COMPLETION_KEYS, full, strict=True)}}


@dataclass
class DataCollatorForWRPO(DataCollatorForPreference):
    """Pads WRPO rows into one batch of ``3B`` sequences: ``[prompt+source; prompt+target; prompt+rejected]``.

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` (each ``[3B, T]``, right-padded) and,
    when the rows carry precomputed reference log-probs, ``ref_chosen_logps`` ``[B, 2]`` and
    ``ref_rejected_logps`` ``[B]``. Truncation (``max_length``) is per sequence, as in TRL's collator.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.max_length is not None and self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"Unsupported truncation mode: {self.truncation_mode}")
        cut = (slice(None) if self.max_length is None else
               slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None))
        ids, masks = [], []
        for key in COMPLETION_KEYS:
            for ex in examples:
                ids.append(torch.tensor((ex["prompt_ids"] + ex[key])[cut]))
                masks.append(torch.tensor(([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))[cut]))
        out = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad([torch.ones_like(t) for t in ids], pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad(masks, pad_to_multiple_of=self.pad_to_multiple_of),
        }
        if "ref_chosen_logps" in examples[0]:
            out["ref_chosen_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
            out["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples])
        return out


# --------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class WRPOConfig(DPOConfig):
    r"""``DPOConfig`` plus the WRPO parameters. Defaults follow the WRPO release (``beta=0.01``, ``alpha_max=0.1``).

    Parameters:
        alpha_max (`float`, defaults to `0.1`): the source answer's weight at the end of training.
        alpha_schedule (`str`, defaults to `"linear"`): ``linear`` (0 to ``alpha_max`` over training) or
            ``constant``.
        length_normalize (`bool`, defaults to `False`): divide each answer's log-ratio by its token count.
        sft_weight (`float`, defaults to `0.0`): weight of the NLL of the chosen answers (:func:`chosen_nll`).

    ``loss_type`` must stay ``["wrpo"]``; ``label_smoothing`` is WRPO's ``eps``.
    """

    beta: float = field(default=0.01, metadata={"help": "Inverse temperature of the WRPO sigmoid (WRPO: 0.01)."})
    loss_type: list[str] = field(default_factory=lambda: ["wrpo"], metadata={"help": "Always ['wrpo']."})
    alpha_max: float = field(default=0.1, metadata={"help": "Source weight alpha at the end of training."})
    alpha_schedule: str = field(default="linear", metadata={"help": "'linear' ramp from 0, or 'constant'.",
                                                             "choices": list(ALPHA_SCHEDULES)})
    length_normalize: bool = field(default=False, metadata={"help": "Use mean instead of summed log-ratios."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of the chosen answers' NLL (RPO); 0: plain WRPO."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if list(self.loss_type) != ["wrpo"]:
            raise ValueError(f"WRPOConfig.loss_type={self.loss_type}: WRPOTrainer computes only ['wrpo']")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"alpha_max={self.alpha_max}: must lie in [0, 1]")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight={self.sft_weight}: must be >= 0")
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"alpha_schedule={self.alpha_schedule!r}: choose one of {', '.join(ALPHA_SCHEDULES)}")
        for name, value, default in (("ld_alpha", self.ld_alpha, None), ("use_weighting", self.use_weighting, False),
                                     ("f_divergence_type", self.f_divergence_type, "reverse_kl")):
            if value != default:
                raise ValueError(f"{name}={value!r} is not supported by WRPOTrainer; leave it at {default!r}")


class WRPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with WRPO's two chosen answers per prompt (see the module docstring).

    ``processing_class`` (a tokenizer) is required. Logged metrics: ``rewards/{source,target,rejected,
    weighted}``, ``rewards/accuracies`` (weighted > rejected), ``rewards/{source,target}_accuracies``,
    ``rewards/margins``, ``logps/{source,target,rejected}``, ``alpha`` and, with ``sft_weight``, ``nll``.
    """

    _tag_names = ["trl", "wrpo", "polyfuse"]
    _name = "WRPO"
    _paper = {
        "title": "Weighted-Reward Preference Optimization for Implicit Model Fusion",
        "id": "2412.03187",
        "citation": textwrap.dedent("""\
            @article{yang2024wrpo,
                title   = {{Weighted-Reward Preference Optimization for Implicit Model Fusion}},
                author  = {Ziyi Yang and Fanqi Wan and Longguang Zhong and Tianyuan Shi and Xiaojun Quan},
                journal = {arXiv preprint arXiv:2412.03187},
                year    = 2024,
            }"""),
    }

    def __init__(self, model: Any, ref_model: Any = None, args: WRPOConfig | None = None,
                 data_collator: Any = None, train_dataset: Dataset | IterableDataset | None = None,
                 eval_dataset: Any = None, processing_class: Any = None, **kwargs: Any) -> None:
        if args is None:
            args = WRPOConfig("wrpo-output")
        if not isinstance(args, WRPOConfig):
            raise TypeError(f"WRPOTrainer needs a WRPOConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("WRPOTrainer needs processing_class=<the policy's tokenizer>")
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if data_collator is None:
            data_collator = DataCollatorForWRPO(pad_token_id=processing_class.pad_token_id,
                                                max_length=args.max_length, truncation_mode=args.truncation_mode,
                                                pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)

    def _send_telemetry(self) -> None:
        """No usage ping: polyfuse makes no network calls at run time."""

    # -- data ----------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Dataset | IterableDataset, processing_class: Any, args: DPOConfig,
                         dataset_name: str) -> Dataset | IterableDataset:
        first = next(iter(dataset))
        if "source_ids" in first:  # already tokenized
            return dataset
        _three_answers(first)
        kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):
            kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Tokenizing {dataset_name} dataset (WRPO)"}
        dataset = dataset.map(tokenize_wrpo_row, fn_kwargs={"processing_class": processing_class}, **kwargs)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            # a prompt that fills max_length leaves no answer token to learn from
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length,
                                     **({"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}))
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", *COMPLETION_KEYS, "ref_chosen_logps", "ref_rejected_logps"]

    # -- reference log-probs ---------------------------------------------------------------------------

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of a WRPO batch: ``([B, 2] (source, target), [B] rejected)``.

        TRL's pass (no-grad, autocast, PEFT adapter switching) returns the ``[3B]`` vector cut in two halves;
        joined again it splits into the three blocks.
        """
        ref = torch.cat(super().compute_ref_log_probs(model, inputs))
        source, target, rejected = ref.chunk(3, dim=0)
        return torch.stack([source, target], dim=1), rejected

    def current_alpha(self) -> float:
        """The source weight at the current optimizer step."""
        return alpha_at(self.state.global_step, self.state.max_steps, self.args.alpha_max, self.args.alpha_schedule)

    # -- loss ----------------------------------------------------------------------------------------

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]  # [3B, T-1]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        per_token = outputs.log_probs[:, -shift_mask.size(1):]  # [3B, T-1], zero off the answers
        policy = per_token.sum(dim=1).view(3, -1).T  # [B, 3]

        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)
        ref = torch.cat([ref_chosen, ref_rejected.unsqueeze(1)], dim=1).to(policy)
        lengths = shift_mask.sum(dim=1).view(3, -1).T if self.args.length_normalize else None

        alpha = self.current_alpha()
        out = wrpo_loss(policy, ref, beta=self.beta, alpha=alpha, label_smoothing=self.label_smoothing,
                        lengths=lengths)
        loss = out.losses.mean()
        if self.args.sft_weight > 0:
            nll = chosen_nll(per_token, shift_mask, alpha=alpha)
            loss = loss + self.args.sft_weight * nll
            self._metrics[mode]["nll"].append(self.accelerator.gather_for_metrics(nll.detach()).mean().item())
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._log_wrpo_metrics(mode, out, policy.detach(), alpha)

        if return_outputs:  # compute_metrics wants logits, which the fused head never builds
            with torch.no_grad():
                outputs = model(**{k: v for k, v in model_kwargs.items() if k != "output_router_logits"})
            return loss, outputs
        return loss

    def _log_wrpo_metrics(self, mode: str, out: WRPOLoss, policy: torch.Tensor, alpha: float) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        rewards, weighted = gather(out.rewards), gather(out.weighted_rewards)
        for i, name in enumerate(("source", "target", "rejected")):
            metrics[f"rewards/{name}"].append(rewards[:, i].mean().item())
            metrics[f"logps/{name}"].append(gather(policy[:, i]).mean().item())
        metrics["rewards/weighted"].append(weighted.mean().item())
        metrics["rewards/accuracies"].append((weighted > rewards[:, 2]).float().mean().item())
        metrics["rewards/source_accuracies"].append((rewards[:, 0] > rewards[:, 2]).float().mean().item())
        metrics["rewards/target_accuracies"].append((rewards[:, 1] > rewards[:, 2]).float().mean().item())
        metrics["rewards/margins"].append((weighted - rewards[:, 2]).mean().item())
        metrics["alpha"].append(alpha)

