"""The streaming merge engine: plan from shard headers, merge tensor by tensor in row chunks, write shards.

``run_merge(config, out)`` has two steps:

1. :func:`plan_merge` reads the config, resolves every model to a local directory and reads the
   safetensors headers (no tensor data). It checks everything a merge can trip on — unknown
   method or parameter, base model absent, a tensor missing from an input, shapes that differ,
   parameter values per tensor — so a bad config fails before any output is written.
2. :func:`execute_plan` streams each tensor through its merger in row chunks sized by a memory
   budget (statistics passes first where the method needs them), and writes each output shard
   with :class:`~polyfuse.merge.shards.StreamingShardWriter` as the rows come. The directory is built
   under a ``.tmp-*`` sibling and renamed into place, with ``config.json``, the tokenizer files,
   ``merge_config.yaml`` and a model card.

Peak memory is the chunk budget plus the interpreter, whatever the size of the tensors or models:
during a merge, chunk buffers of 1 MiB or more are mapped and unmapped on their own
(:mod:`polyfuse.merge.heap`), so the memory they free goes back to the system instead of piling up
in the allocator's heap.
Embedding rows are merged as they are: rows beyond the tokenizer's length (padded vocabularies)
are kept, never truncated. Inputs whose vocabulary differs from the output's (the base's, else the
first model's) have their embedding and LM-head rows matched by token text
(:mod:`polyfuse.merge.vocab`); the rows they lack come from the base, and ``vocab_map.json`` says
what was matched. ``passthrough`` with ``slices`` stacks layer ranges
(:mod:`polyfuse.merge.passthrough`): each output tensor is a renamed input tensor, streamed the same
way, and ``config.json`` gets the new layer count.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polyfuse.errors import ModelLoadError, PolyfuseError
from polyfuse.merge.card import model_card
from polyfuse.merge.config import MergeConfig, load_merge_config
from polyfuse.merge.heap import large_blocks_returned
from polyfuse.merge.methods import Chunk, MergeMethod, TensorJob, get_method, run_merger
from polyfuse.merge.passthrough import stack_slices, stacked_config
from polyfuse.merge.shards import DTYPES, StreamingShardWriter, TensorInfo, read_index, read_rows
from polyfuse.merge.vocab import VocabMatch, gather_rows, read_vocab, row_map, vocab_rows
from polyfuse.workspace import clean_stale_temps, swap_in, temp_name

__all__ = ["MergePlan", "MergeResult", "TensorTask", "execute_plan", "parse_size", "plan_merge", "run_merge"]

logger = logging.getLogger(__name__)

MARKER = "merge_config.yaml"
"""Written into every merge output; an existing directory holding it may be replaced by a new merge."""
VOCAB_MAP = "vocab_map.json"
"""Written when embedding rows were matched by token text: what each input matched (:class:`VocabMatch`)."""
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
_COPIED_CONFIGS = ("config.json", "generation_config.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``2G``, ``500M``, ``1.5GB``, ``2GiB`` or a plain number (K/M/G/T are powers of 1000).

    Raises:
        PolyfuseError: not a size.
    """
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise PolyfuseError(f"--out-shard-size: expected a size like 2G, 500M or 1000000 (bytes), got {text!r}")
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base ** " kmgt".index(match.group(2).lower() or " "))


@dataclass(frozen=True)
class InputModel:
    """One model of the merge: where it came from in the config, its directory and its tensors."""

    label: str
    """``base_model`` or ``models[i]``."""
    ref: str
    path: Path
    tensors: dict[str, TensorInfo]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its inputs, output dtype and (for floating tensors) the merge job."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    base: TensorInfo | None
    sources: list[TensorInfo]
    job: TensorJob | None
    """None: the tensor is not floating point and is copied from ``sources[0]``."""
    row_maps: tuple[torch.Tensor | None, ...] = ()
    """Per source, the source row of each output row (``-1``: from ``fallback``); empty or None: same rows."""
    fallback: TensorInfo | None = None
    """Where the rows a mapped source lacks come from (the base model, else the reference model)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class MergePlan:
    """Everything :func:`execute_plan` needs, checked: method, inputs, tensors and the files to copy."""

    config: MergeConfig
    method: MergeMethod
    base: InputModel | None
    inputs: list[InputModel]
    """The merged inputs (the base excluded for methods that take task vectors against it)."""
    tensors: list[TensorTask]
    seed: int
    config_dir: Path
    """Where config.json (and generation_config.json) are copied from."""
    tokenizer_dir: Path | None
    source_layers: list[int] | None = None
    """A layer stack (``slices``): the source layer index of each output layer; None otherwise."""
    vocab: list[VocabMatch] = field(default_factory=list)
    """Inputs whose embedding rows were matched by token text (empty: every vocabulary is the output's)."""

    @property
    def input_bytes(self) -> int:
        """Bytes of tensor data read: every merged input, plus the base for methods that use it."""
        if self.source_layers is not None:  # a layer stack reads the tensors it copies
            return sum(s.nbytes for t in self.tensors for s in t.sources)
        models = ([self.base] if self.base and self.method.uses_base(True) else []) + self.inputs
        return sum(info.nbytes for m in {m.path: m for m in models}.values() for info in m.tensors.values())


@dataclass
class MergeResult:
    """What a merge wrote and how long it took."""

    out_dir: Path
    tensors: int
    shards: list[str]
    input_bytes: int
    output_bytes: int
    seconds: float
    vocab: list[VocabMatch] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# planning


def _resolve(label: str, ref: str, world_dir: str | Path) -> InputModel:
    from polyfuse.models import resolve_model_ref

    key = label if label == "base_model" else f"{label}.model"
    try:
        resolved = resolve_model_ref(ref, world_dir=world_dir)
    except ModelLoadError as e:
        raise ModelLoadError(f"{key}: {e}") from None
    if not resolved.is_local:
        raise ModelLoadError(
            f"{key}: {ref!r} is not a local directory; polyfuse merge reads local checkpoints only "
            f"(download it first, e.g. huggingface-cli download {resolved.location} --local-dir DIR)"
        )
    path = Path(resolved.location)
    try:
        tensors = read_index(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"{label}: {e}") from None
    return InputModel(label, ref, path, tensors)


def _check_same_tensors(reference: InputModel, other: InputModel, vocab_tensors: frozenset[str] = frozenset()) -> None:
    """Same tensor names and shapes; ``vocab_tensors`` (rows matched by token text) may differ in rows."""
    missing = [n for n in reference.tensors if n not in other.tensors]
    if missing:
        raise PolyfuseError(
            f"{other.label} ({other.ref}): tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
            f"every input needs the tensors of {reference.label} — merge checkpoints of the same architecture"
        )
    extra = [n for n in other.tensors if n not in reference.tensors]
    if extra:
        raise PolyfuseError(
            f"{other.label} ({other.ref}): tensor {extra[0]!r} is not in {reference.label} ({len(extra)} extra in all); "
            "merge checkpoints of the same architecture"
        )
    for name, info in reference.tensors.items():
        shape = other.tensors[name].shape
        if name in vocab_tensors:
            shape, info = shape[1:], TensorInfo(info.name, info.file, info.dtype, info.shape[1:], info.offset)
        if shape != info.shape:
            raise PolyfuseError(
                f"tensor {name!r}: shape {list(shape)} in {other.label} ({other.ref}) but {list(info.shape)} in "
                f"{reference.label}; merge checkpoints of the same architecture (vocabularies of different sizes "
                "are matched by token text when every model directory holds its tokenizer)"
            )


def _tokenizer_len(path: Path) -> int | None:
    """Ids the tokenizer in ``path`` can produce (max id + 1, added tokens included), or None without one."""
    vocab = read_vocab(path)
    return max(vocab.values()) + 1 if vocab else None


def _tokenizer_dir(config: MergeConfig, reference: InputModel, models: list[InputModel],
                   world_dir: str | Path) -> Path | None:
    from polyfuse.models import resolve_model_ref

    key = "tokenizer.source" if config.tokenizer is not None else "tokenizer_source"
    ref = config.tokenizer_ref
    if ref == "base":
        path = reference.path
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            logger.warning("%s (%s) has no tokenizer files; the merged model gets none", reference.label, path)
            return None
    else:
        known = {m.ref: m.path for m in models}
        if ref in known:
            path = known[ref]
        else:
            try:
                resolved = resolve_model_ref(ref, world_dir=world_dir, kind="tokenizer")
            except ModelLoadError as e:
                raise ModelLoadError(f"{key}: {e}") from None
            if not resolved.is_local:
                raise ModelLoadError(f"{key}: {ref!r} is not a local directory; give base or a model directory")
            path = Path(resolved.location)
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ModelLoadError(f"{key}: {path} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    n_tokens, rows = _tokenizer_len(path), vocab_rows(reference.path)
    if n_tokens is not None and rows is not None and n_tokens > rows:
        raise PolyfuseError(
            f"{key}: the tokenizer in {path} has {n_tokens} ids but the models have {rows} embedding rows; "
            "use the tokenizer the models were trained with"
        )
    return path


def plan_merge(config: MergeConfig, *, seed: int = 0, world_dir: str | Path = "runs/world") -> MergePlan:
    """Resolve and check a merge without writing anything (reads config files and shard headers only).

    Raises:
        PolyfuseError: unknown method or parameter, base model absent, a model that cannot be
            resolved, a missing or extra tensor, a shape mismatch, or a bad parameter value —
            naming the key or the tensor.
    """
    method = get_method(config.merge_method)
    if config.slices:
        return _plan_slices(config, method, seed=seed, world_dir=world_dir)
    if method.needs_base and not config.base_model:
        raise PolyfuseError(
            f"base_model: required by {method.name} (task vectors are taken against it); add base_model: PATH"
        )
    labels = [f"models[{i}]" for i in range(len(config.models))]
    method.check_keys(list(config.parameters), [list(m.parameters) for m in config.models], labels)

    base = _resolve("base_model", config.base_model, world_dir) if config.base_model else None
    listed = [_resolve(label, m.model, world_dir) for label, m in zip(labels, config.models, strict=True)]
    listed = [InputModel(m.label, m.ref, m.path, m.tensors, dict(c.parameters))
              for m, c in zip(listed, config.models, strict=True)]
    with_base = method.uses_base(base is not None)
    if with_base:
        assert base is not None
        inputs = [m for m in listed if m.path != base.path]  # mergekit: the base may also be listed
        if not inputs:
            raise PolyfuseError(f"models: {method.name} needs at least one model besides base_model")
    else:
        inputs = listed
    method.check_count(len(inputs), with_base)
    reference = base if base is not None else inputs[0]
    maps, matches = _vocab_maps(reference, inputs)
    vocab_tensors = frozenset(_vocab_tensors(reference)) if maps else frozenset()
    for model in inputs:
        _check_same_tensors(reference, model, vocab_tensors if model.label in maps else frozenset())

    out_dtype = _DTYPES[config.output_dtype] if config.output_dtype else None
    tasks = []
    for name, info in reference.tensors.items():
        sources = [m.tensors[name] for m in inputs]
        dtype = info.dtype
        floating = dtype.startswith(("F", "BF")) and all(s.dtype.startswith(("F", "BF")) for s in sources)
        if not floating:
            tasks.append(TensorTask(name, info.shape, _torch_dtype(info), None, [info], None))
            continue
        params, model_params = method.resolve(name, config.parameters, [m.parameters for m in inputs],
                                              [m.label for m in inputs])
        job = TensorJob(name, info.shape, seed, params, model_params)
        problem = method.check(job)
        if problem:
            raise PolyfuseError(f"tensor {name!r}: {problem}")
        mapped = name in vocab_tensors
        tasks.append(TensorTask(name, info.shape, out_dtype or _torch_dtype(info),
                                base.tensors[name] if with_base and base else None, sources, job,
                                tuple(maps.get(m.label) for m in inputs) if mapped else (),
                                (base or reference).tensors[name] if mapped else None))
    tokenizer_dir = _tokenizer_dir(config, reference, listed + ([base] if base else []), world_dir)
    if matches and tokenizer_dir is not None and tokenizer_dir != reference.path \
            and read_vocab(tokenizer_dir) != read_vocab(reference.path):
        raise PolyfuseError(
            f"tokenizer_source: the inputs' vocabularies differ, so the output takes the vocabulary of "
            f"{reference.label} ({reference.ref}) and matches the others' rows to it; its tokenizer must be that "
            f"one too: set tokenizer_source: base")
    for match in matches:
        logger.info("vocabulary: %s", match.summary())
    return MergePlan(config, method, base, inputs, tasks, seed, reference.path, tokenizer_dir, vocab=matches)


def _vocab_tensors(reference: InputModel) -> list[str]:
    """Tensors indexed by token id: first dimension ``vocab_size`` (embeddings, LM heads, their biases)."""
    rows = vocab_rows(reference.path)
    return [n for n, info in reference.tensors.items() if rows and info.shape and info.shape[0] == rows
            and len(info.shape) <= 2]


def _vocab_maps(reference: InputModel, inputs: list[InputModel]) -> tuple[dict[str, torch.Tensor], list[VocabMatch]]:
    """Row maps (by label) of the inputs whose vocabulary differs from the reference's, and what they matched.

    Inputs without a tokenizer or a ``vocab_size`` are merged by position (their shapes must agree).
    """
    output, out_rows = read_vocab(reference.path), vocab_rows(reference.path)
    maps: dict[str, torch.Tensor] = {}
    matches: list[VocabMatch] = []
    if output is None or out_rows is None:
        return maps, matches
    for model in inputs:
        if model.path == reference.path:
            continue
        vocab, rows = read_vocab(model.path), vocab_rows(model.path)
        if vocab is None or rows is None or (vocab == output and rows == out_rows):
            continue
        maps[model.label], match = row_map(output, out_rows, vocab, rows, f"{model.label} ({model.ref})")
        matches.append(match)
    return maps, matches


def _plan_slices(config: MergeConfig, method: MergeMethod, *, seed: int, world_dir: str | Path) -> MergePlan:
    """Plan a layer stack: every output tensor is one slice model's tensor under its new name."""
    labels = [f"slices[{i}].sources[0]" for i in range(len(config.slices))]
    sources = [s.sources[0] for s in config.slices]
    method.check_keys(list(config.parameters), [list(s.parameters) for s in sources], labels)
    base = _resolve("base_model", config.base_model, world_dir) if config.base_model else None
    resolved: dict[str, InputModel] = {}
    for label, source in zip(labels, sources, strict=True):
        if source.model not in resolved:
            resolved[source.model] = _resolve(label, source.model, world_dir)
    models = [resolved[s.model] for s in sources]
    stacked, source_layers = stack_slices([m.tensors for m in models], [s.layer_range for s in sources], labels)
    out_dtype = _DTYPES[config.output_dtype] if config.output_dtype else None
    tasks = []
    for entry in stacked:
        info = models[entry.slice].tensors[entry.source]
        if not info.dtype.startswith(("F", "BF")):
            tasks.append(TensorTask(entry.name, info.shape, _torch_dtype(info), None, [info], None))
            continue
        params, model_params = method.resolve(entry.name, config.parameters, [sources[entry.slice].parameters],
                                              [labels[entry.slice]])
        job = TensorJob(entry.name, info.shape, seed, params, model_params)
        problem = method.check(job)
        if problem:
            raise PolyfuseError(f"tensor {entry.name!r}: {problem}")
        tasks.append(TensorTask(entry.name, info.shape, out_dtype or _torch_dtype(info), None, [info], job))
    reference = base if base is not None else models[0]  # mergekit: config.json from the base, else a source
    inputs = list(resolved.values())
    tokenizer_dir = _tokenizer_dir(config, reference, inputs + ([base] if base else []), world_dir)
    return MergePlan(config, method, base, inputs, tasks, seed, reference.path, tokenizer_dir, source_layers)


def _torch_dtype(info: TensorInfo) -> torch.dtype:
    try:
        return DTYPES[info.dtype]
    except KeyError:
        raise ModelLoadError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, which torch cannot hold") from None


# --------------------------------------------------------------------------------------------------
# execution


def _rows(info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` as float32 (a 0-d tensor as one row of one element)."""
    return read_rows(info, r0, r1).to(torch.float32).reshape(r1 - r0, *info.shape[1:])


def _chunk_rows(task: TensorTask, budget: int) -> int:
    """Rows per chunk so that inputs and temporaries fit ``budget`` bytes.

    A chunk of K merged inputs costs about 7K + 4 float32 copies of one input's rows at the peak
    (the K + 1 input rows, task vectors, magnitudes, masks, sums); measured with K = 3, the peak
    RSS grows by about the budget. Larger chunks are faster (each chunk maps the shards afresh and
    launches its own kernels), smaller ones use less memory.
    """
    rows = task.shape[0] if task.shape else 1
    per_row = max(1, task.numel // max(1, rows)) * 4 * (7 * len(task.sources) + 4)
    return max(1, min(rows, budget // per_row))


def _merged_rows(task: TensorTask, method: MergeMethod, budget: int) -> Iterator[torch.Tensor]:
    """The output rows of one tensor, chunk by chunk (float32 for merged tensors)."""
    rows = task.shape[0] if task.shape else 1
    step = _chunk_rows(task, budget)
    if task.job is None:  # not floating point: copied
        for r0 in range(0, rows, step):
            yield read_rows(task.sources[0], r0, min(rows, r0 + step))
        return
    per_row = task.numel // max(1, rows)

    def source_rows(i: int, r0: int, r1: int, fallback: torch.Tensor | None) -> torch.Tensor:
        mapping = task.row_maps[i] if task.row_maps else None
        if mapping is None:
            return _rows(task.sources[i], r0, r1)
        assert fallback is not None
        ids = mapping[r0:r1]
        have = ids >= 0
        out = fallback.clone()
        out[have] = gather_rows(task.sources[i], ids[have])
        return out

    def chunks() -> Iterator[Chunk]:
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            base = _rows(task.base, r0, r1) if task.base is not None else None
            fallback = None
            if task.fallback is not None:
                fallback = base if task.fallback is task.base else _rows(task.fallback, r0, r1)
            yield Chunk(base, [source_rows(i, r0, r1, fallback) for i in range(len(task.sources))], r0 * per_row)

    yield from run_merger(method.make(task.job), chunks)


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _assign_shards(tasks: list[TensorTask], shard_bytes: int) -> list[list[TensorTask]]:
    shards: list[list[TensorTask]] = [[]]
    size = 0
    for task in tasks:
        if shards[-1] and size + task.out_bytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(task)
        size += task.out_bytes
    return shards


def _check_out_dir(out_dir: Path, plan: MergePlan) -> None:
    """Refuse to replace an input, a file, or a directory that is not empty and not an earlier merge output."""
    target = out_dir.resolve()
    for model in ([plan.base] if plan.base else []) + plan.inputs:
        if target == model.path or model.path in target.parents:
            raise PolyfuseError(f"output {out_dir} is (inside) the input {model.label} ({model.ref}); choose another directory")
    if out_dir.is_file():
        raise PolyfuseError(f"output {out_dir} is a file; give a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise PolyfuseError(
            f"output {out_dir} exists and is not a polyfuse merge output ({MARKER} missing); "
            "choose a new directory or remove it"
        )


def _write_config(plan: MergePlan, tmp: Path) -> None:
    for name in _COPIED_CONFIGS:
        src = plan.config_dir / name
        if not src.is_file():
            continue
        if name == "config.json" and (plan.config.output_dtype or plan.source_layers is not None):
            data = json.loads(src.read_text(encoding="utf-8"))
            if plan.source_layers is not None:
                data = stacked_config(data, plan.source_layers)
            for key in ("dtype", "torch_dtype"):
                if key in data and plan.config.output_dtype:
                    data[key] = plan.config.output_dtype
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, tmp / name)


def _write_card(plan: MergePlan, tmp: Path, name: str) -> None:
    sample = next((t.job for t in plan.tensors if t.job is not None and len(t.shape) == 2), None)
    sample = sample or next((t.job for t in plan.tensors if t.job is not None), None)
    inputs = []
    if plan.source_layers is not None:  # a layer stack: one row per slice
        for s in plan.config.slices:
            source = s.sources[0]
            inputs.append((source.model, {"layer_range": list(source.layer_range)}))
    for i, model in enumerate(plan.inputs if plan.source_layers is None else []):
        params = {k: v[i] for k, v in sample.model_params.items()} if sample else {}
        inputs.append((model.ref, params))
    notes = [f"{k}: {v}" for k, v in (sample.params.items() if sample else []) if k != "int8_mask"]
    notes.append(f"output dtype: {plan.config.output_dtype or 'as the base model'} (computed in float32)")
    notes += [f"vocabulary: {m.summary()} (see {VOCAB_MAP})" for m in plan.vocab]
    text = model_card(name=name,
                      method=plan.method.name, pretty_name=plan.method.pretty_name,
                      reference=plan.method.reference, base=plan.base.ref if plan.base else None,
                      inputs=inputs, seed=plan.seed, config_yaml=plan.config.to_yaml(), notes=notes)
    (tmp / "README.md").write_text(text, encoding="utf-8")


def execute_plan(plan: MergePlan, out_dir: str | Path, *, chunk_mb: float = 128, out_shard_size: str | int = "2G",
                 progress: bool = True) -> MergeResult:
    """Merge every tensor of a checked plan and write the output directory atomically.

    Args:
        chunk_mb: working-memory budget of one chunk (all inputs and temporaries), in MB.
        out_shard_size: the largest output shard, in bytes (``2G``, ``500M``, ...).
    """
    from polyfuse.progress import progress_bar

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, plan)
    if chunk_mb <= 0:
        raise PolyfuseError(f"--chunk-mb: must be positive, got {chunk_mb}")
    budget = int(chunk_mb * 1e6)
    shards = _assign_shards(plan.tensors, parse_size(out_shard_size))
    names = _shard_names(len(shards))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir.parent, name=out_dir.name)  # what a killed merge into out_dir left behind
    tmp = out_dir.parent / temp_name(out_dir.name)
    tmp.mkdir()
    start = time.perf_counter()
    try:
        weight_map: dict[str, str] = {}
        with progress_bar(f"merge ({plan.method.name})", len(plan.tensors), enabled=progress) as advance, \
                large_blocks_returned():  # freed chunk buffers go back to the system
            for shard, file in zip(shards, names, strict=True):
                entries = [(t.name, t.out_dtype, t.shape) for t in shard]
                with StreamingShardWriter(tmp / file, entries, {"merged_with": "polyfuse"}) as writer:
                    for task in shard:
                        for rows in _merged_rows(task, plan.method, budget):
                            writer.write(task.name, rows)
                        weight_map[task.name] = file
                        advance()
        output_bytes = sum(t.out_bytes for t in plan.tensors)
        if len(names) > 1:
            index = {"metadata": {"total_size": output_bytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _write_config(plan, tmp)
        if plan.tokenizer_dir is not None:
            for name in _TOKENIZER_FILES:
                if (plan.tokenizer_dir / name).is_file():
                    shutil.copyfile(plan.tokenizer_dir / name, tmp / name)
        if plan.vocab:
            report = {"output_vocabulary": plan.base.label if plan.base else plan.inputs[0].label,
                      "inputs": [m.as_dict() for m in plan.vocab]}
            (tmp / VOCAB_MAP).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / MARKER).write_text(f"# polyfuse merge --seed {plan.seed}\n{plan.config.to_yaml()}", encoding="utf-8")
        _write_card(plan, tmp, out_dir.name)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    logger.debug("merged %d tensors (%.2f GB read) with %s into %s (%d shard(s)) in %.1f s", len(plan.tensors),
                plan.input_bytes / 1e9, plan.method.name, out_dir, len(names), seconds)
    return MergeResult(out_dir, len(plan.tensors), names, plan.input_bytes, output_bytes, seconds, plan.vocab)


def run_merge(config: str | Path | MergeConfig, out_dir: str | Path, *, seed: int = 0, chunk_mb: float = 128,
              out_shard_size: str | int = "2G", world_dir: str | Path = "runs/world",
              progress: bool = True) -> MergeResult:
    """Read a mergekit-style YAML (or a validated config), check it, then merge into ``out_dir``.

    Nothing is written unless the whole plan checks out: config, models, tensors, shapes and
    parameters (see :func:`plan_merge`), the output location and the size options.

    Raises:
        PolyfuseError: a bad config, model, tensor or option, naming the key or tensor.
    """
    cfg = config if isinstance(config, MergeConfig) else load_merge_config(config)
    parse_size(out_shard_size)
    try:
        plan = plan_merge(cfg, seed=seed, world_dir=world_dir)
    except PolyfuseError as e:
        if isinstance(config, MergeConfig):
            raise
        raise type(e)(f"{config}: {e}") from None
    return execute_plan(plan, out_dir, chunk_mb=chunk_mb, out_shard_size=out_shard_size, progress=progress)
