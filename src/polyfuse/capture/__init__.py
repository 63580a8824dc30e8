"""Teacher forward passes → top-k store.

``store`` is the on-disk format (writer and memory-mapped reader); backends compute what goes in
it. Backends are looked up by name (``capture.backend`` in a recipe)::

    >>> run = get_backend("hf")
    >>> stats = run(model, tokenizer, [(0, "text"), ...], "runs/x/capture/prose", k=10)
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
    "hf": "polyfuse.capture.hf:capture",
    "vllm": "polyfuse.capture.vllm:capture",
}
"""Backend name -> ``module:function`` with the signature of :func:`polyfuse.capture.hf.capture` (the
``vllm`` backend takes a model reference instead of a loaded model and builds its own engine)."""


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
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PolyfuseError(
            f"capture backend {name!r} needs {err.name}, which is not installed; "
            f"install it with pip install 'polyfuse[{name}]'"
        ) from err
    return getattr(module, attr)
