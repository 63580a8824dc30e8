"""The explicit-fusion recipe (modes ``fusellm``, ``fusechat`` and ``online``): one section per stage.

Adding a stage section is one line on :class:`Recipe` (plus the section's own model)::

    class CaptureSection(Section):
        top_k: int = Field(10, ge=1, description="teacher log-probs kept per position")

    class Recipe(RecipeBase):
        ...
        capture: CaptureSection = Field(default_factory=CaptureSection, description="teacher capture")
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from polyfuse.capture import BACKENDS as CAPTURE_BACKENDS
from polyfuse.fuse.losses import DISTILL_KINDS
from polyfuse.fuse.strategies import STRATEGIES
from polyfuse.merge.methods import METHODS
from polyfuse.recipe.base import RecipeBase, Section

__all__ = ["AlignSection", "BlocksSection", "CaptureSection", "CorpusSection", "DataSection", "EvalSection",
           "FuseSection", "MergeSection", "OnlineSection", "PairsSection", "Recipe", "TrainSection", "VocabSection"]


class DataSection(Section):
    """Where held-out evaluation text comes from."""

    eval: str = Field(
        "world:corpus",
        min_length=1,
        description="directory holding <split>/<domain>.jsonl files, or world:corpus for the tiny world",
        examples=["world:corpus"],
    )
    split: str = Field(
        "heldout", min_length=1, description="split subdirectory to read", examples=["heldout"]
    )
    domains: list[str] | None = Field(
        None, min_length=1, description="domains to keep (null: every domain found in the split)"
    )

    @field_validator("domains")
    @classmethod
    def _unique_domains(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            dupes = sorted({d for d in value if value.count(d) > 1})
            if dupes:
                raise ValueError(f"domain {', '.join(map(repr, dupes))} listed twice, list each domain once")
        return value


class EvalSection(Section):
    """Bits-per-byte evaluation settings."""

    batch_size: int = Field(8, ge=1, description="windows per forward pass", examples=[8])
    max_length: int = Field(512, ge=2, description="window length in tokens", examples=[512])
    stride: int | None = Field(
        None,
        ge=1,
        description="tokens between window starts, at most max_length (null: max_length, no overlap)",
        examples=[256],
    )
    max_bytes_per_domain: int | None = Field(
        None,
        ge=1,
        description="cap on held-out UTF-8 bytes read per domain (null: no cap)",
        examples=[1_000_000],
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model dtype (auto: the checkpoint's dtype)", examples=["auto"]
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda|cuda:\d+)$",
        description="auto, cpu, mps, cuda or cuda:N",
        examples=["auto"],
    )

    @field_validator("stride")
    @classmethod
    def _stride_fits_window(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_length = info.data.get("max_length")
        if value is not None and max_length is not None and value > max_length:
            raise ValueError(
                f"stride {value} is larger than max_length {max_length} so tokens would be skipped, "
                f"set stride <= {max_length} or null"
            )
        return value

    @property
    def effective_stride(self) -> int:
        """The stride actually used: `stride`, or `max_length` when null."""
        return self.stride if self.stride is not None else self.max_length


class CorpusSection(Section):
    """The text fusion trains on (FuseLLM's continual-training corpus, FuseChat's conversations).

    Rows are text (``{"id", "text"}``) or chat: ``{"id", "messages": [{"role", "content"}, ...]}`` or
    ShareGPT ``{"id", "conversations": [{"from", "value"}, ...]}``. ``format: auto`` (default) reads
    each row by its keys (``text`` wins when a row has both); ``text`` or ``chat`` insist on one kind.
    Chat rows are rendered with the target tokenizer's chat template (polyfuse's default when it has
    none), the same text for every model, and only the assistant responses count: the sequence
    metric of capture and both training losses cover the positions that predict a response token
    (see polyfuse.corpus.documents and polyfuse.corpus.spans).
    """

    path: str = Field("world:corpus", min_length=1,
                      description="directory holding <split>/<domain>.jsonl files, or world:corpus")
    format: Literal["auto", "text", "chat"] = Field(
        "auto", description="auto (each row by its keys), text ({id, text} rows) or chat (messages / "
        "conversations rows, rendered with the target's chat template, responses-only metric and loss)")
    split: str = Field("train", min_length=1, description="split subdirectory to read")
    domains: list[str] | None = Field(None, min_length=1, description="domains to keep (null: all)")
    max_bytes_per_domain: int | None = Field(
        None, ge=1, description="cap on UTF-8 bytes read per domain (null: no cap)", examples=[300_000])


class BlocksSection(Section):
    """Splitting documents into blocks that fit every tokenizer."""

    max_tokens: int = Field(512, ge=16, description="tokens per block under every tokenizer, context token included")


class CaptureSection(Section):
    """Teacher forward passes that keep each position's top-k next-token log-probs."""

    backend: Literal[tuple(CAPTURE_BACKENDS)] = Field(  # the capture registry's names
        "hf", description="hf (default) or vllm (optional extra)")
    top_k: int = Field(10, ge=1, le=256, description="teacher log-probs kept per position", examples=[10])
    samples: int = Field(
        0, ge=0, le=1024, description="draws from the rest of each teacher distribution, stored after the "
        "top-k as an unbiased sampled tail (hf backend, 0: top-k only)", examples=[22])
    prefix_bytes: int = Field(
        0, ge=0, le=64, description="sources, hf backend: store the exact probability that the next token "
        "extends each of the first N byte prefixes of the actual one, so positions inside a source token are "
        "conditioned on the whole distribution, not on the stored entries (0: off, 16 covers most tokens)",
        examples=[16])
    batch_size: int = Field(8, ge=1, description="blocks per forward pass")
    shard_size: int = Field(256, ge=1, description="blocks per store shard (the unit of resume)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="model dtype")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda|cuda:\d+)$", description="auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _samples_need_hf(self) -> CaptureSection:
        if self.backend == "vllm" and self.samples:
            raise ValueError("capture.samples needs the hf backend (vLLM returns only top-k prompt log-probs), "
                             "set capture.samples=0 or capture.backend=hf")
        return self


class VocabSection(Section):
    """Source-vocabulary → target-vocabulary maps."""

    method: Literal["exact", "mined", "prefix", "groups", "stats"] = Field(
        "groups", description="exact (normalised string match), mined (exact, else minimum edit distance, "
        "FuseLLM), prefix (exact, else the longest target piece the token's text starts with), groups (a "
        "source token's mass goes to the target tokens it begins, the student matches their summed "
        "probability) or stats (co-alignment statistics, FuseChat)")
    stats_fallback: Literal["exact", "mined"] = Field(
        "mined", description="stats only: the map used for source ids never co-aligned on the corpus")
    stats_min_count: int = Field(
        1, ge=1, description="stats only: co-alignments a source id needs before its statistics are used")


class AlignSection(Section):
    """Token alignment of each source's tokenization to the target's.

    The defaults suit ``vocab.method`` groups; with any other map (or another ``method``) a recipe that
    leaves them out gets ``offsets`` without ``inside`` and ``cuts`` (FuseLLM's reference behaviour).
    """

    method: Literal["offsets", "dtw", "starts"] = Field(
        "starts", description="offsets (one-to-one tokens with identical character spans), dtw (FuseLLM's "
        "dynamic programming) or starts (next tokens that start at the same character, for vocab.method "
        "groups, whose projection handles tokens of different lengths), by default starts with vocab.method "
        "groups, offsets otherwise")
    inside: bool = Field(
        True, description="also teach target positions whose next token starts inside a source token: the "
        "source's prediction before that token, conditioned on the bytes the target has already emitted, each "
        "candidate's remaining bytes mapped to the target piece they begin (default: on with starts only)")
    cuts: bool = Field(
        True, description="keep only the source continuations after which the target's tokenizer still ends its "
        "previous token where it did (a target that emitted a newline and three spaces as one token knows no "
        "fourth space follows), renormalised (default: on with starts only)")
    workers: int = Field(
        1, ge=1, description="processes that project shards at once, one core each (the alignment is Python): "
        "the stores are the same bytes for any number, so changing it keeps the stage current")


class FuseSection(Section):
    """Fusion of the target's and the aligned sources' distributions."""

    strategy: Literal[tuple(STRATEGIES)] = Field(  # the fusion strategies' registry
        "min_ce", description="min_ce (lowest cross-entropy teacher), avg_ce (weighted average) or none")
    level: Literal["token", "sequence"] = Field("token", description="choose or weigh teachers per token or per block")
    criterion: Literal["token", "span"] = Field(
        "span", description="token level: what a source is scored by at each target position: span (its NLL "
        "of the text of the target's next token, its token NLLs spread evenly over their characters: the "
        "same text for every teacher, the default, measured better on two seeds) or token (its NLL of its "
        "own next token, FuseLLM)")
    include_target: bool = Field(True, description="the target's own distribution is one of the teachers (FuseLLM)")
    fallback: Literal["target", "label", "none"] = Field(
        "target", description="what positions no source reaches learn from: target (the target's own "
        "distribution, which keeps them where they were), label (a one-hot on the next token, FuseLLM's "
        "fallback) or none (nothing, only without include_target: the student then drifts toward the "
        "tokens the sources align with)")
    top_k: int | None = Field(None, ge=1, description="entries kept per position in the fused distribution "
                              "(null: as many as a teacher store holds, which keeps a sampled tail whole)")


class TrainSection(Section):
    """Continual training of the target: w·CLM + (1−w)·distill, on the Hugging Face Trainer."""

    lm_loss_weight: float = Field(0.9, ge=0, le=1, description="w: weight of the causal-LM loss")
    distill_loss: Literal[tuple(DISTILL_KINDS)] = Field(  # the losses module's kinds
        "ce", description="distillation loss against the fused targets: ce, forward_kl (alias kl), reverse_kl, "
        "jsd (generalised, divergence_beta), tv (total variation), skew_forward_kl or skew_reverse_kl (skew_alpha)")
    divergence_beta: float = Field(
        0.5, ge=0, le=1, description="jsd only: beta in beta·KL(p‖m) + (1−beta)·KL(q‖m), m = beta·p + (1−beta)·q "
        "(teacher p, student q), 0 is forward KL and 1 reverse KL as in TRL's GKD")
    skew_alpha: float = Field(
        0.1, ge=0, le=1, description="skew KLs only (DistiLLM): KL(p‖alpha·p + (1−alpha)·q) or "
        "KL(q‖(1−alpha)·p + alpha·q), 0 is the plain KL")
    temperature: float = Field(1.0, gt=0, description="temperature applied to teacher and student log-probs")
    teacher_mass: Literal["tail", "renormalise"] = Field(
        "tail", description="tail (top-k probabilities as captured plus one bucket for the rest) or "
        "renormalise (softmax over the top-k as FuseLLM)")
    schedule: Literal["hard", "hard_and_decay"] = Field(
        "hard", description="hard (fixed w) or hard_and_decay (w grows linearly to 1 over training)")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="blocks per device per step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="fraction of steps of linear warm-up")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    lr_scheduler_type: str = Field("cosine", min_length=1, description="Hugging Face scheduler name, e.g. cosine, "
                                   "linear or constant_with_warmup")
    logging_steps: int | None = Field(None, ge=1, description="steps between logged losses (null: max_steps / 20)")
    save_steps: int | None = Field(None, ge=1, description="steps between resumable checkpoints (null: max_steps / 4)")
    baseline: bool = Field(True, description="also train target+clm: plain CLM on identical data, steps and seed")
    baseline_learning_rate: float | None = Field(
        None, gt=0, description="peak learning rate of target+clm (null: learning_rate), so each run can use the "
                                "rate that suits it and fusion is compared with the best plain CLM")
    bf16: bool | None = Field(None, description="bf16 mixed precision (null: on when CUDA supports it)")

    @model_validator(mode="after")
    def _tail_needs_temperature_one(self) -> TrainSection:
        if self.teacher_mass == "tail" and self.temperature != 1.0:
            raise ValueError(f"teacher_mass tail needs temperature 1.0 (got {self.temperature}), "
                             "set train.teacher_mass=renormalise to train at another temperature")
        return self


class PairsSection(Section):
    """FuseChat's pairwise fusion (mode fusechat): one target trained per source, with that source and the
    target as teachers, on the ``train`` settings. Dividing ``train.max_steps`` or ``train.batch_size`` by
    the number of sources gives the pairs together the compute of one FuseLLM training."""

    max_steps: int | None = Field(None, ge=1, description="optimizer steps of each pairwise target (null: train.max_steps)")
    batch_size: int | None = Field(None, ge=1, description="blocks per device per step of each pairwise target "
                                   "(null: train.batch_size)")


class MergeSection(Section):
    """FuseChat's last step: merging the pairwise targets in parameter space (mode fusechat)."""

    method: Literal[tuple(METHODS)] = Field(  # the merge methods' registry
        "sce", description="merge method (mergekit names), sce as FuseChat-2.0 or varm as FuseChat-1.0")
    parameters: dict[str, float | str | bool] = Field(
        default_factory=lambda: {"select_topk": 1.0, "sce_variant": "fusechat"},
        description="method parameters as in a mergekit config, e.g. select_topk or sce_variant")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the merged model")


class OnlineSection(Section):
    """On-policy fusion (mode online): in each round the target continues the starts of the corpus blocks, the
    sources and the target score that text, and the target trains on it (train.max_steps split over the rounds)."""

    rounds: int = Field(4, ge=1, description="rounds of sample, capture, fuse and train")
    prompt_chars: int = Field(128, ge=1, description="characters of each corpus block the target continues "
                                                      "(cut back to a space)")
    max_new_tokens: int = Field(192, ge=1, description="tokens the target writes after each prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the target")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    on_policy_share: float = Field(
        1.0, ge=0, le=1, description="share of each round's blocks the target continues, the others staying corpus "
                                     "text (GKD's lambda: 1 is fully on-policy, 0 is offline fusion in rounds)")


class Recipe(RecipeBase):
    """A whole recipe: models, data and one section per stage."""

    mode: Literal["fusellm", "fusechat", "online"] = Field(
        "fusellm", description="fusellm (fuse all sources at once), fusechat (pairwise targets then a merge) or "
                               "online (the target writes the text the sources score, in rounds)")

    data: DataSection = Field(default_factory=DataSection, description="held-out evaluation data")
    eval: EvalSection = Field(default_factory=EvalSection, description="bits-per-byte evaluation settings")
    corpus: CorpusSection = Field(default_factory=CorpusSection, description="the text fusion trains on")
    blocks: BlocksSection = Field(default_factory=BlocksSection, description="block splitting")
    capture: CaptureSection = Field(default_factory=CaptureSection, description="teacher top-k capture")
    vocab: VocabSection = Field(default_factory=VocabSection, description="vocabulary mapping")
    align: AlignSection = Field(default_factory=AlignSection, description="token alignment")
    fuse: FuseSection = Field(default_factory=FuseSection, description="distribution fusion")
    train: TrainSection = Field(default_factory=TrainSection, description="continual training")
    pairs: PairsSection = Field(default_factory=PairsSection, description="FuseChat's pairwise targets")
    merge: MergeSection = Field(default_factory=MergeSection, description="merging of the pairwise targets")
    online: OnlineSection = Field(default_factory=OnlineSection, description="on-policy fusion (mode online)")

    @model_validator(mode="before")
    @classmethod
    def _align_defaults_follow_the_map(cls, data: Any) -> Any:
        """Without ``vocab.method`` groups (or with an ``align.method`` other than starts), the align keys a
        recipe leaves out are FuseLLM's: offsets, nothing inside source tokens, no cut filter."""
        if not isinstance(data, dict):
            return data
        vocab, align = data.get("vocab"), data.get("align")
        vocab_method = vocab.get("method", "groups") if isinstance(vocab, dict) else "groups"
        if align is not None and not isinstance(align, dict):
            return data
        align = dict(align or {})
        if vocab_method != "groups":
            align.setdefault("method", "offsets")
        if align.get("method", "starts") != "starts":
            align.setdefault("inside", False)
            align.setdefault("cuts", False)
        if align:
            data = {**data, "align": align}
        return data

    @model_validator(mode="after")
    def _sampled_tail_needs_temperature_one(self) -> Recipe:
        if self.capture.samples and self.train.temperature != 1.0:
            raise ValueError(f"capture.samples stores draws weighted for temperature 1, so train.temperature must be "
                             f"1.0 (got {self.train.temperature}); set capture.samples=0 to train at another temperature")
        if self.align.method == "starts" and self.vocab.method != "groups":
            raise ValueError(f"align.method starts pairs next tokens of different lengths, which only vocab.method "
                             f"groups projects correctly (got {self.vocab.method!r}); set vocab.method=groups")
        return self


