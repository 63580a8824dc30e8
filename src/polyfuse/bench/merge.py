"""The ``merge`` bench suite: streaming merges of Llama-shaped checkpoints, side by side with mergekit.

``polyfuse bench merge`` measures TIES; ``--method NAME`` (repeatable, or ``all``) measures other methods
on the same inputs (:func:`method_config` says what each merges). TIES keeps the keys below; another
method's keys end in ``_<method>`` (``mergekit_seconds_<method>`` for mergekit's time).

=====================================  ================================================================
key                                    what is measured
=====================================  ================================================================
merge_input_gb                         tensor bytes read: three merged models + the base (fp32, 32k vocab,
                                       ~1.08 GB each; quick: tiny)
merge_seconds                          wall seconds of ``polyfuse merge`` (a child process: the CLI as a
                                       user runs it, imports included)
merge_gb_per_s                         merge_input_gb / merge_seconds
merge_peak_rss_gb                      the child's peak RSS (``os.wait4``); goal < 0.6
merge_peak_rss_vs_largest_input        merge_peak_rss_gb / the largest input model's size
mergekit_ties_seconds                  wall seconds of ``mergekit-yaml`` 0.1.5 on the same YAML and inputs
mergekit_peak_rss_gb                   its peak RSS
merge_speedup_vs_mergekit              mergekit_ties_seconds / merge_seconds; goal >= 1
merge_max_abs_diff_vs_mergekit         largest |polyfuse - mergekit| over every output entry
merge_entries_differing_vs_mergekit    how many entries differ (tie-breaks at the TIES threshold)
machine_load_1min                      the 1-minute load average when the runs started (shared cores)
=====================================  ================================================================

mergekit is never a dependency of polyfuse: it is installed (once, from the package registry) into
a throw-away venv under ``workdir/mergekit-venv`` layered over this environment's packages; where
that fails its figures are NaN. The inputs are generated once under ``workdir/inputs`` (reused while
their spec matches) with the streaming shard writer, so generating them needs little memory too.
Both merges read from a warm page cache (every input file is read once before each run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from polyfuse.bench import Figure

__all__ = ["LlamaShape", "ensure_mergekit", "method_config", "run", "write_llama_checkpoints"]

logger = logging.getLogger(__name__)

MERGEKIT = "mergekit==0.1.5"


@dataclass(frozen=True)
class LlamaShape:
    """The tensor shapes of a Llama checkpoint (untied head)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order transformers writes them."""
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "post_attention_layernorm.weight", (h,))]
            out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "kvqo"]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab,
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "dtype": "float32", "hidden_act": "silu"}

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * 4 for _, shape in self.tensors())


FULL = LlamaShape(vocab=32000, hidden=1024, intermediate=2816, layers=16, heads=16)  # 1.08 GB in fp32
QUICK = LlamaShape(vocab=512, hidden=64, intermediate=176, layers=2, heads=4)


def write_llama_checkpoints(root: Path, shape: LlamaShape, names: list[str], *, seed: int = 0,
                            delta: float = 2e-3, shards: int = 2) -> dict[str, Path]:
    """Write ``names[0]`` (the base, N(0, 0.02²) entries) and the others (base + N(0, delta²) noise).

    Each is a directory with ``config.json`` and ``shards`` safetensors files plus an index; all are
    generated row chunk by row chunk, in lockstep, so memory stays small for any size. Reused when
    ``root/spec.json`` matches.
    """
    from polyfuse.merge.shards import StreamingShardWriter

    spec = {"shape": asdict(shape), "names": names, "seed": seed, "delta": delta, "shards": shards}
    paths = {n: root / n for n in names}
    spec_file = root / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    tensors = shape.tensors()
    per_shard = math.ceil(len(tensors) / shards)
    groups = [tensors[i:i + per_shard] for i in range(0, len(tensors), per_shard)]
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for path in paths.values():
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(shape.config(), indent=2))
        weight_map = {name: file for group, file in zip(groups, files, strict=True) for name, _ in group}
        index = {"metadata": {"total_size": shape.nbytes}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for t, (group, file) in enumerate(zip(groups, files, strict=True)):
        entries = [(name, torch.float32, s) for name, s in group]
        writers = [StreamingShardWriter(p / file, entries) for p in paths.values()]
        for j, (name, s) in enumerate(group):
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (t * 1000 + j) + m)
                          for m in range(len(names))]
            rows = s[0]
            step = max(1, (1 << 22) // max(1, math.prod(s[1:])))
            for r0 in range(0, rows, step):
                chunk = (min(rows, r0 + step) - r0, *s[1:])
                base = torch.randn(chunk, generator=generators[0]) * 0.02
                if name.endswith("norm.weight"):
                    base += 1.0
                writers[0].write(name, base)
                for m, writer in enumerate(writers[1:], start=1):
                    writer.write(name, base + torch.randn(chunk, generator=generators[m]) * delta)
        for writer in writers:
            writer.close()
    spec_file.write_text(json.dumps(spec))
    return paths


# --------------------------------------------------------------------------------------------------
# mergekit in a throw-away venv


def ensure_mergekit(venv: Path, *, timeout: float = 900) -> tuple[Path | None, str]:
    """A python with mergekit 0.1.5 importable, in a venv layered over this environment's packages.

    The venv sees this environment's site-packages (and polyfuse) through a ``.pth`` file, so only
    mergekit and its few missing dependencies are installed, into the venv; nothing here changes.
    Returns ``(python or None, why not)``.
    """
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import mergekit.merge_methods, polyfuse"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    shutil.rmtree(venv, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    made = subprocess.run([base_python, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        return None, f"python -m venv failed: {made.stderr.strip()[-200:]}"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    import polyfuse

    layers = [sysconfig.get_paths()["purelib"], str(Path(polyfuse.__file__).resolve().parents[1])]
    Path(site, "polyfuse_layer.pth").write_text("\n".join(layers) + "\n")
    try:
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", MERGEKIT], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"pip install {MERGEKIT} timed out"
    if pip.returncode != 0 or subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"pip install {MERGEKIT} failed: {(pip.stderr or pip.stdout).strip()[-200:]}"
    return python, ""


# --------------------------------------------------------------------------------------------------
# measuring


def _warm(paths: list[Path]) -> None:
    """Read every input file once so both merges start from a warm page cache."""
    for path in paths:
        for file in path.glob("*.safetensors"):
            with file.open("rb") as f:
                while f.read(1 << 24):
                    pass


def _run_child(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GB, exit code) of one child process."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss * 1024 / 1e9, proc.returncode


def _compare(a: Path, b: Path) -> tuple[float, int]:
    """(largest |a - b|, number of differing entries) over two checkpoint directories, in row chunks."""
    from polyfuse.merge.shards import read_index, read_rows

    left, right = read_index(a), read_index(b)
    if left.keys() != right.keys():
        return math.inf, -1
    worst, differing = 0.0, 0
    for name, info in left.items():
        rows = info.shape[0] if info.shape else 1
        step = max(1, (1 << 22) // max(1, info.numel // max(1, rows)))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            diff = (read_rows(info, r0, r1).to(torch.float32) - read_rows(right[name], r0, r1).to(torch.float32)).abs()
            if diff.numel():
                worst = max(worst, float(diff.max()))
                differing += int((diff > 0).sum())
    return worst, differing


#: mergekit 0.1.5's names for the methods it has (polyfuse's ``varm`` has no mergekit counterpart).
MERGEKIT_METHODS = frozenset({"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                              "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock",
                              "passthrough", "sce"})
#: Methods whose masks are random: polyfuse and mergekit draw different masks, so entries differ.
RANDOM_METHODS = frozenset({"dare_linear", "dare_ties", "della", "della_linear"})


def method_config(method: str, paths: dict[str, Path], layers: int) -> dict:
    """The merge YAML the bench runs for ``method`` on the generated ``base``, ``a``, ``b``, ``c``.

    Task-vector methods merge ``a``, ``b``, ``c`` onto ``base`` (weight 1/3, density 0.5 where the method
    prunes); ``slerp`` interpolates ``base`` and ``a``; ``nuslerp`` ``a`` and ``b``; ``passthrough`` stacks the
    first half of ``a``'s layers on the second half of ``b``'s.
    """
    from polyfuse.merge.methods import get_method

    spec = get_method(method)  # a PolyfuseError naming merge_method for an unknown name
    three = ["a", "b", "c"]
    prunes = "density" in spec.model_params
    config: dict = {"merge_method": method, "dtype": "float32"}
    if method == "slerp":
        return {**config, "base_model": str(paths["base"]), "models": [{"model": str(paths["a"])}],
                "parameters": {"t": 0.3}}
    if method == "nuslerp":
        return {**config, "models": [{"model": str(paths[n]), "parameters": {"weight": 0.5}} for n in ("a", "b")]}
    if method == "passthrough":
        half = layers // 2
        return {**config, "slices": [{"sources": [{"model": str(paths["a"]), "layer_range": [0, half]}]},
                                     {"sources": [{"model": str(paths["b"]), "layer_range": [half, layers]}]}]}
    models = []
    for name in three:
        params = {"weight": 1 / 3} if "weight" in spec.model_params else {}
        models.append({"model": str(paths[name]), **({"parameters": {**params, **({"density": 0.5} if prunes else {})}}
                                                    if params or prunes else {})})
    config["models"] = models
    if spec.needs_base or spec.optional_base:
        config["base_model"] = str(paths["base"])
    if method == "ties":
        config["parameters"] = {"normalize": True}
    if method == "sce":
        config["parameters"] = {"select_topk": 0.5, "sce_variant": "mergekit"}
    return config


def _key(base: str, method: str) -> str:
    """TIES keeps the bench's original keys; every other method's figures carry its name as a suffix."""
    return base if method == "ties" else f"{base}_{method}"


def run(*, quick: bool, workdir: Path, methods: list[str] | None = None, mergekit: bool = True) -> list[Figure]:
    """Generate the inputs, merge them with polyfuse and (when it can be installed) mergekit; report.

    ``methods`` (default ``["ties"]``; ``["all"]`` for every registered method) are measured one after the
    other on the same inputs; ``mergekit=False`` skips the comparison (its figures are NaN).
    """
    from polyfuse.merge.methods import METHODS

    methods = list(methods or ["ties"])
    if methods == ["all"]:
        methods = list(METHODS)
    shape = QUICK if quick else FULL
    names = ["base", "a", "b", "c"]
    size = "quick" if quick else "full"
    configs = {m: method_config(m, {n: workdir / f"inputs-{size}" / n for n in names}, shape.layers) for m in methods}
    logger.info("bench merge: generating %s inputs (%.2f GB each) under %s", size, shape.nbytes / 1e9, workdir)
    paths = write_llama_checkpoints(workdir / f"inputs-{size}", shape, names)
    load = os.getloadavg()[0]
    figures = [Figure("merge_input_gb", len(names) * shape.nbytes / 1e9, "GB",
                      f"four generated models (a base and three fine-tunes), {shape}"),
               Figure("machine_load_1min", load, "", "1-minute load average: other jobs share the cores")]
    python, why = (ensure_mergekit(workdir / "mergekit-venv") if mergekit and MERGEKIT_METHODS & set(methods)
                   else (None, "not compared (--no-mergekit)" if not mergekit else "no method of this run is in mergekit"))
    if python is None:
        logger.warning("bench merge: no mergekit comparison: %s", why)
    for method in methods:
        figures += _measure(method, configs[method], paths, shape, workdir, python, why)
    return figures


def _measure(method: str, config: dict, paths: dict[str, Path], shape: LlamaShape, workdir: Path,
             python: Path | None, why: str) -> list[Figure]:
    """Merge once with polyfuse and once with mergekit (when it has the method) and compare."""
    import yaml

    config_file = workdir / f"{method}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    read = [Path(m["model"]) for m in config.get("models", [])] + [
        Path(src["model"]) for sl in config.get("slices", []) for src in sl["sources"]]
    read = list(dict.fromkeys(read + ([Path(config["base_model"])] if "base_model" in config else [])))
    input_gb = len(read) * shape.nbytes / 1e9
    note = f"2 shared cores, load {os.getloadavg()[0]:.1f} at start"
    k = lambda base: _key(base, method)  # noqa: E731

    out = workdir / f"out-polyfuse-{method}"
    _warm(read)
    cmd = [sys.executable, "-m", "polyfuse.cli", "merge", str(config_file), str(out), "--seed", "0"]
    seconds, rss, code = _run_child(cmd, workdir / f"polyfuse-{method}.log")
    if code != 0:
        raise RuntimeError(f"polyfuse merge ({method}) failed (exit {code}); see {workdir / f'polyfuse-{method}.log'}")
    figures = [Figure(k("merge_seconds"), seconds, "s", f"polyfuse merge CLI, {method} of {len(read)} inputs, {note}"),
               Figure(k("merge_gb_per_s"), input_gb / seconds, "GB/s", "input bytes read / wall seconds"),
               Figure(k("merge_peak_rss_gb"), rss, "GB", "peak RSS of the polyfuse merge process (goal < 0.6)"),
               Figure(k("merge_peak_rss_vs_largest_input"), rss / (shape.nbytes / 1e9), "x",
                      "peak RSS / one input model's size")]
    mk_keys = (("mergekit_ties_seconds" if method == "ties" else f"mergekit_seconds_{method}", "s"),
               (k("mergekit_peak_rss_gb"), "GB"), (k("merge_speedup_vs_mergekit"), "x"),
               (k("merge_max_abs_diff_vs_mergekit"), ""), (k("merge_entries_differing_vs_mergekit"), ""))
    if python is None or method not in MERGEKIT_METHODS:
        reason = why if python is None else f"mergekit has no {method}"
        shutil.rmtree(out, ignore_errors=True)
        return figures + [Figure(key, float("nan"), unit, reason) for key, unit in mk_keys]
    mk_out = workdir / f"out-mergekit-{method}"
    shutil.rmtree(mk_out, ignore_errors=True)
    _warm(read)
    cmd = [str(python), "-m", "mergekit.scripts.run_yaml", str(config_file), str(mk_out), "--no-copy-tokenizer",
           "--random-seed", "0"]
    mk_seconds, mk_rss, code = _run_child(cmd, workdir / f"mergekit-{method}.log")
    if code != 0:
        shutil.rmtree(out, ignore_errors=True)
        reason = f"mergekit-yaml failed (exit {code}); see {workdir / f'mergekit-{method}.log'}"
        logger.warning("bench merge: %s", reason)
        return figures + [Figure(key, float("nan"), unit, reason) for key, unit in mk_keys]
    diff, differing = _compare(out, mk_out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    why_differ = ("random masks: polyfuse and mergekit draw different ones" if method in RANDOM_METHODS else
                  "TIES keeps exactly k entries; where several |delta| equal the k-th largest, mergekit's argsort "
                  "keeps an arbitrary subset, polyfuse the first by position" if "ties" in method else
                  "float rounding order")
    values = (mk_seconds, mk_rss, mk_seconds / seconds, diff, differing)
    details = (f"{MERGEKIT} mergekit-yaml, same YAML, {note}", "peak RSS of the mergekit process",
               "mergekit seconds / polyfuse seconds (goal >= 1)", "largest |polyfuse - mergekit| over all output entries",
               f"entries that differ ({why_differ})")
    return figures + [Figure(key, value, unit, detail)
                      for (key, unit), value, detail in zip(mk_keys, values, details, strict=True)]
