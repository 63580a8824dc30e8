"""Recipe YAML as pydantic models: sections, model references, `key=value` overrides, one-line errors.

A recipe is validated without touching any model or data file: existence is checked by the stages
that load things. Every model forbids unknown keys and every field carries help text, so a typo is an
error that names the file, the dotted key and the fix, never a silent fallback to a default.

Adding a stage section is one line on `Recipe` (plus the section's own model)::

    class CaptureSection(Section):
        top_k: int = Field(10, ge=1, description="teacher log-probs kept per position")

    class Recipe(Section):
        ...
        capture: CaptureSection = Field(default_factory=CaptureSection, description="teacher capture")
"""

from __future__ import annotations

import copy
import difflib
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from polyfuse.errors import RecipeError

if TYPE_CHECKING:
    from polyfuse.implicit.recipe import ImplicitRecipe

__all__ = [
    "AlignSection",
    "BlocksSection",
    "CaptureSection",
    "CorpusSection",
    "DataSection",
    "FuseSection",
    "TrainSection",
    "VocabSection",
    "EvalSection",
    "ModelRef",
    "ModelSpec",
    "Recipe",
    "RecipeBase",
    "Section",
    "TargetSpec",
    "apply_overrides",
    "format_validation_error",
    "load_recipe",
    "parse_recipe",
]

NAME_PATTERN = r"^[A-Za-z0-9_.+-]+$"
WORLD_PREFIX = "world:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_ID_AT_REV = re.compile(r"^(?P<model>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<revision>[^\s@]+)$")


# --------------------------------------------------------------------------------------------------
# model references


@dataclass(frozen=True)
class ModelRef:
    """A model reference: a local path, a hub id (`org/name`, short form `org/name@rev`) or `world:NAME`.

    `str(ref)` gives the short form back, so `ModelRef.parse(str(ref)) == ref`. Nothing is resolved
    here: a hub-shaped string such as `runs/model` may still be a local directory, which the loader
    decides by looking at the filesystem first.
    """

    model: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None) -> ModelRef:
        """Parse `org/name@rev` into (`org/name`, `rev`); other strings are kept whole."""
        match = _HUB_ID_AT_REV.match(text)
        if match is None:
            return cls(text, revision)
        if revision is not None and revision != match["revision"]:
            raise ValueError(
                f"model {text!r} pins revision {match['revision']!r} but revision is {revision!r}, "
                "give the revision in one place"
            )
        return cls(match["model"], match["revision"])

    @property
    def kind(self) -> Literal["world", "hub", "path"]:
        """`world` for `world:NAME`, `hub` for hub-shaped ids (`org/name`, `name`), else `path`."""
        if self.model.startswith(WORLD_PREFIX):
            return "world"
        if _HUB_ID.match(self.model) or re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.model):
            return "hub"
        return "path"

    @property
    def world_name(self) -> str | None:
        """NAME for a `world:NAME` reference, else None."""
        return self.model[len(WORLD_PREFIX) :] if self.kind == "world" else None

    def __str__(self) -> str:
        return self.model if self.revision is None else f"{self.model}@{self.revision}"


# --------------------------------------------------------------------------------------------------
# sections


class Section(BaseModel):
    """Base of every recipe model: unknown keys are errors and values are not coerced ('8' is not 8)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSpec(Section):
    """One model of the recipe: the target or a source."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="short unique name used for artifact directories (letters, digits, _ . + -)",
        examples=["prose"],
    )
    model: str = Field(
        min_length=1,
        description="local path, hub id org/name (or org/name@rev) or world:NAME from the tiny world",
        examples=["world:prose"],
    )
    tokenizer: str | None = Field(
        None,
        min_length=1,
        description="tokenizer path or hub id when it differs from model (null: same as model)",
    )
    revision: str | None = Field(
        None, min_length=1, description="hub revision (branch, tag or commit), also settable as model@rev"
    )

    @model_validator(mode="before")
    @classmethod
    def _split_revision(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            revision = data.get("revision")
            ref = ModelRef.parse(data["model"], revision if isinstance(revision, str) else None)
            if ref.revision is not None:
                data = {**data, "model": ref.model, "revision": ref.revision}
        return data

    @field_validator("model")
    @classmethod
    def _check_world_name(cls, value: str) -> str:
        if value.startswith(WORLD_PREFIX) and not re.match(NAME_PATTERN, value[len(WORLD_PREFIX) :]):
            raise ValueError(f"{value!r} needs a model name after 'world:', e.g. world:target")
        return value

    @model_validator(mode="after")
    def _check_revision_applies(self) -> ModelSpec:
        if self.revision is not None and self.ref.kind != "hub":
            raise ValueError(
                f"revision {self.revision!r} only applies to hub ids, but model {self.model!r} is a "
                f"{self.ref.kind} reference, remove revision"
            )
        return self

    @property
    def ref(self) -> ModelRef:
        """The model reference as a value object (`str()` gives `org/name@rev`)."""
        return ModelRef(self.model, self.revision)


class TargetSpec(ModelSpec):
    """The target model: like a source, but its name defaults to `target`."""

    name: str = Field(
        "target",
        pattern=NAME_PATTERN,
        description="short name used for artifact directories (letters, digits, _ . + -)",
    )


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

    backend: Literal["hf", "vllm"] = Field("hf", description="hf (default) or vllm (optional extra)")
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


class FuseSection(Section):
    """Fusion of the target's and the aligned sources' distributions."""

    strategy: Literal["min_ce", "avg_ce", "none"] = Field(
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
    distill_loss: Literal["ce", "kl"] = Field("ce", description="distillation loss against the fused targets")
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
    baseline: bool = Field(True, description="also train target+clm: plain CLM on identical data, steps and seed")
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

    method: Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "sce", "varm"] = Field(
        "sce", description="merge method (mergekit names), sce as FuseChat-2.0 or varm as FuseChat-1.0")
    parameters: dict[str, float | str | bool] = Field(
        default_factory=lambda: {"select_topk": 1.0, "sce_variant": "fusechat"},
        description="method parameters as in a mergekit config, e.g. select_topk or sce_variant")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the merged model")


class RecipeBase(Section):
    """What every recipe kind shares: where it writes, where world: references resolve, the seed, the
    target and the sources (unique names), and the helpers manifests use. :class:`Recipe` is explicit
    fusion and FuseChat; :class:`polyfuse.implicit.recipe.ImplicitRecipe` is implicit fusion."""

    mode: str = Field("fusellm", description="the recipe kind (each subclass narrows it)")
    workdir: str = Field(
        "runs/recipe", min_length=1, description="directory where stage artifact directories are written"
    )
    world: str = Field(
        "runs/world", min_length=1, description="directory where world:NAME references resolve"
    )
    seed: int = Field(0, ge=0, description="random seed for every stage", examples=[0])
    target: TargetSpec = Field(description="the model knowledge is fused into, e.g. {model: world:target}")
    sources: list[ModelSpec] = Field(
        min_length=1, description="source models to fuse from, each {name: ..., model: ...}"
    )

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, value: list[ModelSpec]) -> list[ModelSpec]:
        seen: dict[str, int] = {}
        for i, spec in enumerate(value):
            if spec.name in seen:
                raise ValueError(
                    f"duplicate source name {spec.name!r} (sources.{seen[spec.name]} and sources.{i}), "
                    "give each source a unique name"
                )
            seen[spec.name] = i
        return value

    @model_validator(mode="after")
    def _target_name_not_a_source(self) -> RecipeBase:
        if any(s.name == self.target.name for s in self.sources):
            raise ValueError(
                f"target.name {self.target.name!r} is also a source name, rename the target or the source"
            )
        return self

    def models(self) -> list[ModelSpec]:
        """The target first, then the sources in recipe order."""
        return [self.target, *self.sources]

    @classmethod
    def sections(cls) -> list[str]:
        """Names of the top-level settings sections (data, eval, ...); model entries are not sections."""
        return [
            name
            for name, field in cls.model_fields.items()
            if isinstance(field.annotation, type)
            and issubclass(field.annotation, Section)
            and not issubclass(field.annotation, ModelSpec)
        ]

    def section_dict(self, name: str) -> dict[str, Any]:
        """One top-level mapping (a section, or `target`) as a JSON-ready dict with defaults, for manifests."""
        value = getattr(self, name, None) if name in type(self).model_fields else None
        if not isinstance(value, BaseModel):
            raise KeyError(f"{name!r} is not a recipe section, sections: {', '.join(self.sections())}")
        return value.model_dump(mode="json")

    def to_yaml(self, exclude_defaults: bool = True) -> str:
        """The recipe as YAML; with `exclude_defaults` only what differs from the defaults is written."""
        data = self.model_dump(mode="json", exclude_defaults=exclude_defaults)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


class Recipe(RecipeBase):
    """A whole recipe: models, data and one section per stage."""

    mode: Literal["fusellm", "fusechat"] = Field(
        "fusellm", description="fusellm (fuse all sources at once) or fusechat (pairwise targets then a merge)")

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


# --------------------------------------------------------------------------------------------------
# YAML loading and overrides


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-5` as a float (YAML 1.2 style)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key]}), keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_override(item: str) -> tuple[str, list[str], Any, bool]:
    """Split one override into (key, parts, value, delete)."""
    text = item.strip()
    usage = "use key=value (e.g. eval.batch_size=4) or ~key to delete a key"
    if text.startswith("~"):
        key, value, delete = text[1:], None, True
    elif "=" in text and not text.startswith("-"):
        key, raw = text.split("=", 1)
        key, delete = key.strip(), False
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise RecipeError(f"override {item!r}: value is not valid YAML ({_one_line(problem)})") from None
    else:
        raise RecipeError(f"override {item!r}: not understood, {usage}")
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"override {item!r}: empty key, {usage}")
    return key, parts, value, delete


def _child(container: Any, part: str, item: str, where: str) -> tuple[Any, Any]:
    """(container, key) addressing `part` inside `container`; list parts must be indices."""
    if isinstance(container, dict):
        return container, part
    if isinstance(container, list):
        if not part.isdigit():
            raise RecipeError(
                f"override {item!r}: {where} is a list, index it with a number such as {where}.0"
            )
        index = int(part)
        if index > len(container):
            raise RecipeError(
                f"override {item!r}: {where} has {len(container)} items, use an index up to {len(container)}"
            )
        return container, index
    raise RecipeError(f"override {item!r}: {where} is {container!r}, not a mapping or list")


def _apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply overrides to a deep copy of `data`; also return {dotted key: override} for error notes."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    notes: dict[str, str] = {}
    for item in overrides:
        key, parts, value, delete = _parse_override(item)
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[:depth]) or "the recipe"
            container, k = _child(node, part, item, where)
            missing = (isinstance(container, list) and k == len(container)) or (
                isinstance(container, dict) and (k not in container or container[k] is None)
            )
            if missing:
                if delete:
                    raise RecipeError(f"override {item!r}: {key} is not in the recipe, nothing to delete")
                fresh: Any = [] if parts[depth + 1].isdigit() else {}
                if isinstance(container, list):
                    container.append(fresh)
                else:
                    container[k] = fresh
            node = container[k]
        where = ".".join(parts[:-1]) or "the recipe"
        container, k = _child(node, parts[-1], item, where)
        if delete:
            if (isinstance(container, dict) and k not in container) or (
                isinstance(container, list) and k >= len(container)
            ):
                raise RecipeError(f"override {item!r}: {key} is not in the recipe, nothing to delete")
            del container[k]
        elif isinstance(container, list) and k == len(container):
            container.append(value)
        else:
            container[k] = value
        notes[key] = item
    return out, notes


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with torchtune-style overrides applied.

    `a.b=value` sets a key (value parsed as YAML, so `eval.batch_size=4` is an int and `key=` is null),
    `sources.0.model=/x` indexes a list (index == length appends), `~a.b` deletes a key.
    """
    return _apply_overrides(data, overrides)[0]


# --------------------------------------------------------------------------------------------------
# error formatting


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _strip_none(annotation: Any) -> Any:
    if _is_union(annotation):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _walk(root: type[BaseModel], loc: Sequence[str | int]) -> tuple[list[str | int], Any, FieldInfo | None]:
    """Follow a pydantic error loc through the model classes.

    Returns the clean path (union tags dropped), the annotation reached (None past an unknown key)
    and the FieldInfo of the last field (None for list items).
    """
    path: list[str | int] = []
    annotation: Any = root
    field: FieldInfo | None = None
    for part in loc:
        current = _strip_none(annotation)
        origin = get_origin(current)
        if isinstance(part, int) and origin in (list, tuple):
            path.append(part)
            annotation, field = (get_args(current) or (Any,))[0], None
        elif isinstance(part, str) and _is_model(current):
            path.append(part)
            field = current.model_fields.get(part)
            annotation = field.annotation if field is not None else None
        elif isinstance(part, str) and origin is dict:
            path.append(part)
            annotation, field = (get_args(current) or (Any, Any))[-1], None
        elif annotation is None:
            path.append(part)
        # else: a union member tag such as 'int' or 'function-after[...]': not part of the key
    return path, annotation, field


def _plural(annotation: Any) -> str:
    annotation = _strip_none(annotation)
    if annotation is str:
        return "strings"
    if annotation is int:
        return "integers"
    if annotation is float:
        return "numbers"
    if _is_model(annotation):
        return "mappings"
    return "values"


def _constraints(metadata: Sequence[Any]) -> str:
    parts = []
    for item in metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                parts.append(f"{symbol} {getattr(item, attr)}")
    return " " + " and ".join(parts) if parts else ""


def _expected(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a value of `annotation` looks like, in words ('an integer >= 1 or null')."""
    if _is_union(annotation):
        args = get_args(annotation)
        words = " or ".join(_expected(a, metadata) for a in args if a is not type(None))
        return words + (" or null" if type(None) in args else "")
    origin = get_origin(annotation)
    min_len = next((m.min_length for m in metadata if getattr(m, "min_length", None)), None)
    pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (list, tuple):
        item = (get_args(annotation) or (Any,))[0]
        head = "a non-empty list" if min_len == 1 else "a list"
        if min_len and min_len > 1:
            head = f"a list of at least {min_len}"
        return f"{head} of {_plural(item)}"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _constraints(metadata)
    if annotation is float:
        return "a number" + _constraints(metadata)
    if annotation is str:
        if pattern:
            return f"a string matching {pattern}"
        return "a non-empty string" if min_len == 1 else "a string"
    if _is_model(annotation):
        return "a mapping with keys " + ", ".join(annotation.model_fields)
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any, limit: int = 60) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fix_hint(field: FieldInfo | None) -> str:
    if field is None:
        return ""
    example = field.examples[0] if field.examples else None
    if example is None and field.default is not None and not field.is_required():
        default = field.get_default(call_default_factory=False)
        if isinstance(default, str | int | float | bool):
            example = default
    if example is not None:
        example_text = example if isinstance(example, str) else _show(example)
        return f" (set it to e.g. {example_text}" + (")" if field.is_required() else ", or remove the key)")
    return "" if field.is_required() else " (fix the value or remove the key)"


def _describe(error: Mapping[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, problem) for one pydantic error dict."""
    kind, loc, msg = error["type"], error["loc"], _one_line(error["msg"])
    if kind == "extra_forbidden":
        path, annotation, _ = _walk(root, loc[:-1])
        key = str(loc[-1])
        dotted = ".".join(str(p) for p in (*path, key))
        allowed = list(_strip_none(annotation).model_fields) if _is_model(_strip_none(annotation)) else []
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f", did you mean {close[0]!r}?" if close else ""
        return dotted, f"unknown key{hint} (allowed keys: {', '.join(allowed)})"
    path, annotation, field = _walk(root, loc)
    dotted = ".".join(str(p) for p in path)
    if kind == "missing":
        what = f" (add it: {field.description})" if field is not None and field.description else ""
        return dotted, f"required key missing{what}"
    if kind in ("value_error", "assertion_error"):
        return dotted, re.sub(r"^(Value error|Assertion failed), ", "", msg)
    metadata = field.metadata if field is not None else ()
    expected = _expected(annotation, metadata) if annotation is not None else msg
    return dotted, f"expected {expected}, got {_show(error.get('input'))}{_fix_hint(field)}"


def format_validation_error(
    err: ValidationError,
    source: str,
    root_model: type[BaseModel],
    *,
    overridden: Mapping[str, str] | None = None,
) -> str:
    """All problems of `err` as ONE line: `source: dotted.key: problem (fix)` joined by `; `.

    `overridden` maps dotted keys to the override that set them, so a problem caused by a
    command-line override says so.
    """
    problems: list[str] = []
    for error in err.errors(include_url=False):
        dotted, problem = _describe(error, root_model)
        note = ""
        for key, item in (overridden or {}).items():
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                note = f" (from override {item!r})"
        line = f"{source}: {dotted}: {problem}{note}" if dotted else f"{source}: {problem}{note}"
        if line not in problems:
            problems.append(line)
    return "; ".join(problems)


# --------------------------------------------------------------------------------------------------
# entry points


def _validate(data: Any, source: str, notes: Mapping[str, str]) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: the recipe must be a mapping of keys ({', '.join(Recipe.model_fields)}), "
            f"got {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source, Recipe, overridden=notes)) from None


def parse_recipe(data: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str = "recipe") -> Recipe:
    """Validate an already-loaded recipe mapping (plus overrides); `source` names it in errors."""
    merged, notes = _apply_overrides(data, overrides)
    return _validate(merged, source, notes)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe | ImplicitRecipe:
    """Read a recipe YAML, apply `key=value` / `~key` overrides (they win) and validate it.

    A recipe with `mode: implicit` (after overrides) is an implicit-fusion recipe and comes back as
    :class:`polyfuse.implicit.recipe.ImplicitRecipe`; every other mode gives a :class:`Recipe`.

    Raises RecipeError (one line) for a missing file, invalid YAML, a malformed override or any
    validation problem (all problems at once).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError(f"{path}: {what}, check the path")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = _one_line(getattr(err, "problem", None) or err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({_one_line(context)} started at line {context_mark.line + 1})"
        if not isinstance(err, yaml.constructor.ConstructorError):
            problem += ", fix the syntax there"
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe ({_one_line(err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return _validate(data, str(path), {})
    merged, notes = _apply_overrides(data, overrides)
    if merged.get("mode") == "implicit":
        from polyfuse.implicit.recipe import parse_implicit_recipe

        return parse_implicit_recipe(data, overrides, source=str(path))
    return _validate(merged, str(path), notes)
