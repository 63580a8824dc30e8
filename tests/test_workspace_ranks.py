"""run_stage under two real processes (gloo on CPU): rank 0 alone writes, collective stages share a directory."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="")
    report: dict = {}
    try:
        from polyfuse.errors import DataError
        from polyfuse.workspace import current_ranks, run_stage, workdir_lock

        ranks = current_ranks()
        report["ranks"] = [ranks.rank, ranks.world_size]
        base = Path(root)
        lock = workdir_lock(base)  # one run's ranks share the workdir's lock: it must not block rank 1
        lock.__enter__()

        def solo(out: Path) -> dict:
            with open(base / "solo-builds.txt", "a") as f:  # counts builds across processes
                f.write(f"{ranks.rank}\n")
            (out / "data.txt").write_text("solo")
            return {"by": ranks.rank}

        first = run_stage(base / "solo", "solo", {"a": 1}, {}, solo)
        report["solo"] = [first.skipped, first.manifest.outputs["by"]]

        def shared(out: Path) -> dict:
            (out / f"part-{ranks.rank}.txt").write_text(str(ranks.rank))
            return {"rank": ranks.rank}

        res = run_stage(base / "shared", "shared", {"b": 1}, {}, shared, resumable=True, collective=True)
        report["shared"] = [res.skipped, res.manifest.outputs["rank"]]
        again = run_stage(base / "shared", "shared", {"b": 1}, {}, shared, resumable=True, collective=True)
        report["again_skipped"] = again.skipped

        def failing(out: Path) -> dict:
            (out / f"done-{ranks.rank}.txt").write_text("x")
            if ranks.rank == 1:
                raise RuntimeError("boom on rank 1")
            return {}

        try:
            run_stage(base / "bad", "bad", {"c": 1}, {}, failing, resumable=True, collective=True)
            report["bad"] = "no error"
        except DataError as exc:
            report["bad"] = f"DataError: {exc}"
        except RuntimeError as exc:
            report["bad"] = f"RuntimeError: {exc}"
    except BaseException:
        report["crash"] = traceback.format_exc()
    queue.put((rank, report))


def test_two_ranks_share_stages_without_racing(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    reports = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for r in (0, 1):
        assert "crash" not in reports[r], reports[r]["crash"]
        assert reports[r]["ranks"] == [r, 2]
    # a non-collective stage is built once, by rank 0, and every rank sees its manifest
    assert (tmp_path / "solo-builds.txt").read_text().split() == ["0"]
    assert reports[0]["solo"] == reports[1]["solo"] == [False, 0]
    # a collective stage: both ranks wrote into one directory; rank 0's outputs are the manifest's
    shared = tmp_path / "shared"
    assert sorted(p.name for p in shared.iterdir()) == ["manifest.json", "part-0.txt", "part-1.txt"]
    assert json.loads((shared / "manifest.json").read_text())["outputs"] == {"rank": 0}
    assert not (tmp_path / ".partial-shared").exists()
    assert reports[0]["again_skipped"] is reports[1]["again_skipped"] is True
    # a failure on rank 1 fails every rank; the partial work is kept for the rerun
    assert reports[1]["bad"] == "RuntimeError: boom on rank 1"
    assert reports[0]["bad"].startswith("DataError: stage bad failed on rank 1: RuntimeError: boom on rank 1")
    assert not (tmp_path / "bad").exists()
    assert {p.name for p in (tmp_path / ".partial-bad").iterdir()} >= {"done-0.txt", "done-1.txt", "key.json"}


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
