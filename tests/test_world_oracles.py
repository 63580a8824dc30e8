"""The opt-in oracle teachers of the tiny world: the target's own tokenizer vs a metaspace twin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import polyfuse.demo.world as world_mod
from polyfuse.cli import main
from polyfuse.demo.world import ORACLES, PRESETS, SPECIALIST_PREFIX, build_world, load_world, oracle_plans
from polyfuse.models import resolve_model_ref
from polyfuse.workspace import Manifest

SPECIALISTS = tuple(p.name for p in oracle_plans(PRESETS["test"])[len(ORACLES):])
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")


@pytest.fixture(scope="module")
def oracle_world(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> Path:
    """A copy of the test world with both oracles built (the four world models are reused)."""
    path = tmp_path_factory.mktemp("oracles") / "world"
    shutil.copytree(tiny_world, path)
    build_world(path, preset="test", seed=0, oracles=True)
    return path


def _outputs(world: Path, name: str) -> dict:
    return Manifest.from_path(world / "models" / name).outputs


def _config(world: Path, name: str) -> dict:
    return Manifest.from_path(world / "models" / name).config


def test_oracles_are_opt_in(tiny_world: Path) -> None:
    assert SPECIALISTS == ("oracle-prose", "oracle-code", "oracle-math")
    assert not any((tiny_world / "models" / name).exists() for name in (*ORACLES, *SPECIALISTS))
    assert set(load_world(tiny_world)["models"]).isdisjoint((*ORACLES, *SPECIALISTS))


def test_specialist_oracles_are_the_sources_with_the_targets_tokenizer(oracle_world: Path) -> None:
    """oracle-<source>: the target's tokenizer and architecture, the source's mix and steps, their own seed."""
    models = oracle_world / "models"
    target_plan = _config(oracle_world, "target")["plan"]
    seeds = []
    for name in SPECIALISTS:
        source = name.removeprefix(SPECIALIST_PREFIX)
        cfg, src = _config(oracle_world, name), _config(oracle_world, source)
        assert (models / name / "tokenizer.json").read_bytes() == (models / "target/tokenizer.json").read_bytes()
        assert (cfg["plan"]["arch"], cfg["plan"]["mix"], cfg["plan"]["steps"]) == \
            (target_plan["arch"], src["plan"]["mix"], src["plan"]["steps"])
        assert load_world(oracle_world)["models"][name]["emphasis"] == source
        seeds.append(cfg["seed"])
    assert seeds == [5, 6, 7]


def test_oracle_tokenizer_is_the_targets(oracle_world: Path) -> None:
    models = oracle_world / "models"
    target, oracle, twin = (AutoTokenizer.from_pretrained(models / n) for n in ("target", *ORACLES))
    assert oracle.get_vocab() == target.get_vocab()
    assert (models / "oracle/tokenizer.json").read_bytes() == (models / "target/tokenizer.json").read_bytes()
    assert twin.get_vocab() != target.get_vocab()
    spec = json.loads((models / "oracle-twin/tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "Metaspace" and spec["model"]["type"] == "BPE"
    assert _config(oracle_world, "oracle-twin")["plan"]["vocab_size"] == _config(oracle_world, "target")["plan"]["vocab_size"]


def test_oracles_have_the_target_architecture(oracle_world: Path) -> None:
    target = AutoConfig.from_pretrained(oracle_world / "models/target").to_dict()
    for name in ORACLES:
        model = AutoModelForCausalLM.from_pretrained(oracle_world / "models" / name)
        assert {k: model.config.to_dict()[k] for k in ARCH_KEYS} == {k: target[k] for k in ARCH_KEYS}, name


def test_oracles_train_longer_with_one_seed(oracle_world: Path) -> None:
    source_steps = next(m.steps for m in PRESETS["test"].models if m.role == "source")
    oracle, twin, target = (_config(oracle_world, n) for n in (*ORACLES, "target"))
    for cfg in (oracle, twin):
        assert cfg["plan"]["steps"] == source_steps > target["plan"]["steps"]
        assert cfg["plan"]["mix"] == target["plan"]["mix"]
    assert oracle["seed"] == twin["seed"] == 4  # seed + 4: after the four world models
    assert _outputs(oracle_world, "oracle")["final_loss"] < _outputs(oracle_world, "target")["final_loss"]


def test_world_json_and_references(oracle_world: Path) -> None:
    models = load_world(oracle_world)["models"]
    for name, kind in zip(ORACLES, ("byte_bpe", "metaspace_bpe"), strict=True):
        entry = models[name]
        assert (entry["role"], entry["arch"], entry["tokenizer"], entry["emphasis"]) == \
            ("oracle", "llama", kind, "general")
        assert entry["params"] and entry["vocab"] and entry["seconds"] is not None
        resolved = resolve_model_ref(f"world:{name}", world_dir=oracle_world)
        assert Path(resolved.location) == (oracle_world / "models" / name).resolve()


def test_rebuild_reuses_every_part(oracle_world: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a current world part was rebuilt")

    monkeypatch.setattr(world_mod, "build_model", fail)
    assert set(ORACLES) <= set(build_world(oracle_world, preset="test", seed=0, oracles=True)["models"])
    # without --oracles the current oracles stay listed
    assert set(ORACLES) <= set(build_world(oracle_world, preset="test", seed=0)["models"])
    assert main(["world", "--out", str(oracle_world), "--preset", "test", "--oracles"]) == 0
    assert "world:oracle-twin" in capsys.readouterr().out


def test_changed_target_makes_only_the_oracle_stale(oracle_world: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    world = tmp_path / "world"
    shutil.copytree(oracle_world, world)
    (world / "models/target/NOTE.txt").write_text("the target's directory changed\n")
    assert set(build_world(world, preset="test", seed=0)["models"]) & set(ORACLES) == {"oracle-twin"}
    built: list[str] = []

    def record(out, plan, *args, **kwargs):  # no training: only which parts are rebuilt matters here
        built.append(plan.name)
        return {}

    monkeypatch.setattr(world_mod, "build_model", record)
    assert set(ORACLES) <= set(build_world(world, preset="test", seed=0, oracles=True)["models"])
    assert built == ["oracle", *SPECIALISTS]
