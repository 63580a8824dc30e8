"""hf capture: equals model(...).logits top-k, skips padding, resumes after SIGKILL, splits across ranks."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from polyfuse.capture import get_backend
from polyfuse.capture import hf as hf_capture
from polyfuse.capture.hf import capture
from polyfuse.capture.store import STORE_NAME, StoreReader, shard_name
from polyfuse.corpus.documents import read_documents
from polyfuse.corpus.tokens import encode_blocks
from polyfuse.errors import DataError, PolyfuseError
from polyfuse.models import load_model, load_tokenizer
from polyfuse.workspace import partial_dir, run_stage

WORLD_MODELS = ("prose", "code", "math", "target")  # GPT-2, GPT-NeoX, Mistral, Llama


def heldout_blocks(world: Path, n: int, chars: int = 160) -> list[tuple[int, str]]:
    """``n`` blocks cut from the held-out corpus every ``chars`` characters (fits the 256-token context)."""
    texts = []
    for domain in ("prose", "code", "math"):
        for doc in read_documents(world / "corpus" / "heldout" / f"{domain}.jsonl"):
            texts += [doc.text[i : i + chars] for i in range(0, len(doc.text), chars)]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [(int(100 + i), texts[j][: int(rng.integers(1, chars + 1))]) for i, j in enumerate(picked)]


@pytest.fixture(scope="module")
def blocks(tiny_world: Path) -> list[tuple[int, str]]:
    return heldout_blocks(tiny_world, 40)


@pytest.fixture(scope="module")
def prose(tiny_world: Path) -> tuple:
    return load_model(str(tiny_world / "models" / "prose"), device="cpu"), load_tokenizer(
        str(tiny_world / "models" / "prose")
    )


def assert_matches_reference(model, tokenizer, blocks, store: Path, k: int) -> None:
    """Every stored row equals log_softmax(model(ids).logits) of the unpadded block, up to fp16 rounding."""
    reader = StoreReader(store)
    assert reader.block_ids == [b for b, _ in blocks]
    for (block_id, _), enc in zip(blocks, encode_blocks(tokenizer, [t for _, t in blocks]), strict=True):
        row = reader[block_id]
        assert row.n_positions == len(enc) - 1  # no padded position is ever stored
        ids = torch.as_tensor(enc.ids)[None]
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [P, V]
        top = ref.topk(k, dim=-1)
        tol = dict(rtol=1e-3, atol=1e-3)
        # ids may swap within exact ties, so compare the reference log-probs *at* the stored ids
        np.testing.assert_allclose(ref.gather(1, torch.as_tensor(row.ids)).numpy(), top.values.numpy(), **tol)
        np.testing.assert_allclose(row.logprobs.astype(np.float32), top.values.numpy(), **tol)
        target = ref.gather(1, ids[0, 1:, None])[:, 0].numpy()  # [P]
        np.testing.assert_allclose(row.target_logprob.astype(np.float32), target, **tol)
        assert row.nll_sum == pytest.approx(
            -target.astype(np.float64).sum(), abs=1e-3 * max(1, row.n_positions)
        )


@pytest.mark.parametrize("name", WORLD_MODELS)
def test_capture_equals_plain_forward(tiny_world: Path, blocks, tmp_path: Path, name: str) -> None:
    model = load_model(str(tiny_world / "models" / name), device="cpu")
    tokenizer = load_tokenizer(str(tiny_world / "models" / name))
    stats = capture(
        model,
        tokenizer,
        blocks,
        tmp_path / "store",
        k=10,
        batch_size=8,
        shard_size=16,
        progress=False,
        meta={"model": f"world:{name}"},
    )
    assert stats["finalized"] and stats["blocks"] == len(blocks) and stats["shards_written"] == 3
    assert stats["tokens"] == sum(len(e) - 1 for e in encode_blocks(tokenizer, [t for _, t in blocks]))
    assert stats["bytes_per_token"] <= 48
    assert_matches_reference(model, tokenizer, blocks, tmp_path / "store", k=10)
    meta = StoreReader(tmp_path / "store").meta
    assert meta["model"] == f"world:{name}" and meta["tokenizer_len"] == len(tokenizer)
    assert meta["architecture"] == type(model).__name__ and meta["temperature"] == 1.0


def tiny_random_model(arch: str, **extra: object) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        arch,
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # logits of order 10, so that scaling and soft-capping matter
        model.get_output_embeddings().weight.mul_(60)
    return model


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("gemma3_text", {"head_dim": 16, "final_logit_softcapping": 5.0}),
        ("gemma2", {"head_dim": 16, "final_logit_softcapping": 5.0}),
        ("cohere", {"logit_scale": 0.25}),
        ("granite", {"logits_scaling": 4.0}),
        ("qwen2", {}),
    ],
)
def test_logit_transforms(prose, blocks, tmp_path: Path, arch: str, extra: dict) -> None:
    model = tiny_random_model(arch, **extra)
    _, tokenizer = prose  # any tokenizer with ids < 512
    capture(
        model, tokenizer, blocks[:12], tmp_path / "store", k=5, batch_size=4, shard_size=8, progress=False
    )
    assert_matches_reference(model, tokenizer, blocks[:12], tmp_path / "store", k=5)


def test_unknown_logit_transform_is_caught(prose, tmp_path: Path) -> None:
    """The probe compares the chunked head with model(...).logits and refuses to store wrong numbers."""
    model = tiny_random_model("llama")
    model.config.logit_scale = 0.5  # Llama's forward ignores it; head_logits would apply it
    with pytest.raises(PolyfuseError, match="differs from model"):
        capture(model, prose[1], [(0, "some text here")], tmp_path / "store", k=3, progress=False)
    assert not list((tmp_path / "store").glob("shard-*"))


def test_head_chunking_changes_nothing(
    prose, blocks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = prose
    capture(model, tokenizer, blocks, tmp_path / "whole", k=10, progress=False)
    monkeypatch.setattr(hf_capture, "_HEAD_CHUNK_ELEMENTS", 512 * 7)  # 7 rows per head chunk
    capture(model, tokenizer, blocks, tmp_path / "chunked", k=10, progress=False)
    whole, chunked = StoreReader(tmp_path / "whole"), StoreReader(tmp_path / "chunked")
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a.logprobs.astype(np.float32), b.logprobs.astype(np.float32), atol=1e-3)
        assert a.nll_sum == pytest.approx(b.nll_sum, abs=1e-3)


def test_batching_does_not_change_results(prose, blocks, tmp_path: Path) -> None:
    model, tokenizer = prose
    capture(model, tokenizer, blocks, tmp_path / "b1", k=10, batch_size=1, progress=False)
    capture(model, tokenizer, blocks, tmp_path / "b8", k=10, batch_size=8, progress=False)
    for a, b in zip(StoreReader(tmp_path / "b1"), StoreReader(tmp_path / "b8"), strict=True):
        assert a.block_id == b.block_id and a.n_positions == b.n_positions
        # padding changes the float32 sums in the last bits; stored as fp16, a value may round one ulp apart
        np.testing.assert_allclose(a.logprobs.astype(np.float32), b.logprobs.astype(np.float32), atol=1e-3, rtol=1e-3)


def test_empty_block_and_backend_registry(prose, tmp_path: Path) -> None:
    model, tokenizer = prose
    capture(model, tokenizer, [(5, ""), (6, "a b")], tmp_path / "store", k=4, progress=False)
    reader = StoreReader(tmp_path / "store")
    assert reader[5].n_positions == 0 and reader[5].ids.shape == (0, 4) and reader[5].nll_sum == 0.0
    assert reader[6].n_positions > 0
    # the registry's entry point takes references and loads the model itself: the same store
    run = get_backend("hf")
    run(model.name_or_path, None, [(5, ""), (6, "a b")], tmp_path / "by_ref", k=4, progress=False, dtype="float32",
        device="cpu")
    by_ref = StoreReader(tmp_path / "by_ref")
    assert (by_ref[6].ids == reader[6].ids).all() and by_ref[6].nll_sum == pytest.approx(reader[6].nll_sum)
    with pytest.raises(PolyfuseError, match="unknown capture backend"):
        get_backend("nope")


def test_bad_inputs(prose, tmp_path: Path) -> None:
    model, tokenizer = prose
    with pytest.raises(DataError, match="not unique"):
        capture(model, tokenizer, [(1, "a"), (1, "b")], tmp_path / "s1", progress=False)
    with pytest.raises(DataError, match="context is 256"):
        capture(model, tokenizer, [(1, "word " * 400)], tmp_path / "s2", progress=False)
    capture(model, tokenizer, [(1, "a b c")], tmp_path / "s3", k=4, progress=False)
    with pytest.raises(DataError, match="other settings"):
        capture(model, tokenizer, [(1, "a b c")], tmp_path / "s3", k=5, progress=False)


def test_ranks_union_equals_single_process(prose, blocks, tmp_path: Path) -> None:
    """Ranks 1 and 2 write their shards, rank 0 writes its own and finalizes: same bytes as one process."""
    model, tokenizer = prose
    kw = dict(k=10, batch_size=4, shard_size=6, progress=False)
    capture(model, tokenizer, blocks, tmp_path / "single", **kw)
    for rank in (2, 1):
        stats = capture(model, tokenizer, blocks, tmp_path / "ranks", rank=rank, world_size=3, **kw)
        assert not stats["finalized"]
    written = sorted(p.name for p in (tmp_path / "ranks").glob("shard-*"))
    assert written == [shard_name(s) for s in range(7) if s % 3 != 0]
    stats = capture(model, tokenizer, blocks, tmp_path / "ranks", rank=0, world_size=3, **kw)
    assert stats["finalized"] and stats["shards_written"] == 3
    assert_same_files(tmp_path / "single", tmp_path / "ranks")


def test_rank0_waits_then_gives_a_clear_error(prose, blocks, tmp_path: Path) -> None:
    model, tokenizer = prose
    with pytest.raises(DataError, match="world_size=1"):
        capture(
            model,
            tokenizer,
            blocks,
            tmp_path / "s",
            shard_size=20,
            rank=0,
            world_size=2,
            wait_s=0,
            progress=False,
        )
    stats = capture(model, tokenizer, blocks, tmp_path / "s", shard_size=20, progress=False)  # finishes it
    assert stats["finalized"] and stats["shards_skipped"] == 1 and stats["shards_written"] == 1


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert STORE_NAME in names
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors


CHILD = """
import sys, time
from pathlib import Path
import torch
from polyfuse.capture import store
from polyfuse.capture.hf import capture
from polyfuse.models import load_model, load_tokenizer
sys.path.insert(0, {tests!r})
from test_capture import heldout_blocks

world, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads({threads})
write = store.StoreWriter.write_shard
def slow_write(self, index, rows):
    path = write(self, index, rows)
    time.sleep(0.4)
    return path
store.StoreWriter.write_shard = slow_write
model = load_model(str(world / "models" / "prose"), device="cpu")
tokenizer = load_tokenizer(str(world / "models" / "prose"))
capture(model, tokenizer, heldout_blocks(world, 40), out, k=10, batch_size=4, shard_size=5, progress=False)
"""


def test_sigkill_then_resume_is_byte_identical(tiny_world: Path, prose, tmp_path: Path) -> None:
    model, tokenizer = prose
    blocks = heldout_blocks(tiny_world, 40)
    kw = dict(k=10, batch_size=4, shard_size=5, progress=False)
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads()))
    )
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_world), str(out)])
    deadline = time.monotonic() + 60
    while not (out / shard_name(0)).exists():
        assert proc.poll() is None, "the capture process ended before writing its first shard"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*"))
    assert 1 <= len(done) < 8 and not (out / STORE_NAME).exists()

    stats = capture(model, tokenizer, blocks, out, **kw)
    assert stats["shards_skipped"] == len(done) and stats["shards_written"] == 8 - len(done)
    capture(model, tokenizer, blocks, tmp_path / "straight", **kw)
    assert_same_files(out, tmp_path / "straight")


def test_resumable_stage_around_capture(
    prose, blocks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_stage(resumable=True) + capture: a failure after shard 0 keeps it; the rerun captures the rest."""
    model, tokenizer = prose
    out = tmp_path / "capture" / "prose"
    config = {"k": 10, "shard_size": 10}

    def build(work: Path) -> dict:
        return capture(model, tokenizer, blocks, work, k=10, shard_size=10, progress=False)

    write = hf_capture.StoreWriter.write_shard

    def failing_write(self, index, rows):
        if index == 1:
            raise RuntimeError("disk full")
        return write(self, index, rows)

    monkeypatch.setattr(hf_capture.StoreWriter, "write_shard", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        run_stage(out, "capture", config, {}, build, resumable=True)
    assert (partial_dir(out) / shard_name(0)).exists()
    monkeypatch.setattr(hf_capture.StoreWriter, "write_shard", write)
    result = run_stage(out, "capture", config, {}, build, resumable=True)
    assert result.manifest.outputs["shards_skipped"] == 1 and result.manifest.outputs["shards_written"] == 3
    assert len(StoreReader(out)) == len(blocks)
