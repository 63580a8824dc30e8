"""The run's machine-readable results file: ``<run>/results.json``.

Every stage deep-merges its figures into it with :func:`update_results`; nothing is removed, so a
later stage (or ``polyfuse report``) sees everything earlier ones wrote. Schema::

    {
      "models": {
        NAME: {                                  # a source, the target, or a trained/merged target
          "bpb": {DOMAIN: float, ..., "all": float},   # bits per byte on held-out text, lower is better
          "accuracy": {TASK: float},             # one headline score per task in [0, 1], higher is better
          "tasks": {TASK: {METRIC: float}}       # every metric lm-evaluation-harness reported (optional)
        }
      },
      "meta": {
        "target": NAME,                          # optional: the target's row name (else inferred)
        "bpb": {"split": str, "batch_size": int, "max_length": int, ...},   # how bpb was measured
        "lm_eval": {"version": str,              # written by polyfuse.evaluate.lm_eval_bridge
                    "tasks": {TASK: {"metric": str, "num_fewshot": int | None, "limit": ...,
                                     "n_samples": int, "higher_is_better": {METRIC: bool}}}}
      }
    }

Row names follow the papers' table: the sources by their recipe names, ``TARGET`` (the original
target), ``TARGET+clm`` (continual training on the same data, no teacher), ``TARGET+fused``
(FuseLLM), ``TARGET+pair:SOURCE`` (FuseChat pairwise), ``TARGET+fusechat`` (merged),
``TARGET+sft``, ``TARGET+sft+dpo`` and ``TARGET+sft+wrpo`` (FuseChat-3.0); see :func:`row_order`.

``bpb.all`` is pooled over the whole held-out set (total bits / total bytes: the byte-weighted
average of the domains), not a mean of the domain figures. ``accuracy`` values are fractions
(0.5 is half right); reports print them as percentages. lm-eval metric names keep a filter suffix
when the filter is not ``none`` (``exact_match,strict-match``); standard errors are not stored.
A missing figure is simply absent (never ``null``); reports render it as ``–``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from polyfuse.errors import DataError
from polyfuse.workspace import atomic_write_json

RESULTS_NAME = "results.json"
TRAINED_SUFFIXES = ("+clm", "+fused", "+clm:real", "+fused:real", "+pair:", "+fusechat", "+sft", "+sft+dpo", "+sft+wrpo")
"""Row suffixes after the target's name, in the order the papers' tables list them."""


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


REBUILD_RESULTS = ("delete it and rerun 'polyfuse run RECIPE': the eval stages' rows are written again from their "
                   "outputs (rows added with 'polyfuse eval --run' must be evaluated again)")
"""The fix for a corrupt results file."""


def read_results(path: str | Path) -> dict[str, Any]:
    """The results file, or an empty skeleton when it does not exist yet.

    Raises:
        DataError: the file is not JSON, not UTF-8, or not a mapping with a ``models`` mapping (one line
            naming the file and :data:`REBUILD_RESULTS`).
    """
    path = Path(path)
    if not path.is_file():
        return {"models": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a valid results file ({err.msg} at line {err.lineno}, column {err.colno}); "
                        f"{REBUILD_RESULTS}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a valid results file (not UTF-8: {err.reason}); {REBUILD_RESULTS}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise DataError(f"{path}: not a valid results file (no 'models' mapping at the top level); {REBUILD_RESULTS}")
    return data


def update_results(path: str | Path, models: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict:
    """Deep-merge per-model figures (and optional meta) into the results file, atomically.

    The read-merge-write runs under an exclusive lock on ``<file>.lock``, so processes that update the
    same run at once (ranks, parallel evaluations) never lose each other's rows. An update that changes
    nothing writes nothing (and takes no lock).
    """
    import copy
    import fcntl

    path = Path(path)
    if path.is_file():  # nothing new (a fully current run): no write, so a read-only run directory is fine
        data = read_results(path)
        merged = copy.deepcopy(data)
        _merge(merged.setdefault("models", {}), models)
        if meta:
            _merge(merged.setdefault("meta", {}), meta)
        if merged == data:
            return data
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = read_results(path)
            _merge(data.setdefault("models", {}), models)
            if meta:
                _merge(data.setdefault("meta", {}), meta)
            atomic_write_json(path, data)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return data


def load_results(path: str | Path) -> dict[str, Any]:
    """A run's results file (``path`` is the file or its run directory), validated enough to report.

    Raises:
        DataError: the file is missing, not JSON, or lacks the ``models`` mapping (path named).
    """
    path = Path(path)
    file = path / RESULTS_NAME if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{file}: no results file; run the pipeline's eval stage (polyfuse run RECIPE) first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{file}: unreadable results file ({err}); {REBUILD_RESULTS}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise DataError(
            f"{file}: no 'models' mapping at the top level; see polyfuse.evaluate.results for the schema"
        )
    data.setdefault("meta", {})
    return data


def target_name(results: Mapping[str, Any]) -> str | None:
    """The target's row name: ``meta.target`` when set, else ``target`` when present, else the most
    common prefix before ``+`` among the trained rows (``llama2`` for ``llama2+fused``); ``None``
    when the file has no target."""
    models = results.get("models", {})
    explicit = results.get("meta", {}).get("target")
    if explicit:
        return str(explicit)
    if "target" in models:
        return "target"
    prefixes = [name.split("+", 1)[0] for name in models if "+" in name]
    if not prefixes:
        return None
    return max(sorted(set(prefixes)), key=prefixes.count)


def _suffix_rank(suffix: str) -> tuple[int, str]:
    for rank, known in enumerate(TRAINED_SUFFIXES):
        if suffix == known or (known.endswith(":") and suffix.startswith(known)):
            return rank, suffix
    return len(TRAINED_SUFFIXES), suffix


def row_order(names: Iterable[str], target: str | None) -> list[str]:
    """Model names in the papers' order: sources (names without ``+``, by name), the target, then
    its trained rows by :data:`TRAINED_SUFFIXES` (pairwise rows by source name), then any other
    name, by name."""
    names = list(dict.fromkeys(names))
    if target is None:
        return sorted(names)
    sources = sorted(n for n in names if "+" not in n and n != target)
    trained = [n for n in names if n.startswith(target + "+")]
    trained.sort(key=lambda n: _suffix_rank(n[len(target):]))
    known = [n for n in trained if _suffix_rank(n[len(target):])[0] < len(TRAINED_SUFFIXES)]
    others = sorted(n for n in names if n not in sources and n != target and n not in known)
    return [*sources, *([target] if target in names else []), *known, *others]


def gap_closed(results: Mapping[str, Any], row: str, *, baseline: str | None = None) -> dict[str, float]:
    """Per domain, the share of the gap between plain continual training and the best source that
    ``row`` closes: ``(bpb[baseline] - bpb[row]) / (bpb[baseline] - min over sources of bpb[source])``.

    ``baseline`` defaults to ``TARGET+clm``; sources are the rows without ``+`` other than the target.
    1.0 means as good as the best source on that domain, 0 no better than the baseline, negative
    worse. Domains where no source beats the baseline (no gap) or a figure is missing are left out,
    and so is ``all`` (no single source is "best" on the mixture).
    """
    models = results.get("models", {})
    target = target_name(results)
    if target is None:
        return {}
    base = models.get(baseline or f"{target}+clm", {}).get("bpb", {})
    mine = models.get(row, {}).get("bpb", {})
    sources = [models[name].get("bpb", {}) for name in source_rows(results)]
    out = {}
    for domain, value in mine.items():
        best = [s[domain] for s in sources if domain in s]
        if domain == "all" or domain not in base or not best:
            continue
        gap = base[domain] - min(best)
        if gap > 0:
            out[domain] = (base[domain] - value) / gap
    return out



def best_source_share(results: Mapping[str, Any], row: str) -> dict[str, float]:
    """Per task, ``row``'s held-out accuracy over the best source's on that task (1.0: as good as the best
    source). Sources are the rows without ``+`` other than the target; ``all`` and tasks where every source
    scores 0 are left out."""
    models = results.get("models", {})
    mine = models.get(row, {}).get("accuracy", {})
    sources = [models[name].get("accuracy", {}) for name in source_rows(results)]
    out = {}
    for task, value in mine.items():
        best = max((s[task] for s in sources if task in s), default=0.0)
        if task != "all" and best > 0:
            out[task] = value / best
    return out


def source_rows(results: Mapping[str, Any]) -> list[str]:
    """The sources' row names: the rows without ``+`` other than the target."""
    target = target_name(results)
    return [name for name in results.get("models", {}) if "+" not in name and name != target]


#: Per-task learning curve of an implicit training stage, beside its model (``polyfuse.implicit.curves``).
CURVE_FILE = "curve.json"


def read_curve(path: str | Path) -> dict[str, Any] | None:
    """A stage's ``curve.json`` (a stage directory or the file), or ``None`` when absent or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / CURVE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("points"), list) else None
