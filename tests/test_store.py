"""The top-k store: exact fp16 round trip, id packing, memory-mapped reads, datasets compatibility, size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from polyfuse.capture.store import (
    PENDING_NAME,
    STORE_NAME,
    BlockTopK,
    StoreReader,
    StoreWriter,
    decode_ids,
    encode_ids,
    id_width_for,
    shard_name,
)
from polyfuse.errors import DataError


def random_block(
    rng: np.random.Generator, block_id: int, P: int, k: int, vocab: int, n_pad: int = 0
) -> BlockTopK:
    """A plausible block: sorted fp16 log-probs (subnormals and big negatives included), optional padding."""
    lp = np.sort(-rng.exponential(3.0, size=(P, k)), axis=1)[:, ::-1].astype(np.float16)  # [P, k]
    if P:
        lp[0, -1] = np.float16(-6e-8)  # subnormal fp16 values must survive
        lp[0, :] = np.sort(lp[0])[::-1]
        lp[-1, -1] = np.float16(-60000.0)
    ids = (rng.integers(0, vocab, size=(P, 1)) + np.arange(k) * 7919) % vocab  # [P, k], distinct per row
    if n_pad and P:
        ids[:, k - n_pad :] = -1
        lp[:, k - n_pad :] = -np.inf
    tgt = lp[:, 0] - np.float16(rng.random(P)).astype(np.float16)  # [P]
    return BlockTopK(block_id, ids, lp, tgt.astype(np.float16), float(-tgt.astype(np.float64).sum()))


def write_store(path: Path, rows_per_shard: list[list[BlockTopK]], *, k: int, vocab: int) -> StoreReader:
    writer = StoreWriter(path, k=k, vocab_size=vocab, meta={"model": "test"})
    for i, rows in enumerate(rows_per_shard):
        writer.write_shard(i, rows)
    writer.finalize(len(rows_per_shard))
    return StoreReader(path)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float16 and np.array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize(
    ("vocab", "width"),
    [
        (1, 2),
        (512, 2),
        (65_535, 2),
        (65_536, 3),
        (152_064, 3),
        (262_144, 3),
        ((1 << 24) - 1, 3),
        (1 << 24, 4),
    ],
)
def test_id_width(vocab: int, width: int) -> None:
    assert id_width_for(vocab) == width


@pytest.mark.parametrize("width", [2, 3, 4])
def test_id_packing_round_trip(width: int) -> None:
    top = (1 << (8 * width)) - 2  # largest id; the next value is PAD
    ids = np.array([[0, 1, 255, 256, 65_534], [top, -1, -1, 7, top - 1]], dtype=np.int64)
    raw = encode_ids(ids, width)
    assert len(raw) == ids.size * width
    assert raw[:width] == bytes(width) and raw[2 * width : 3 * width] == (255).to_bytes(width, "little")
    np.testing.assert_array_equal(decode_ids(raw, width).reshape(ids.shape), ids)


@pytest.mark.parametrize("vocab", [512, 70_000, 1 << 24])
def test_round_trip_is_exact(tmp_path: Path, vocab: int) -> None:
    rng = np.random.default_rng(0)
    k = 10
    shards = [
        [
            random_block(rng, 0, 37, k, vocab),
            random_block(rng, 1, 0, k, vocab),
            random_block(rng, 2, 5, k, vocab, 3),
        ],
        [random_block(rng, 3, 1, k, vocab)],
    ]
    reader = write_store(tmp_path / "s", shards, k=k, vocab=vocab)
    assert reader.id_width == id_width_for(vocab) and reader.k == k and reader.vocab_size == vocab
    assert len(reader) == 4 and reader.block_ids == [0, 1, 2, 3]
    for want in (row for rows in shards for row in rows):
        got = reader[want.block_id]
        assert got.n_positions == want.n_positions
        assert got.ids.dtype == np.int64 and got.ids.shape == (want.n_positions, k)
        np.testing.assert_array_equal(got.ids, want.ids)
        assert same_bits(got.logprobs, want.logprobs)
        assert same_bits(got.target_logprob, want.target_logprob)
        assert got.nll_sum == want.nll_sum
    padded = reader[2]
    assert (padded.ids[:, -3:] == -1).all() and np.isneginf(padded.logprobs[:, -3:]).all()
    assert [b.block_id for b in reader] == [0, 1, 2, 3]


def test_reads_are_memory_mapped_views(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    reader = write_store(tmp_path / "s", [[random_block(rng, 9, 20, 4, 100)]], k=4, vocab=100)
    row = reader[9]
    for arr in (row.logprobs, row.target_logprob):
        assert not arr.flags.owndata and not arr.flags.writeable  # a view into the mapped shard


def test_arbitrary_block_ids_and_lookup(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    shards = [
        [random_block(rng, 1000, 3, 2, 50), random_block(rng, 7, 2, 2, 50)],
        [random_block(rng, -5, 1, 2, 50)],
    ]
    reader = write_store(tmp_path / "s", shards, k=2, vocab=50)
    assert reader.block_ids == [1000, 7, -5] and 7 in reader and 8 not in reader
    assert reader[-5].n_positions == 1
    with pytest.raises(KeyError, match="block 8"):
        reader[8]
    info = json.loads((tmp_path / "s" / STORE_NAME).read_text())
    assert [(s["first_block"], s["last_block"], s["rows"]) for s in info["shards"]] == [
        (1000, 7, 2),
        (-5, -5, 1),
    ]


def test_store_json_contents(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    reader = write_store(
        tmp_path / "s", [[random_block(rng, 0, 10, 3, 64)], [random_block(rng, 1, 4, 3, 64)]], k=3, vocab=64
    )
    info = reader.info
    assert info["format"] == "polyfuse.topk" and info["format_version"] == 1
    assert (info["k"], info["vocab_size"], info["id_width"]) == (3, 64, 2)
    assert info["meta"] == {"model": "test", "temperature": 1.0} and reader.temperature == 1.0
    assert (info["blocks"], info["positions"]) == (2, 14)
    assert [s["file"] for s in info["shards"]] == [shard_name(0), shard_name(1)]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in info["shards"])
    assert not (tmp_path / "s" / PENDING_NAME).exists()
    reader.verify()
    shard = tmp_path / "s" / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        StoreReader(tmp_path / "s").verify()


def test_readable_with_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(4)
    rows = [random_block(rng, i, 6 + i, 10, 512) for i in range(3)]
    write_store(tmp_path / "s", [rows], k=10, vocab=512)
    ds = datasets.Dataset.from_file(str(tmp_path / "s" / shard_name(0)))
    assert ds.column_names == [
        "block_id",
        "n_positions",
        "nll_sum",
        "topk_ids",
        "topk_logprobs",
        "target_logprob",
    ]
    assert ds["block_id"] == [0, 1, 2] and ds["n_positions"] == [6, 7, 8]
    row = ds[1]
    ids = np.frombuffer(row["topk_ids"], dtype="<u2").reshape(-1, 10)
    np.testing.assert_array_equal(ids, rows[1].ids)
    assert same_bits(np.frombuffer(row["topk_logprobs"], dtype="<f2").reshape(-1, 10), rows[1].logprobs)


@pytest.mark.parametrize(("vocab", "per_position"), [(512, 42), (152_064, 52)])
def test_bytes_per_token(tmp_path: Path, vocab: int, per_position: int) -> None:
    """k = 10: 2-byte ids give 42 B/position, 3-byte ids 52 B, plus ~32 B per block and ~1 KiB per shard."""
    rng = np.random.default_rng(5)
    shards = [[random_block(rng, s * 64 + i, 2047, 10, vocab) for i in range(64)] for s in range(2)]
    reader = write_store(tmp_path / "s", shards, k=10, vocab=vocab)
    bpt = reader.bytes_per_token()
    assert per_position < bpt < per_position + 0.1
    if reader.id_width == 2:
        assert bpt <= 48


def test_writer_validates_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    writer = StoreWriter(tmp_path / "s", k=4, vocab_size=100, meta={})
    good = random_block(rng, 0, 5, 4, 100)

    def bad(**change: object) -> BlockTopK:
        fields = dict(good.__dict__)
        fields.update(change)
        return BlockTopK(**fields)

    with pytest.raises(ValueError, match=r"\[P, 4\]"):
        writer.write_shard(0, [bad(ids=good.ids[:, :3])])
    with pytest.raises(ValueError, match="float16"):
        writer.write_shard(0, [bad(logprobs=good.logprobs.astype(np.float32))])
    with pytest.raises(ValueError, match="sorted descending"):
        writer.write_shard(0, [bad(logprobs=good.logprobs[:, ::-1].copy())])
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        writer.write_shard(0, [bad(ids=good.ids + 100)])
    padded = good.ids.copy()
    padded[:, -1] = -1
    with pytest.raises(ValueError, match="padding"):
        writer.write_shard(0, [bad(ids=padded)])
    assert writer.existing_shards() == []


def test_finalize_requires_every_shard(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    writer = StoreWriter(tmp_path / "s", k=2, vocab_size=10, meta={})
    writer.write_shard(1, [random_block(rng, 5, 2, 2, 10)])
    with pytest.raises(DataError, match="shard-00000.arrow"):
        writer.finalize(2)
    with pytest.raises(DataError, match="rerun it"):
        StoreReader(tmp_path / "s")
    writer.write_shard(0, [random_block(rng, 5, 2, 2, 10)])
    with pytest.raises(DataError, match="block id"):
        writer.finalize(2)


def test_finalize_removes_stale_temps(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    writer = StoreWriter(tmp_path / "s", k=2, vocab_size=10, meta={})
    writer.write_shard(0, [random_block(rng, 0, 2, 2, 10)])
    (tmp_path / "s" / ".tmp-shard-00001.arrow-999999999-abcd").write_bytes(b"half")
    writer.finalize()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [shard_name(0), STORE_NAME]


def test_other_settings_are_refused(tmp_path: Path) -> None:
    StoreWriter(tmp_path / "s", k=2, vocab_size=10, meta={"model": "a"})
    StoreWriter(tmp_path / "s", k=2, vocab_size=10, meta={"model": "a"})  # same settings: resume
    with pytest.raises(DataError, match="k, meta differ"):
        StoreWriter(tmp_path / "s", k=3, vocab_size=10, meta={"model": "b"})


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a top-k store"):
        StoreReader(tmp_path)
    (tmp_path / STORE_NAME).write_text(json.dumps({"format": "polyfuse.topk", "format_version": 99}))
    with pytest.raises(DataError, match="version 99"):
        StoreReader(tmp_path)
