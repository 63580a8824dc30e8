"""Recipe validation: unknown keys, types, overrides and one-line errors that name key and fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from polyfuse.errors import PolyfuseError, RecipeError
from polyfuse.recipe import (
    EvalSection,
    ModelRef,
    ModelSpec,
    Recipe,
    Section,
    apply_overrides,
    load_recipe,
    parse_recipe,
)

VALID = """\
workdir: runs/tiny
world: runs/world
seed: 3
target: {name: target, model: "world:target"}
sources:
  - {name: prose, model: "world:prose"}
  - {name: code, model: "world:code", tokenizer: "world:code"}
data:
  eval: "world:corpus"
  split: heldout
  domains: [prose, code]
eval:
  batch_size: 4
  max_length: 64
  stride: 32
  max_bytes_per_domain: 10000
  dtype: float32
  device: cpu
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so errors name "recipe.yaml", as a user running in place sees them


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return Path(name)


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    return write(tmp_path, VALID)


def test_valid_recipe_loads(valid: Path) -> None:
    recipe = load_recipe(valid)
    assert recipe.workdir == "runs/tiny"
    assert recipe.seed == 3
    assert [m.name for m in recipe.models()] == ["target", "prose", "code"]
    assert recipe.sources[1].tokenizer == "world:code"
    assert recipe.data.domains == ["prose", "code"]
    assert recipe.eval.batch_size == 4
    assert recipe.eval.effective_stride == 32
    assert recipe.eval.dtype == "float32"


def test_minimal_recipe_uses_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, "target: {model: 'world:target'}\nsources: [{name: a, model: 'world:a'}]\n")
    )
    assert recipe.target.name == "target"
    assert recipe.workdir == "runs/recipe"
    assert recipe.world == "runs/world"
    assert recipe.eval == EvalSection()
    assert recipe.eval.effective_stride == recipe.eval.max_length == 512
    assert recipe.data.eval == "world:corpus"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, VALID + "wrkdir: x\n"))
    assert "recipe.yaml: wrkdir: unknown key" in message
    assert "did you mean 'workdir'" in message
    for key in ("workdir", "world", "seed", "target", "sources", "data", "eval"):
        assert key in message.split("allowed keys:")[1]


def test_unknown_nested_key_lists_section_keys(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, VALID.replace("batch_size: 4", "batchsize: 4")))
    assert message.startswith("recipe.yaml: eval.batchsize: unknown key")
    assert "allowed keys: batch_size, max_length, stride, max_bytes_per_domain, dtype, device" in message


def test_unknown_key_inside_list_item(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, VALID.replace("tokenizer:", "tokeniser:")))
    assert "sources.1.tokeniser: unknown key" in message
    assert "allowed keys: name, model, tokenizer, revision" in message


def test_wrong_type_names_key_value_and_fix(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, VALID.replace("batch_size: 4", "batch_size: abc")))
    assert "recipe.yaml: eval.batch_size: expected an integer >= 1, got 'abc'" in message
    assert "8" in message and "remove the key" in message


def test_strings_are_not_coerced_to_numbers(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, VALID.replace("seed: 3", "seed: '3'")))
    assert "seed: expected an integer >= 0, got '3'" in message


def test_bad_literal_and_pattern(tmp_path: Path) -> None:
    text = VALID.replace("dtype: float32", "dtype: fp8").replace("device: cpu", "device: gpu")
    message = error_of(write(tmp_path, text))
    assert "eval.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got 'fp8'" in message
    assert "eval.device:" in message and "got 'gpu'" in message


def test_missing_required_key(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "sources: [{name: a, model: 'world:a'}]\n"))
    assert message.startswith("recipe.yaml: target: required key missing")


def test_missing_key_in_list_item(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "target: {model: 'world:t'}\nsources: [{name: a}]\n"))
    assert "sources.0.model: required key missing" in message


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = "seed: -1\nsources: []\neval: {batch_size: 0, stride: x, colour: red}\n"
    message = error_of(write(tmp_path, text))
    problems = message.split("; recipe.yaml: ")
    assert len(problems) == 6, message
    for part in (
        "seed:",
        "target: required key missing",
        "sources:",
        "eval.batch_size:",
        "eval.stride:",
        "colour",
    ):
        assert part in message


def test_empty_and_non_mapping_recipes(tmp_path: Path) -> None:
    assert "target: required key missing" in error_of(write(tmp_path, ""))
    assert "must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_override_parses_yaml_values(valid: Path) -> None:
    recipe = load_recipe(valid, ["eval.batch_size=16", "eval.stride=null", "data.domains=[prose]"])
    assert recipe.eval.batch_size == 16
    assert recipe.eval.stride is None
    assert recipe.data.domains == ["prose"]


def test_override_indexes_lists(valid: Path) -> None:
    recipe = load_recipe(valid, ["sources.0.model=/x/y"])
    assert recipe.sources[0].model == "/x/y"
    recipe = load_recipe(valid, ["sources.2.name=math", "sources.2.model=org/math"])
    assert [s.name for s in recipe.sources] == ["prose", "code", "math"]


def test_override_deletes_key(valid: Path) -> None:
    recipe = load_recipe(valid, ["~eval.stride", "~data"])
    assert recipe.eval.stride is None
    assert recipe.data.domains is None
    assert "target: required key missing" in error_of(valid, ("~target",))


def test_override_wins_over_yaml(valid: Path) -> None:
    assert load_recipe(valid).workdir == "runs/tiny"
    assert load_recipe(valid, ["workdir=runs/other"]).workdir == "runs/other"


def test_invalid_override_value_is_attributed_to_override(valid: Path) -> None:
    message = error_of(valid, ("eval.batch_size=abc",))
    assert "eval.batch_size: expected an integer >= 1, got 'abc'" in message
    assert "eval.batch_size=abc" in message


@pytest.mark.parametrize("bad", ["--eval.batch_size=4", "eval.batch_size", "-x", "=4", "eval..x=1"])
def test_malformed_override(valid: Path, bad: str) -> None:
    message = error_of(valid, (bad,))
    assert "key=value" in message or "empty key" in message


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("~eval.nope", "nothing to delete"),
        ("sources.x.model=a", "index it with a number"),
        ("sources.9.model=a", "has 2 items"),
        ("seed.x=1", "not a mapping or list"),
    ],
)
def test_override_path_errors(valid: Path, bad: str, expected: str) -> None:
    assert expected in error_of(valid, (bad,))


def test_apply_overrides_does_not_mutate_input() -> None:
    data = {"eval": {"batch_size": 2}}
    out = apply_overrides(data, ["eval.batch_size=3", "new.deep.key=1e-5"])
    assert data == {"eval": {"batch_size": 2}}
    assert out == {"eval": {"batch_size": 3}, "new": {"deep": {"key": 1e-5}}}


def test_duplicate_source_names(tmp_path: Path) -> None:
    text = VALID.replace("name: code", "name: prose")
    message = error_of(write(tmp_path, text))
    assert "sources: duplicate source name 'prose' (sources.0 and sources.1)" in message


def test_target_name_must_differ_from_sources(valid: Path) -> None:
    assert "also a source name" in error_of(valid, ("target.name=prose",))


def test_stride_larger_than_max_length(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, VALID.replace("stride: 32", "stride: 65")))
    assert "eval.stride: stride 65 is larger than max_length 64" in message
    load_recipe(write(tmp_path, VALID.replace("stride: 32", "stride: 64")))  # equal is fine


@pytest.mark.parametrize(
    ("text", "model", "revision", "kind"),
    [
        ("org/name@v1.0", "org/name", "v1.0", "hub"),
        ("org/name@refs/pr/1", "org/name", "refs/pr/1", "hub"),
        ("org/name", "org/name", None, "hub"),
        ("world:prose", "world:prose", None, "world"),
        ("/abs/dir@x", "/abs/dir@x", None, "path"),
        ("./models/a", "./models/a", None, "path"),
    ],
)
def test_model_ref_parse_and_round_trip(text: str, model: str, revision: str | None, kind: str) -> None:
    ref = ModelRef.parse(text)
    assert (ref.model, ref.revision, ref.kind) == (model, revision, kind)
    assert str(ref) == text
    assert ModelRef.parse(str(ref)) == ref


def test_model_spec_splits_revision() -> None:
    spec = ModelSpec(name="a", model="org/name@abc123")
    assert (spec.model, spec.revision) == ("org/name", "abc123")
    assert str(spec.ref) == "org/name@abc123"
    assert ModelSpec(name="a", model="org/name@r", revision="r").revision == "r"


def test_model_spec_revision_conflicts(valid: Path) -> None:
    message = error_of(valid, ("sources.0.model=org/name@a", "sources.0.revision=b"))
    assert "sources.0:" in message and "give the revision in one place" in message
    assert "only applies to hub ids" in error_of(valid, ("sources.0.revision=main",))


def test_bad_model_name_and_world_ref(valid: Path) -> None:
    message = error_of(valid, ("sources.0.name=my model", "sources.1.model='world:'"))
    assert "sources.0.name: expected a string matching" in message
    assert "sources.1.model:" in message and "world:target" in message


def test_to_yaml_round_trip(valid: Path, tmp_path: Path) -> None:
    recipe = load_recipe(valid, ["sources.0.model=org/prose@v2"])
    text = recipe.to_yaml()
    assert "batch_size: 4" in text and "device: cpu" in text
    assert "revision: v2" in text
    assert load_recipe(write(tmp_path, text, "again.yaml")) == recipe
    minimal = parse_recipe({"target": {"model": "world:t"}, "sources": [{"name": "a", "model": "world:a"}]})
    assert yaml.safe_load(minimal.to_yaml()) == {
        "target": {"model": "world:t"},
        "sources": [{"name": "a", "model": "world:a"}],
    }
    assert "batch_size: 8" in minimal.to_yaml(exclude_defaults=False)


def test_section_dict(valid: Path) -> None:
    recipe = load_recipe(valid)
    assert recipe.section_dict("eval")["max_length"] == 64
    assert recipe.section_dict("data")["domains"] == ["prose", "code"]
    assert recipe.section_dict("target") == {
        "name": "target",
        "model": "world:target",
        "tokenizer": None,
        "revision": None,
    }
    assert Recipe.sections() == ["data", "eval", "corpus", "blocks", "capture", "vocab", "align", "fuse", "train", "pairs", "merge",
                                 "online"]
    with pytest.raises(KeyError):
        recipe.section_dict("sources")


def test_missing_recipe_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="nope.yaml") as info:
        load_recipe(missing)
    assert isinstance(info.value, PolyfuseError)
    assert "not found" in str(info.value)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "seed: 1\neval: {batch_size: 4\n"))
    assert "recipe.yaml:" in message and "invalid YAML" in message
    assert message.split(":")[1].isdigit()


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, VALID + "seed: 4\n"))
    assert "duplicate key 'seed'" in message and "line 3" in message


def test_scientific_floats_parse_as_floats() -> None:
    assert apply_overrides({}, ["lr=1e-5"]) == {"lr": 1e-5}


def _all_models(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    seen.add(model)
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate not in seen:
                _all_models(candidate, seen)
    return seen


def test_every_field_documented_and_extra_forbidden() -> None:
    for model in _all_models(Recipe, set()):
        assert issubclass(model, Section)
        assert model.model_config.get("extra") == "forbid", model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert "\n" not in field.description and ";" not in field.description


def test_sampled_tail_and_starts_combinations_are_checked():
    from polyfuse.errors import RecipeError
    from polyfuse.recipe import parse_recipe

    base = {"target": {"model": "world:target"}, "sources": [{"name": "a", "model": "world:prose"}]}
    with pytest.raises(RecipeError, match="train.temperature must be 1.0"):
        parse_recipe(base, ["capture.samples=8", "train.temperature=2.0", "train.teacher_mass=renormalise"])
    with pytest.raises(RecipeError, match="vocab.method=groups"):
        parse_recipe(base, ["align.method=starts", "vocab.method=mined"])
    ok = parse_recipe(base, ["capture.samples=8", "align.method=starts", "vocab.method=groups"])
    assert ok.capture.samples == 8 and ok.align.method == "starts"


def test_align_defaults_follow_the_vocabulary_map():
    """groups (the default) gets starts with inside and cuts; any other map gets FuseLLM's offsets alone."""
    from polyfuse.recipe import parse_recipe

    base = {"target": {"model": "world:target"}, "sources": [{"name": "a", "model": "world:prose"}]}
    default = parse_recipe(base)
    assert (default.vocab.method, default.align.method, default.align.inside, default.align.cuts) == \
        ("groups", "starts", True, True)
    assert "align" not in yaml.safe_load(default.to_yaml())
    mined = parse_recipe(base, ["vocab.method=mined"])
    assert (mined.align.method, mined.align.inside, mined.align.cuts) == ("offsets", False, False)
    offsets = parse_recipe(base, ["align.method=offsets", "align.cuts=true"])
    assert (offsets.vocab.method, offsets.align.inside, offsets.align.cuts) == ("groups", False, True)


def test_training_settings_are_recipe_fields_with_the_old_values_as_defaults(valid: Path) -> None:
    train = load_recipe(valid).train
    assert (train.lr_scheduler_type, train.adam_beta2, train.max_grad_norm) == ("cosine", 0.95, 1.0)
    assert train.logging_steps is None and train.save_steps is None and train.bf16 is None
    changed = load_recipe(valid, ["train.adam_beta2=0.99", "train.lr_scheduler_type=linear", "train.save_steps=5"]).train
    assert (changed.adam_beta2, changed.lr_scheduler_type, changed.save_steps) == (0.99, "linear", 5)
    with pytest.raises(RecipeError, match=r"train\.adam_beta2"):
        load_recipe(valid, ["train.adam_beta2=1.5"])


def test_recipe_choices_are_the_registries_names() -> None:
    """A method, strategy or backend added to its registry is a valid recipe value with no second list."""
    from typing import get_args

    from polyfuse import generate
    from polyfuse.capture import BACKENDS
    from polyfuse.fuse.strategies import STRATEGIES
    from polyfuse.merge.methods import METHODS
    from polyfuse.recipe import CaptureSection, FuseSection, MergeSection
    from polyfuse.recipe.implicit import SampleSection

    assert get_args(FuseSection.model_fields["strategy"].annotation) == tuple(STRATEGIES)
    assert get_args(MergeSection.model_fields["method"].annotation) == tuple(METHODS)
    assert get_args(CaptureSection.model_fields["backend"].annotation) == tuple(BACKENDS)
    assert get_args(SampleSection.model_fields["backend"].annotation) == tuple(generate.BACKENDS)
