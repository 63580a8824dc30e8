"""One process of the multi-process tests: run recipe stages under ``torchrun`` and record what this rank
touched (shards it wrote, store blocks it read, models it evaluated) in ``REPORT/rank<R>.json``; :func:`torchrun` starts them.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py REPORT RECIPE STAGE[,STAGE] [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str]) -> None:
    report_dir, recipe_path, stages, *overrides = argv
    rank = int(os.environ.get("RANK", "0"))
    writes: dict[str, list[int]] = defaultdict(list)   # store (in the workdir) -> shard indices this rank wrote
    reads: dict[str, list[int]] = defaultdict(list)    # store (in the workdir) -> block ids this rank read

    from polyfuse.capture.store import StoreReader, StoreWriter
    from polyfuse.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    workdir = Path(recipe.workdir).resolve()

    def _key(store: Path) -> str:  # a store's place in the workdir, e.g. "align/prose" ("fuse" while it is built)
        rel = store.resolve().relative_to(workdir)
        return str(rel.with_name(rel.name.removeprefix(".partial-")))

    write_shard, getitem = StoreWriter.write_shard, StoreReader.__getitem__

    def spy_write(self, shard_index, rows):
        writes[_key(self.out_dir)].append(int(shard_index))
        return write_shard(self, shard_index, rows)

    def spy_read(self, block_id):
        reads[_key(self.path)].append(int(block_id))
        return getitem(self, block_id)

    StoreWriter.write_shard, StoreReader.__getitem__ = spy_write, spy_read

    import polyfuse.evaluate.accuracy as accuracy
    import polyfuse.evaluate.bpb as bpb

    evaluated: list[str] = []   # models this rank evaluated (bits per byte by row name, accuracy by location)
    evaluate_bpb, evaluate_accuracy = bpb.evaluate_bpb, accuracy.evaluate_accuracy

    def spy_bpb(loaders, *args, **kwargs):
        evaluated.extend(name for name, _ in loaders)
        return evaluate_bpb(loaders, *args, **kwargs)

    def spy_accuracy(location, *args, **kwargs):
        evaluated.append(str(location))
        return evaluate_accuracy(location, *args, **kwargs)

    bpb.evaluate_bpb = spy_bpb
    import polyfuse.stages.implicit as implicit_stages

    implicit_stages.evaluate_accuracy = spy_accuracy  # imported by name there

    from polyfuse.stages import run_recipe

    run_recipe(recipe, only=stages.split(","), progress=False)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": int(os.environ.get("WORLD_SIZE", "1")),
                                                      "writes": writes, "reads": reads, "evaluated": evaluated}))


def torchrun(nproc: int, report: Path, recipe: Path, stages: str, *overrides: str) -> dict[int, dict]:
    """Run ``stages`` of ``recipe`` under ``torchrun`` with ``nproc`` processes; each rank's report."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__)), str(report), str(recipe), stages, *overrides]
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = {r: json.loads((report / f"rank{r}.json").read_text()) for r in range(nproc)}
    assert all(rep["world_size"] == nproc for rep in reports.values())
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
