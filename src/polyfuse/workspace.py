"""Artifact directories: content hashes, manifests, atomic writes and skip-if-current stages.

Every stage writes one directory with a `manifest.json` holding the stage name, its resolved config,
the hashes of its inputs, package versions, timing and whatever the stage reports as outputs. A stage
is *current* when its manifest matches the stage, config and input hashes it would be run with, and is
then skipped. A directory is only ever replaced whole: it is built in a `.tmp-*` sibling and swapped in
by renames, so a killed or failing run never leaves a half-written artifact in place.

A *resumable* stage (`run_stage(..., resumable=True)`) is built in a persistent sibling
`.partial-NAME` instead, which survives a failed or killed run: the rerun hands the same directory,
with what the last run wrote, to `build`, which skips the work already there. The partial directory
holds `key.json` (stage, config, input hashes) and is wiped when they change.

Under several processes (``accelerate launch``/``torchrun``: ``WORLD_SIZE`` > 1) every rank calls
`run_stage` with the same arguments. Rank 0 alone opens, wipes and swaps in directories and writes
manifests; the others wait at barriers. A *collective* stage (`collective=True`: capture, training)
is built by every rank in the same directory, each writing its own share; any other stage is built
by rank 0 alone. A failure on any rank is raised on every rank.

This module knows nothing about what a stage computes::

    def build(tmp: Path) -> dict:
        (tmp / "scores.json").write_text("{}")
        return {"domains": 3}

    result = run_stage(Path("runs/x/eval"), "eval", recipe.section_dict("eval"), {"model": model_dir}, build)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from polyfuse.errors import DataError

__all__ = [
    "MANIFEST_NAME",
    "PARTIAL_KEY_NAME",
    "Manifest",
    "Ranks",
    "StageResult",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_lineage",
    "clean_stale_temps",
    "current_ranks",
    "file_records",
    "full_verification",
    "hash_file",
    "hash_input",
    "hash_inputs",
    "hash_path",
    "is_current",
    "normalise_config",
    "package_versions",
    "partial_dir",
    "run_stage",
    "stage_status",
    "tree_files",
    "verify_artifact",
    "workdir_lock",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
PARTIAL_PREFIX = ".partial-"
PARTIAL_KEY_NAME = "key.json"
_CHUNK = 1 << 20
_DIGEST_SIZE = 32
_PACKAGES = (
    "polyfuse",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "safetensors",
    "accelerate",
    "trl",
    "numpy",
)

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
    return any(path.is_relative_to(held) for held in _HELD_LOCKS)


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


# --------------------------------------------------------------------------------------------------
# versions and config normalisation


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return tuple(sorted(found.items()))


def package_versions() -> dict[str, str]:
    """Versions of python and the packages a result depends on ("absent" when not installed)."""
    return dict(_versions())


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "model_dump"):  # pydantic models
        return value.model_dump(mode="json")
    raise TypeError(
        f"{type(value).__name__} is not JSON-serialisable; convert it before putting it in a config"
    )


def normalise_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` after a JSON round trip: tuples become lists, Paths strings, keys strings."""
    return json.loads(json.dumps(dict(config), default=_json_default))


# --------------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(name: str, prefix: str = TMP_PREFIX) -> str:
    return f"{prefix}{name}-{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory, fsync and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / _temp_name(path.name)
    try:
        with tmp.open("xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def iter_jsonl(path: str | Path, *, missing: str, fix: str = "each line must be one JSON object"
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream the objects of a JSONL file, each with its ``FILE:LINE`` (blank lines skipped).

    Raises:
        DataError: the file is absent (``"{path}: {missing}"``), or a line is not JSON or not an object
            (``FILE:LINE`` named, then ``fix``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or drop the line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); {fix}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got a {type(row).__name__}; {fix}")
            yield where, row


def read_jsonl(path: str | Path, *, missing: str, fix: str = "each line must be one JSON object"
               ) -> list[tuple[str, dict[str, Any]]]:
    """:func:`iter_jsonl` as a list."""
    return list(iter_jsonl(path, missing=missing, fix=fix))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as JSON (indent 2, sorted keys, trailing newline)."""
    return atomic_write_text(path, _dumps(obj))


# --------------------------------------------------------------------------------------------------
# manifests


@dataclass
class Manifest:
    """What produced an artifact directory; stored as `manifest.json` inside it."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    versions: dict[str, str]
    created: str
    duration_s: float
    outputs: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] | None = None
    """Every file of the artifact (manifest excluded): ``{path: {"bytes", "blake2b"}}``; None in manifests
    written before polyfuse recorded them (they are not verified)."""
    input_paths: dict[str, str] | None = None
    """Where each path input was (``{name: path relative to this directory}``), so that a stage reading
    several artifacts can check they were built on the same versions of what they share
    (:func:`check_lineage`); None in manifests written before polyfuse recorded them."""

    def to_json(self) -> str:
        """The manifest as JSON text (indent 2, sorted keys, trailing newline)."""
        return _dumps(asdict(self))

    @classmethod
    def from_path(cls, path: str | Path) -> Manifest:
        """Read `path/manifest.json` (or `path` itself if it is the manifest file)."""
        path = Path(path)
        file = path if path.is_file() else path / MANIFEST_NAME
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{file}: no manifest, the stage has not been run here") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{file}: unreadable manifest ({err}), delete the directory and rerun") from None
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in _OPTIONAL] if isinstance(data, dict) else names
        if missing:
            raise DataError(f"{file}: manifest lacks {', '.join(missing)}, delete the directory and rerun")
        return cls(**{n: data[n] for n in names if n in data})


_OPTIONAL = ("files", "input_paths")


@dataclass
class StageResult:
    """The directory a stage wrote (or kept), its manifest and whether the build was skipped."""

    path: Path
    manifest: Manifest
    skipped: bool


def _read_manifest(out_dir: Path) -> Manifest | None:
    try:
        return Manifest.from_path(out_dir / MANIFEST_NAME)
    except DataError:
        return None


def _matches(
    manifest: Manifest | None, stage: str, config: Mapping[str, Any], input_hashes: Mapping[str, str]
) -> bool:
    return (
        manifest is not None
        and manifest.stage == stage
        and manifest.config == normalise_config(config)
        and manifest.inputs == dict(input_hashes)
    )


def is_current(
    out_dir: str | Path, stage: str, config: Mapping[str, Any], input_hashes: Mapping[str, str]
) -> bool:
    """True when `out_dir/manifest.json` records this stage, config and input hashes.

    Package versions and timestamps are not compared: upgrading a package does not make results stale.
    """
    return _matches(_read_manifest(Path(out_dir)), stage, config, input_hashes)


def stage_status(
    out_dir: str | Path, stage: str, config: Mapping[str, Any], inputs: Mapping[str, str | Path]
) -> Literal["missing", "stale", "current"]:
    """`missing` (no manifest), `stale` (manifest differs or is unreadable) or `current`."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).exists():
        return "missing"
    return "current" if is_current(out_dir, stage, config, hash_inputs(inputs)) else "stale"


# --------------------------------------------------------------------------------------------------
# running a stage


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale_temps(parent: str | Path, name: str | None = None) -> list[Path]:
    """Remove `.tmp-*` / `.trash-*` entries in `parent` left by killed runs; return what was removed.

    Names carry the writer's pid (`.tmp-NAME-PID-RANDOM`); entries whose process is still alive on
    this machine are kept, so concurrent stages sharing a parent do not delete each other's work.
    With ``name`` only the temps of that one output (`.tmp-NAME-*`, `.trash-NAME-*`) are considered.
    """
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    prefixes = (TMP_PREFIX, TRASH_PREFIX) if name is None else (f"{TMP_PREFIX}{name}-", f"{TRASH_PREFIX}{name}-")
    for entry in parent.iterdir():
        if not entry.name.startswith(prefixes):  # `.partial-*` dirs are kept
            continue
        if name is not None and entry.name.count("-") != name.count("-") + 3:  # another output's temp
            continue
        pid_text = entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 3 else ""
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp` with renames; the old directory goes to a `.trash-*` sibling first."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    trash = out_dir.parent / _temp_name(out_dir.name, TRASH_PREFIX)
    os.replace(out_dir, trash)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(trash, out_dir)
        raise
    _remove(trash)


def partial_dir(out_dir: str | Path) -> Path:
    """The persistent work directory of a resumable stage writing `out_dir`: `<parent>/.partial-<name>`."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{PARTIAL_PREFIX}{out_dir.name}"


def _stage_key(stage: str, config: Mapping[str, Any], input_hashes: Mapping[str, str]) -> dict[str, Any]:
    return {"stage": stage, "config": normalise_config(config), "inputs": dict(input_hashes)}


def _open_partial(
    work: Path, key: Mapping[str, Any], *, fresh: bool, log: Callable[[str], Any], stage: str
) -> None:
    """Create `work` with `key.json`, or keep it when its key matches (unless `fresh`), else wipe it."""
    key_file = work / PARTIAL_KEY_NAME
    if work.exists() or work.is_symlink():
        try:
            old = json.loads(key_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if old == key and not fresh:
            log(f"stage {stage}: resuming from {work}")
            return
        reason = "force" if fresh and old == key else "config or inputs changed"
        log(f"stage {stage}: discarding partial work in {work} ({reason})")
        _remove(work)
    work.mkdir()
    atomic_write_json(key_file, key)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes running a pipeline (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def current_ranks() -> Ranks:
    """Rank and world size from an initialised process group, else from ``WORLD_SIZE``/``RANK``.

    With ``WORLD_SIZE`` > 1 and no process group yet, ``accelerate.PartialState()`` creates it (gloo
    on CPU, nccl on GPU), as ``accelerate launch`` and the HF Trainer would.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState()
    return Ranks(dist.get_rank(), dist.get_world_size())


LOCK_NAME = ".polyfuse.lock"
"""The run lock in a workdir: held (``fcntl.flock``) by the process running a recipe there."""

_HELD_LOCKS: dict[str, list[Any]] = {}  # resolved workdir -> [open lock file or None, depth]


def _lock_holder(fh: Any) -> str:
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: "
            f"{info.get('command')}")


def _take_lock(workdir: Path) -> Any:
    """Open and lock ``workdir/.polyfuse.lock`` (None when the workdir cannot be written at all)."""
    import errno
    import fcntl
    import sys

    writable = True
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fh = open(workdir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held until released
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:  # read-only here: a lock file opened for reading still shows (and takes) the lock
            fh = open(workdir / LOCK_NAME, encoding="utf-8")  # noqa: SIM115
        except OSError:
            logger.debug("workdir %s is not writable (%s): running without its lock", workdir, exc.strerror)
            return None
        writable = False
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fh)
        fh.close()
        raise DataError(f"{workdir}: in use by another polyfuse run ({holder}); wait for it to finish, or give "
                        f"this run another workdir") from None
    if not writable:
        return fh
    info = {"pid": os.getpid(), "host": platform.node(), "command": " ".join(["polyfuse", *sys.argv[1:]]),
            "started": datetime.now(UTC).isoformat(timespec="seconds")}
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(info) + "\n")
    fh.flush()
    return fh


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, *, ranks: Ranks | None = None) -> Iterator[None]:
    """Hold the workdir's run lock for the block: one run per workdir.

    The lock is an ``fcntl.flock`` on ``<workdir>/.polyfuse.lock``, which records the holder (pid, host,
    command, start); the kernel releases it when the holder dies, so a lock left by a killed run is
    taken over. Re-entrant within a process. Under several ranks, rank 0 takes it for the whole run
    and every rank learns the outcome. A workdir that cannot be written is used without the lock.

    Raises:
        DataError: another live process holds the lock (named in the message).
    """
    key = str(Path(workdir).resolve())
    held = _HELD_LOCKS.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    ranks = ranks or current_ranks()
    fh, error = None, None
    if ranks.main:
        try:
            fh = _take_lock(Path(workdir))
        except Exception as exc:  # shared with the other ranks below
            error = exc
    failures = ranks.gather(None if error is None else str(error))
    if error is not None:
        raise error
    if failures[0] is not None:
        raise DataError(failures[0])
    _HELD_LOCKS[key] = [fh, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        if fh is not None:
            fh.close()  # closing the descriptor releases the flock


def _raise_if_any_failed(ranks: Ranks, error: BaseException | None, stage: str) -> None:
    """Share each rank's failure; re-raise the own one, or report another rank's."""
    failures = ranks.gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(failures) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise DataError(f"stage {stage} failed on rank {rank}: {msg}")


def run_stage(
    out_dir: str | Path,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str | Path],
    build: Callable[[Path], Mapping[str, Any] | None],
    *,
    force: bool = False,
    log: Callable[[str], Any] | None = None,
    resumable: bool = False,
    collective: bool = False,
    ranks: Ranks | None = None,
) -> StageResult:
    """Build `out_dir` with `build(work_dir)` unless its manifest is current; swap it in atomically.

    `build` writes its files into the directory it is given and may return a dict of outputs
    (counts, metrics, file names) that goes into the manifest.

    By default the directory is a fresh, empty temp directory; if `build` raises, it is deleted,
    the previous `out_dir` (if any) is left untouched and the exception propagates.

    With `resumable=True` it is the persistent `.partial-<name>` sibling (:func:`partial_dir`),
    which holds `key.json` (stage, config and input hashes; do not write a file of that name) and
    whatever an earlier failed or killed run of the same stage, config and inputs wrote there, so
    `build` can skip finished work. It is kept when `build` raises, wiped when the key differs or
    with `force=True`, and on success `key.json` is removed, the manifest written and the
    directory renamed to `out_dir`. `clean_stale_temps` never removes it.

    Under several processes (`ranks`, default :func:`current_ranks`) see the module docstring;
    `collective=True` hands every rank the same (resumable) directory.
    """
    out_dir = Path(out_dir)
    log = log or logger.info
    config = normalise_config(config)
    input_hashes = hash_inputs(inputs)
    input_paths = {name: os.path.relpath(value.resolve(), out_dir.resolve())
                   for name, value in inputs.items() if isinstance(value, Path)}
    ranks = ranks or current_ranks()
    manifest = None if force else _read_manifest(out_dir)
    current = manifest is not None and _matches(manifest, stage, config, input_hashes)
    if ranks.world_size > 1:  # everyone follows rank 0's view, taken before anyone changes anything
        current = ranks.gather(current)[0]
    if current:
        verify_artifact(out_dir)
        log(f"stage {stage}: up to date, skipped ({out_dir})")
        return StageResult(out_dir, _read_manifest(out_dir), skipped=True)
    check_lineage({name: value for name, value in inputs.items() if isinstance(value, Path)}, input_hashes)
    if ranks.world_size > 1:
        return _run_stage_ranked(out_dir, stage, config, input_hashes, build, force=force, log=log,
                                 resumable=resumable, collective=collective, ranks=ranks, input_paths=input_paths)
    return _run_stage_here(out_dir, stage, config, input_hashes, build, force=force, log=log,
                           resumable=resumable, input_paths=input_paths)


def _run_stage_ranked(out_dir: Path, stage: str, config: dict[str, Any], input_hashes: dict[str, str],
                      build: Callable[[Path], Mapping[str, Any] | None], *, force: bool,
                      log: Callable[[str], Any], resumable: bool, collective: bool, ranks: Ranks,
                      input_paths: dict[str, str] | None = None) -> StageResult:
    """`run_stage` on one of several ranks (all ranks decided alike that the stage must run)."""
    if not collective:  # rank 0 builds alone; the others wait for its result
        error: BaseException | None = None
        if ranks.main:
            try:
                _run_stage_here(out_dir, stage, config, input_hashes, build, force=force, log=log,
                                resumable=resumable, input_paths=input_paths)
            except BaseException as exc:  # shared with the other ranks below, then re-raised
                error = exc
        _raise_if_any_failed(ranks, error, stage)
        return StageResult(out_dir, _read_manifest(out_dir), skipped=False)
    work = partial_dir(out_dir)
    error = None
    if ranks.main:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(out_dir.parent)
            _open_partial(work, _stage_key(stage, config, input_hashes), fresh=force, log=log, stage=stage)
        except BaseException as exc:
            error = exc
    _raise_if_any_failed(ranks, error, stage)
    start = time.perf_counter()
    outputs: Mapping[str, Any] | None = None
    try:
        outputs = build(work)
    except BaseException as exc:
        error = exc
    _raise_if_any_failed(ranks, error, stage)
    if ranks.main:
        try:
            _finish(work, out_dir, stage, config, input_hashes, outputs, time.perf_counter() - start,
                    resumable=True, log=log, input_paths=input_paths)
        except BaseException as exc:
            error = exc
    _raise_if_any_failed(ranks, error, stage)
    return StageResult(out_dir, _read_manifest(out_dir), skipped=False)


def _finish(tmp: Path, out_dir: Path, stage: str, config: dict[str, Any], input_hashes: dict[str, str],
            outputs: Any, duration: float, *, resumable: bool, log: Callable[[str], Any],
            input_paths: dict[str, str] | None = None) -> Manifest:
    """Write the manifest into the built directory and swap it in as `out_dir`."""
    if outputs is not None and not isinstance(outputs, Mapping):
        raise TypeError(f"stage {stage}: build returned {type(outputs).__name__}, expected a dict or None")
    manifest = Manifest(
        stage=stage,
        config=config,
        inputs=input_hashes,
        versions=package_versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        duration_s=round(duration, 3),
        outputs=json.loads(_dumps(dict(outputs or {}))),
        input_paths=dict(input_paths or {}),
    )
    if resumable:
        (tmp / PARTIAL_KEY_NAME).unlink(missing_ok=True)
    manifest.files = file_records(tmp)
    atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
    _swap_in(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    log(f"stage {stage}: wrote {out_dir} in {manifest.duration_s:.1f}s")
    return manifest


def _run_stage_here(out_dir: Path, stage: str, config: dict[str, Any], input_hashes: dict[str, str],
                    build: Callable[[Path], Mapping[str, Any] | None], *, force: bool,
                    log: Callable[[str], Any], resumable: bool,
                    input_paths: dict[str, str] | None = None) -> StageResult:
    """`run_stage` in one process: build in a temp (or partial) directory, then swap it in."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(parent)
    if resumable:
        tmp = partial_dir(out_dir)
        _open_partial(tmp, _stage_key(stage, config, input_hashes), fresh=force, log=log, stage=stage)
    else:
        tmp = parent / _temp_name(out_dir.name)
        tmp.mkdir()
    start = time.perf_counter()
    try:
        manifest = _finish(tmp, out_dir, stage, config, input_hashes, build(tmp), time.perf_counter() - start,
                           resumable=resumable, log=log, input_paths=input_paths)
    except BaseException:
        if not resumable:
            _remove(tmp)
        elif tmp.is_dir() and not (tmp / PARTIAL_KEY_NAME).exists():  # failed after the key was removed
            atomic_write_json(tmp / PARTIAL_KEY_NAME, _stage_key(stage, config, input_hashes))
        raise
    return StageResult(out_dir, manifest, skipped=False)
