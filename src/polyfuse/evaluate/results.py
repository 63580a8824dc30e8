"""The run's machine-readable results file: ``<run>/results.json``.

Schema (every stage adds to it; nothing is removed)::

    {"models": {NAME: {"bpb": {DOMAIN: float, ..., "all": float},      # bits per byte, lower is better
                       "accuracy": {TASK: float}}},                     # later stages
     "meta": {...}}                                                      # how the figures were made

``all`` is the pooled figure over the mixed held-out set (total bits / total bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyfuse.workspace import atomic_write_json


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def read_results(path: str | Path) -> dict[str, Any]:
    """The results file, or an empty skeleton when it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {"models": {}}


def update_results(path: str | Path, models: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict:
    """Deep-merge per-model figures (and optional meta) into the results file, atomically."""
    data = read_results(path)
    _merge(data.setdefault("models", {}), models)
    if meta:
        _merge(data.setdefault("meta", {}), meta)
    atomic_write_json(Path(path), data)
    return data
