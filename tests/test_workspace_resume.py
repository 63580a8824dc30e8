"""Resumable stages: the `.partial-*` work directory survives failures and kills, and is keyed by config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from polyfuse.workspace import (
    MANIFEST_NAME,
    PARTIAL_KEY_NAME,
    Manifest,
    clean_stale_temps,
    hash_path,
    partial_dir,
    run_stage,
)


class TwoParts:
    """A build in two parts that skips a part already written; can be told to fail after part 1."""

    def __init__(self, fail_after_part1: bool = False) -> None:
        self.fail_after_part1 = fail_after_part1
        self.written: list[str] = []

    def __call__(self, work: Path) -> dict:
        for part in ("part1", "part2"):
            if not (work / part).exists():
                (work / part).write_text(part)
                self.written.append(part)
            if part == "part1" and self.fail_after_part1:
                raise RuntimeError("killed after part 1")
        return {"parts": sorted(p.name for p in work.iterdir() if p.name.startswith("part"))}


def test_partial_dir_name(tmp_path: Path) -> None:
    assert partial_dir(tmp_path / "capture" / "prose") == tmp_path / "capture" / ".partial-prose"


def test_failed_build_keeps_partial_and_rerun_finishes(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "capture"
    work = partial_dir(out)
    with pytest.raises(RuntimeError, match="after part 1"):
        run_stage(out, "capture", {"k": 10}, {}, TwoParts(fail_after_part1=True), resumable=True)
    assert not out.exists()
    assert (work / "part1").read_text() == "part1" and not (work / "part2").exists()
    key = json.loads((work / PARTIAL_KEY_NAME).read_text())
    assert key == {"stage": "capture", "config": {"k": 10}, "inputs": {}}

    clean_stale_temps(out.parent)  # a later stage's cleanup must not delete resumable work
    assert (work / "part1").exists()

    lines: list[str] = []
    rerun = TwoParts()
    result = run_stage(out, "capture", {"k": 10}, {}, rerun, resumable=True, log=lines.append)
    assert rerun.written == ["part2"]  # part 1 was reused
    assert any("resuming" in line for line in lines)
    assert not work.exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "part1", "part2"]  # no key.json
    assert Manifest.from_path(out).outputs == {"parts": ["part1", "part2"]}
    assert result.manifest.config == {"k": 10}

    again = TwoParts()
    assert run_stage(out, "capture", {"k": 10}, {}, again, resumable=True).skipped
    assert again.written == []


def test_config_change_wipes_partial(tmp_path: Path) -> None:
    out = tmp_path / "capture"
    with pytest.raises(RuntimeError):
        run_stage(out, "capture", {"k": 10}, {}, TwoParts(fail_after_part1=True), resumable=True)
    lines: list[str] = []
    build = TwoParts()
    run_stage(out, "capture", {"k": 5}, {}, build, resumable=True, log=lines.append)
    assert build.written == ["part1", "part2"]
    assert any("discarding" in line for line in lines)


def test_input_change_wipes_partial(tmp_path: Path) -> None:
    src = tmp_path / "blocks.txt"
    src.write_text("a")
    out = tmp_path / "capture"
    with pytest.raises(RuntimeError):
        run_stage(out, "capture", {}, {"blocks": src}, TwoParts(fail_after_part1=True), resumable=True)
    src.write_text("b")
    build = TwoParts()
    run_stage(out, "capture", {}, {"blocks": src}, build, resumable=True)
    assert build.written == ["part1", "part2"]


def test_force_starts_fresh(tmp_path: Path) -> None:
    out = tmp_path / "capture"
    with pytest.raises(RuntimeError):
        run_stage(out, "capture", {}, {}, TwoParts(fail_after_part1=True), resumable=True)
    build = TwoParts()
    run_stage(out, "capture", {}, {}, build, resumable=True, force=True)
    assert build.written == ["part1", "part2"]


def test_unreadable_key_wipes_partial(tmp_path: Path) -> None:
    out = tmp_path / "capture"
    work = partial_dir(out)
    work.mkdir()
    (work / "part1").write_text("stale")
    (work / PARTIAL_KEY_NAME).write_text("{not json")
    build = TwoParts()
    run_stage(out, "capture", {}, {}, build, resumable=True)
    assert build.written == ["part1", "part2"] and (out / "part1").read_text() == "part1"


def test_rebuild_replaces_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "capture"
    run_stage(out, "capture", {"k": 1}, {}, TwoParts(), resumable=True)
    (out / "part1").write_text("old")
    run_stage(out, "capture", {"k": 2}, {}, TwoParts(), resumable=True)
    assert (out / "part1").read_text() == "part1"
    assert Manifest.from_path(out).config == {"k": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["capture"]


def test_partial_dirs_do_not_change_parent_hash(tmp_path: Path) -> None:
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / "a.txt").write_text("a")
    before = hash_path(parent)
    (parent / ".partial-x").mkdir()
    (parent / ".partial-x" / "part1").write_text("1")
    assert hash_path(parent) == before


CHILD = """
import sys, time
from pathlib import Path
from polyfuse.workspace import run_stage

def build(work: Path) -> dict:
    for i in range(50):
        part = work / f"part{i:02d}"
        if not part.exists():
            part.write_text(str(i))
            time.sleep(0.05)
    return {"parts": 50}

run_stage(Path(sys.argv[1]), "slow", {"n": 50}, {}, build, resumable=True)
"""


def test_sigkill_then_resume(tmp_path: Path) -> None:
    """A killed run leaves `.partial-*`; the rerun continues from it and ends like an uninterrupted run."""
    out = tmp_path / "slow"
    work = partial_dir(out)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ})
    deadline = time.monotonic() + 30
    while not (work / "part03").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "child ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in work.iterdir() if p.name.startswith("part")}
    assert 3 < len(done_before) < 50 and not out.exists()

    written: list[str] = []

    def build(w: Path) -> dict:
        for i in range(50):
            part = w / f"part{i:02d}"
            if not part.exists():
                part.write_text(str(i))
                written.append(part.name)
        return {"parts": 50}

    run_stage(out, "slow", {"n": 50}, {}, build, resumable=True)
    assert set(written).isdisjoint(done_before) and len(written) + len(done_before) == 50
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("part")) == [
        f"part{i:02d}" for i in range(50)
    ]
    assert all((out / f"part{i:02d}").read_text() == str(i) for i in range(50))
