"""Teacher forward passes → top-k store.

``store`` is the on-disk format (writer and memory-mapped reader); backends compute what goes in
it. Backends are looked up by name (``capture.backend`` in a recipe)::

    >>> run = get_backend("hf")
    >>> stats = run("world:prose", None, [(0, "text"), ...], "runs/x/capture/prose", k=10)
    >>> StoreReader("runs/x/capture/prose")[0].logprobs.shape     # (P, 10)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from polyfuse.capture.store import BlockTopK, StoreReader, StoreWriter, id_bits_for, is_store
from polyfuse.errors import PolyfuseError

__all__ = ["BACKENDS", "BlockTopK", "StoreReader", "StoreWriter", "get_backend", "id_bits_for", "is_store"]

BACKENDS: dict[str, str] = {
    "hf": "polyfuse.capture.hf:capture_ref",
    "vllm": "polyfuse.capture.vllm:capture_ref",
}
"""Backend name -> ``module:function`` with the signature of :func:`polyfuse.capture.hf.capture_ref`: a model
reference, a tokenizer reference (or None), the blocks, the store directory, and keyword settings (``k``,
``samples``, ``seed``, ``batch_size``, ``shard_size``, ``progress``, ``meta``, ``dtype``, ``device``,
``prefix_bytes``, ``pieces``). Each backend loads what it needs itself."""

_REQUIRES: dict[str, tuple[str, ...]] = {"vllm": ("vllm",)}
"""The optional packages a backend needs, imported by :func:`get_backend`."""


def get_backend(name: str) -> Callable[..., dict[str, Any]]:
    """The capture function of backend ``name`` (imported on first use).

    Raises:
        PolyfuseError: an unknown backend, or one whose optional dependency is not installed.
    """
    try:
        target = BACKENDS[name]
    except KeyError:
        raise PolyfuseError(
            f"unknown capture backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}"
        ) from None
    module_name, _, attr = target.partition(":")
    try:
        for dependency in _REQUIRES.get(name, ()):  # an optional extra: fail here, before any work
            importlib.import_module(dependency)
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PolyfuseError(
            f"capture backend {name!r} needs {err.name}, which is not installed; "
            f"install it with pip install 'polyfuse[{name}]'"
        ) from err
    return getattr(module, attr)
