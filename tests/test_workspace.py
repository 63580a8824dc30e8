"""Artifact directories: skip-if-current, rebuild on change, atomic swap, hashing, temp cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polyfuse.errors import DataError
from polyfuse.workspace import (
    MANIFEST_NAME,
    Manifest,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temps,
    hash_file,
    hash_input,
    hash_path,
    is_current,
    package_versions,
    run_stage,
    stage_status,
)


class Builder:
    """A stage build that writes one file and counts its calls."""

    def __init__(self, text: str = "result") -> None:
        self.calls = 0
        self.text = text

    def __call__(self, tmp: Path) -> dict:
        self.calls += 1
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "out.txt").write_text(self.text)
        return {"n": self.calls, "file": Path("out.txt")}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".trash-")))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text("hello")
    return path


def test_build_once_then_skipped(tmp_path: Path, src: Path) -> None:
    out, build, lines = tmp_path / "runs" / "eval", Builder(), []
    first = run_stage(out, "eval", {"k": 1}, {"data": src}, build, log=lines.append)
    assert not first.skipped and build.calls == 1
    assert (out / "out.txt").read_text() == "result"
    manifest = Manifest.from_path(out)
    assert manifest.stage == "eval" and manifest.config == {"k": 1}
    assert manifest.inputs == {"data": hash_file(src)}
    assert manifest.outputs == {"n": 1, "file": "out.txt"}
    assert manifest.versions["python"] and manifest.created.endswith("+00:00")

    second = run_stage(out, "eval", {"k": 1}, {"data": src}, build, log=lines.append)
    assert second.skipped and build.calls == 1
    assert second.manifest == manifest
    assert lines[0].startswith(f"stage eval: wrote {out} in ") and lines[0].endswith("s")
    assert lines[1] == f"stage eval: up to date, skipped ({out})"
    assert leftovers(out.parent) == []


def test_config_normalised_before_comparison(tmp_path: Path) -> None:
    out, build = tmp_path / "s", Builder()
    run_stage(out, "s", {"dims": (1, 2), "dir": tmp_path}, {}, build)
    assert run_stage(out, "s", {"dims": [1, 2], "dir": str(tmp_path)}, {}, build).skipped
    assert build.calls == 1


def test_config_change_rebuilds(tmp_path: Path, src: Path) -> None:
    out, build = tmp_path / "s", Builder()
    run_stage(out, "s", {"k": 1}, {"data": src}, build)
    assert not run_stage(out, "s", {"k": 2}, {"data": src}, build).skipped
    assert build.calls == 2
    assert Manifest.from_path(out).config == {"k": 2}
    assert not run_stage(out, "other", {"k": 2}, {"data": src}, build).skipped  # stage name counts too


def test_input_content_change_rebuilds(tmp_path: Path, src: Path) -> None:
    out, build = tmp_path / "s", Builder()
    run_stage(out, "s", {}, {"data": src}, build)
    assert stage_status(out, "s", {}, {"data": src}) == "current"
    src.write_text("HELLO")  # same size, possibly the same mtime tick
    assert stage_status(out, "s", {}, {"data": src}) == "stale"
    assert not run_stage(out, "s", {}, {"data": src}, build).skipped
    assert build.calls == 2


def test_versions_do_not_make_stale(tmp_path: Path, src: Path) -> None:
    out, build = tmp_path / "s", Builder()
    run_stage(out, "s", {}, {"data": src}, build)
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["versions"]["torch"] = "0.0.1"
    data["created"] = "2000-01-01T00:00:00+00:00"
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    assert run_stage(out, "s", {}, {"data": src}, build).skipped


def test_force_rebuilds(tmp_path: Path) -> None:
    out, build = tmp_path / "s", Builder()
    run_stage(out, "s", {}, {}, build)
    result = run_stage(out, "s", {}, {}, build, force=True)
    assert not result.skipped and build.calls == 2
    assert result.manifest.outputs["n"] == 2


def test_build_error_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "s"
    run_stage(out, "s", {"k": 1}, {}, Builder("old"))
    before = (out / MANIFEST_NAME).read_text()

    def failing(tmp: Path) -> dict:
        (tmp / "out.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(out, "s", {"k": 2}, {}, failing)
    assert (out / "out.txt").read_text() == "old"
    assert (out / MANIFEST_NAME).read_text() == before
    assert leftovers(tmp_path) == []
    assert stage_status(out, "s", {"k": 2}, {}) == "stale"


def test_build_error_without_previous_output(tmp_path: Path) -> None:
    def failing(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "s", "s", {}, {}, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_returning_non_dict_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected a dict"):
        run_stage(tmp_path / "s", "s", {}, {}, lambda tmp: [1])
    assert list(tmp_path.iterdir()) == []


def test_rebuild_replaces_whole_directory(tmp_path: Path) -> None:
    out = tmp_path / "s"
    run_stage(out, "s", {"k": 1}, {}, lambda tmp: (tmp / "a.txt").write_text("a") and None)
    run_stage(out, "s", {"k": 2}, {}, lambda tmp: (tmp / "b.txt").write_text("b") and None)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", MANIFEST_NAME]
    assert leftovers(tmp_path) == []


def test_stage_status(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "s"
    assert stage_status(out, "s", {}, {"data": src}) == "missing"
    run_stage(out, "s", {}, {"data": src}, Builder())
    assert stage_status(out, "s", {}, {"data": src}) == "current"
    assert stage_status(out, "s", {"x": 1}, {"data": src}) == "stale"
    (out / MANIFEST_NAME).write_text("{not json")
    assert stage_status(out, "s", {}, {"data": src}) == "stale"
    assert not is_current(out, "s", {}, {})


def test_atomic_write_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"b": [1, 2], "a": {"z": None, "p": Path("q")}})
    assert (
        path.read_text()
        == '{\n  "a": {\n    "p": "q",\n    "z": null\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'
    )
    atomic_write_text(path, "replaced")
    assert path.read_text() == "replaced"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_atomic_write_failure_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    return root


def test_hash_path_stable_and_sensitive(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    first = hash_path(tree)
    assert first == hash_path(tree) == hash_path(make_tree(tmp_path / "copy"))
    (tree / ".tmp-junk-1-abc").mkdir()
    (tree / ".tmp-junk-1-abc" / "x").write_text("ignored")
    assert hash_path(tree) == first

    (tree / "a.txt").write_text("ALPHA")  # same size
    changed = hash_path(tree)
    assert changed != first
    (tree / "a.txt").write_text("alpha")
    assert hash_path(tree) == first

    (tree / "a.txt").rename(tree / "c.txt")
    assert hash_path(tree) not in (first, changed)
    (tree / "c.txt").rename(tree / "a.txt")
    (tree / "extra").write_text("")
    assert hash_path(tree) != first


def test_hash_file_cache_sees_atomic_replace(tmp_path: Path) -> None:
    path, new = tmp_path / "f", tmp_path / "g"
    path.write_text("one")
    old = os.stat(path).st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(old, old))  # old enough to be cached
    first = hash_file(path)
    assert hash_file(path) == first
    new.write_text("two")  # same size and mtime, new inode: what atomic writers produce
    os.utime(new, ns=(old, old))
    os.replace(new, path)
    assert hash_file(path) != first


def test_hash_file_does_not_cache_recently_modified_files(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("one")
    tick = os.stat(path).st_mtime_ns
    first = hash_file(path)
    path.write_text("two")  # rewritten within the same timestamp tick: size and mtime unchanged
    os.utime(path, ns=(tick, tick))
    assert hash_file(path) != first


def test_hash_input_refs_and_paths(tmp_path: Path, src: Path) -> None:
    assert hash_input(str(src)) == hash_input(src) == hash_file(src)
    assert hash_input("org/name@v1") == hash_input("org/name@v1") != hash_input("org/name@v2")
    assert hash_input("world:prose") != hash_input("world:code")
    with pytest.raises(DataError, match="does not exist"):
        hash_input(tmp_path / "missing")


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_clean_stale_temps(tmp_path: Path) -> None:
    pid = dead_pid()
    stale = [tmp_path / f".tmp-eval-{pid}-abcd", tmp_path / f".trash-eval-{pid}-ef01", tmp_path / ".tmp-odd"]
    for path in stale:
        path.mkdir()
        (path / "f").write_text("x")
    live = tmp_path / f".tmp-eval-{os.getpid()}-beef"
    live.mkdir()
    (tmp_path / "keep").mkdir()
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "keep"]


def test_run_stage_cleans_leftovers(tmp_path: Path) -> None:
    leftover = tmp_path / f".tmp-s-{dead_pid()}-0000"
    leftover.mkdir()
    run_stage(tmp_path / "s", "s", {}, {}, Builder())
    assert leftovers(tmp_path) == []


def test_package_versions() -> None:
    versions = package_versions()
    assert {"polyfuse", "python", "torch", "transformers", "numpy"} <= set(versions)
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert all(isinstance(v, str) and v for v in versions.values())


def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    manifest = Manifest(
        "s", {"a": [1]}, {"x": "h"}, {"python": "3"}, "2024-01-01T00:00:00+00:00", 1.5, {"n": 2}
    )
    (tmp_path / MANIFEST_NAME).write_text(manifest.to_json())
    assert Manifest.from_path(tmp_path) == manifest
    assert Manifest.from_path(tmp_path / MANIFEST_NAME) == manifest
    (tmp_path / MANIFEST_NAME).write_text('{"stage": "s"}')
    with pytest.raises(DataError, match="lacks config"):
        Manifest.from_path(tmp_path)
    with pytest.raises(DataError, match="no manifest"):
        Manifest.from_path(tmp_path / "nothing")
