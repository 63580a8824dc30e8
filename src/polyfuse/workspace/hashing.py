"""Content hashes of stage inputs, artifact verification against their manifests, and lineage checks.

A stage's inputs are hashed by content (:func:`hash_inputs`): a file by its bytes (blake2b, cached per
path, inode, size and mtime), a directory by its sorted relative paths and file hashes, a reference
(hub id, ``world:NAME``) by its text. An artifact is checked against the sizes and hashes its manifest
records before it is used (:func:`verify_artifact`), and the artifacts a stage reads together must have
been built on the versions of what they share that are there now (:func:`check_lineage`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.workspace.files import PARTIAL_PREFIX, TMP_PREFIX, TRASH_PREFIX
from polyfuse.workspace.lock import held_workdirs
from polyfuse.workspace.manifest import MANIFEST_NAME, _read_manifest

__all__ = [
    "check_lineage",
    "file_records",
    "full_verification",
    "hash_file",
    "hash_input",
    "hash_inputs",
    "hash_path",
    "rebuild_hint",
    "tree_files",
    "verify_artifact",
]

_CHUNK = 1 << 20
_DIGEST_SIZE = 32

# (abs path, inode, size, mtime_ns) -> content hash; only filled for files not modified in the last
# couple of seconds, since a rewrite within one filesystem timestamp tick can keep size and mtime.
_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}
_RACY_NS = 2_000_000_000


# --------------------------------------------------------------------------------------------------
# hashing


def hash_file(path: str | Path) -> str:
    """blake2b hex digest of a file's content, read in 1 MiB chunks (cached per path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        _HASH_CACHE[key] = value
    return value


def _skipped(name: str) -> bool:
    return name.startswith((TMP_PREFIX, TRASH_PREFIX, PARTIAL_PREFIX))


def hash_path(path: str | Path) -> str:
    """Content hash of a file, or of a directory tree (sorted relative paths + file content hashes).

    Entries whose name starts with `.tmp-`, `.trash-` or `.partial-` (in-progress or abandoned
    writes) are ignored; everything else counts, `manifest.json` included. Symlinks are followed.
    """
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    if not path.is_dir():
        raise DataError(f"{path}: cannot hash a path that does not exist")
    digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    digest.update(b"dir\0")
    for rel, file in tree_files(path):
        digest.update(f"{rel}\0{hash_file(file)}\n".encode())
    return digest.hexdigest()


def tree_files(path: str | Path) -> list[tuple[str, Path]]:
    """Sorted ``(relative POSIX path, path)`` of every file under a directory that :func:`hash_path` counts."""
    path = Path(path)
    entries: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        rel_root = Path(root).relative_to(path)
        entries.extend(((rel_root / f).as_posix(), Path(root) / f) for f in files if not _skipped(f))
    return sorted(entries)


def hash_input(value: str | Path) -> str:
    """Hash of a stage input: content hash for an existing path, else the hash of `"ref:" + value`.

    A `Path` object must exist (it names a file); a string that is not an existing path (a hub id,
    `world:NAME`) is hashed as a reference.
    """
    if isinstance(value, Path) or os.path.exists(value):
        return hash_path(value)
    return hashlib.blake2b(f"ref:{value}".encode(), digest_size=_DIGEST_SIZE).hexdigest()


def hash_inputs(inputs: Mapping[str, str | Path]) -> dict[str, str]:
    """`{name: hash_input(value)}` for every input; a missing input path names the stage that makes it.

    A `Path` input that is an artifact (a directory with a `manifest.json`, or a file in one) is first
    checked against the sizes and content hashes its manifest records (:func:`verify_artifact`), so an
    artifact changed after its stage wrote it is never used. So is a string input (a model reference)
    naming a directory polyfuse owns (:func:`_owned_reference`); other model directories are not.
    """
    missing = [(name, value) for name, value in inputs.items() if isinstance(value, Path) and not value.exists()]
    if missing:
        name, value = missing[0]
        raise DataError(f"input {name!r} ({value}) does not exist yet: build it first, e.g. with "
                        f"'polyfuse {name.split(':')[0].split('_')[-1]} RECIPE' or run every stage with "
                        f"'polyfuse run RECIPE'")
    for value in inputs.values():
        if isinstance(value, Path) or _owned_reference(value):
            verify_artifact(value, full=True)
    return {name: hash_input(value) for name, value in inputs.items()}


def _owned_reference(value: str) -> bool:
    """Whether a string input names a directory polyfuse owns: inside a workdir this process holds the lock
    of (the running recipe's artifacts, e.g. trained models evaluated by reference), or a world's model
    (``WORLD/models/NAME``). A model directory elsewhere (a copy, perhaps edited on purpose) is not."""
    if not os.path.isdir(value):
        return False
    path = Path(value).resolve()
    if (path.parent.parent / "world.json").is_file() and path.parent.name == "models":
        return True
    return any(path.is_relative_to(held) for held in held_workdirs())


# --------------------------------------------------------------------------------------------------
# artifact verification

_FULL_VERIFY = False


@contextlib.contextmanager
def full_verification() -> Iterator[None]:
    """Within the block, a stage skipped as current re-reads its files' content hashes (``polyfuse run --verify``)."""
    global _FULL_VERIFY
    previous, _FULL_VERIFY = _FULL_VERIFY, True
    try:
        yield
    finally:
        _FULL_VERIFY = previous


def file_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "blake2b"}}`` of every file of an artifact directory but its manifest."""
    return {rel: {"bytes": file.stat().st_size, "blake2b": hash_file(file)}
            for rel, file in tree_files(path) if rel != MANIFEST_NAME}


def rebuild_hint(artifact: Path, stage: str) -> str:
    """The command that rebuilds an artifact directory written by ``stage``."""
    if stage.startswith("world."):
        world = next((p for p in artifact.parents if (p / "world.json").is_file()), artifact.parent)
        command = {"world.real": f"polyfuse world --out {world} --real",
                   "world.chat_model": f"polyfuse demo --family implicit --world {world}",
                   "world.tasks": f"polyfuse demo --family implicit --world {world}"}.get(
                       stage, f"polyfuse world --out {world}")
        return f"delete {artifact} and rerun '{command}' (it rebuilds what is missing)"
    only = "pairs" if "pairs" in artifact.parts and stage in ("fuse", "train") else stage
    return (f"rebuild it with 'polyfuse run RECIPE --only {only} --force' (or delete {artifact} and rerun "
            "'polyfuse run RECIPE')")


def verify_artifact(path: str | Path, *, full: bool | None = None) -> None:
    """Check an artifact against what its `manifest.json` records: every recorded file is there, with
    its size and, with ``full`` (default: inside :func:`full_verification`), its content hash. Files
    added beside them are not checked (the manifest promises nothing about them; they change the
    artifact's content hash, so its consumers are rebuilt).

    ``path`` is an artifact directory, or a file or directory directly inside one (``merge/model``). Paths
    without a manifest, and manifests that record no files (written before polyfuse recorded them), are
    not checked.

    Raises:
        DataError: one line naming the changed file, what differs and the command that rebuilds it.
    """
    path = Path(path)
    full = _FULL_VERIFY if full is None else full
    directory = path if path.is_dir() and (path / MANIFEST_NAME).is_file() else path.parent
    manifest = _read_manifest(directory)
    if manifest is None or manifest.files is None:
        return
    records = manifest.files
    wanted = records if directory == path else {
        rel: r for rel, r in records.items() if rel == path.name or rel.startswith(f"{path.name}/")}
    hint = rebuild_hint(directory, manifest.stage)
    where = f"{directory / MANIFEST_NAME}"
    for rel, record in sorted(wanted.items()):
        file = directory / rel
        if not file.is_file():
            raise DataError(f"{file}: missing, but {where} lists it; the artifact changed after stage "
                            f"{manifest.stage} wrote it: {hint}")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise DataError(f"{file}: {size} bytes, but {where} records {record['bytes']}; the artifact changed "
                            f"after stage {manifest.stage} wrote it: {hint}")
        if full and hash_file(file) != record["blake2b"]:
            raise DataError(f"{file}: content differs from the hash {where} records; the artifact changed after "
                            f"stage {manifest.stage} wrote it: {hint}")


def _current_hash(path: Path) -> str | None:
    """:func:`hash_path` of an existing path, taking recorded files' hashes from their manifest when their
    size matches (as a skipped stage trusts them); None when the path is gone."""
    if path.is_file():
        manifest = _read_manifest(path.parent)
        record = (manifest.files or {}).get(path.name) if manifest is not None else None
        if record is not None and record["bytes"] == path.stat().st_size:
            return record["blake2b"]
        return hash_file(path)
    if not path.is_dir():
        return None
    manifest = _read_manifest(path)
    if manifest is None or manifest.files is None:
        return hash_path(path)
    digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    digest.update(b"dir\0")
    for rel, file in tree_files(path):
        record = manifest.files.get(rel)
        known = record is not None and record["bytes"] == file.stat().st_size
        digest.update(f"{rel}\0{record['blake2b'] if known else hash_file(file)}\n".encode())
    return digest.hexdigest()


def check_lineage(inputs: Mapping[str, Path], hashes: Mapping[str, str]) -> None:
    """Check that the artifacts a stage is about to read were built on what is there now.

    Every manifest records the content hash of each input (``inputs``) and, for path inputs, where it
    was (``input_paths``). Walking those records upstream from ``inputs`` (whose current ``hashes`` are
    given), every recorded path must still have the recorded content: otherwise the stage would mix
    versions, e.g. stores captured on two different corpora (a store copied in from another run), or
    stores captured before the blocks were rebuilt read with the new blocks. Paths that are gone are
    compared only between the manifests that recorded them. Cheap: manifests are read, and files are
    taken at their recorded hashes when their size matches. Manifests without ``input_paths`` (written
    before polyfuse recorded them) add nothing.

    Raises:
        DataError: one line naming the artifact built on another version, the path and the fix.
    """
    claims: dict[str, tuple[str, Path | None]] = {}  # path -> (content hash, the artifact that recorded it)
    queue: list[Path] = []
    for name, value in sorted(inputs.items()):
        path = Path(value).resolve()
        claims[str(path)] = (hashes[name], None)
        queue.append(path if path.is_dir() else path.parent)
    seen: set[Path] = set()
    while queue:
        artifact = queue.pop(0)
        if artifact in seen:
            continue
        seen.add(artifact)
        manifest = _read_manifest(artifact)
        if manifest is None or not manifest.input_paths:
            continue
        for name, rel in sorted(manifest.input_paths.items()):
            recorded = manifest.inputs.get(name)
            if recorded is None:
                continue
            path = os.path.normpath(artifact / rel)
            if path not in claims:
                now = _current_hash(Path(path))
                claims[path] = (recorded, artifact) if now is None else (now, None)
                queue.append(Path(path) if os.path.isdir(path) else Path(path).parent)
            known, by = claims[path]
            if known != recorded:
                other = "the one there now" if by is None else f"the one {by} was built on"
                raise DataError(f"{artifact} was built on another version of {path} than {other}, so this stage "
                                "would mix the two; rebuild what is stale with 'polyfuse run RECIPE' (it reruns "
                                "every stale stage in order)")
