"""Safetensors I/O for the merge engine: header-only indexes, row-chunk reads, streaming shard writes.

Reading never loads a whole checkpoint: :func:`read_index` parses only the JSON headers, and
:func:`read_rows` opens the shard with ``safetensors.safe_open`` (memory-mapped) for one row range
and lets the mapping go when the caller drops the tensor, so resident memory stays at the size of
the chunks in use. :class:`StreamingShardWriter` writes a safetensors file whose header is known up
front (names, dtypes, shapes) and whose data arrive in row chunks, so an output shard never has
to sit in memory either.

File format (safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from polyfuse.errors import ModelLoadError

__all__ = [
    "DTYPES",
    "TensorInfo",
    "StreamingShardWriter",
    "dtype_name",
    "read_index",
    "read_rows",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype names -> torch dtypes (the ones torch can hold)."""

_NAMES = {v: k for k, v in DTYPES.items()}
_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``F32``)."""
    return _NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a checkpoint and what it is, read from a shard header."""

    name: str
    file: Path
    dtype: str
    """safetensors dtype name, e.g. ``F32`` or ``BF16``."""
    shape: tuple[int, ...]
    offset: int
    """Byte offset of the tensor's data inside its shard (orders tensors as they were written)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


def _read_header(file: Path) -> dict:
    try:
        with file.open("rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            if not 0 < n < _MAX_HEADER:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"{file}: not a readable safetensors file ({e}); re-save the model with save_pretrained"
        ) from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file}: malformed safetensors header; re-save the model with save_pretrained")
    return header


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: unreadable index ({e}); re-save the model with save_pretrained") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(
                f"{index} names shard(s) that are missing: {', '.join(missing[:3])}; copy the complete checkpoint"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        has_bin = any(model_dir.glob("*.bin"))
        hint = (
            "it holds only PyTorch .bin weights; convert it with "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
            if has_bin
            else "save the model there with save_pretrained"
        )
        raise ModelLoadError(f"{model_dir}: no .safetensors weights; {hint}")
    return files


def read_index(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, from the shard headers only (no tensor data is read).

    The directory holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
    (or any ``*.safetensors`` files). The result is ordered as the tensors are stored (file, offset).

    Raises:
        ModelLoadError: no safetensors weights, an unreadable header, or a tensor in two shards.
    """
    model_dir = Path(model_dir)
    tensors: dict[str, TensorInfo] = {}
    for file in _weight_files(model_dir):
        header = _read_header(file)
        entries = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                info = TensorInfo(name, file, str(meta["dtype"]), tuple(int(s) for s in meta["shape"]),
                                  int(meta["data_offsets"][0]))
            except (KeyError, TypeError, ValueError, IndexError):
                raise ModelLoadError(f"{file}: malformed header entry for tensor {name!r}") from None
            entries.append(info)
        for info in sorted(entries, key=lambda i: i.offset):
            if info.name in tensors:
                raise ModelLoadError(
                    f"{model_dir}: tensor {info.name!r} is stored twice ({tensors[info.name].file.name} and "
                    f"{file.name}); re-save the model with save_pretrained"
                )
            tensors[info.name] = info
    return tensors


def read_rows(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor along dim 0 (the whole tensor for 0-d tensors).

    The result may be backed by the shard's memory map (zero-copy, read-only): never modify it in
    place; the mapping is released when the tensor is dropped.
    """
    from safetensors import safe_open

    with safe_open(str(info.file), framework="pt") as f:
        if not info.shape:
            return f.get_tensor(info.name)
        return f.get_slice(info.name)[start:stop]


class StreamingShardWriter:
    """Write one safetensors file whose tensors arrive in order, each as a sequence of row chunks.

    ``entries`` fixes the tensors (name, dtype, shape) and their order before any data is written::

        with StreamingShardWriter(path, [("w", torch.float32, (4, 2))]) as w:
            w.write("w", torch.zeros(3, 2))
            w.write("w", torch.ones(1, 2))
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._sizes: list[tuple[str, torch.dtype, int]] = []
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, dtype, shape in entries:
            n = 1
            for s in shape:
                n *= s
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, dtype, nbytes))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # data start 8-byte aligned; trailing spaces are allowed
        self._file: BinaryIO = self.path.open("xb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._pos = -1  # index into _sizes of the tensor being written
        self._left = 0
        self._advance()

    def _advance(self) -> None:
        """Move to the next tensor that still needs bytes (tensors with no elements need none)."""
        while self._left == 0 and self._pos < len(self._sizes):
            self._pos += 1
            self._left = self._sizes[self._pos][2] if self._pos < len(self._sizes) else -1

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next rows of tensor ``name`` (cast to the tensor's declared dtype)."""
        if chunk.numel() == 0:
            return
        if self._pos >= len(self._sizes) or self._sizes[self._pos][0] != name:
            expected = self._sizes[self._pos][0] if self._pos < len(self._sizes) else "nothing"
            raise RuntimeError(f"{self.path.name}: got rows of {name!r}, expected {expected!r}")
        dtype = self._sizes[self._pos][1]
        data = chunk.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._left:
            raise RuntimeError(f"{self.path.name}: too many bytes for {name!r}")
        self._file.write(memoryview(data))
        self._left -= data.nbytes
        self._advance()

    def close(self) -> None:
        """Flush and close; raises if a declared tensor did not get all its bytes."""
        done = self._pos >= len(self._sizes)
        self._file.flush()
        self._file.close()
        if not done:
            raise RuntimeError(f"{self.path.name}: tensor {self._sizes[self._pos][0]!r} is incomplete")

    def __enter__(self) -> StreamingShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
