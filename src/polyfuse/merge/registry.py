"""The merge-method registry and the types every merger shares.

A method (:class:`MergeMethod`) names its parameters (:class:`Param`), checks and resolves their
values for each tensor into a :class:`TensorJob`, and makes a per-tensor :class:`Merger`. A merger
sees the tensor as row chunks (:class:`Chunk`): zero or more statistics passes, then one merge pass
(:func:`run_merger`). Methods are registered by name in :data:`METHODS`
(:mod:`polyfuse.merge.methods` registers the built-in ones).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from polyfuse.errors import PolyfuseError
from polyfuse.merge.config import ParamValue, resolve_value

__all__ = [
    "METHODS",
    "REQUIRED",
    "Chunk",
    "MergeMethod",
    "Merger",
    "Param",
    "TensorJob",
    "get_method",
    "register",
    "run_merger",
]

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its kind, default (``REQUIRED`` if none) and allowed range."""

    kind: type
    default: Any = REQUIRED
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (None when it is)."""
        if self.kind is bool:
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if self.kind is str:
            if self.choices and value not in self.choices:
                return f"expected one of {', '.join(self.choices)}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {value!r}"
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"must be between {self.low:g} and {self.high:g}, got {value!r}"
        return None

    def example(self) -> str:
        if self.choices:
            return self.choices[0]
        return "1.0" if self.high is None else f"{self.high:g}"


@dataclass
class Chunk:
    """Rows ``[r0, r1)`` of one tensor from every input, as float32 (shapes [rows, ...])."""

    base: Tensor | None
    """The base model's rows (None for methods without a base)."""
    models: list[Tensor]
    """The merged inputs' rows, in config order (the base excluded when the method has one)."""
    offset: int
    """Flat index of the chunk's first element within the whole tensor."""

    def deltas(self) -> Tensor:
        """Task vectors of the chunk: [K, rows, ...]."""
        assert self.base is not None
        out = torch.empty((len(self.models), *self.base.shape), dtype=torch.float32)
        for i, m in enumerate(self.models):
            torch.sub(m, self.base, out=out[i])
        return out


@dataclass(frozen=True)
class TensorJob:
    """What a merger needs to know about one tensor: name, shape, seed and resolved parameters."""

    name: str
    shape: tuple[int, ...]
    seed: int
    params: dict[str, Any]
    """Method-wide parameter values for this tensor."""
    model_params: dict[str, list[Any]]
    """Per-model parameter values, one per merged input."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Merger(Protocol):
    """Merges one tensor: zero or more statistics passes over every chunk, then one merge pass."""

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        """Yield one ``observe(chunk)`` per statistics pass; the caller feeds it every chunk in order."""
        ...

    def merge(self, chunk: Chunk) -> Tensor:
        """The merged rows of one chunk (float32, the chunk's shape); chunks come in order."""
        ...


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: name, reference, parameters and a factory of per-tensor mergers."""

    name: str
    pretty_name: str
    reference: str
    needs_base: bool
    params: Mapping[str, Param]
    """Method-wide parameters (``parameters:`` in the YAML)."""
    model_params: Mapping[str, Param]
    """Per-model parameters (``models[i].parameters``, with ``parameters:`` as the default)."""
    make: Callable[[TensorJob], Merger]
    check: Callable[[TensorJob], str | None] = field(default=lambda job: None)
    """Problem with a resolved job that the parameter ranges cannot express (None when fine)."""
    optional_base: bool = False
    """Without ``needs_base``: take task vectors against ``base_model`` when one is given."""
    min_models: int = 1
    """Fewest merged inputs (the base excluded when the method uses it)."""
    max_models: int | None = None
    """Most merged inputs (None: any number)."""

    def uses_base(self, has_base: bool) -> bool:
        """Whether the merge reads the base model (always with ``needs_base``, if given with ``optional_base``)."""
        return self.needs_base or (self.optional_base and has_base)

    def check_count(self, count: int, with_base: bool) -> None:
        """Raise PolyfuseError (naming ``models``) when ``count`` merged inputs are not allowed."""
        low, high = self.min_models, self.max_models
        if low <= count and (high is None or count <= high):
            return
        bound = low if count < low else high
        wanted = f"exactly {low}" if low == high else f"at least {low}" if count < low else f"at most {high}"
        besides = " besides base_model" if with_base else ""
        raise PolyfuseError(f"models: {self.name} merges {wanted} model{'' if bound == 1 else 's'}{besides}, "
                            f"got {count}")

    def check_keys(self, global_keys: Sequence[str], model_keys: Sequence[Sequence[str]],
                   model_labels: Sequence[str]) -> None:
        """Raise PolyfuseError for a parameter this method does not know, naming the key."""
        names = [*self.params, *self.model_params]
        known = ", ".join(names) or "none"
        for key in global_keys:
            if key not in self.params and key not in self.model_params:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                hint = f", did you mean {close[0]!r}?" if close else ""
                raise PolyfuseError(f"parameters.{key}: unknown parameter for {self.name}{hint} (known: {known})")
        per_model = ", ".join(self.model_params) or "none"
        for label, keys in zip(model_labels, model_keys, strict=True):
            for key in keys:
                if key not in self.model_params:
                    close = difflib.get_close_matches(key, list(self.model_params), n=1, cutoff=0.6)
                    where = f", did you mean {close[0]!r}?" if close else ""
                    if key in self.params:
                        where = " (it is method-wide: put it under the top-level parameters)"
                    raise PolyfuseError(
                        f"{label}.parameters.{key}: not a per-model parameter of {self.name}{where} "
                        f"(per-model: {per_model})"
                    )

    def resolve(self, tensor: str, global_values: Mapping[str, ParamValue],
                model_values: Sequence[Mapping[str, ParamValue]], model_labels: Sequence[str]
                ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """Parameter values for one tensor; raises PolyfuseError naming the key of a missing or bad value."""
        params: dict[str, Any] = {}
        for key, spec in self.params.items():
            value = resolve_value(global_values[key], tensor) if key in global_values else None
            params[key] = _checked(spec, value, f"parameters.{key}", self.name, tensor)
        model_params: dict[str, list[Any]] = {key: [] for key in self.model_params}
        for label, values in zip(model_labels, model_values, strict=True):
            for key, spec in self.model_params.items():
                value = resolve_value(values[key], tensor) if key in values else None
                where = f"{label}.parameters.{key}"
                if value is None and key in global_values:
                    value = resolve_value(global_values[key], tensor)
                    where = f"parameters.{key}" if value is not None else where
                model_params[key].append(_checked(spec, value, where, self.name, tensor))
        return params, model_params


def _checked(spec: Param, value: Any, where: str, method: str, tensor: str) -> Any:
    if value is None:
        if spec.default is REQUIRED:
            raise PolyfuseError(
                f"{where}: required by {method} (no value for tensor {tensor!r}); add e.g. "
                f"{where.rsplit('.', 1)[-1]}: {spec.example()}"
            )
        return spec.default
    problem = spec.problem(value)
    if problem:
        raise PolyfuseError(f"{where}: {problem}")
    return float(value) if spec.kind is float else value


METHODS: dict[str, MergeMethod] = {}
"""Registered methods by name."""


def register(method: MergeMethod) -> MergeMethod:
    """Make ``method`` available by name (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; PolyfuseError (naming ``merge_method``) otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise PolyfuseError(f"merge_method: unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def run_merger(merger: Merger, chunks: Callable[[], Iterator[Chunk]]) -> Iterator[Tensor]:
    """Feed every statistics pass all chunks, then yield the merged rows chunk by chunk."""
    for observe in merger.statistics():
        for chunk in chunks():
            observe(chunk)
    for chunk in chunks():
        yield merger.merge(chunk)
