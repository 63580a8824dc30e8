"""Parity with mergekit 0.1.5's definitions (runs where mergekit is importable; mergekit is never a
dependency of polyfuse).

Tolerance: float32 results agree to ``rtol=1e-5, atol=1e-6`` (entries of size ~0.1-1). polyfuse
accumulates whole-tensor statistics (DARE's L1 norms, SCE's mean squares) in float64 where mergekit
uses float32, which moves results by a few ulps; TIES, linear and task arithmetic come out bit-equal
in practice. DARE cannot share mergekit's random stream (mergekit draws ``torch.bernoulli`` from the
global generator in its task-graph order; polyfuse seeds a generator per tensor and model), so DARE
is compared with the drop mask fixed: mergekit's ``bernoulli`` is replaced by one that returns
polyfuse's documented mask and keeps mergekit's own rescaling. DELLA likewise: mergekit's
``torch.bernoulli(p)`` is replaced by polyfuse's draw (keep where u < p), so mergekit's own ranks
and keep probabilities are compared. Model Breadcrumbs, SLERP, NuSLERP and Model Stock are
deterministic and compared directly (mergekit's magnitude sorts are not stable; the cases have no
tied magnitudes except zeros, where the order does not matter); ``passthrough`` layer stacks
(``slices``) are compared through both pipelines, bit for bit.

Without mergekit installed, ``test_parity_in_a_mergekit_venv`` (slow) installs mergekit 0.1.5 into a
throw-away venv layered over this environment and runs this file there::

    .venv/bin/pytest -m slow tests/test_merge_parity.py
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from polyfuse.merge import merge_tensors, run_merge
from polyfuse.merge.blocks import stream_seed

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def api():
    """mergekit's in-memory API (skips when mergekit is not installed)."""
    return pytest.importorskip("mergekit.merge_methods.api", reason="mergekit not installed")


@pytest.fixture(scope="module")
def tensors(api) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(96, 40, generator=gen)
    models = [base + 0.05 * torch.randn(96, 40, generator=gen) for _ in range(3)]
    models[2][:10] = base[:10]  # unchanged rows (zero deltas, zero variance)
    return base, models


WEIGHTS = [0.3, 0.5, 0.2]
CASES = [
    ("linear", {"weight": WEIGHTS}, {}),
    ("linear", {"weight": WEIGHTS, "normalize": False}, {}),
    ("task_arithmetic", {"weight": WEIGHTS}, {}),
    ("task_arithmetic", {"weight": WEIGHTS, "normalize": True, "lambda": 0.7}, {}),
    ("ties", {"weight": WEIGHTS, "density": [0.3, 0.5, 0.9]}, {}),
    ("ties", {"weight": WEIGHTS, "density": 0.4, "rescale": True, "normalize": False, "lambda": 1.3}, {}),
    ("sce", {"select_topk": 1.0}, {"sce_variant": "mergekit"}),
    ("sce", {"select_topk": 0.25}, {"sce_variant": "mergekit"}),
    ("breadcrumbs", {"weight": WEIGHTS, "density": [0.3, 0.5, 0.9], "gamma": [0.01, 0.1, 0.05]}, {}),
    ("breadcrumbs", {"weight": WEIGHTS, "density": 0.5, "rescale": True, "normalize": True}, {}),
    ("breadcrumbs_ties", {"weight": WEIGHTS, "density": [0.3, 0.5, 0.9], "gamma": 0.05}, {}),
    ("breadcrumbs_ties", {"weight": WEIGHTS, "density": 0.8, "gamma": 0.3, "normalize": True, "lambda": 0.8}, {}),
    ("della", {"weight": WEIGHTS}, {}),  # density 1: no sampling, TIES' election only
    ("della_linear", {"weight": WEIGHTS, "lambda": 1.2}, {}),
    ("slerp", {"t": 0.3}, {}),
    ("slerp", {"t": 1.4}, {}),
    ("nuslerp", {"weight": WEIGHTS[:2]}, {}),
    ("nuslerp", {"weight": WEIGHTS[:2], "nuslerp_flatten": False}, {}),
    ("nuslerp", {"weight": WEIGHTS[:2], "nuslerp_flatten": False, "nuslerp_row_wise": True}, {}),
    ("nuslerp", {"weight": WEIGHTS[:2], "nuslerp_flatten": False}, {"base": False}),
    ("nuslerp", {"weight": WEIGHTS[:2]}, {"base": False}),
    ("model_stock", {}, {}),
    ("model_stock", {"filter_wise": True}, {}),
    ("passthrough", {}, {"base": False}),
    ("passthrough", {"scale": 0.5}, {"base": False}),
]
MODELS = {"slerp": 1, "nuslerp": 2, "passthrough": 1}  # merged inputs besides the base (3 for the others)


@pytest.mark.parametrize(("method", "params", "extra"), CASES)
def test_tensor_parity(api, tensors, method, params, extra):
    base, models = tensors
    models = models[:MODELS.get(method, 3)]
    extra = dict(extra)
    if not extra.pop("base", method != "linear"):  # linear, nuslerp without a base
        ours = merge_tensors(method, models, parameters={**params, **extra})
        theirs = api.merge_tensors(models, method, parameters=params)
    else:
        ours = merge_tensors(method, models, base=base, parameters={**params, **extra})
        theirs = api.merge_tensors([base, *models], method, parameters=params, base_index=0)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_parity_with_the_drop_mask_fixed(api, tensors, monkeypatch, method, rescale):
    import mergekit.sparsify as sparsify

    base, models = tensors
    density, seed, name = [0.3, 0.6, 0.8], 7, "model.layers.0.mlp.up_proj.weight"
    calls = itertools.count()

    def polyfuse_mask(tensor, density, rescale_norm=None):
        i = next(calls)
        u = torch.rand(tensor.numel(), generator=torch.Generator().manual_seed(stream_seed(seed, name, i)))
        mask = (u < density).view_as(tensor).to(tensor.dtype)
        return sparsify.rescaled_masked_tensor(tensor, mask, rescale_norm)

    monkeypatch.setattr(sparsify, "bernoulli", polyfuse_mask)
    params = {"weight": WEIGHTS, "density": density, "rescale": rescale}
    ours = merge_tensors(method, models, base=base, parameters=params, seed=seed, name=name)
    theirs = api.merge_tensors([base, *models], method, parameters=params, base_index=0)
    assert next(calls) == 3  # one mask per model, in model order
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(("rescale", "shape"), [(True, "matrix"), (False, "matrix"), (True, "vector")])
def test_della_parity_with_the_sampling_fixed(api, tensors, monkeypatch, method, rescale, shape):
    """mergekit draws ``torch.bernoulli(p)``; it is replaced by polyfuse's documented draw (u < p), so
    mergekit's own ranks, probabilities, rescaling and election are compared."""
    import mergekit.sparsify as sparsify

    base, models = tensors
    if shape == "vector":  # ranked as a whole
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]
    seed, name = 11, "model.layers.0.mlp.down_proj.weight"
    calls = itertools.count()

    def polyfuse_draw(probabilities):
        i = next(calls)
        u = torch.rand(probabilities.numel(), generator=torch.Generator().manual_seed(stream_seed(seed, name, i)))
        return (u.view_as(probabilities) < probabilities).to(probabilities.dtype)

    monkeypatch.setattr(sparsify.torch, "bernoulli", polyfuse_draw)
    params = {"weight": WEIGHTS, "density": [0.3, 0.6, 0.7], "epsilon": [0.1, 0.2, 0.25], "rescale": rescale}
    theirs = api.merge_tensors([base, *models], method, parameters=params, base_index=0)
    monkeypatch.undo()
    ours = merge_tensors(method, models, base=base, parameters=params, seed=seed, name=name)
    assert next(calls) == 3  # one draw per model, in model order
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


# ---- whole pipeline on a tiny Llama -----------------------------------------------------------


@pytest.fixture(scope="module")
def llamas(api, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("parity-llamas")
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for i, name in enumerate(("base", "a", "b", "c")):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                param.copy_(base[key] + (0.02 * torch.randn(param.shape, generator=gen) if i else 0))
        paths[name] = root / name
        model.save_pretrained(paths[name], max_shard_size="40KB")
    return paths


def _state(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    state = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return state


@pytest.mark.parametrize(("method", "per_model", "params", "extra"), [
    ("linear", {"weight": 1.0}, {}, {}),
    ("task_arithmetic", {"weight": 0.4}, {"lambda": 0.9}, {}),
    ("ties", {"weight": 0.5, "density": 0.5}, {}, {}),
    ("sce", {}, {"select_topk": 0.3}, {"sce_variant": "mergekit"}),
    ("breadcrumbs_ties", {"weight": 0.5, "density": 0.6, "gamma": 0.05}, {}, {}),
    ("slerp", {}, {"t": 0.35}, {}),
    ("nuslerp", {"weight": 0.5}, {"nuslerp_flatten": False}, {}),
    ("nuslerp", {"weight": 0.5}, {}, {"base": False}),
    ("model_stock", {}, {}, {}),
])
def test_pipeline_parity_on_a_tiny_llama(tmp_path, llamas, method, per_model, params, extra):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    extra = dict(extra)
    with_base = extra.pop("base", True)
    names = ("a", "b", "c")[:MODELS.get(method, 3)]
    config = {"merge_method": method, "base_model": str(llamas["base"]), "dtype": "float32",
              "models": [{"model": str(llamas[n]), **({"parameters": per_model} if per_model else {})}
                         for n in names],
              "parameters": params}
    if not with_base:
        del config["base_model"]
    if method == "linear":
        config["models"].append({"model": str(llamas["base"]), "parameters": per_model})
    mergekit_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours_config = tmp_path / "polyfuse.yaml"
    ours_config.write_text(yaml.safe_dump({**config, "parameters": {**params, **extra}}))
    run_merge(ours_config, tmp_path / "polyfuse", progress=False)
    ours, theirs = _state(tmp_path / "polyfuse"), _state(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **TOLERANCE, msg=name)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_layer_stack_parity_on_a_tiny_llama(tmp_path, llamas, scale):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    ranges = [("a", 0, 2), ("b", 1, 2), ("c", 0, 1)]
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(llamas[n]), "layer_range": [start, end]}]}
                         for n, start, end in ranges]}
    if scale is not None:
        config["parameters"] = {"scale": [{"filter": "o_proj", "value": scale}, {"value": 1.0}]}
    mergekit_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours_config = tmp_path / "polyfuse.yaml"
    ours_config.write_text(yaml.safe_dump(config))
    run_merge(ours_config, tmp_path / "polyfuse", progress=False)
    ours, theirs = _state(tmp_path / "polyfuse"), _state(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    layers = [json.loads((tmp_path / d / "config.json").read_text())["num_hidden_layers"]
              for d in ("polyfuse", "mergekit")]
    assert layers == [4, 4]


@pytest.mark.slow
def test_parity_in_a_mergekit_venv(tmp_path_factory):
    """Install mergekit 0.1.5 into a throw-away venv (package registry) and run this file there."""
    from polyfuse.bench.merge import ensure_mergekit

    venv = Path(os.environ.get("POLYFUSE_MERGEKIT_VENV") or tmp_path_factory.mktemp("mergekit") / "venv")
    python, why = ensure_mergekit(venv)
    if python is None:
        pytest.skip(f"mergekit venv unavailable: {why}")
    result = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                             "-m", "not slow"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "skipped" not in result.stdout and " passed" in result.stdout, result.stdout[-1000:]
