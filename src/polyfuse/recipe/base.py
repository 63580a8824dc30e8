"""What every recipe kind shares: model references, the strict ``Section`` base and ``RecipeBase``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["NAME_PATTERN", "WORLD_PREFIX", "ModelRef", "ModelSpec", "RecipeBase", "Section", "TargetSpec"]

NAME_PATTERN = r"^[A-Za-z0-9_.+-]+$"
WORLD_PREFIX = "world:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_ID_AT_REV = re.compile(r"^(?P<model>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<revision>[^\s@]+)$")



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




class RecipeBase(Section):
    """What every recipe kind shares: where it writes, where world: references resolve, the seed, the
    target and the sources (unique names), and the helpers manifests use. :class:`polyfuse.recipe.explicit.Recipe` is explicit
    fusion and FuseChat; :class:`polyfuse.recipe.implicit.ImplicitRecipe` is implicit fusion."""

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


