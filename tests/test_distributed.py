"""Capture and fused training under two real processes (``torchrun``, gloo on CPU) against one process.

Each rank's spy (``tests/dist_worker.py``) records the shards it wrote and the store blocks it read, so
these tests fail if a rank writes another's shard, reads the whole teacher store, or skips its share.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from tests.dist_worker import torchrun

BATCH, STEPS = 4, 4   # the global batch: one process of 4 rows, or two of 2


def write_recipe(path: Path, world: Path, workdir: Path) -> Path:
    data = {"workdir": str(workdir), "world": str(world), "seed": 0,
            "target": {"name": "target", "model": "world:target"},
            "sources": [{"name": "prose", "model": "world:prose"}, {"name": "math", "model": "world:math"}],
            "data": {"eval": "world:corpus", "split": "heldout"},
            "eval": {"batch_size": 4, "max_length": 128, "max_bytes_per_domain": 3000},
            "corpus": {"path": "world:corpus", "split": "train", "max_bytes_per_domain": 6000},
            "blocks": {"max_tokens": 64},
            "capture": {"top_k": 4, "samples": 4, "batch_size": 4, "shard_size": 5},
            "fuse": {"strategy": "min_ce"},
            "train": {"max_steps": STEPS, "batch_size": BATCH, "learning_rate": 1.0e-3, "warmup_ratio": 0.0,
                      "logging_steps": 1, "save_steps": 100, "baseline": False, "lm_loss_weight": 0.5}}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def runs(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Capture, align, fuse and evaluation with one process and with two, then fused training of both from the
    one-process store."""
    root = tmp_path_factory.mktemp("dist")
    one = write_recipe(root / "one.yaml", tiny_world, root / "one")
    two = write_recipe(root / "two.yaml", tiny_world, root / "two")
    torchrun(1, root / "capture-1", one, "blocks,capture,vocab,align,fuse,eval")
    torchrun(2, root / "capture-2", two, "blocks,capture,vocab,align,fuse,eval")
    # training: the same fused store for both (copied), one process with 4 rows, two with 2 rows each
    shutil.copytree(root / "one", root / "train-two")
    torchrun(1, root / "train-1", one, "train")
    train_two = write_recipe(root / "train-two.yaml", tiny_world, root / "train-two")
    torchrun(2, root / "train-2", train_two, "train", f"train.batch_size={BATCH // 2}")
    return {"root": root, "one": root / "one", "two": root / "two", "train-two": root / "train-two"}


def _rounded(value: object) -> object:
    """``value`` with every float rounded to 9 decimals (sums taken in another order differ in the last bits)."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _store_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name.startswith("shard-") or p.name == "store.json"}


def test_two_process_capture_align_and_fuse_are_byte_identical_and_split_by_shard(runs: dict[str, Path]) -> None:
    stores = [f"capture/{m}" for m in ("target", "prose", "math")] + [f"align/{m}" for m in ("prose", "math")]
    stores.append("fuse")
    for store in stores:
        one, two = (_store_files(runs[k] / store) for k in ("one", "two"))
        shards = sorted(n for n in one if n.startswith("shard-"))
        assert len(shards) >= 4, "the test needs several shards per rank"
        assert one.keys() == two.keys()
        for name in one:
            assert one[name] == two[name], f"{store}/{name} differs between one and two processes"
    reports = {r: json.loads((runs["root"] / "capture-2" / f"rank{r}.json").read_text()) for r in (0, 1)}
    solo = json.loads((runs["root"] / "capture-1" / "rank0.json").read_text())
    assert set(solo["writes"]) == set(stores)
    for store, written in solo["writes"].items():
        n = len(written)
        assert sorted(written) == list(range(n))
        for r in (0, 1):  # each rank wrote exactly its own shards, once each
            assert sorted(reports[r]["writes"][store]) == [s for s in range(n) if s % 2 == r], (store, r)
    for stage in ("align/prose", "align/math", "fuse"):  # the statistics are summed over the ranks
        a, b = (json.loads((runs[k] / stage / "manifest.json").read_text())["outputs"] for k in ("one", "two"))
        assert _rounded(b) == _rounded(a), stage


def test_two_process_evaluation_splits_the_models_and_matches_one_process(runs: dict[str, Path]) -> None:
    one, two = (json.loads((runs[k] / "results.json").read_text())["models"] for k in ("one", "two"))
    assert sorted(one) == sorted(two) == ["math", "prose", "target"]
    for name in one:
        assert two[name]["bpb"] == pytest.approx(one[name]["bpb"], rel=1e-6), name
    evaluated = [json.loads((runs["root"] / "capture-2" / f"rank{r}.json").read_text())["evaluated"] for r in (0, 1)]
    assert evaluated == [["target", "math"], ["prose"]]  # model i on rank i % 2, each once


def _log(workdir: Path) -> list[dict]:
    state = json.loads((workdir / "train" / "fused" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h and "train_loss" not in h]


def test_two_process_training_matches_one_process_at_the_same_global_batch(runs: dict[str, Path]) -> None:
    import torch

    from polyfuse.models import load_model

    one, two = _log(runs["one"]), _log(runs["train-two"])
    assert [h["step"] for h in one] == [h["step"] for h in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):  # same rows per step, loss summed over both ranks' tokens
        for key in ("loss", "clm_loss", "distill_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    m1 = load_model(str(runs["one"] / "train" / "fused"), dtype="float32", device="cpu")
    m2 = load_model(str(runs["train-two"] / "train" / "fused"), dtype="float32", device="cpu")
    for (name, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.allclose(p1, p2, atol=1e-5), name


def test_each_rank_reads_only_its_share_of_the_teacher_store(runs: dict[str, Path]) -> None:
    def fused_reads(report: str, rank: int) -> list[int]:  # the block ids read from <workdir>/fuse
        reads = json.loads((runs["root"] / report / f"rank{rank}.json").read_text())["reads"]
        assert len(reads) == 1, reads.keys()  # training reads no other store
        (store, ids), = reads.items()
        assert store == "fuse"
        return ids

    solo, ranks = fused_reads("train-1", 0), [fused_reads("train-2", r) for r in (0, 1)]
    n_blocks = len((runs["one"] / "blocks" / "blocks.jsonl").read_text().splitlines())
    assert len(solo) >= BATCH * STEPS and n_blocks > BATCH * STEPS  # a store larger than what training reads
    # the two ranks together read what one process reads, each half of it: no rank reads the whole store
    assert Counter(ranks[0]) + Counter(ranks[1]) == Counter(solo)
    assert len(ranks[0]) == len(ranks[1]) == len(solo) // 2


def test_align_in_two_worker_processes_writes_the_same_store_and_statistics(
        runs: dict[str, Path], tiny_world: Path, tmp_path: Path) -> None:
    from polyfuse.recipe import load_recipe
    from polyfuse.stages.teachers import align_stage

    work = tmp_path / "workers"
    shutil.copytree(runs["one"], work)
    recipe = load_recipe(write_recipe(tmp_path / "w.yaml", tiny_world, work), ["align.workers=2"])
    results = align_stage(recipe, force=True, progress=False)
    for name in ("prose", "math"):
        assert not results[name].skipped
        assert _store_files(work / "align" / name) == _store_files(runs["one"] / "align" / name)
        solo = json.loads((runs["one"] / "align" / name / "manifest.json").read_text())["outputs"]
        assert results[name].manifest.outputs == solo, "statistics are summed in shard order, whatever the workers"
