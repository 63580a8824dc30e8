"""The merge configuration: mergekit-compatible YAML, validated by pydantic (unknown keys are errors).

::

    merge_method: ties
    base_model: ./runs/pivot
    models:
      - model: ./runs/target+pair:mistral
        parameters: {weight: 0.5, density: 0.6}
      - model: ./runs/target+pair:qwen
        parameters:
          weight: [{filter: mlp, value: 0.3}, {value: 0.5}]   # first matching filter wins
          density: 0.6
    parameters: {normalize: true}      # method-wide values, and defaults for every model
    dtype: bfloat16                    # output dtype (polyfuse always computes in float32)
    tokenizer_source: base             # or a model directory; `tokenizer: {source: ...}` also works

Parameter values are a number (or boolean / string) or a list of ``{filter, value}`` entries whose
``filter`` is a substring of the tensor name (an entry without ``filter`` matches every tensor).
``merge_method: passthrough`` also takes mergekit's ``slices`` instead of ``models`` (layer stacking;
one source per slice)::

    merge_method: passthrough
    slices:
      - sources: [{model: ./a, layer_range: [0, 24]}]
      - sources: [{model: ./b, layer_range: [8, 32]}]

mergekit's layer gradients (a list of numbers), ``modules``, slices for other methods and
``tokenizer: {source: union}`` are not supported and say so. Model references are local
directories (or ``world:NAME``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from polyfuse.errors import RecipeError

__all__ = [
    "DTYPE_NAMES",
    "FilteredValue",
    "InputModel",
    "MergeConfig",
    "OutputSlice",
    "ParamValue",
    "SliceSource",
    "TokenizerSection",
    "load_merge_config",
    "parse_merge_config",
    "resolve_value",
]

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
_UNSUPPORTED = {
    "modules": "multi-module configs are not supported; list whole models under `models`",
    "chat_template": "chat_template is not supported; the tokenizer's own template is copied",
}


class FilteredValue(BaseModel):
    """One entry of a filtered parameter: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = Field(None, description="substring of the tensor name; omit to match every tensor")
    value: StrictBool | float | str = Field(description="the parameter value for matching tensors")


ParamValue = StrictBool | float | str | list[FilteredValue]
"""A parameter value: a scalar, or ``[{filter: self_attn, value: 0.3}, {value: 0.5}]``."""


def _no_gradients(params: Any) -> Any:
    if isinstance(params, Mapping):
        for key, value in params.items():
            if isinstance(value, list) and value and not all(isinstance(v, Mapping) for v in value):
                raise ValueError(
                    f"{key}: layer gradients (a list of numbers) are not supported; give one number, "
                    "or a list of {filter, value} entries"
                )
    return params


class InputModel(BaseModel):
    """One input model and its per-model parameters (e.g. ``weight``, ``density``)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="local model directory or world:NAME", examples=["./runs/target"])
    parameters: dict[str, ParamValue] = Field(default_factory=dict, description="per-model parameters")

    _check_parameters = field_validator("parameters", mode="before")(_no_gradients)


class SliceSource(BaseModel):
    """The source of an output slice: layers ``[start, end)`` of one model."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="local model directory or world:NAME", examples=["./runs/target"])
    layer_range: tuple[int, int] = Field(description="[start, end]: the layers start … end − 1", examples=[[0, 16]])
    parameters: dict[str, ParamValue] = Field(default_factory=dict, description="per-model parameters (scale)")

    _check_parameters = field_validator("parameters", mode="before")(_no_gradients)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"expected [start, end] with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(BaseModel):
    """Consecutive output layers copied from one source (``passthrough``)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1, description="one source: passthrough copies one model's layers")

    @field_validator("sources")
    @classmethod
    def _one_source(cls, value: list[SliceSource]) -> list[SliceSource]:
        if len(value) > 1:
            raise ValueError(f"passthrough copies one source per slice, got {len(value)}; "
                             "stack them as consecutive slices")
        return value


class TokenizerSection(BaseModel):
    """mergekit's modern ``tokenizer:`` block; only ``source`` (``base`` or a model directory) is supported."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field("base", min_length=1, description="base, or the model directory whose tokenizer is copied")

    @field_validator("source")
    @classmethod
    def _not_union(cls, value: str) -> str:
        if value == "union":
            raise ValueError("union vocabularies are not supported; use base or a model directory")
        return value


class MergeConfig(BaseModel):
    """A mergekit-style merge configuration (see the module docstring for an example)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str = Field(min_length=1, description="a registered method: linear, task_arithmetic, ties, dare_*, "
                              "breadcrumbs*, della*, slerp, nuslerp, model_stock, passthrough, sce or varm",
                              examples=["ties"])
    base_model: str | None = Field(None, description="the pivot every task vector is taken against")
    models: list[InputModel] = Field(default_factory=list, description="the models to merge (or slices)")
    slices: list[OutputSlice] = Field(default_factory=list,
                                      description="passthrough only: layer slices stacked in order (instead of models)")
    parameters: dict[str, ParamValue] = Field(default_factory=dict,
                                              description="method parameters, and defaults for every model")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        None, description="output dtype (default: the base model's tensor dtypes)")
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        None, description="output dtype; wins over dtype")
    tokenizer_source: str | None = Field(None, min_length=1, description="base, or a model directory (legacy key)")
    tokenizer: TokenizerSection | None = Field(None, description="tokenizer: {source: base | model directory}")

    _check_parameters = field_validator("parameters", mode="before")(_no_gradients)

    @model_validator(mode="before")
    @classmethod
    def _unsupported_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, why in _UNSUPPORTED.items():
                if key in data:
                    raise ValueError(f"{key}: {why}")
        return data

    @field_validator("tokenizer_source")
    @classmethod
    def _source_not_union(cls, value: str | None) -> str | None:
        if value == "union":
            raise ValueError("union vocabularies are not supported; use base or a model directory")
        return value

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> MergeConfig:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or tokenizer, not both")
        return self

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if self.models and self.slices:
            raise ValueError("give either models or slices, not both")
        if not self.models and not self.slices:
            raise ValueError("models: list the models to merge (or, with passthrough, slices)")
        if self.slices and self.merge_method != "passthrough":
            raise ValueError(f"slices: layer slices are supported with merge_method: passthrough only, "
                             f"not {self.merge_method}; list whole models under models")
        return self

    @property
    def output_dtype(self) -> str | None:
        """The requested output dtype name, or None to keep each tensor's dtype from the base."""
        return self.out_dtype or self.dtype

    @property
    def tokenizer_ref(self) -> str:
        """``base`` or the model reference whose tokenizer files are copied."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source or "base"

    def to_yaml(self) -> str:
        """The configuration as YAML, without keys left at their defaults."""
        data = self.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def resolve_value(value: ParamValue, tensor_name: str) -> bool | float | str | None:
    """The value of a parameter for one tensor: the scalar itself, or the first matching filter's value.

    >>> resolve_value([FilteredValue(filter="mlp", value=0.3), FilteredValue(value=0.5)], "model.layers.0.mlp.up_proj.weight")
    0.3
    """
    if not isinstance(value, list):
        return value
    for entry in value:
        if entry.filter is None or entry.filter in tensor_name:
            return entry.value
    return None


def parse_merge_config(data: Any, *, source: str = "merge config") -> MergeConfig:
    """Validate an already-loaded mapping; ``source`` names it in errors.

    Raises:
        RecipeError: one line naming every bad key and the fix.
    """
    from polyfuse.validation import format_validation_error

    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a merge config must be a mapping with keys {', '.join(MergeConfig.model_fields)}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source, MergeConfig)) from None


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file.

    Raises:
        RecipeError: the file is missing, is not YAML, or does not validate.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: merge config not found; check the path") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = " ".join(str(e).split())
        raise RecipeError(f"{path}: not a readable YAML file ({first})") from None
    return parse_merge_config(data, source=str(path))
