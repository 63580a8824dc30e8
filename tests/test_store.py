"""The top-k store: exact fp16 round trip, bit-packed ids, memory-mapped reads, datasets compatibility, size."""

from __future__ import annotations

import filecmp
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
    id_bits_for,
    pack_ids,
    shard_name,
    unpack_ids,
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
    ("vocab", "bits"),
    [
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 3),
        (512, 10),
        (32_000, 15),
        (50_432, 16),
        (65_535, 16),
        (65_536, 17),
        (151_936, 18),
        (262_144, 19),
        ((1 << 24) - 1, 24),
        (1 << 24, 25),
    ],
)
def test_id_bits(vocab: int, bits: int) -> None:
    """ceil(log2(V + 1)): the ids 0..V-1 and one PAD value."""
    assert id_bits_for(vocab) == bits
    assert vocab <= (1 << bits) - 1 < 2 * vocab + 1


def edge_vocabs() -> list[int]:
    """V = 2**n - 1, 2**n, 2**n + 1 for n = 1..24, restricted to 2..2**24."""
    return sorted({v for n in range(1, 25) for v in (2**n - 1, 2**n, 2**n + 1) if 2 <= v <= 1 << 24})


def test_id_packing_round_trip_every_edge() -> None:
    """Each edge vocabulary and k = 1..16: 0, V - 1, PAD and random ids survive; the size is exact."""
    rng = np.random.default_rng(10)
    for vocab in edge_vocabs():
        bits = id_bits_for(vocab)
        for k in range(1, 17):
            P = 3 + k % 4
            ids = rng.integers(0, vocab, size=(P, k))  # [P, k]
            ids[0, 0], ids[-1, -1] = vocab - 1, 0
            ids[1, k // 2 :] = -1
            raw = pack_ids(ids, bits)
            assert len(raw) == -(-ids.size * bits // 8), (vocab, k)
            got = unpack_ids(raw, bits, ids.size).reshape(P, k)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, ids, err_msg=f"vocab {vocab}, k {k}")


@pytest.mark.parametrize("bits", [1, 7, 8, 9, 17, 24, 25, 32])
def test_id_packing_layout(bits: int) -> None:
    """LSB-first bit stream: id i sits at stream bits [i * bits, (i + 1) * bits); padding bits are zero."""
    pad = (1 << bits) - 1
    ids = np.array([0, min(1, pad - 1), pad - 1, -1, (pad - 1) // 3, 5 % pad], dtype=np.int64)
    raw = pack_ids(ids, bits)
    stream = int.from_bytes(raw, "little")
    want = sum((pad if v < 0 else int(v)) << (i * bits) for i, v in enumerate(ids))
    assert stream == want and len(raw) == -(-len(ids) * bits // 8)
    np.testing.assert_array_equal(unpack_ids(raw, bits, len(ids)), ids)
    assert unpack_ids(raw, bits, 0).shape == (0,) and pack_ids(np.zeros(0, np.int64), bits) == b""
    with pytest.raises(ValueError, match=r"\[-1, "):
        pack_ids(np.array([pad]), bits)
    with pytest.raises(ValueError, match="fewer than"):
        unpack_ids(raw, bits, len(ids) + 8)


@pytest.mark.parametrize("vocab", [2, 512, 65_535, 65_536, 70_000, (1 << 24) - 1, 1 << 24])
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
    odd = shards[0][0]
    odd.logprobs[1, 0], odd.logprobs[2, 0] = np.float16(0.0), np.float16(-0.0)  # signed zeros stay as they are
    odd.target_logprob[3] = np.float16(np.nan)  # aligned stores mark unaligned positions with NaN
    reader = write_store(tmp_path / "s", shards, k=k, vocab=vocab)
    assert reader.id_bits == id_bits_for(vocab) and reader.k == k and reader.vocab_size == vocab
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
    assert info["format"] == "polyfuse.topk" and info["format_version"] == 2
    assert (info["k"], info["vocab_size"], info["id_bits"]) == (3, 64, 7)
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
    ids = unpack_ids(row["topk_ids"], id_bits_for(512), 7 * 10).reshape(-1, 10)
    np.testing.assert_array_equal(ids, rows[1].ids)
    assert same_bits(np.frombuffer(row["topk_logprobs"], dtype="<f2").reshape(-1, 10), rows[1].logprobs)


@pytest.mark.parametrize(
    ("vocab", "per_position"),
    [(32_000, 40.75), (50_432, 42.0), (128_256, 43.25), (151_936, 44.5), (256_000, 44.5), (262_144, 45.75)],
)
def test_bytes_per_token_k10(tmp_path: Path, vocab: int, per_position: float) -> None:
    """k = 10 on 2,047-token blocks: k * id_bits / 8 + 22 B/position (+ 32 B/block, ~1 KiB/shard), <= 48."""
    rng = np.random.default_rng(5)
    shards = [[random_block(rng, s * 16 + i, 2047, 10, vocab, n_pad=i % 2) for i in range(16)] for s in range(2)]
    reader = write_store(tmp_path / "s", shards, k=10, vocab=vocab)
    shard_bytes = sum((tmp_path / "s" / shard_name(i)).stat().st_size for i in range(2))
    per_token = shard_bytes / reader.n_positions
    assert reader.n_positions == 32 * 2047
    assert per_position < per_token < per_position + 0.05
    assert per_token < reader.bytes_per_token() < per_position + 0.1  # store.json included
    assert reader.bytes_per_token() <= 48


def test_rewrite_is_byte_identical(tmp_path: Path) -> None:
    """Same rows, same settings: the same shard bytes and store.json (what resume relies on)."""
    rng = np.random.default_rng(11)
    shards = [[random_block(rng, i, 50 + i, 10, 151_936, n_pad=i % 3) for i in range(4)] for _ in range(2)]
    shards[1] = [BlockTopK(r.block_id + 10, r.ids, r.logprobs, r.target_logprob, r.nll_sum) for r in shards[1]]
    write_store(tmp_path / "a", shards, k=10, vocab=151_936)
    write_store(tmp_path / "b", shards, k=10, vocab=151_936)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [shard_name(0), shard_name(1), STORE_NAME]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert not mismatch and not errors


def test_ids_column_holds_packed_bits(tmp_path: Path) -> None:
    """The ids column of a shard holds exactly ceil(P * k * bits / 8) bytes per block; metadata names them."""
    import pyarrow as pa

    rng = np.random.default_rng(12)
    sizes = (1, 7, 2047)
    rows = [random_block(rng, i, P, 10, 151_936) for i, P in enumerate(sizes)]
    write_store(tmp_path / "s", [rows], k=10, vocab=151_936)
    with pa.ipc.open_stream(pa.memory_map(str(tmp_path / "s" / shard_name(0)), "r")) as stream:
        table = stream.read_all()
    lengths = [len(v) for v in table.column("topk_ids").to_pylist()]
    assert lengths == [-(-P * 10 * 18 // 8) for P in sizes]
    info = json.loads(table.schema.metadata[b"polyfuse.topk"])
    assert info == {"format_version": 2, "id_bits": 18, "k": 10}


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
    with pytest.raises(DataError, match="version 99.*re-run the capture"):
        StoreReader(tmp_path)


def test_version_1_stores_are_refused_with_the_fix(tmp_path: Path) -> None:
    """A finalized or pending store of format 1 (byte-aligned ids) is neither read nor resumed into."""
    old = {"format": "polyfuse.topk", "format_version": 1, "k": 10, "vocab_size": 512, "id_width": 2,
           "meta": {"temperature": 1.0}, "blocks": 0, "positions": 0, "shards": []}
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / STORE_NAME).write_text(json.dumps(old))
    with pytest.raises(DataError, match=r"version 1, this polyfuse reads 'polyfuse.topk' version 2.*--force"):
        StoreReader(tmp_path / "done")
    (tmp_path / "pending").mkdir()
    (tmp_path / "pending" / PENDING_NAME).write_text(json.dumps(old))
    with pytest.raises(DataError, match="format version 1.*re-run the capture"):
        StoreWriter(tmp_path / "pending", k=10, vocab_size=512, meta={})
