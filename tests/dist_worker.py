"""One process of the multi-process tests: run recipe stages under ``torchrun`` and record what this rank
touched (shards it wrote, store blocks it read) in ``REPORT/rank<R>.json``; :func:`torchrun` starts them.

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
    writes: dict[str, list[int]] = defaultdict(list)   # "stage/store" -> shard indices this rank wrote
    reads: dict[str, list[int]] = defaultdict(list)    # "stage/store" -> block ids this rank read

    from polyfuse.capture.store import StoreReader, StoreWriter

    write_shard, getitem = StoreWriter.write_shard, StoreReader.__getitem__

    def spy_write(self, shard_index, rows):
        writes[f"{self.out_dir.parent.name}/{self.out_dir.name.removeprefix('.partial-')}"].append(int(shard_index))
        return write_shard(self, shard_index, rows)

    def spy_read(self, block_id):
        reads[f"{self.path.parent.name}/{self.path.name}"].append(int(block_id))
        return getitem(self, block_id)

    StoreWriter.write_shard, StoreReader.__getitem__ = spy_write, spy_read

    from polyfuse.recipe import load_recipe
    from polyfuse.stages import run_recipe

    run_recipe(load_recipe(recipe_path, overrides), only=stages.split(","), progress=False)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": int(os.environ.get("WORLD_SIZE", "1")),
                                                      "writes": writes, "reads": reads}))


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
