"""The top-k store: each position's top-k next-token log-probs, per block; the only module that knows
the on-disk layout.

A store is a directory::

    store.json            format, format_version (2), k, vocab_size, id_bits, meta (model, tokenizer,
                          temperature, ...), blocks, positions and the shard list (file, index, rows,
                          first/last block, positions, bytes, sha256)
    shard-00000.arrow     Arrow IPC *stream* files, uncompressed (the `.arrow` files of `datasets`):
    shard-00001.arrow     memory-mapped on read; `datasets.Dataset.from_file(path)` opens one as is

One row per block (P = the block's token count - 1 positions; position t predicts token t + 1):

=================  =========  ==================================================================
column             type       content
=================  =========  ==================================================================
``block_id``       int64      the block's id (any int; unique within the store)
``n_positions``    int32      P
``nll_sum``        float64    sum over positions of -ln p(actual next token) (from fp32 values)
``topk_ids``       binary     P x k ids, row-major, bit-packed at ``id_bits`` bits each
``topk_logprobs``  binary     P x k float16 (little-endian) log-probs, sorted descending per position
``target_logprob`` binary     P float16: log-prob of the actual next token
``prefix_logmass`` binary     only with ``prefix_bytes`` L > 0: P x L float16; entry ``[t, l-1]`` is the
                              log of the probability that the next token's bytes start with the first
                              ``l`` bytes of the actual next token and go on past them (NaN where the
                              actual token has ``l`` bytes or fewer, or is a special token)
=================  =========  ==================================================================

**Ids.** ``id_bits`` = ``vocab_size.bit_length()`` = ceil(log2(vocab_size + 1)): the fewest bits that
hold every id ``0..vocab_size-1`` plus one reserved PAD value, ``2**id_bits - 1``. A block's ``P * k``
ids form one bit stream, least significant bit first: id i occupies stream bits
``[i * id_bits, (i + 1) * id_bits)``, and stream bit j is bit ``j % 8`` of byte ``j // 8`` (numpy's
``bitorder="little"``); the last byte is zero-padded, so the column holds ``ceil(P * k * id_bits / 8)``
bytes. :func:`pack_ids` and :func:`unpack_ids` are the vectorised codec.

**Padding.** A padding entry (a fused or aligned store with fewer than k valid entries at a position)
has id PAD and log-prob -inf; the reader returns it as id -1. A real entry's log-prob is finite
(captures clamp it to -65504, the smallest fp16). Log-probs are stored bit for bit (NaN payloads and
signed zeros included): nothing of the fp16 values is lost.

**Size.** A position costs ``k * id_bits / 8 + 2 * k + 2`` bytes, plus 32 bytes per block (fixed
columns and offsets) and ~1 KiB per shard (schema, ``store.json``). At k = 10:

======================  =======  ================  ==========================================
vocab_size              id_bits  bytes / position  e.g.
======================  =======  ================  ==========================================
16,384 .. 32,767        15       40.75             Llama-2, Mistral-7B (32,000)
32,768 .. 65,535        16       42.0              GPT-2 (50,257), MPT (50,432)
65,536 .. 131,071       17       43.25             Llama-3 (128,256)
131,072 .. 262,143      18       44.5              Qwen2 (151,936), BLOOM (250,880)
262,144 .. 524,287      19       45.75             Gemma-3 (262,144)
524,288 .. 1,048,575    20       47.0
======================  =======  ================  ==========================================

so every vocabulary up to 1,048,575 ids stays under 48 bytes per position at k = 10 (larger ones
cost 1.25 bytes per extra bit, up to 53.25 at 2**24).

**Versions.** Version 1 (byte-aligned 2/3/4-byte ids, ``id_width``) is not read: the reader names
the fix (capture again). A shard's schema metadata (key ``polyfuse.topk``) repeats k, id_bits and the
format version, so a lone shard can be decoded.

Writing is resumable: each shard is written to a temp file and renamed, so a shard file that
exists is complete; `store.json` is written last, by :meth:`StoreWriter.finalize`. Until then
`store.pending.json` records what the store is for, so a resumed writer with different settings is
refused instead of mixing two stores. The bytes of a shard depend only on its rows, so a rerun
writes byte-identical shards.

    >>> w = StoreWriter(out, k=10, vocab_size=512, meta={"model": "world:prose"})
    >>> w.write_shard(0, [BlockTopK(0, ids, logprobs, target_logprob, nll_sum)])
    >>> w.finalize()
    >>> StoreReader(out)[0].logprobs.shape      # (P, 10) float16, memory-mapped
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from polyfuse.errors import DataError
from polyfuse.workspace import atomic_write_bytes, atomic_write_json, clean_stale_temps, normalise_config

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PENDING_NAME",
    "STORE_NAME",
    "BlockTopK",
    "StoreReader",
    "StoreWriter",
    "id_bits_for",
    "is_store",
    "pack_ids",
    "shard_name",
    "unpack_ids",
]

FORMAT = "polyfuse.topk"
FORMAT_VERSION = 2
STORE_NAME = "store.json"
PENDING_NAME = "store.pending.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.arrow$")
_BINARY_LIMIT = (1 << 31) - 1  # int32 offsets of `binary`; bigger shard columns use `large_binary`
_IDENTITY_KEYS = ("format", "format_version", "k", "vocab_size", "id_bits", "prefix_bytes", "meta")
_MAX_ID_BITS = 32


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``shard-00000.arrow``)."""
    return f"shard-{index:05d}.arrow"


def id_bits_for(vocab_size: int) -> int:
    """Bits per stored id: ceil(log2(vocab_size + 1)), room for ids ``0..vocab_size-1`` plus the PAD value."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    bits = int(vocab_size).bit_length()
    if bits > _MAX_ID_BITS:
        raise ValueError(f"vocab_size {vocab_size} does not fit {_MAX_ID_BITS}-bit ids")
    return bits


def _pad_value(bits: int) -> int:
    return (1 << bits) - 1


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= _MAX_ID_BITS:
        raise ValueError(f"id bits must lie in [1, {_MAX_ID_BITS}], got {bits}")


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    """Bit-pack int ids (-1 = padding -> PAD) at ``bits`` bits each, LSB first; ``ceil(n * bits / 8)`` bytes.

    ``ids`` of any shape (flattened row-major, ``n`` entries) with values in ``[-1, 2**bits - 1)``.
    """
    _check_bits(bits)
    flat = np.asarray(ids).reshape(-1)  # [n]
    if flat.size and (flat.min() < -1 or flat.max() >= _pad_value(bits)):
        raise ValueError(f"ids must lie in [-1, {_pad_value(bits)}) to pack them at {bits} bits")
    words = np.where(flat < 0, _pad_value(bits), flat).astype("<u4")  # [n]
    stream = np.unpackbits(words.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")  # [n, 32]
    return np.packbits(stream[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack_ids(data: np.ndarray | bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: the first ``count`` ids as int64 ``[count]``, PAD returned as -1.

    Each id is read from the 8 bytes starting at its first byte (one gather, one shift, one mask).
    """
    _check_bits(bits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size * 8 < count * bits:
        raise ValueError(f"{raw.size} bytes hold fewer than {count} ids of {bits} bits")
    start = np.arange(count, dtype=np.int64) * bits  # [count] first stream bit of each id
    padded = np.concatenate([raw[: (count * bits + 7) // 8], np.zeros(8, np.uint8)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)[start >> 3]  # [count, 8]
    words = np.ascontiguousarray(windows).view("<u8")[:, 0]  # [count]
    ids = ((words >> (start & 7).astype(np.uint64)) & np.uint64(_pad_value(bits))).astype(np.int64)
    ids[ids == _pad_value(bits)] = -1
    return ids


@dataclass
class BlockTopK:
    """One block's captured distributions (P positions; position t predicts token t + 1).

    ``ids`` [P, k] int64 (-1 = padding), ``logprobs`` [P, k] float16 sorted descending within a
    position (-inf for padding), ``target_logprob`` [P] float16 (log-prob of the actual next
    token), ``nll_sum`` = sum of -ln p(actual next token) over positions (from fp32 values).
    """

    block_id: int
    ids: np.ndarray
    logprobs: np.ndarray
    target_logprob: np.ndarray
    nll_sum: float
    prefix_logmass: np.ndarray | None = None
    """[P, L] float16 or None: log-mass of the tokens that extend each byte prefix of the actual next
    token (:mod:`polyfuse.capture.prefix`); what a position inside that token is conditioned on."""

    @property
    def n_positions(self) -> int:
        """P, the number of scored positions."""
        return int(self.target_logprob.shape[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _binary(chunks: list[bytes]) -> pa.Array:
    kind = pa.large_binary() if sum(map(len, chunks)) > _BINARY_LIMIT else pa.binary()
    return pa.array(chunks, type=kind)


def is_store(path: str | Path) -> bool:
    """True when ``path`` holds a finalized store (a ``store.json``)."""
    return (Path(path) / STORE_NAME).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err}); delete the store directory and capture again") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a JSON object; delete the store directory and capture again")
    return data


class StoreWriter:
    """Write a top-k store shard by shard; several processes may write disjoint shards of one store.

    Args:
        out_dir: the store directory (created if missing).
        k: entries per position.
        vocab_size: ids are in ``[0, vocab_size)``; decides ``id_bits``.
        meta: what produced the store (model ref, tokenizer name and length, temperature, ...);
            JSON-serialisable, kept in ``store.json``. ``temperature`` defaults to 1.0.

    Raises:
        DataError: ``out_dir`` already holds a (pending or finalized) store with other settings.
    """

    def __init__(self, out_dir: str | Path, *, k: int, vocab_size: int, meta: Mapping[str, Any],
                 prefix_bytes: int = 0) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if prefix_bytes < 0:
            raise ValueError(f"prefix_bytes must be >= 0, got {prefix_bytes}")
        self.prefix_bytes = int(prefix_bytes)
        self.out_dir = Path(out_dir)
        self.k = int(k)
        self.vocab_size = int(vocab_size)
        self.id_bits = id_bits_for(self.vocab_size)
        meta = normalise_config({"temperature": 1.0, **dict(meta)})
        self.identity: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "id_bits": self.id_bits,
            **({"prefix_bytes": self.prefix_bytes} if self.prefix_bytes else {}),
            "meta": meta,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_or_claim()

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` recorded in ``store.json``."""
        return self.identity["meta"]

    def _check_or_claim(self) -> None:
        for name in (STORE_NAME, PENDING_NAME):
            path = self.out_dir / name
            if not path.is_file():
                continue
            found = _read_json(path)
            if found.get("format_version") != FORMAT_VERSION:
                raise DataError(
                    f"{path}: a store of format version {found.get('format_version')!r}, this polyfuse writes "
                    f"version {FORMAT_VERSION}; delete {self.out_dir} and re-run the capture (or rerun the "
                    "stage with --force)"
                )
            old = {key: found.get(key) for key in _IDENTITY_KEYS}
            mine = {key: self.identity.get(key) for key in _IDENTITY_KEYS}
            if old != mine:
                diff = sorted(key for key in _IDENTITY_KEYS if old.get(key) != mine[key])
                raise DataError(
                    f"{self.out_dir}: holds a store written with other settings ({', '.join(diff)} differ); "
                    "use another directory or delete this one"
                )
            return
        atomic_write_json(self.out_dir / PENDING_NAME, self.identity)

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.out_dir / shard_name(index)

    def has_shard(self, index: int) -> bool:
        """Whether shard ``index`` was written completely (shards appear by rename only)."""
        return self.shard_path(index).is_file()

    def existing_shards(self) -> list[int]:
        """Indices of the shards written so far, sorted."""
        found = (_SHARD_RE.match(p.name) for p in self.out_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _check_row(self, row: BlockTopK) -> None:
        P = row.target_logprob.shape[0] if row.target_logprob.ndim == 1 else -1
        where = f"block {row.block_id}"
        if row.target_logprob.ndim != 1 or row.ids.shape != (P, self.k) or row.logprobs.shape != (P, self.k):
            raise ValueError(
                f"{where}: expected ids and logprobs [P, {self.k}] and target_logprob [P], got "
                f"{row.ids.shape}, {row.logprobs.shape}, {row.target_logprob.shape}"
            )
        if row.logprobs.dtype != np.float16 or row.target_logprob.dtype != np.float16:
            raise ValueError(f"{where}: logprobs and target_logprob must be float16")
        L = self.prefix_bytes
        if L and (row.prefix_logmass is None or row.prefix_logmass.shape != (P, L)
                  or row.prefix_logmass.dtype != np.float16):
            raise ValueError(f"{where}: expected prefix_logmass [P, {L}] float16 (the store has prefix_bytes={L})")
        if P == 0:
            return
        if row.ids.min() < -1 or row.ids.max() >= self.vocab_size:
            raise ValueError(f"{where}: ids must lie in [0, {self.vocab_size}) or be -1 (padding)")
        if not np.all(row.logprobs[:, :-1] >= row.logprobs[:, 1:]):
            raise ValueError(f"{where}: logprobs must be sorted descending per position (and not NaN)")
        if np.any(np.isneginf(row.logprobs) != (row.ids < 0)):
            raise ValueError(f"{where}: padding entries (id -1) and only they must have log-prob -inf")

    def write_shard(self, shard_index: int, rows: Sequence[BlockTopK]) -> Path:
        """Write shard ``shard_index`` (one row per block, in the given order) atomically; return its path."""
        for row in rows:
            self._check_row(row)
        info = {"k": self.k, "id_bits": self.id_bits, "format_version": FORMAT_VERSION}
        schema = pa.schema(
            [
                ("block_id", pa.int64()),
                ("n_positions", pa.int32()),
                ("nll_sum", pa.float64()),
                ("topk_ids", pa.binary()),
                ("topk_logprobs", pa.binary()),
                ("target_logprob", pa.binary()),
                *([("prefix_logmass", pa.binary())] if self.prefix_bytes else []),
            ],
            metadata={FORMAT: json.dumps(info, sort_keys=True)},
        )
        columns = [
            pa.array([int(r.block_id) for r in rows], type=pa.int64()),
            pa.array([r.n_positions for r in rows], type=pa.int32()),
            pa.array([float(r.nll_sum) for r in rows], type=pa.float64()),
            _binary([pack_ids(r.ids, self.id_bits) for r in rows]),
            _binary([np.ascontiguousarray(r.logprobs, dtype="<f2").tobytes() for r in rows]),
            _binary([np.ascontiguousarray(r.target_logprob, dtype="<f2").tobytes() for r in rows]),
            *([_binary([np.ascontiguousarray(r.prefix_logmass, dtype="<f2").tobytes() for r in rows])]
              if self.prefix_bytes else []),
        ]
        fields = [f.with_type(c.type) for f, c in zip(schema, columns, strict=True)]
        schema = pa.schema(fields, metadata=schema.metadata)
        batch = pa.record_batch(columns, schema=schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as stream:  # uncompressed: readers memory-map it
            stream.write_batch(batch)
        return atomic_write_bytes(self.shard_path(shard_index), sink.getvalue().to_pybytes())

    def finalize(self, n_shards: int | None = None) -> dict[str, Any]:
        """Write ``store.json`` listing every shard (checks that shards ``0..n_shards-1`` all exist).

        Also removes temp files left by killed writers. Returns the ``store.json`` content.

        Raises:
            DataError: a shard is missing, or a block id occurs twice.
        """
        clean_stale_temps(self.out_dir)
        found = self.existing_shards()
        expected = list(range(n_shards if n_shards is not None else (max(found) + 1 if found else 0)))
        missing = sorted(set(expected) - set(found))
        if missing:
            shown = ", ".join(shard_name(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(
                f"{self.out_dir}: {len(missing)} shard(s) missing ({shown}); finish the capture "
                "(rerun it: it resumes) before finalizing"
            )
        extra = sorted(set(found) - set(expected))
        if extra:
            raise DataError(
                f"{self.out_dir}: unexpected shard(s) {', '.join(shard_name(i) for i in extra)} beyond "
                f"the {len(expected)} expected; delete the directory and capture again"
            )
        shards, seen, positions, blocks = [], set(), 0, 0
        for index in expected:
            path = self.shard_path(index)
            table = _open_table(path)
            block_ids = table.column("block_id").to_numpy()
            n_pos = int(np.asarray(table.column("n_positions").to_numpy(), dtype=np.int64).sum())
            dup = seen.intersection(block_ids.tolist())
            if dup:
                raise DataError(f"{path}: block id(s) {sorted(dup)[:5]} also occur in an earlier shard")
            seen.update(block_ids.tolist())
            shards.append(
                {
                    "file": path.name,
                    "index": index,
                    "rows": int(table.num_rows),
                    "first_block": int(block_ids[0]) if len(block_ids) else None,
                    "last_block": int(block_ids[-1]) if len(block_ids) else None,
                    "positions": n_pos,
                    "bytes": path.stat().st_size,
                    "sha256": _sha256(path),
                }
            )
            positions += n_pos
            blocks += int(table.num_rows)
        content = {**self.identity, "blocks": blocks, "positions": positions, "shards": shards}
        atomic_write_json(self.out_dir / STORE_NAME, content)
        (self.out_dir / PENDING_NAME).unlink(missing_ok=True)
        return content


def _open_table(path: Path) -> pa.Table:
    """Memory-map an IPC stream file; the table's buffers point into the mapping (no copy)."""
    try:
        with pa.ipc.open_stream(pa.memory_map(str(path), "r")) as reader:
            return reader.read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(
            f"{path}: unreadable shard ({err}); delete the store directory and capture again"
        ) from None


class _Batch:
    """Numpy views over one record batch's columns (offsets and data buffers of the binary columns)."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.block_id = batch.column("block_id").to_numpy()
        self.nll_sum = batch.column("nll_sum").to_numpy()
        self.binary = {name: self._views(batch.column(name)) for name in _BINARY_COLUMNS
                       if name in batch.schema.names}

    @staticmethod
    def _views(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        _, offsets, data = col.buffers()
        off_type = np.int64 if pa.types.is_large_binary(col.type) else np.int32
        off = np.frombuffer(offsets, dtype=off_type)[col.offset : col.offset + len(col) + 1]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        return off, raw

    def bytes_of(self, name: str, row: int) -> np.ndarray:
        off, raw = self.binary[name]
        return raw[off[row] : off[row + 1]]


_BINARY_COLUMNS = ("topk_ids", "topk_logprobs", "target_logprob", "prefix_logmass")


class StoreReader:
    """Read a finalized store; rows come back as :class:`BlockTopK` over memory-mapped data.

    ``logprobs`` and ``target_logprob`` are read-only float16 views into the mapped files (no
    copy); ``ids`` are decoded to int64 (one small copy per block). Blocks are looked up by
    ``block_id``; iteration follows the store order (shard by shard, row by row).

    Raises:
        DataError: no ``store.json`` (capture not finished), another format version, or a
            missing or unreadable shard.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        file = self.path / STORE_NAME
        if not file.is_file():
            hint = (
                "the capture has not finished; rerun it (it resumes) to finalize the store"
                if (self.path / PENDING_NAME).is_file()
                else "not a top-k store directory; run the capture stage first"
            )
            raise DataError(f"{self.path}: no {STORE_NAME}; {hint}")
        self.info: dict[str, Any] = _read_json(file)
        if self.info.get("format") != FORMAT or self.info.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{file}: format {self.info.get('format')!r} version {self.info.get('format_version')!r}, "
                f"this polyfuse reads {FORMAT!r} version {FORMAT_VERSION} only; re-run the capture to rewrite it "
                "(polyfuse capture RECIPE --force, then polyfuse run RECIPE for the stages after it)"
            )
        self.k = int(self.info["k"])
        self.vocab_size = int(self.info["vocab_size"])
        self.id_bits = int(self.info["id_bits"])
        self.prefix_bytes = int(self.info.get("prefix_bytes", 0))
        self._batches: list[_Batch] = []
        self._index: dict[int, tuple[int, int]] = {}
        for shard in self.info["shards"]:
            shard_path = self.path / shard["file"]
            if not shard_path.is_file():
                raise DataError(f"{shard_path}: shard listed in {STORE_NAME} is missing; capture again")
            for batch in _open_table(shard_path).to_batches():
                view = _Batch(batch)
                number = len(self._batches)
                self._batches.append(view)
                for row, block_id in enumerate(view.block_id.tolist()):
                    self._index[block_id] = (number, row)
        self._order = list(self._index)

    @property
    def meta(self) -> dict[str, Any]:
        """What produced the store (model ref, tokenizer, temperature, ...), as given to the writer."""
        return self.info["meta"]

    @property
    def temperature(self) -> float:
        """Softmax temperature of the stored log-probs."""
        return float(self.meta.get("temperature", 1.0))

    @property
    def block_ids(self) -> list[int]:
        """Block ids in store order."""
        return list(self._order)

    @property
    def n_positions(self) -> int:
        """Total positions (scored tokens) in the store."""
        return int(self.info["positions"])

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._index

    def __getitem__(self, block_id: int) -> BlockTopK:
        try:
            number, row = self._index[int(block_id)]
        except KeyError:
            raise KeyError(f"block {block_id} is not in the store {self.path}") from None
        batch = self._batches[number]
        lp = batch.bytes_of("topk_logprobs", row).view("<f2").reshape(-1, self.k)  # [P, k]
        return BlockTopK(
            block_id=int(block_id),
            ids=unpack_ids(batch.bytes_of("topk_ids", row), self.id_bits, lp.size).reshape(-1, self.k),  # [P, k]
            logprobs=lp,
            target_logprob=batch.bytes_of("target_logprob", row).view("<f2"),  # [P]
            nll_sum=float(batch.nll_sum[row]),
            prefix_logmass=(batch.bytes_of("prefix_logmass", row).view("<f2").reshape(-1, self.prefix_bytes)
                            if self.prefix_bytes else None),  # [P, L]
        )

    def __iter__(self) -> Iterator[BlockTopK]:
        for block_id in self._order:
            yield self[block_id]

    def files(self) -> list[Path]:
        """Every file in the store directory."""
        return sorted(p for p in self.path.iterdir() if p.is_file())

    def bytes_per_token(self) -> float:
        """On-disk bytes (all files, ``store.json`` included) per stored position."""
        total = sum(p.stat().st_size for p in self.files())
        return total / self.n_positions if self.n_positions else math.nan

    def verify(self) -> None:
        """Check every shard's sha256 against ``store.json``.

        Raises:
            DataError: a shard's content changed.
        """
        for shard in self.info["shards"]:
            if _sha256(self.path / shard["file"]) != shard["sha256"]:
                raise DataError(
                    f"{self.path / shard['file']}: sha256 mismatch; the shard was modified, capture again"
                )
