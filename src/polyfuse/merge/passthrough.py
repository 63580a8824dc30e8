"""``passthrough``: copy one model's tensors (optionally scaled), or stack layer slices (mergekit's ``slices``).

With ``models:`` the one model is copied. With ``slices:`` the output is built as mergekit 0.1.5
builds it for a single-module decoder: the tensors before the layers (embeddings) from the first
slice's model, then each slice's layers ``[start, end)`` renumbered consecutively from 0, then the
tensors after the layers (final norm, head) from the last slice's model. A layer tensor is one whose
name holds ``<layers|h|blocks|layer>.<index>.`` (``model.layers.7.mlp.up_proj.weight``); a tensor
outside the layers counts as "before" when its name names an embedding (``embed``, ``wte``,
``wpe``), else as "after". Each output tensor still streams through the engine row chunk by row
chunk; only its name changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

from polyfuse.errors import PolyfuseError
from polyfuse.merge.registry import Chunk, TensorJob

__all__ = ["Passthrough", "StackedTensor", "layer_of", "stack_slices", "stacked_config"]

_LAYER = re.compile(r"^(?P<head>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<tail>.+)$")
_BEFORE = re.compile(r"embed|(^|\.)wte(\.|$)|(^|\.)wpe(\.|$)")
T = TypeVar("T")


class Passthrough:
    """θ = θ₁, or θ₁ · ``scale`` when the (per-model, optional) scale is given."""

    def __init__(self, job: TensorJob) -> None:
        self.scale = job.model_params["scale"][0]

    def statistics(self) -> Iterator[Callable[[Chunk], None]]:
        return iter(())

    def merge(self, chunk: Chunk) -> Tensor:
        return chunk.models[0] if self.scale is None else chunk.models[0] * self.scale


def layer_of(name: str) -> tuple[str, int, str] | None:
    """``(head, index, tail)`` of a layer tensor's name, None outside the layers.

    >>> layer_of("model.layers.12.self_attn.q_proj.weight")
    ('model.layers', 12, 'self_attn.q_proj.weight')
    """
    match = _LAYER.match(name)
    return (match["head"], int(match["index"]), match["tail"]) if match else None


@dataclass(frozen=True)
class StackedTensor:
    """One output tensor of a layer stack: its new name, where it comes from and which slice."""

    name: str
    source: str
    """The tensor's name in its source model."""
    slice: int
    """Index of the slice whose model provides it."""


def stack_slices(models: Sequence[Mapping[str, T]], ranges: Sequence[tuple[int, int]],
                 labels: Sequence[str]) -> tuple[list[StackedTensor], list[int]]:
    """The output tensors of stacked slices, in order, and the source layer index of each output layer.

    Args:
        models: each slice's model, as its tensors by name (in file order).
        ranges: each slice's ``[start, end)`` layers.
        labels: each slice's config key, for errors (``slices[0].sources[0]``).

    Raises:
        PolyfuseError: a model without layer tensors, or a range beyond its layers.
    """
    stacked: list[StackedTensor] = []
    source_layers: list[int] = []
    for i, (tensors, (start, end), label) in enumerate(zip(models, ranges, labels, strict=True)):
        layers: dict[int, list[tuple[str, str, str]]] = {}
        for name in tensors:
            parsed = layer_of(name)
            if parsed:
                layers.setdefault(parsed[1], []).append((name, parsed[0], parsed[2]))
        if not layers:
            raise PolyfuseError(f"{label}.model: no layer tensors (names like model.layers.0.…) to slice")
        count = max(layers) + 1
        if end > count:
            raise PolyfuseError(f"{label}.layer_range: [{start}, {end}] but the model has {count} layers "
                                f"(0 … {count - 1}); end is exclusive")
        for index in range(start, end):
            out = len(source_layers)
            stacked += [StackedTensor(f"{head}.{out}.{tail}", name, i) for name, head, tail in layers.get(index, [])]
            source_layers.append(index)
    outside = [[n for n in tensors if layer_of(n) is None] for tensors in (models[0], models[-1])]
    before = [StackedTensor(n, n, 0) for n in outside[0] if _BEFORE.search(n)]
    after = [StackedTensor(n, n, len(models) - 1) for n in outside[1] if not _BEFORE.search(n)]
    return before + stacked + after, source_layers


def stacked_config(config: dict[str, Any], source_layers: Sequence[int]) -> dict[str, Any]:
    """``config.json`` of a layer stack: ``num_hidden_layers`` is the stack's layer count (in
    ``text_config`` when the key lives there); a per-layer ``layer_types`` list follows the slices."""
    out = dict(config)
    holder = out if "num_hidden_layers" in out or "text_config" not in out else dict(out["text_config"])
    before = holder.get("num_hidden_layers")
    holder["num_hidden_layers"] = len(source_layers)
    kinds = holder.get("layer_types")
    if isinstance(kinds, list) and len(kinds) == before and all(i < len(kinds) for i in source_layers):
        holder["layer_types"] = [kinds[i] for i in source_layers]
    if holder is not out:
        out["text_config"] = holder
    return out
