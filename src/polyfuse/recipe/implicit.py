"""The implicit-fusion recipe (``mode: implicit``, FuseChat-3.0 / WRPO) as pydantic models.

Same conventions as :mod:`polyfuse.recipe.explicit` (strict types, unknown keys are errors, help text on every field,
one-line errors naming the file and dotted key). A recipe::

    mode: implicit
    workdir: runs/implicit
    world: runs/world
    target: {name: target, model: "world:chat-target"}
    sources:
      - {name: math, model: "world:chat-math", sample: {temperature: 0.7}}   # per-source sampling
    prompts: {path: "world:tasks", eval: "world:tasks"}
    sample: {n: 4, temperature: 1.0, max_new_tokens: 256}
    score: {reward_model: null}        # null: the verifiers' verdict is the reward (1 right, 0 wrong)
    build: {split: [4, 6]}
    sft: {learning_rate: 5.0e-6}
    dpo: {loss: sigmoid_norm, beta: 10}
    wrpo: {alpha_max: 0.1, beta: 0.01}

Stages, in order: ``sample``, ``score``, ``build``, ``sft``, ``dpo``, ``wrpo``, ``accuracy``
(:mod:`polyfuse.stages.implicit`).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from polyfuse.generate import BACKENDS as GENERATION_BACKENDS
from polyfuse.recipe.base import ModelSpec, RecipeBase, Section, TargetSpec

__all__ = ["AccuracySection", "BuildSection", "CurvesSection", "DPOSection", "ImplicitModelSpec", "ImplicitRecipe",
           "ImplicitTargetSpec", "PromptsSection", "SampleSection", "SamplingOverrides", "ScoreSection",
           "SFTSection", "TrainingSection", "WRPOSection"]

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda|cuda:\d+)$"
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class SamplingOverrides(Section):
    """One model's sampling parameters where they differ from the sample section."""

    n: int | None = Field(None, ge=1, description="responses per prompt (null: sample.n)")
    temperature: float | None = Field(None, ge=0, description="sampling temperature, 0 is greedy (null: sample.temperature)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (null: sample.top_p)")
    repetition_penalty: float | None = Field(None, gt=0, description="repetition penalty (null: sample.repetition_penalty)")
    max_new_tokens: int | None = Field(None, ge=1, description="longest response in tokens (null: sample.max_new_tokens)")


class ImplicitModelSpec(ModelSpec):
    """A source: a model plus its own sampling parameters and chat template."""

    sample: SamplingOverrides = Field(default_factory=SamplingOverrides,
                                      description="this model's sampling parameters where they differ from sample")
    chat_template: str | None = Field(
        None, min_length=1,
        description="Jinja chat template or a .jinja file for a tokenizer without one (null: polyfuse's default)")


class ImplicitTargetSpec(TargetSpec):
    """The target: trained by sft then dpo or wrpo; it also samples (its own responses feed WRPO)."""

    sample: SamplingOverrides = Field(default_factory=SamplingOverrides,
                                      description="the target's sampling parameters where they differ from sample")
    chat_template: str | None = Field(
        None, min_length=1,
        description="Jinja chat template or a .jinja file for a tokenizer without one (null: polyfuse's default)")


class PromptsSection(Section):
    """Where the prompts come from."""

    path: str = Field("world:tasks", min_length=1,
                      description="JSONL of {prompt_id, prompt, answer or tests} rows, or world:tasks for the tiny world")
    eval: str | None = Field("world:tasks", min_length=1,
                             description="held-out prompts with answers for the accuracy stage "
                                         "(world:tasks is its heldout.jsonl, null: no accuracy stage)")
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts (null: all)")
    max_eval_prompts: int | None = Field(None, ge=1, description="use only the first N held-out prompts (null: all)")


class SampleSection(Section):
    """Sampling N responses per prompt from every source (and the target)."""

    backend: Literal[tuple(GENERATION_BACKENDS)] = Field(  # polyfuse.generate's backends
        "hf", description="hf (batched generate) or vllm (optional extra, GPU)")
    n: int = Field(4, ge=1, description="responses per prompt and model")
    temperature: float = Field(1.0, ge=0, description="sampling temperature, 0 is greedy (then n must be 1)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    repetition_penalty: float = Field(1.0, gt=0, description="repetition penalty (1 is none)")
    max_new_tokens: int = Field(256, ge=1, description="longest response in tokens")
    batch_size: int = Field(16, ge=1, description="prompts per generate call (the unit of resume)")
    workers: int = Field(1, ge=1, description="processes that sample batches at once with one torch thread each "
                         "(hf backend), the same records for any number, so changing it keeps the stage current")
    include_target: bool = Field(True, description="the target samples too (its responses are WRPO's target answers)")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, mps, cuda or cuda:N")
    dtype: Dtype = Field("auto", description="model dtype (auto: bfloat16 on CUDA that supports it, else float32)")


class ScoreSection(Section):
    """Rewards and correctness of every sampled response."""

    reward_model: str | None = Field(
        None, min_length=1,
        description="sequence-classification checkpoint (path or hub id), null: the verifiers' verdict is the "
                    "reward, 1 right and 0 wrong")
    label: int | str | None = Field(None, description="label index or name that means good, for a multi-label reward model")
    batch_size: int = Field(8, ge=1, description="responses per reward-model forward pass")
    max_length: int | None = Field(None, ge=2, description="reward-model input length cap in tokens (null: the model's)")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, mps, cuda or cuda:N")
    dtype: Dtype = Field("auto", description="reward-model dtype")
    workers: int | None = Field(None, ge=1, description="sandboxed code tests run at once (null: up to 8)")


class BuildSection(Section):
    """SFT, DPO and WRPO data by the FuseChat-3.0 rules."""

    split: list[int] = Field([4, 6], min_length=2, max_length=2, description="SFT to preference ratio of prompts")
    reward_windows: dict[Literal["math", "code", "other"], list[float] | None] = Field(
        default_factory=lambda: {"other": [0.01, 0.1], "math": [0.01, 0.1], "code": None},
        description="per category the inclusive window of chosen minus rejected reward a DPO pair needs (null: none)")
    pairs_per_prompt: Literal["best", "all"] = Field(
        "best", description="best (one same-source pair per prompt, as published) or all (one per source)")

    @field_validator("split")
    @classmethod
    def _positive_split(cls, value: list[int]) -> list[int]:
        if min(value) < 0 or sum(value) == 0:
            raise ValueError(f"split {value} needs two non-negative parts with a positive sum, e.g. [4, 6]")
        return value

    @field_validator("reward_windows")
    @classmethod
    def _windows(cls, value: dict[str, list[float] | None]) -> dict[str, list[float] | None]:
        for cat, window in value.items():
            if window is not None and (len(window) != 2 or window[0] > window[1]):
                raise ValueError(f"reward_windows.{cat} is {window}, give [low, high] with low <= high or null")
        return value


class TrainingSection(Section):
    """Settings every training stage shares (null learning_rate: the stage's published default)."""

    enabled: bool = Field(True, description="run this stage")
    learning_rate: float | None = Field(None, gt=0, description="peak learning rate (null: the published default)")
    num_train_epochs: float = Field(1.0, gt=0, description="epochs over the data (max_steps wins when set)")
    max_steps: int = Field(-1, ge=-1, description="optimizer steps, -1 for num_train_epochs")
    batch_size: int = Field(2, ge=1, description="rows per device per step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_length: int | None = Field(512, ge=8, description="longest tokenized row (null: no cap)")
    lr_scheduler_type: str = Field("cosine", min_length=1, description="transformers scheduler name")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of the steps of linear warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    logging_steps: int = Field(10, ge=1, description="steps between logged losses")
    save_steps: int = Field(100, ge=1, description="steps between checkpoints (the unit of resume)")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    bf16: bool | None = Field(None, description="bf16 mixed precision (null: on when CUDA supports it)")
    lora_r: int = Field(0, ge=0, description="LoRA rank, 0 trains every weight (needs peft when > 0)")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the matching ``polyfuse.implicit.train`` config dataclass."""
        data = self.model_dump()
        data.pop("enabled")
        data["per_device_train_batch_size"] = data.pop("batch_size")
        return data


class SFTSection(TrainingSection):
    """Supervised fine-tuning of the target on the best responses (TRL SFTTrainer)."""


class DPOSection(TrainingSection):
    """DPO of the SFT model on same-source pairs (TRL DPOTrainer)."""

    loss: Literal["sigmoid", "sigmoid_norm"] = Field(
        "sigmoid", description="sigmoid (DPO) or sigmoid_norm (length-normalised DPO as FuseChat-3.0)")
    beta: float | None = Field(None, gt=0, description="DPO beta (null: 0.01 for sigmoid, 10 for sigmoid_norm)")
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL loss on the chosen answers added to DPO "
                                                     "(RPO, 0 is plain DPO)")


class WRPOSection(TrainingSection):
    """WRPO of the SFT model: chosen = [source answer, target answer], alpha ramped from 0 to alpha_max."""

    alpha_max: float = Field(0.1, ge=0, le=1, description="final weight of the source answer in the chosen reward")
    beta: float = Field(0.01, gt=0, description="WRPO beta")
    alpha_schedule: Literal["linear", "constant"] = Field("linear", description="linear ramp from 0 or constant")
    length_normalize: bool = Field(False, description="divide each log-ratio by its answer's token count")
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL loss on the chosen answers, alpha-weighted "
                                                     "like their rewards (RPO, 0 is plain WRPO)")


class AccuracySection(Section):
    """Held-out accuracy of every row (greedy answers checked by the verifiers)."""

    batch_size: int = Field(32, ge=1, description="prompts per generate call")
    max_new_tokens: int = Field(256, ge=1, description="longest answer in tokens")
    include_sources: bool = Field(True, description="also evaluate the sources (rows named after them)")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, mps, cuda or cuda:N")
    dtype: Dtype = Field("auto", description="model dtype")


class CurvesSection(Section):
    """Per-task learning curves: held-out accuracy during sft, dpo and wrpo (``<stage>/curve.json``)."""

    points: int = Field(4, ge=0, description="evaluations after step 0, evenly spaced to the last step (0: none)")
    per_task: int | None = Field(50, ge=1, description="held-out prompts per task at each point (null: all)")


class ImplicitRecipe(RecipeBase):
    """An implicit-fusion recipe: sample, score, build, sft, dpo and wrpo, then held-out accuracy."""

    mode: Literal["implicit"] = Field("implicit", description="implicit (FuseChat-3.0 / WRPO)")
    workdir: str = Field("runs/implicit", min_length=1, description="directory where stage artifact directories are written")
    target: ImplicitTargetSpec = Field(description="the model trained on the fused data, e.g. {model: world:chat-target}")
    sources: list[ImplicitModelSpec] = Field(min_length=1, description="models sampled from, each {name: ..., model: ...}")
    prompts: PromptsSection = Field(default_factory=PromptsSection, description="prompt and held-out files")
    sample: SampleSection = Field(default_factory=SampleSection, description="sampling")
    score: ScoreSection = Field(default_factory=ScoreSection, description="reward model and verifiers")
    build: BuildSection = Field(default_factory=BuildSection, description="data construction rules")
    sft: SFTSection = Field(default_factory=SFTSection, description="supervised fine-tuning")
    dpo: DPOSection = Field(default_factory=DPOSection, description="DPO or length-normalised DPO")
    wrpo: WRPOSection = Field(default_factory=WRPOSection, description="weighted-reward preference optimisation")
    accuracy: AccuracySection = Field(default_factory=AccuracySection, description="held-out accuracy")
    curves: CurvesSection = Field(default_factory=CurvesSection, description="per-task learning curves")

    def to_yaml(self, exclude_defaults: bool = True) -> str:
        """The recipe as YAML; with ``exclude_defaults`` only what differs from the defaults is written."""
        data = self.model_dump(mode="json", exclude_defaults=exclude_defaults)
        if exclude_defaults:
            data = {"mode": "implicit", **data}
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
