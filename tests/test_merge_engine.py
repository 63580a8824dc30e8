"""The streaming merge engine on tiny Llamas built here (random init, save_pretrained; no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from polyfuse.cli import main
from polyfuse.errors import PolyfuseError
from polyfuse.merge import METHODS, merge_tensors, parse_merge_config, plan_merge, run_merge
from polyfuse.merge.engine import _chunk_rows

TOKENS = 90  # the tokenizer's length; the embedding has 100 rows (a padded vocabulary)
ROWS = 100


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TOKENS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pivot and three 'fine-tuned' copies (pivot + noise), saved in 3+ safetensors shards each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    config = LlamaConfig(vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"], max_shard_size="20KB")
    _tokenizer().save_pretrained(paths["base"])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(("a", "b", "c")):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                param.copy_(base_state[key] + 0.02 * torch.randn(param.shape, generator=gen))
        paths[name] = root / name
        model.save_pretrained(paths[name], max_shard_size="20KB")
    return paths


def _state(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            state.update({k: f.get_tensor(k).clone() for k in f.keys()})  # noqa: SIM118
    return state


def _config(llamas: dict[str, Path], method: str = "ties", **extra) -> dict:
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    per_model = {"weight": None, "density": 0.6}
    params = {}
    names = ("a", "b", "c")
    if method == "sce":
        per_model, params = {}, {"select_topk": 0.3, "sce_variant": "fusechat"}
    elif method in ("varm", "model_stock"):
        per_model = {}
    elif method in ("linear", "task_arithmetic"):
        per_model = {"weight": None}
    elif method.startswith("breadcrumbs"):
        per_model = {"weight": None, "density": 0.6, "gamma": 0.05}
    elif method == "slerp":
        per_model, params, names = {}, {"t": 0.4}, ("a",)
    elif method == "nuslerp":
        per_model, params, names = {"weight": None}, {"nuslerp_flatten": False}, ("a", "b")
    elif method == "passthrough":
        per_model, params, names = {}, {"scale": [{"filter": "o_proj", "value": 0.5}]}, ("a",)
    models = [{"model": str(llamas[n]), "parameters": {k: (weights[n] if v is None else v) for k, v in per_model.items()}}
              for n in names]
    data = {"merge_method": method, "base_model": str(llamas["base"]), "models": models, "parameters": params,
            **extra}
    return data


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _expected(llamas: dict[str, Path], data: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Whole-tensor, in-memory merge of every tensor (the reference for the chunked engine)."""
    cfg = parse_merge_config(data)
    plan = plan_merge(cfg, seed=seed)
    states = {n: _state(llamas[n]) for n in ("base", "a", "b", "c")}
    names = [next(n for n in ("a", "b", "c") if str(llamas[n]) == m["model"]) for m in data["models"]]
    with_base = cfg.base_model is not None and cfg.merge_method not in ("linear", "passthrough")
    out = {}
    for task in plan.tensors:
        tensors = [states[n][task.name] for n in names]
        params = {**task.job.params, **task.job.model_params}
        out[task.name] = merge_tensors(cfg.merge_method, tensors, parameters=params, name=task.name, seed=seed,
                                       base=states["base"][task.name] if with_base else None)
    return out


def test_sharded_output_loads_with_transformers_and_equals_whole_tensor_merge(tmp_path, llamas):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _config(llamas)
    out = tmp_path / "merged"
    result = run_merge(_write(tmp_path, data), out, chunk_mb=0.05, out_shard_size="30K", progress=False)
    assert len(result.shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert result.input_bytes == 4 * sum(t.numel() * 4 for t in _state(llamas["base"]).values())

    merged = _state(out)
    expected = _expected(llamas, data)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name

    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert model(torch.tensor([[1, 5, 7]])).logits.shape == (1, 3, ROWS)
    assert len(AutoTokenizer.from_pretrained(out)) == TOKENS


def test_padded_embedding_rows_are_kept(tmp_path, llamas):
    out = tmp_path / "merged"
    run_merge(_write(tmp_path, _config(llamas, "task_arithmetic")), out, progress=False)
    merged, base, a = _state(out), _state(llamas["base"]), _state(llamas["a"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (ROWS, 32)
        tail = merged[name][TOKENS:]  # rows no token id maps to: merged like every other row
        assert not torch.equal(tail, base[name][TOKENS:]) and not torch.equal(tail, a[name][TOKENS:])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == ROWS


def test_chunking_does_not_change_the_output(tmp_path, llamas):
    data = _config(llamas, "sce")
    small = run_merge(_write(tmp_path, data), tmp_path / "small", chunk_mb=0.02, progress=False)
    large = run_merge(_write(tmp_path, data), tmp_path / "large", chunk_mb=512, progress=False)
    a, b = _state(small.out_dir), _state(large.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chunk_rows_respect_the_budget(llamas):
    plan = plan_merge(parse_merge_config(_config(llamas)))
    for task in plan.tensors:
        row_bytes = task.numel // task.shape[0] * 4 * (7 * len(task.sources) + 4)
        for budget in (1, 10_000, 100_000):
            rows = _chunk_rows(task, budget)
            assert rows == 1 or rows * row_bytes <= budget


def test_a_merge_hands_freed_chunk_memory_back(tmp_path, llamas, monkeypatch):
    from contextlib import contextmanager

    calls = []

    @contextmanager
    def spy():
        calls.append("in")
        yield True
        calls.append("out")

    monkeypatch.setattr("polyfuse.merge.engine.large_blocks_returned", spy)
    run_merge(_write(tmp_path, _config(llamas)), tmp_path / "merged", progress=False)
    assert calls == ["in", "out"]  # polyfuse.merge.heap; tests/test_merge_heap.py checks what it does


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_writes_a_loadable_checkpoint(tmp_path, llamas, method):
    data = _config(llamas, method, dtype="bfloat16")
    out = tmp_path / "merged"
    run_merge(_write(tmp_path, data), out, chunk_mb=0.05, progress=False)
    merged = _state(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    expected = _expected(llamas, data)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert f"method: `{method}`" in card and str(llamas["a"]) in card and str(llamas["base"]) in card


def test_nuslerp_without_a_base_interpolates_the_models_themselves(tmp_path, llamas):
    data = _config(llamas, "nuslerp")
    del data["base_model"]
    out = tmp_path / "merged"
    run_merge(_write(tmp_path, data), out, chunk_mb=0.05, progress=False)
    merged, expected = _state(out), _expected(llamas, data)
    with_base = _expected(llamas, _config(llamas, "nuslerp"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(expected[key], with_base[key])
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name


def test_methods_check_how_many_models_they_merge(tmp_path, llamas):
    data = _config(llamas, "slerp")
    data["models"].append({"model": str(llamas["b"])})
    with pytest.raises(PolyfuseError, match=r"models: slerp merges exactly 1 model besides base_model, got 2"):
        run_merge(_write(tmp_path, data), tmp_path / "out", progress=False)
    data = _config(llamas, "model_stock")
    data["models"] = data["models"][:1] + [{"model": str(llamas["base"])}]  # the base listed too: not counted
    with pytest.raises(PolyfuseError, match=r"model_stock merges at least 2 models besides base_model, got 1"):
        run_merge(_write(tmp_path, data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _slices(llamas: dict[str, Path], *ranges: tuple[str, int, int]) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(llamas[n]), "layer_range": [a, b]}]} for n, a, b in ranges]}


def test_passthrough_slices_stack_layers_streamed_and_renumbered(tmp_path, llamas):
    from transformers import AutoModelForCausalLM

    data = _slices(llamas, ("a", 0, 2), ("b", 1, 2), ("a", 0, 1))  # layers a0 a1 b1 a0
    data["slices"][1]["sources"][0]["parameters"] = {"scale": [{"filter": "mlp", "value": 2.0}]}
    out = tmp_path / "stacked"
    result = run_merge(_write(tmp_path, data), out, chunk_mb=0.01, out_shard_size="30K", progress=False)
    merged, a, b = _state(out), _state(llamas["a"]), _state(llamas["b"])
    sources = [(a, 0), (a, 1), (b, 1), (a, 0)]
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"],  # before the layers: first slice
                "model.norm.weight": a["model.norm.weight"], "lm_head.weight": a["lm_head.weight"]}  # after: last
    for i, (state, j) in enumerate(sources):
        for key, tensor in state.items():
            if key.startswith(f"model.layers.{j}."):
                scale = 2.0 if i == 2 and ".mlp." in key else 1.0
                expected[key.replace(f"layers.{j}.", f"layers.{i}.")] = tensor * scale
    assert merged.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(merged[key], tensor), key
    assert len(result.shards) > 1
    assert result.input_bytes == sum(t.numel() * 4 for t in expected.values())
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4 and model(torch.tensor([[1, 5, 7]])).logits.shape == (1, 3, ROWS)
    assert "layer_range=[1, 2]" in (out / "README.md").read_text()


def test_passthrough_slices_check_their_ranges_and_method(tmp_path, llamas):
    data = _slices(llamas, ("a", 0, 2), ("b", 1, 3))
    with pytest.raises(PolyfuseError, match=r"slices\[1\]\.sources\[0\]\.layer_range: \[1, 3\] but the model has 2 layers"):
        run_merge(_write(tmp_path, data), tmp_path / "out", progress=False)
    data = {**_slices(llamas, ("a", 0, 2)), "merge_method": "ties"}
    with pytest.raises(PolyfuseError, match=r"slices: layer slices are supported with merge_method: passthrough only"):
        run_merge(_write(tmp_path, data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_merge_is_deterministic_given_the_seed(tmp_path, llamas):
    models = [{"model": str(llamas[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("a", "b")]
    config = _write(tmp_path, {"merge_method": "dare_ties", "base_model": str(llamas["base"]), "models": models})
    runs = {}
    for name, seed in (("one", "1"), ("again", "1"), ("other", "2")):
        assert main(["merge", str(config), str(tmp_path / name), "--seed", seed, "--chunk-mb", "0.05"]) == 0
        runs[name] = _state(tmp_path / name)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(runs["one"][key], runs["again"][key])
    assert not torch.equal(runs["one"][key], runs["other"][key])
    assert "seed 1" in (tmp_path / "one" / "merge_config.yaml").read_text()


def test_cli_reports_a_bad_config_in_one_line(tmp_path, llamas, capsys):
    config = _write(tmp_path, {**_config(llamas), "merge_method": "nope"})
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    assert "merge_method: unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tokenizer_from_another_model(tmp_path, llamas):
    data = _config(llamas, "linear")
    # the base has the tokenizer; copying "from" the base path by name must work the same as `base`
    data["tokenizer"] = {"source": str(llamas["base"])}
    del data["base_model"]
    out = tmp_path / "merged"
    run_merge(_write(tmp_path, data), out, progress=False)
    assert (out / "tokenizer.json").read_bytes() == (llamas["base"] / "tokenizer.json").read_bytes()
