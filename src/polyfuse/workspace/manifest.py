"""The `manifest.json` of an artifact directory: what it records, the normalised config and package versions.

Every stage writes one directory holding a `manifest.json` with the stage name, its resolved config
(after a JSON round trip, :func:`normalise_config`), the hashes of its inputs, package versions,
timing, whatever the stage reports as outputs, and every file it wrote (size and content hash).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.workspace.files import _dumps, _json_default

__all__ = ["MANIFEST_NAME", "Manifest", "normalise_config", "package_versions"]

MANIFEST_NAME = "manifest.json"
_PACKAGES = (
    "polyfuse",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "safetensors",
    "accelerate",
    "trl",
    "numpy",
)


@dataclass
class Manifest:
    """What produced an artifact directory; stored as `manifest.json` inside it."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    versions: dict[str, str]
    created: str
    duration_s: float
    outputs: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] | None = None
    """Every file of the artifact (manifest excluded): ``{path: {"bytes", "blake2b"}}``; None in manifests
    written before polyfuse recorded them (they are not verified)."""
    input_paths: dict[str, str] | None = None
    """Where each path input was (``{name: path relative to this directory}``), so that a stage reading
    several artifacts can check they were built on the same versions of what they share
    (:func:`polyfuse.workspace.check_lineage`); None in manifests written before polyfuse recorded them."""

    def to_json(self) -> str:
        """The manifest as JSON text (indent 2, sorted keys, trailing newline)."""
        return _dumps(asdict(self))

    @classmethod
    def from_path(cls, path: str | Path) -> Manifest:
        """Read `path/manifest.json` (or `path` itself if it is the manifest file)."""
        path = Path(path)
        file = path if path.is_file() else path / MANIFEST_NAME
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{file}: no manifest, the stage has not been run here") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{file}: unreadable manifest ({err}), delete the directory and rerun") from None
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in _OPTIONAL] if isinstance(data, dict) else names
        if missing:
            raise DataError(f"{file}: manifest lacks {', '.join(missing)}, delete the directory and rerun")
        return cls(**{n: data[n] for n in names if n in data})


_OPTIONAL = ("files", "input_paths")


def _read_manifest(out_dir: Path) -> Manifest | None:
    try:
        return Manifest.from_path(out_dir / MANIFEST_NAME)
    except DataError:
        return None


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return tuple(sorted(found.items()))


def package_versions() -> dict[str, str]:
    """Versions of python and the packages a result depends on ("absent" when not installed)."""
    return dict(_versions())


def normalise_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` after a JSON round trip: tuples become lists, Paths strings, keys strings."""
    return json.loads(json.dumps(dict(config), default=_json_default))
