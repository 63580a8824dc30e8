"""Artifact directories: content hashes, manifests, atomic writes and skip-if-current stages.

Every stage writes one directory with a `manifest.json` holding the stage name, its resolved config,
the hashes of its inputs, package versions, timing and whatever the stage reports as outputs. A stage
is *current* when its manifest matches the stage, config and input hashes it would be run with, and is
then skipped; otherwise it is built aside and swapped in whole.

- :mod:`~polyfuse.workspace.hashing`: content hashes of inputs, artifact verification, lineage checks
- :mod:`~polyfuse.workspace.files`: atomic writes, directory swaps, leftovers of killed runs, JSON and JSONL
- :mod:`~polyfuse.workspace.manifest`: :class:`Manifest`, normalised configs, package versions
- :mod:`~polyfuse.workspace.runner`: :func:`run_stage` (skip, resume, swap in, ranks) and stage status
- :mod:`~polyfuse.workspace.ranks`: :class:`Ranks` under ``accelerate launch`` / ``torchrun``
- :mod:`~polyfuse.workspace.processes`: :func:`map_in_processes`, local worker processes for Python-bound work;
  :func:`beside`, one job in a second process while this one runs another
- :mod:`~polyfuse.workspace.lock`: :func:`workdir_lock`, one run per workdir

Import from ``polyfuse.workspace``. It knows nothing about what a stage computes::

    def build(tmp: Path) -> dict:
        (tmp / "scores.json").write_text("{}")
        return {"domains": 3}

    result = run_stage(Path("runs/x/eval"), "eval", recipe.section_dict("eval"), {"model": model_dir}, build)
"""

from __future__ import annotations

from polyfuse.workspace.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temps,
    iter_jsonl,
    read_jsonl,
    swap_in,
    temp_name,
)
from polyfuse.workspace.hashing import (
    check_lineage,
    file_records,
    full_verification,
    hash_file,
    hash_input,
    hash_inputs,
    hash_path,
    rebuild_hint,
    tree_files,
    verify_artifact,
)
from polyfuse.workspace.lock import IMPLICIT_LOCK_NAME, LOCK_NAME, workdir_lock
from polyfuse.workspace.manifest import MANIFEST_NAME, Manifest, normalise_config, package_versions
from polyfuse.workspace.processes import beside, map_in_processes
from polyfuse.workspace.ranks import NO_ACCELERATE, Ranks, current_ranks, start_process_group
from polyfuse.workspace.runner import (
    PARTIAL_KEY_NAME,
    StageResult,
    is_current,
    partial_dir,
    run_stage,
    stage_status,
)

__all__ = [
    "IMPLICIT_LOCK_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "NO_ACCELERATE",
    "PARTIAL_KEY_NAME",
    "Manifest",
    "Ranks",
    "StageResult",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "beside",
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
    "iter_jsonl",
    "map_in_processes",
    "normalise_config",
    "package_versions",
    "partial_dir",
    "read_jsonl",
    "rebuild_hint",
    "run_stage",
    "stage_status",
    "start_process_group",
    "swap_in",
    "temp_name",
    "tree_files",
    "verify_artifact",
    "workdir_lock",
]
