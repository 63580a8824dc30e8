"""Merge configs: mergekit-style YAML validates, and every bad config fails before any output is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from polyfuse.errors import PolyfuseError
from polyfuse.merge import load_merge_config, parse_merge_config, parse_size, run_merge
from polyfuse.merge.config import resolve_value


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": 6}))
    return path


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(6, 4, generator=gen), "norm.weight": torch.ones(4)}
    out = {"base": write_checkpoint(tmp_path / "base", base)}
    for name in ("a", "b"):
        out[name] = write_checkpoint(tmp_path / name, {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                                                        for k, v in base.items()})
    out["wide"] = write_checkpoint(tmp_path / "wide", {"embed.weight": torch.randn(7, 4), "norm.weight": torch.ones(4)})
    out["short"] = write_checkpoint(tmp_path / "short", {"embed.weight": torch.randn(6, 4)})
    return out


def config(models: dict[str, Path], **changes) -> dict:
    data = {"merge_method": "ties", "base_model": str(models["base"]),
            "models": [{"model": str(models["a"]), "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": str(models["b"]), "parameters": {"weight": 0.5, "density": 0.5}}],
            "dtype": "float32"}
    data.update(changes)
    return data


def fails_before_output(tmp_path: Path, data: dict, match: str) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    with pytest.raises(PolyfuseError, match=match) as info:
        run_merge(path, out, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_mergekit_style_config_validates_and_round_trips():
    text = """
merge_method: sce
base_model: ./pivot
models:
  - model: ./a
  - model: ./b
parameters:
  select_topk: 0.1
  sce_variant: fusechat
dtype: bfloat16
tokenizer:
  source: base
"""
    cfg = parse_merge_config(yaml.safe_load(text))
    assert cfg.output_dtype == "bfloat16" and cfg.tokenizer_ref == "base"
    assert parse_merge_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_filtered_values_pick_the_first_match():
    cfg = parse_merge_config({"merge_method": "linear", "models": [
        {"model": "./a", "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]}}]})
    value = cfg.models[0].parameters["weight"]
    assert resolve_value(value, "model.layers.0.mlp.up_proj.weight") == 0.3
    assert resolve_value(value, "model.layers.0.self_attn.q_proj.weight") == 0.5


@pytest.mark.parametrize(("change", "match"), [
    ({"merge_methd": "ties"}, r"merge_methd: unknown key, did you mean 'merge_method'"),
    ({"dtype": "float8"}, r"dtype: expected one of"),
    ({"modules": {}}, r"modules: multi-module configs are not supported"),
    ({"slices": [{"sources": [{"model": "./a", "layer_range": [0, 2]}]}]},
     r"give either models or slices, not both"),
    ({"tokenizer_source": "union"}, r"tokenizer_source: union vocabularies are not supported"),
    ({"parameters": {"weight": [0.1, 0.5, 1.0]}}, r"layer gradients"),
])
def test_structural_errors_name_the_key(tmp_path, change, match):
    with pytest.raises(PolyfuseError, match=match):
        parse_merge_config({"merge_method": "ties", "base_model": "./b", "models": [{"model": "./a"}], **change},
                           source="merge.yaml")


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("merge_method: [ties")
    with pytest.raises(PolyfuseError, match=r"m\.yaml: not a readable YAML file"):
        load_merge_config(path)


@pytest.mark.parametrize(("change", "match"), [
    ({"merge_method": "slerpy"}, r"merge_method: unknown method 'slerpy'"),
    ({"base_model": None}, r"base_model: required by ties"),
    ({"parameters": {"densty": 0.5}}, r"parameters\.densty: unknown parameter for ties"),
    ({"parameters": {"lambda": "big"}}, r"parameters\.lambda: expected a number"),
])
def test_config_errors_fail_before_output(tmp_path, models, change, match):
    fails_before_output(tmp_path, config(models, **change), match)


def test_missing_weight_names_the_model(tmp_path, models):
    data = config(models)
    del data["models"][1]["parameters"]["weight"]
    fails_before_output(tmp_path, data, r"models\[1\]\.parameters\.weight: required by ties")


def test_bad_density_names_the_model(tmp_path, models):
    data = config(models)
    data["models"][0]["parameters"]["density"] = 1.5
    fails_before_output(tmp_path, data, r"models\[0\]\.parameters\.density: must be between 0 and 1")


def test_absent_base_model_directory(tmp_path, models):
    fails_before_output(tmp_path, config(models, base_model=str(tmp_path / "nowhere")),
                        r"base_model: model path .* does not exist")


def test_hub_id_is_refused(tmp_path, models):
    data = config(models)
    data["models"][0]["model"] = "org/some-model"
    fails_before_output(tmp_path, data, r"models\[0\]\.model: 'org/some-model' is not a local directory")


def test_shape_mismatch_names_the_tensor(tmp_path, models):
    data = config(models)
    data["models"][1]["model"] = str(models["wide"])
    fails_before_output(tmp_path, data, r"tensor 'embed\.weight': shape \[7, 4\] in models\[1\]")


def test_missing_tensor_names_the_tensor(tmp_path, models):
    data = config(models)
    data["models"][0]["model"] = str(models["short"])
    fails_before_output(tmp_path, data, r"models\[0\] .*tensor 'norm\.weight' is missing")


def test_linear_weights_summing_to_zero_are_refused(tmp_path, models):
    data = config(models, merge_method="linear")
    data["models"][0]["parameters"] = {"weight": 1.0}
    data["models"][1]["parameters"] = {"weight": -1.0}
    fails_before_output(tmp_path, data, r"tensor 'embed\.weight': the weights sum to 0")


def test_sce_without_a_variant(tmp_path, models):
    data = config(models, merge_method="sce", parameters={"select_topk": 0.1})
    for m in data["models"]:
        m.pop("parameters")
    fails_before_output(tmp_path, data, r"parameters\.sce_variant: required by sce")


def test_bad_shard_size_fails_before_output(tmp_path, models):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config(models)))
    with pytest.raises(PolyfuseError, match="--out-shard-size"):
        run_merge(path, tmp_path / "out", out_shard_size="lots", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unrelated_output_directory_is_not_replaced(tmp_path, models):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config(models)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PolyfuseError, match="is not a polyfuse merge output"):
        run_merge(path, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    run_merge(path, tmp_path / "merged", progress=False)
    run_merge(path, tmp_path / "merged", progress=False)  # an earlier merge output is replaced
    assert (tmp_path / "merged" / "merge_config.yaml").is_file()


def test_parse_size():
    assert parse_size("2G") == 2_000_000_000
    assert parse_size("50M") == 50_000_000
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1KiB") == 1024
    assert parse_size("123") == 123


def test_integer_and_scalar_tensors(tmp_path):
    from safetensors.torch import load_file

    base = {"w": torch.zeros(3, 2), "scale": torch.tensor(1.0), "ids": torch.arange(4)}
    paths = [write_checkpoint(tmp_path / "base", base)]
    for i in (1, 2):
        paths.append(write_checkpoint(tmp_path / f"m{i}", {"w": torch.full((3, 2), float(i)),
                                                           "scale": torch.tensor(1.0 + i), "ids": torch.arange(4) * i}))
    data = {"merge_method": "task_arithmetic", "base_model": str(paths[0]),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths[1:]]}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    run_merge(path, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["w"].tolist() == [[1.5, 1.5]] * 3  # 0.5 * 1 + 0.5 * 2
    assert out["scale"].shape == () and float(out["scale"]) == 2.5
    assert torch.equal(out["ids"], torch.arange(4))  # not floating point: copied from the base


def test_an_input_directory_is_never_the_output(tmp_path, models):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config(models)))
    with pytest.raises(PolyfuseError, match=r"is \(inside\) the input models\[0\]"):
        run_merge(path, models["a"], progress=False)
    assert (models["a"] / "model.safetensors").is_file()
