"""Loading models and tokenizers from a local directory, a hub id or the tiny world (``world:NAME``).

Everything here reads facts (vocabulary size, padded embedding rows, tied heads, special tokens)
from the config and the tokenizer, never from the model name. A reference that cannot be resolved
or loaded raises :class:`~polyfuse.errors.ModelLoadError` with one line that names what is wrong
and how to fix it.

    >>> ref = resolve_model_ref("org/name@v1.0")
    >>> ref.location, ref.is_local, ref.revision
    ('org/name', False, 'v1.0')
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from polyfuse.errors import ModelLoadError, PolyfuseError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ResolvedModel",
    "VocabFacts",
    "bos_context_id",
    "load_model",
    "load_tokenizer",
    "data_dir",
    "lazy_loaders",
    "pick_device",
    "resolve_all",
    "resolve_bf16",
    "pick_dtype",
    "resolve_model_ref",
    "vocab_facts",
]

WORLD_PREFIX = "world:"
_PATH_PREFIXES = ("/", "./", "../", "~")
# A hub id: optional "org/" then "name"; letters, digits, '-', '_', '.' (huggingface_hub's rule).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points: a local directory or a hub id (plus an optional revision)."""

    ref: str
    """The reference as the user wrote it (``world:prose``, ``./ckpt``, ``org/name@rev``)."""
    location: str
    """What ``from_pretrained`` receives: an absolute directory or a hub id without ``@rev``."""
    is_local: bool
    revision: str | None = None
    """Hub revision (branch, tag or commit); always ``None`` for local directories."""

    def __str__(self) -> str:
        return self.location if self.revision is None else f"{self.location}@{self.revision}"


@dataclass(frozen=True)
class VocabFacts:
    """Vocabulary facts of one model + tokenizer pair, read from the config and the tokenizer.

    ``embedding_rows`` is often larger than ``tokenizer_len`` (rows padded to a multiple of 64 or
    128 for speed); ids in ``[tokenizer_len, embedding_rows)`` are never produced by the tokenizer.
    """

    tokenizer_len: int
    """``len(tokenizer)``: base vocabulary plus added tokens."""
    embedding_rows: int
    """Rows of the input embedding (= the model's output vocabulary size)."""
    tied: bool
    """Whether the output head shares its weight with the input embedding."""

    @property
    def padding_rows(self) -> int:
        """Embedding rows that no tokenizer id maps to (may be 0)."""
        return max(0, self.embedding_rows - self.tokenizer_len)

    def check(self, name: str = "model") -> None:
        """Raise ModelLoadError if the tokenizer can produce ids the model has no embedding row for."""
        if self.tokenizer_len > self.embedding_rows:
            raise ModelLoadError(
                f"{name}: tokenizer has {self.tokenizer_len} tokens but the model has only "
                f"{self.embedding_rows} embedding rows; use the tokenizer saved with this model "
                "(or resize the embeddings with model.resize_token_embeddings(len(tokenizer)))"
            )


def _is_path_like(ref: str) -> bool:
    return ref.startswith(_PATH_PREFIXES) or ref.count("/") > 1


def _missing_files(path: Path, kind: Literal["model", "tokenizer"]) -> list[str]:
    """What a usable directory of this kind lacks (empty list: nothing)."""
    if kind == "tokenizer":
        if any((path / f).is_file() for f in _TOKENIZER_FILES):
            return []
        return [f"tokenizer files (one of {', '.join(_TOKENIZER_FILES)})"]
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    has_weights = any((path / f).is_file() for f in _WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        missing.append(f"model weights (one of {', '.join(_WEIGHT_FILES)})")
    return missing


def _check_local_dir(ref: str, path: Path, kind: Literal["model", "tokenizer"]) -> None:
    """litgpt-style check: list exactly what is missing and what is there, then the fix."""
    missing = _missing_files(path, kind)
    if not missing:
        return
    found = sorted(p.name for p in path.iterdir())
    shown = ", ".join(found[:10]) + (f", ... ({len(found)} in all)" if len(found) > 10 else "")
    fix = (
        "save it there with tokenizer.save_pretrained(path)"
        if kind == "tokenizer"
        else "save it there with model.save_pretrained(path) and tokenizer.save_pretrained(path)"
    )
    origin = "" if ref == str(path) else f" (from {ref!r})"
    raise ModelLoadError(
        f"{kind} directory {str(path)!r}{origin} is missing {' and '.join(missing)}; "
        f"found: {shown or 'nothing'}; {fix}, or give a hub id like org/name"
    )


def resolve_model_ref(
    ref: str,
    *,
    world_dir: str | Path = "runs/world",
    revision: str | None = None,
    kind: Literal["model", "tokenizer"] = "model",
) -> ResolvedModel:
    """Resolve ``ref`` to a local directory or a hub id; nothing is downloaded.

    Rules, in order:

    * ``world:NAME`` -> ``<world_dir>/models/NAME`` (must exist, and match its manifest's file sizes);
    * an existing directory -> local (it must hold ``config.json`` and weights, or tokenizer
      files when ``kind="tokenizer"``);
    * a string starting with ``/``, ``./``, ``../``, ``~`` or with more than one ``/`` -> a local
      path that does not exist (error);
    * otherwise ``org/name[@rev]`` -> hub id; ``@rev`` (or ``revision=``) becomes ``revision``.

    Raises:
        ModelLoadError: the reference names a missing or incomplete directory, or is not a hub id.
        DataError: a world's model changed after the world was built (the fix named).
    """
    ref = ref.strip()
    if not ref:
        raise ModelLoadError(
            "empty model reference; give a local directory, a hub id like org/name or world:NAME"
        )

    if ref.startswith(WORLD_PREFIX):
        name = ref[len(WORLD_PREFIX) :]
        path = Path(world_dir) / "models" / name
        if not name or not path.is_dir():
            models = Path(world_dir) / "models"
            built = sorted(p.name for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
            if not built:
                raise ModelLoadError(
                    f"model {ref!r} not found at {path}; build the tiny world first with 'polyfuse world'"
                )
            raise ModelLoadError(
                f"model {ref!r} not found: the world at {world_dir} has no model {name!r}; it has "
                f"{', '.join('world:' + n for n in built)} (oracles need 'polyfuse world --oracles', chat models "
                "'polyfuse demo --family implicit')"
            )
        _check_local_dir(ref, path, kind)
        from polyfuse.workspace import verify_artifact

        verify_artifact(path)  # a world's model is checked against its manifest (sizes; hashes when read by a stage)
        return ResolvedModel(ref=ref, location=str(path.resolve()), is_local=True)

    path = Path(ref).expanduser()
    if path.is_dir():
        _check_local_dir(ref, path, kind)
        return ResolvedModel(ref=ref, location=str(path.resolve()), is_local=True)
    if path.exists():
        raise ModelLoadError(
            f"{kind} path {ref!r} is a file, not a directory; give the directory that holds "
            "config.json and the weights (as written by save_pretrained), or a hub id like org/name"
        )
    if _is_path_like(ref):
        raise ModelLoadError(
            f"{kind} path {ref!r} does not exist; check the path, or give a hub id like org/name"
        )

    hub_id, _, ref_revision = ref.partition("@")
    if "@" in ref and not ref_revision:
        raise ModelLoadError(
            f"{ref!r} ends with '@' but names no revision; write org/name@REVISION or drop the '@'"
        )
    if not _HUB_ID.match(hub_id):
        raise ModelLoadError(
            f"{ref!r} is neither an existing directory nor a hub id; check the path, or give a hub id like org/name"
        )
    if ref_revision and revision and ref_revision != revision:
        raise ModelLoadError(
            f"{ref!r} names revision {ref_revision!r} but revision={revision!r} was also given; keep one of them"
        )
    return ResolvedModel(ref=ref, location=hub_id, is_local=False, revision=ref_revision or revision)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is parsed by torch.

    Raises:
        PolyfuseError: an unknown device string, or ``cuda`` asked for on a machine without it.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise PolyfuseError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PolyfuseError(f"device {device!r} asked for but CUDA is not available; use device=cpu or auto")
    return dev


def resolve_bf16(flag: bool | None) -> bool:
    """A trainer's ``bf16`` setting: ``None`` is auto (on when CUDA supports bf16); ``True`` without such a
    device raises PolyfuseError rather than training in float32 unasked."""
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if flag and not cuda_bf16:
        raise PolyfuseError("bf16=true needs a CUDA device with bf16 support; leave bf16 unset (auto) on CPU")
    return cuda_bf16 if flag is None else flag


def pick_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a CUDA device that supports it, else float32; names like ``bf16`` map to dtypes.

    Raises:
        PolyfuseError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dev = torch.device(device) if isinstance(device, str) else device
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        choices = ", ".join(["auto", *_DTYPES])
        raise PolyfuseError(f"unknown dtype {dtype!r}; choose one of {choices}") from None


@functools.cache
def _quiet_transformers() -> None:
    """Silence the tqdm bars transformers shows on every save/load (once per process)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_hint(resolved: ResolvedModel) -> str:
    if resolved.is_local:
        return "check that the directory was written by save_pretrained and is complete"
    return (
        "check the hub id and revision and your network; offline (HF_HUB_OFFLINE=1) the model must "
        "already be in the local cache, or give a local directory"
    )


@functools.cache
def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub endpoint opens within 5 s (asked once per process)."""
    import socket
    import urllib.parse

    url = urllib.parse.urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=5):
            return True
    except OSError:
        return False


def _hub_kwargs(resolved: ResolvedModel, kind: Literal["model", "tokenizer"]) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for a hub id when the hub cannot be reached: the local cache only.

    Without this, the hub client retries for most of a minute before failing.

    Raises:
        ModelLoadError: the hub cannot be reached and the model is not in the local cache.
    """
    if resolved.is_local:
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or _reachable(constants.ENDPOINT):
        return {}
    file = "tokenizer_config.json" if kind == "tokenizer" else "config.json"
    if isinstance(try_to_load_from_cache(resolved.location, file, revision=resolved.revision), str):
        return {"local_files_only": True}
    raise ModelLoadError(
        f"{kind} {resolved.ref!r}: the hub ({constants.ENDPOINT}) cannot be reached and it is not in the local "
        "cache; connect and rerun, download it beforehand, or give a local directory"
    )


def load_tokenizer(
    resolved_or_ref: ResolvedModel | str,
    tokenizer: str | None = None,
    *,
    world_dir: str | Path = "runs/world",
    **kw: Any,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, or the one named by ``tokenizer`` (a path, hub id or ``world:NAME``).

    Extra keyword arguments go to ``AutoTokenizer.from_pretrained``.

    Raises:
        ModelLoadError: the reference cannot be resolved or the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    _quiet_transformers()
    if tokenizer is not None:
        resolved = resolve_model_ref(tokenizer, world_dir=world_dir, kind="tokenizer")
    elif isinstance(resolved_or_ref, str):
        resolved = resolve_model_ref(resolved_or_ref, world_dir=world_dir, kind="tokenizer")
    else:
        resolved = resolved_or_ref
    kw = {**_hub_kwargs(resolved, "tokenizer"), **kw}
    try:
        return AutoTokenizer.from_pretrained(resolved.location, revision=resolved.revision, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load tokenizer from {resolved}: {_first_line(e)}; {_load_hint(resolved)}"
        ) from e


def load_model(
    resolved: ResolvedModel | str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    world_dir: str | Path = "runs/world",
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM``, in eval mode, on ``device`` in ``dtype``.

    Raises:
        ModelLoadError: the reference cannot be resolved or the model cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    if isinstance(resolved, str):
        resolved = resolve_model_ref(resolved, world_dir=world_dir)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, revision=resolved.revision, dtype=torch_dtype, **_hub_kwargs(resolved, "model")
        )
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(
            f"cannot load model from {resolved}: {_first_line(e)}; {_load_hint(resolved)}"
        ) from e
    return model.to(dev).eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


def vocab_facts(
    model_or_config: PreTrainedModel | PreTrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> VocabFacts:
    """Read tokenizer length, embedding rows and head tying from a model (or its config) and tokenizer.

    For a model the actual embedding matrix and weight sharing are inspected; for a config,
    ``vocab_size`` and ``tie_word_embeddings`` of its text (decoder) part are used.
    """
    config = getattr(model_or_config, "config", model_or_config)
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rows = int(text_config.vocab_size)
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if hasattr(model_or_config, "get_input_embeddings"):
        emb_in = model_or_config.get_input_embeddings()
        emb_out = model_or_config.get_output_embeddings()
        if emb_in is not None:
            rows = int(emb_in.weight.shape[0])
            if emb_out is not None:
                tied = (
                    emb_in.weight is emb_out.weight or emb_in.weight.data_ptr() == emb_out.weight.data_ptr()
                )
    return VocabFacts(tokenizer_len=len(tokenizer), embedding_rows=rows, tied=tied)


def context_length(config: Any) -> int | None:
    """The longest sequence a model config declares (``max_position_embeddings``, ``n_positions`` or
    ``max_seq_len``, read from the text config of multimodal models); None when it declares none."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def bos_context_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id used as left context of a document's first token: BOS, else EOS, else ``None``.

    With ``None`` the first token of each document has no context and cannot be scored.
    """
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


# --------------------------------------------------------------------------------------------------
# what every stage resolves and loads


def resolve_all(models: Sequence[tuple[str, str, str | None, str | None]], *,
                world_dir: str | Path) -> list[tuple[str, Any, str | None]]:
    """Resolve every ``(name, ref, revision, tokenizer)`` up front, so a bad path fails before any work."""
    return [(name, resolve_model_ref(ref, world_dir=world_dir, revision=rev), tok)
            for name, ref, rev, tok in models]


def lazy_loaders(resolved: Sequence[tuple[str, Any, str | None]], *, dtype: str = "auto",
                 device: str = "auto") -> list[tuple[str, Callable[[], Any]]]:
    """``(name, load)`` pairs; evaluation calls ``load()`` one model at a time. A tokenizer with ids the model
    has no embedding row for is refused in one line (:meth:`polyfuse.models.VocabFacts.check`)."""
    def make(res, tok):
        def load():
            model, tokenizer = load_model(res, dtype=dtype, device=device), load_tokenizer(res, tok)
            vocab_facts(model, tokenizer).check(str(res))
            return model, tokenizer

        return load

    return [(name, make(res, tok)) for name, res, tok in resolved]


def data_dir(ref: str, world_dir: str | Path) -> str:
    """``world:corpus`` → ``<world>/corpus``; anything else is a directory path."""
    return str(Path(world_dir) / ref.removeprefix("world:")) if ref.startswith("world:") else ref
