"""Merge methods: per-tensor mergers registered by name, each working on row chunks.

Notation: θ₀ the base (pivot), θᵢ the K merged models, δᵢ = θᵢ − θ₀ their task vectors, wᵢ the
per-model ``weight``, ρᵢ the ``density``, λ the global ``lambda``.

=================  ==========================================================================
``linear``         θ = Σ wᵢθᵢ / Σ wᵢ (``normalize``, default true); no base needed
``task_arithmetic`` θ = θ₀ + λ Σ wᵢδᵢ (÷ Σ wᵢ with ``normalize``)
``ties``           keep the top-ρᵢ fraction of |δᵢ|; elect the sign of Σ wᵢδᵢ; disjoint weighted mean
``dare_linear``    keep each entry of δᵢ with probability ρᵢ, rescale (L1, as mergekit); task arithmetic
``dare_ties``      the DARE drop, then TIES' sign election and disjoint mean
``sce``            select by variance across models, calculate per-matrix weights, erase by sign
``varm``           θ = θ₀ + Σ Wᵢδᵢ with Wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) per matrix (FuseChat v1)
=================  ==========================================================================

The definitions follow mergekit 0.1.5 (parameter names, defaults and edge cases), so a mergekit
YAML means the same here. Every merger sees a tensor as a stream of row chunks
(:class:`Chunk`): methods that need whole-tensor statistics (TIES' magnitude threshold, DARE's
L1 rescale, SCE's variance top-k and weights, VaRM's weights) declare statistics passes
(:meth:`Merger.statistics`) that the engine feeds with every chunk before the merge pass. All
statistics are exact and independent of the chunk size: top-k by radix select
(:mod:`polyfuse.merge.select`), sums accumulated per row in float64, DARE's drop mask drawn in
flat element order from a generator seeded by (seed, tensor name, model).

    >>> base = torch.zeros(2, 2)
    >>> merge_tensors("task_arithmetic", [torch.ones(2, 2), 3 * torch.ones(2, 2)], base=base,
    ...               parameters={"weight": [0.5, 0.5]}).tolist()
    [[2.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from polyfuse.errors import PolyfuseError
from polyfuse.merge.config import ParamValue, resolve_value
from polyfuse.merge.select import TopK

__all__ = [
    "METHODS",
    "Chunk",
    "MergeMethod",
    "Merger",
    "Param",
    "TensorJob",
    "get_method",
    "merge_tensors",
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


# --------------------------------------------------------------------------------------------------
# building blocks


def _per_model(values: Sequence[float], like: Tensor) -> Tensor:
    """[K] values as a [K, 1, ...] float32 tensor that broadcasts against ``like`` ([K, rows, ...])."""
    return torch.tensor(values, dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


class _RowSums:
    """Per-model sums of a chunked tensor, in float64, independent of the chunking.

    Each row (or, for 1-D tensors, each block of ``block`` consecutive elements — a carry holds a
    partial block between chunks) is summed on its own; the row sums are summed once at the end.
    Memory: one float64 per row (per block) and model.
    """

    def __init__(self, block: int = 4096) -> None:
        self._parts: list[Tensor] = []
        self._block = block
        self._carry: Tensor | None = None

    def add(self, values: Tensor) -> None:
        """Add the values [K, rows, ...] of one chunk (chunks in order)."""
        values = values.to(torch.float64)
        if values.dim() > 2:
            self._parts.append(values.reshape(values.shape[0], values.shape[1], -1).sum(-1))
            return
        if self._carry is not None:
            values = torch.cat([self._carry, values], dim=1)
        full = values.shape[1] // self._block * self._block
        if full:
            self._parts.append(values[:, :full].reshape(values.shape[0], -1, self._block).sum(-1))
        self._carry = values[:, full:].clone()

    def total(self) -> Tensor:
        """[K] float64 sums over every chunk added so far."""
        parts = self._parts + ([self._carry.sum(1, keepdim=True)] if self._carry is not None else [])
        return torch.cat(parts, dim=1).sum(1)


def _stream_seed(seed: int, tensor: str, model: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _RandomKeep:
    """DARE's drop mask: entry j of model i is kept when uᵢⱼ < ρᵢ, with uᵢⱼ ~ U[0, 1) drawn in flat
    element order from a ``torch.Generator`` seeded by (seed, tensor name, i). Row chunks draw
    consecutive pieces of the same stream, so the mask does not depend on the chunking."""

    def __init__(self, seed: int, tensor: str, density: Sequence[float]) -> None:
        self._seeds = [_stream_seed(seed, tensor, i) for i in range(len(density))]
        self._density = list(density)
        self._generators: list[torch.Generator] = []
        self._next = 0

    def keep(self, offset: int, n: int) -> Tensor:
        """[K, n] boolean mask for the elements ``[offset, offset + n)`` (offset 0 restarts the stream)."""
        if offset == 0:
            self._generators = [torch.Generator().manual_seed(s) for s in self._seeds]
            self._next = 0
        if offset != self._next:
            raise RuntimeError(f"DARE chunks out of order: expected offset {self._next}, got {offset}")
        self._next = offset + n
        masks = []
        for density, generator in zip(self._density, self._generators, strict=True):
            if density >= 1:
                masks.append(torch.ones(n, dtype=torch.bool))
            else:
                masks.append(torch.rand(n, generator=generator) < density)
        return torch.stack(masks)


def _sign_consensus(values: Tensor) -> Tensor:
    """TIES' erase mask [K, ...]: the sign of each entry agrees with the sign of the column sum
    (a zero sum counts as positive; zero entries never agree)."""
    majority = torch.where(values.sum(0) >= 0, 1.0, -1.0)
    return values.sign() == majority


# --------------------------------------------------------------------------------------------------
# linear


class _Linear:
    """θ = Σ wᵢθᵢ / Σ wᵢ (the division only with ``normalize``)."""

    def __init__(self, job: TensorJob) -> None:
        self.weights = job.model_params["weight"]
        self.normalize = job.params["normalize"]

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        return iter(())

    def merge(self, chunk: Chunk) -> Tensor:
        out = torch.zeros_like(chunk.models[0])
        for x, w in zip(chunk.models, self.weights, strict=True):
            out.add_(x, alpha=w)
        return out / sum(self.weights) if self.normalize else out


def _linear_check(job: TensorJob) -> str | None:
    if job.params["normalize"] and sum(job.model_params["weight"]) == 0:
        return "the weights sum to 0, so normalize divides by 0; change a weight or set normalize: false"
    return None


# --------------------------------------------------------------------------------------------------
# task arithmetic family: task_arithmetic, ties, dare_linear, dare_ties


class _TaskArithmetic:
    """θ₀ + λ · combine(wᵢ · sparsify(δᵢ)), as mergekit's generalized task arithmetic.

    ``sparsify``: None, ``magnitude`` (keep the top ⌊ρᵢ·n⌋ (at least 1) entries by |δᵢ|) or
    ``random`` (keep with probability ρᵢ); with ``rescale`` the kept entries are scaled by
    Σ|δᵢ| / Σ|kept δᵢ| (L1 norm preserved). ``consensus``: keep only entries whose sign agrees with
    sign(Σ wᵢδᵢ) and divide by the sum of the agreeing weights; without it divide by Σ wᵢ. The
    division happens only with ``normalize``.
    """

    def __init__(self, job: TensorJob, *, sparsify: str | None, consensus: bool) -> None:
        self.job = job
        self.weights = job.model_params["weight"]
        k = len(self.weights)
        self.density = job.model_params.get("density", [1.0] * k)
        self.sparsify = sparsify if sparsify and any(d < 1 for d in self.density) else None
        self.consensus = consensus
        self.scale = [1.0] * k
        self._topk: TopK | None = None
        self._random: _RandomKeep | None = None

    def _keep(self, chunk: Chunk, deltas: Tensor) -> Tensor:
        k = deltas.shape[0]
        if self._topk is not None:
            if chunk.offset == 0:
                self._topk.restart()
            return self._topk.keep(deltas.abs().reshape(k, -1)).view(deltas.shape)
        assert self._random is not None
        return self._random.keep(chunk.offset, deltas[0].numel()).view(deltas.shape)

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        k, n = len(self.weights), self.job.numel
        if self.sparsify == "magnitude":
            topk = TopK(k)
            yield lambda c: topk.count_high(c.deltas().abs().reshape(k, -1))
            counts = [n if d >= 1 else 0 if d <= 0 else max(1, int(d * n)) for d in self.density]
            if topk.choose(counts):
                yield lambda c: topk.count_low(c.deltas().abs().reshape(k, -1))
            topk.finish()
            self._topk = topk
        elif self.sparsify == "random":
            self._random = _RandomKeep(self.job.seed, self.job.name, self.density)
        if self.sparsify and self.job.params["rescale"]:
            before, after = _RowSums(), _RowSums()

            def observe(chunk: Chunk) -> None:
                deltas = chunk.deltas()
                before.add(deltas.abs())
                after.add((deltas * self._keep(chunk, deltas)).abs())

            yield observe
            eps = 1e-7  # mergekit: no rescale when either L1 norm is below this
            self.scale = [float(b / a) if b >= eps and a >= eps else 1.0
                          for b, a in zip(before.total().tolist(), after.total().tolist(), strict=True)]

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        weighted = chunk.deltas()  # [K, rows, ...], updated in place below
        if self.sparsify:
            weighted.mul_(self._keep(chunk, weighted))
            if any(s != 1.0 for s in self.scale):
                weighted.mul_(_per_model(self.scale, weighted))
        weighted.mul_(_per_model(self.weights, weighted))
        if self.consensus:
            # entries agreeing with the elected sign s: s * wᵢδᵢ > 0; their sum is s * Σ relu(s * wᵢδᵢ)
            sign = (weighted.sum(0) >= 0).to(torch.float32).mul_(2).sub_(1)
            weighted.mul_(sign)
            agree = weighted > 0
            mixed = weighted.clamp_(min=0).sum(0).mul_(sign)
            divisor = torch.zeros_like(mixed)
            for i, w in enumerate(self.weights):
                divisor.add_(agree[i], alpha=w)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = weighted.sum(0)
            total = sum(self.weights)
            divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total)
        if self.job.params["normalize"]:
            mixed.div_(divisor)
        if self.job.params["lambda"] != 1:
            mixed.mul_(self.job.params["lambda"])
        return mixed.add_(chunk.base)


# --------------------------------------------------------------------------------------------------
# SCE and VaRM


class _SCE:
    """SCE (FuseChat 2.0): Select by variance, Calculate per-matrix weights, Erase by sign.

    1. select: if 0 < τ (``select_topk``) < 1, keep the ⌊τ·nnz⌋ entries with the largest
       variance of δ across models (nnz: entries with non-zero variance); τ = 0 keeps none;
    2. calculate: ηᵢ = mean(sel(δᵢ)²) / Σⱼ mean(sel(δⱼ)²), computed on the selected deltas;
    3. erase: keep entries whose sign agrees with sign(Σᵢ δᵢ);
    4. θ = θ₀ + Σ ηᵢ eᵢ δᵢ / Σ ηᵢ eᵢ.

    ``sce_variant`` says which deltas steps 3-4 use:

    * ``mergekit`` (upstream mergekit's ``sce``): the selected deltas (the merge is sparsified);
      the denominator is clamped at 1e-6, and the weights fall back to uniform when
      Σⱼ mean(δⱼ²) < 1e-6 — note that fine-tuning deltas of about 1e-3 or less always fall back;
    * ``fusechat`` (FuseChat/FuseO1's released ``sce_merging.py``): the full, unselected deltas —
      the selection only sets the weights; a zero denominator becomes 1, and the weights fall back
      to uniform only when every selected delta is exactly zero.
    """

    def __init__(self, job: TensorJob) -> None:
        self.job = job
        self.tau = job.params["select_topk"]
        self.variant = job.params["sce_variant"]
        self.eta: list[float] = []
        self._topk: TopK | None = None

    def _selected(self, chunk: Chunk, deltas: Tensor) -> Tensor | None:
        """Selection mask [rows, ...] of the chunk (None: everything selected)."""
        if self.tau >= 1:
            return None
        if self._topk is None:  # select_topk 0 or no non-zero variance: nothing is selected
            return torch.zeros(deltas.shape[1:], dtype=torch.bool)
        if chunk.offset == 0:
            self._topk.restart()
        variance = torch.var(deltas, dim=0, unbiased=False)
        return self._topk.keep(variance.reshape(1, -1)).view(deltas.shape[1:])

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        if 0 < self.tau < 1:
            topk, nonzero = TopK(1), []

            def count(chunk: Chunk) -> None:
                variance = torch.var(chunk.deltas(), dim=0, unbiased=False).reshape(1, -1)
                nonzero.append(int(torch.count_nonzero(variance)))
                topk.count_high(variance)

            yield count
            k = int(torch.tensor(sum(nonzero)) * self.tau)  # float32 product, as mergekit and FuseChat
            if k > 0:
                if topk.choose([k]):
                    yield lambda c: topk.count_low(torch.var(c.deltas(), dim=0, unbiased=False).reshape(1, -1))
                topk.finish()
                self._topk = topk
        sums = _RowSums()

        def squares(chunk: Chunk) -> None:
            deltas = chunk.deltas()
            mask = self._selected(chunk, deltas)
            sums.add((deltas if mask is None else deltas * mask).square())

        yield squares
        means = (sums.total() / self.job.numel).tolist()
        total = sum(means)
        uniform = abs(total) < 1e-6 if self.variant == "mergekit" else total == 0
        self.eta = [1.0 / len(means)] * len(means) if uniform else [m / total for m in means]

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        deltas = chunk.deltas()
        mask = self._selected(chunk, deltas)
        if self.variant == "mergekit" and mask is not None:
            deltas = deltas * mask
        weights = _per_model(self.eta, deltas) * _sign_consensus(deltas)
        mixed = (deltas * weights).sum(0)
        divisor = weights.sum(0)
        if self.variant == "mergekit":
            divisor = divisor.clamp(min=1e-6)
        else:
            divisor[divisor == 0] = 1
        return chunk.base + mixed / divisor


class _VaRM:
    """VaRM (FuseChat v1): θ = θ₀ + Σ Wᵢδᵢ with Wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) per tensor (uniform when
    no model changed it). Each model's statistic is its own change from the base — the released
    FuseChat script read one shared statistics file for every model and so averaged uniformly."""

    def __init__(self, job: TensorJob) -> None:
        self.weights: list[float] = []

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        sums = _RowSums()
        yield lambda chunk: sums.add(chunk.deltas().square())
        squares = sums.total().tolist()
        total = sum(squares)
        self.weights = [1.0 / len(squares)] * len(squares) if total == 0 else [s / total for s in squares]

    def merge(self, chunk: Chunk) -> Tensor:
        assert chunk.base is not None
        deltas = chunk.deltas()
        return chunk.base + (deltas * _per_model(self.weights, deltas)).sum(0)


# --------------------------------------------------------------------------------------------------
# registry

_WEIGHT = Param(float, help="weight of this model")
_DENSITY = Param(float, 1.0, "fraction of the task vector kept", low=0.0, high=1.0)
_LAMBDA = Param(float, 1.0, "scale of the merged task vector")
_INT8 = Param(bool, False, "accepted for mergekit compatibility; no effect")


def _task_method(name: str, pretty: str, url: str, *, sparsify: str | None, consensus: bool,
                 normalize: bool, rescale: bool) -> MergeMethod:
    params = {"lambda": _LAMBDA, "normalize": Param(bool, normalize, "divide by the sum of the weights"),
              "int8_mask": _INT8}
    model_params = {"weight": _WEIGHT}
    if sparsify:
        params["rescale"] = Param(bool, rescale, "rescale kept entries to the task vector's L1 norm")
        model_params["density"] = _DENSITY
    return MergeMethod(name, pretty, url, True, params, model_params,
                       lambda job: _TaskArithmetic(job, sparsify=sparsify, consensus=consensus))


register(MergeMethod("linear", "Linear", "https://arxiv.org/abs/2203.05482", False,
                     {"normalize": Param(bool, True, "divide by the sum of the weights")},
                     {"weight": _WEIGHT}, _Linear, _linear_check))
register(_task_method("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                      sparsify=None, consensus=False, normalize=False, rescale=False))
register(_task_method("ties", "TIES", "https://arxiv.org/abs/2306.01708",
                      sparsify="magnitude", consensus=True, normalize=True, rescale=False))
register(_task_method("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
                      sparsify="random", consensus=False, normalize=False, rescale=True))
register(_task_method("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
                      sparsify="random", consensus=True, normalize=False, rescale=True))
register(MergeMethod("sce", "SCE", "https://arxiv.org/abs/2408.07990", True,
                     {"select_topk": Param(float, 1.0, "fraction of entries selected by variance", low=0.0, high=1.0),
                      "sce_variant": Param(str, help="fusechat or mergekit (see the docs)",
                                           choices=("fusechat", "mergekit")),
                      "int8_mask": _INT8},
                     {}, _SCE))
register(MergeMethod("varm", "VaRM", "https://arxiv.org/abs/2402.16107", True, {}, {}, _VaRM))


# --------------------------------------------------------------------------------------------------
# in-memory entry point


def merge_tensors(method: str, tensors: Sequence[Tensor], *, base: Tensor | None = None,
                  parameters: Mapping[str, Any] | None = None, name: str = "tensor", seed: int = 0,
                  chunk_rows: int | None = None) -> Tensor:
    """Merge one tensor in memory with the same mergers the streaming engine uses.

    Args:
        method: a registered method name.
        tensors: the merged inputs, each [rows, ...] (the base excluded).
        base: the base tensor, required by every method but ``linear``.
        parameters: method-wide values as scalars; per-model values as a list (one per input) or a
            scalar broadcast to every input.
        name: the tensor name (seeds DARE's drop mask).
        chunk_rows: process this many rows at a time (default: all at once).

    Returns:
        The merged tensor, float32, the inputs' shape.
    """
    spec = get_method(method)
    if spec.needs_base and base is None:
        raise PolyfuseError(f"{method} needs a base tensor")
    values = dict(parameters or {})
    global_values = {k: v for k, v in values.items() if not isinstance(v, list | tuple)}
    model_values = [{k: v[i] for k, v in values.items() if isinstance(v, list | tuple)} for i in range(len(tensors))]
    labels = [f"models[{i}]" for i in range(len(tensors))]
    spec.check_keys(list(global_values), [list(v) for v in model_values], labels)
    shape = tuple(tensors[0].shape)
    params, model_params = spec.resolve(name, global_values, model_values, labels)
    job = TensorJob(name, shape, seed, params, model_params)
    problem = spec.check(job)
    if problem:
        raise PolyfuseError(f"{name}: {problem}")
    flat = [t.to(torch.float32).reshape(shape or (1,)) for t in tensors]
    base_flat = base.to(torch.float32).reshape(shape or (1,)) if base is not None else None
    rows = flat[0].shape[0]
    step = max(1, chunk_rows or rows)
    per_row = flat[0][0].numel() if rows else 0

    def chunks() -> Iterator[Chunk]:
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield Chunk(None if base_flat is None else base_flat[r0:r1], [t[r0:r1] for t in flat], r0 * per_row)

    parts = list(run_merger(spec.make(job), chunks))
    return torch.cat(parts).reshape(shape) if parts else torch.empty(shape)
