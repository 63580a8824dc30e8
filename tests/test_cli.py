"""The polyfuse command: help on every subcommand, one-line errors for bad input, eval and run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from polyfuse.cli import app, main

SUBCOMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_subcommands_listed() -> None:
    assert {"world", "eval", "run", "check", "demo"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_on_every_subcommand(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def _recipe(tmp_path: Path, world: Path, **changes) -> Path:
    data = {"workdir": str(tmp_path / "run"), "world": str(world),
            "target": {"model": "world:target"},
            "sources": [{"name": "prose", "model": "world:prose"}, {"name": "math", "model": "world:math"}],
            "eval": {"batch_size": 4, "max_length": 128, "max_bytes_per_domain": 3000}}
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data[section][leaf] = value
        else:
            data[section] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return errors[0]


def test_unknown_key_is_one_line(tmp_path: Path, tiny_world: Path, capsys) -> None:
    path = _recipe(tmp_path, tiny_world, eval__batchsize=4)
    assert main(["check", str(path)]) == 2
    err = _one_line_error(capsys)
    assert "eval.batchsize" in err and "batch_size" in err and "recipe.yaml" in err


def test_wrong_type_is_one_line(tmp_path: Path, tiny_world: Path, capsys) -> None:
    path = _recipe(tmp_path, tiny_world)
    assert main(["check", str(path), "eval.max_length=long"]) == 2
    err = _one_line_error(capsys)
    assert "eval.max_length" in err and "long" in err


def test_missing_model_path_is_one_line(tmp_path: Path, tiny_world: Path, capsys) -> None:
    missing = tmp_path / "nowhere" / "model"
    path = _recipe(tmp_path, tiny_world)
    assert main(["check", str(path), f"sources.1.model={missing}"]) == 2
    err = _one_line_error(capsys)
    assert str(missing) in err and "check the path" in err


def test_missing_world_model_names_the_fix(tmp_path: Path, capsys) -> None:
    path = _recipe(tmp_path, tmp_path / "no-world")
    assert main(["run", str(path)]) == 2
    err = _one_line_error(capsys)
    assert "world:target" in err and "polyfuse world" in err


def test_eval_json(tiny_world: Path, capsys) -> None:
    code = main(["eval", "world:target", "p=world:prose", "--world", str(tiny_world), "--max-length", "128",
                 "--max-bytes", "2000", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["models"]) == {"target", "p"}
    for result in out["models"].values():
        assert set(result["bpb"]) == {"prose", "code", "math", "all"}
        assert all(0.5 < v < 16 for v in result["bpb"].values())


def test_run_writes_results_then_skips(tmp_path: Path, tiny_world: Path, capsys) -> None:
    path = _recipe(tmp_path, tiny_world)
    assert main(["run", str(path), "--only", "eval"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["models"]) == {"target", "prose", "math"}
    manifest = (tmp_path / "run" / "eval" / "target" / "manifest.json").read_text()
    assert main(["run", str(path), "--only", "eval"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval" / "target" / "manifest.json").read_text() == manifest
    # a changed setting makes the stage stale
    assert main(["run", str(path), "--only", "eval", "eval.max_bytes_per_domain=2000"]) == 0
    assert (tmp_path / "run" / "eval" / "target" / "manifest.json").read_text() != manifest


def test_explicit_fusion_end_to_end(tmp_path: Path, tiny_world: Path) -> None:
    """blocks → capture → vocab → align → fuse → train (fused and CLM baseline) → eval, on the test world."""
    path = _recipe(tmp_path, tiny_world)
    small = ["corpus.max_bytes_per_domain=4000", "blocks.max_tokens=96", "capture.shard_size=16",
             "train.max_steps=3", "train.batch_size=4", "eval.max_bytes_per_domain=1500"]
    assert main(["run", str(path), *small]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert {"target+clm", "target+fused"} <= set(results["models"])
    fuse = json.loads((run / "fuse" / "manifest.json").read_text())
    assert fuse["outputs"]["teacher_share"]["positions"] > 0
    by_domain = fuse["outputs"]["teacher_share_by_domain"]
    assert set(by_domain) == {"prose", "code", "math"}
    assert all(abs(sum(shares) - 1) < 1e-6 for shares in by_domain.values())   # MinCE: one teacher per position
    for source in ("prose", "math"):
        align = json.loads((run / "align" / source / "manifest.json").read_text())
        assert 0.2 < align["outputs"]["coverage"] <= 1.0
    from polyfuse.capture.store import StoreReader

    store = StoreReader(run / "capture" / "target")  # k entries (top-k + sampled tail) at id_bits + fp16 each
    assert store.bytes_per_token() <= store.k * (store.id_bits / 8 + 2) + 2 + 8  # tiny blocks: per-block overhead
    # everything is current now: a rerun trains nothing
    before = (run / "train" / "fused" / "manifest.json").read_text()
    assert main(["run", str(path), *small]) == 0
    assert (run / "train" / "fused" / "manifest.json").read_text() == before
    # the baseline's own learning rate retrains target+clm only, at that rate
    clm_weights = (run / "train" / "clm" / "model.safetensors").read_bytes()
    assert main(["run", str(path), *small, "train.baseline_learning_rate=5e-4", "--only", "train"]) == 0
    assert (run / "train" / "fused" / "manifest.json").read_text() == before
    clm = json.loads((run / "train" / "clm" / "manifest.json").read_text())["config"]["train"]
    assert clm["learning_rate"] == 5e-4 and "baseline_learning_rate" not in clm
    assert json.loads(before)["config"]["train"]["learning_rate"] == 1e-4
    assert (run / "train" / "clm" / "model.safetensors").read_bytes() != clm_weights


def test_grouped_projection_end_to_end(tmp_path: Path, tiny_world: Path) -> None:
    """vocab.method=groups with a sampled tail: the fused entries carry their teacher, training reads the groups."""
    from polyfuse.capture.store import StoreReader
    from polyfuse.stages.fusion import GROUPS_NAME

    path = _recipe(tmp_path, tiny_world)
    small = ["corpus.max_bytes_per_domain=3000", "blocks.max_tokens=96", "train.max_steps=2", "train.batch_size=4",
             "eval.max_bytes_per_domain=1500", "vocab.method=groups", "capture.top_k=4", "capture.samples=6"]
    assert main(["run", str(path), *small]) == 0
    run = tmp_path / "run"
    with np.load(run / "fuse" / GROUPS_NAME) as z:
        groups = z["groups"]
    n_tgt = groups.shape[1]
    assert groups.shape[0] == 1 + 2 and (groups[0] == np.arange(n_tgt)).all()  # the target, then each source
    fused = StoreReader(run / "fuse")
    assert fused.k == 10 and fused.info["vocab_size"] == 3 * n_tgt
    teachers = {int(i) // n_tgt for b in fused.block_ids for i in fused[b].ids.ravel() if i >= 0}
    assert teachers <= {0, 1, 2} and len(teachers) > 1
    state = json.loads((run / "train" / "fused" / "trainer_state.json").read_text())
    assert all(np.isfinite(h["distill_loss"]) for h in state["log_history"] if "distill_loss" in h)
    results = json.loads((run / "results.json").read_text())
    assert "target+fused" in results["models"]


def test_cut_filter_skips_a_source_with_the_targets_vocabulary(tmp_path: Path, tiny_world: Path) -> None:
    """align.cuts applies to sources with another tokenizer; one with the target's own already follows its cuts."""
    path = _recipe(tmp_path, tiny_world, sources=[{"name": "self", "model": "world:target"},
                                                  {"name": "prose", "model": "world:prose"}])
    small = ["corpus.max_bytes_per_domain=1500", "blocks.max_tokens=96", "capture.top_k=4"]
    assert main(["run", str(path), *small, "--only", "blocks", "--only", "capture", "--only", "vocab",
                 "--only", "align"]) == 0
    outputs = {n: json.loads((tmp_path / "run" / "align" / n / "manifest.json").read_text())["outputs"]
               for n in ("self", "prose")}
    assert outputs["self"]["cuts"] is False and outputs["prose"]["cuts"] is True
    assert outputs["self"]["coverage"] == 1.0


def test_span_criterion_scores_every_teacher_on_the_same_text(tmp_path: Path, tiny_world: Path) -> None:
    """fuse.criterion=span: a teacher with the target's own tokenizer scores exactly its token NLL; a
    cross-tokenizer source is scored on the target token's text, which changes who wins."""
    from polyfuse.align.transfer import span_nll
    from polyfuse.capture.store import StoreReader
    from polyfuse.corpus.blocks import read_blocks
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_tokenizer

    path = _recipe(tmp_path, tiny_world)
    small = ["corpus.max_bytes_per_domain=1500", "blocks.max_tokens=96", "capture.top_k=4"]
    shares = {}
    for criterion in ("token", "span"):
        assert main(["run", str(path), *small, f"fuse.criterion={criterion}", "--only", "blocks", "--only", "capture",
                     "--only", "vocab", "--only", "align", "--only", "fuse"]) == 0
        manifest = json.loads((tmp_path / "run" / "fuse" / "manifest.json").read_text())
        assert manifest["config"]["fuse"]["criterion"] == criterion
        shares[criterion] = manifest["outputs"]["teacher_share"]
    assert shares["span"] != shares["token"]
    blocks = read_blocks(tmp_path / "run" / "blocks" / "blocks.jsonl")
    own = StoreReader(tmp_path / "run" / "capture" / "target")
    enc = encode_blocks(load_tokenizer(str(tiny_world / "models" / "target")), [b.text for b in blocks])
    for b, e in zip(blocks[:5], enc, strict=False):
        row = own[b.block_id]
        np.testing.assert_allclose(span_nll(row, e, e), -row.target_logprob.astype(np.float64), rtol=1e-6)


def test_fuse_fallback_without_the_target(tmp_path: Path, tiny_world: Path) -> None:
    """include_target=false: positions no source reaches get the target's own entries, its label, or nothing."""
    from polyfuse.capture.store import StoreReader
    from polyfuse.corpus.blocks import read_blocks
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_tokenizer

    path = _recipe(tmp_path, tiny_world)
    # FuseLLM's one-to-one map leaves many positions to the fallback (the default projection leaves few)
    small = ["corpus.max_bytes_per_domain=2000", "blocks.max_tokens=96", "fuse.include_target=false",
             "vocab.method=mined"]
    stores = {}
    for fallback in ("none", "label", "target"):
        assert main(["run", str(path), *small, f"fuse.fallback={fallback}", "--only", "blocks", "--only", "capture",
                     "--only", "vocab", "--only", "align", "--only", "fuse"]) == 0
        stores[fallback] = StoreReader(tmp_path / "run" / "fuse")
        stores[fallback] = {b: stores[fallback][b] for b in stores[fallback].block_ids}
    blocks = read_blocks(tmp_path / "run" / "blocks" / "blocks.jsonl")
    tok = load_tokenizer(str(tiny_world / "models" / "target"))
    target = StoreReader(tmp_path / "run" / "capture" / "target")
    seen = 0
    for b, enc in zip(blocks, encode_blocks(tok, [b.text for b in blocks]), strict=True):
        none, label, own = (stores[f][b.block_id] for f in ("none", "label", "target"))
        empty = ~(none.ids >= 0).any(-1)                      # no source reached these positions
        seen += int(empty.sum())
        assert (label.ids[empty, 0] == enc.ids[1:][empty]).all() and (label.ids[empty, 1:] == -1).all()
        np.testing.assert_array_equal(np.sort(own.ids[empty]), np.sort(target[b.block_id].ids[empty]))  # ties re-sorted
        np.testing.assert_array_equal(label.ids[~empty], none.ids[~empty])  # elsewhere the sources decide
    assert seen > 0
    # with the target as a teacher, the label fallback takes exactly the positions no source reaches
    assert main(["run", str(path), *small, "fuse.include_target=true", "fuse.fallback=label", "--only", "fuse"]) == 0
    both = StoreReader(tmp_path / "run" / "fuse")
    manifest = json.loads((tmp_path / "run" / "fuse" / "manifest.json").read_text())
    assert manifest["outputs"]["teachers"] == ["label", "target", "prose", "math"]
    for b, enc in zip(blocks, encode_blocks(tok, [b.text for b in blocks]), strict=True):
        empty = ~(stores["none"][b.block_id].ids >= 0).any(-1)
        ids = both[b.block_id].ids
        assert (ids[empty, 0] == enc.ids[1:][empty]).all() and (ids[empty, 1:] == -1).all()


def test_fusechat_mode_pairs_then_merge(tmp_path: Path, tiny_world: Path) -> None:
    """mode=fusechat: one target per source (target + that source only), merged onto the target (SCE)."""
    path = _recipe(tmp_path, tiny_world)
    small = ["mode=fusechat", "corpus.max_bytes_per_domain=3000", "blocks.max_tokens=96", "train.max_steps=2",
             "train.batch_size=4", "eval.max_bytes_per_domain=1500", "pairs.max_steps=3", "pairs.batch_size=2"]
    assert main(["run", str(path), *small]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())["models"]
    assert {"target+pair:prose", "target+pair:math", "target+fusechat"} <= set(results)
    assert "target+fused" not in results                    # fusellm's joint fusion did not run
    for source in ("prose", "math"):
        fuse = json.loads((run / "pairs" / source / "fuse" / "manifest.json").read_text())
        assert fuse["config"]["sources"] == [source]
        assert len(fuse["outputs"]["teacher_share"]["share"]) == 2   # the target and that source
        train = json.loads((run / "pairs" / source / "train" / "manifest.json").read_text())
        assert train["config"]["train"]["max_steps"] == 3 and train["outputs"]["steps"] == 3  # pairs.max_steps
        state = json.loads((run / "pairs" / source / "train" / "trainer_state.json").read_text())
        assert state["global_step"] == 3 and state["train_batch_size"] == 2       # pairs.batch_size
        assert train["config"]["train"]["batch_size"] == 2
    merge_cfg = yaml.safe_load((run / "merge" / "merge.yaml").read_text())
    assert merge_cfg["merge_method"] == "sce" and len(merge_cfg["models"]) == 2
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict:
        out = {}
        for f in sorted(directory.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    merged, base = tensors(run / "merge" / "model"), tensors(tiny_world / "models" / "target")
    pair = tensors(run / "pairs" / "prose" / "train")
    name = next(n for n in merged if n.endswith("mlp.down_proj.weight"))
    assert not np.allclose(merged[name].numpy(), base[name].numpy())   # the merge moved the weights
    assert not np.allclose(merged[name].numpy(), pair[name].numpy())   # and is not one pairwise target


def test_stats_vocab_stage_counts_dtw_pairs_on_the_blocks(tmp_path: Path, tiny_world: Path, capsys) -> None:
    """vocab.method=stats: FuseChat's co-alignment map over the recipe's blocks, mined map as fallback."""
    from polyfuse.align.vocab import MapKind, VocabMap

    path = _recipe(tmp_path, tiny_world)
    small = ["corpus.max_bytes_per_domain=3000", "blocks.max_tokens=96", "vocab.method=stats"]
    assert main(["vocab", str(path), *small]) == 2           # the blocks do not exist yet: one-line error
    assert "polyfuse blocks RECIPE" in _one_line_error(capsys)
    assert main(["blocks", str(path), *small]) == 0
    assert main(["vocab", str(path), *small]) == 0
    vmap = VocabMap.load(tmp_path / "run" / "vocab" / "prose")
    assert vmap.method == "stats" and vmap.has_stats
    assert (vmap.kind == MapKind.STATS).sum() > 0          # statistics were used for some ids
    assert (vmap.kind == MapKind.MINED).sum() > 0          # ids never co-aligned keep the mined map
    manifest = json.loads((tmp_path / "run" / "vocab" / "prose" / "manifest.json").read_text())
    assert "blocks" in manifest["inputs"]                  # more blocks -> a new map
    ids, weights = vmap.candidates(int(np.nonzero(vmap.kind == MapKind.STATS)[0][0]))
    assert len(ids) >= 1 and abs(float(weights.sum()) - 1.0) < 1e-5


def test_demo_recipe_validates(tmp_path: Path) -> None:
    from polyfuse.demo.run import demo_recipe_path
    from polyfuse.recipe import load_recipe

    recipe = load_recipe(demo_recipe_path())
    assert [m.name for m in recipe.models()] == ["target", "prose", "code", "math"]
    shutil.copy(demo_recipe_path(), tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml", ["eval.batch_size=2"]).eval.batch_size == 2


def test_demo_on_the_test_world(tmp_path: Path, tiny_world: Path, capsys) -> None:
    """The demo command end to end, all three families, on a copy of the built test world (the implicit
    family adds the chat models to it, in a second process beside the explicit families; windows clamp to
    its context)."""
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    small = ["corpus.max_bytes_per_domain=3000", "blocks.max_tokens=96", "train.max_steps=2", "train.batch_size=4",
             "pairs.max_steps=2", "eval.max_bytes_per_domain=1500"]
    assert main(["demo", "--preset", "test", "--world", str(world), "--out", str(tmp_path / "d"), *small,
                 "--implicit-set", "accuracy.batch_size=16", "--side-by-side"]) == 0
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert set(results["models"]) == {"target", "prose", "code", "math", "target+clm", "target+fused",
                                      "target+pair:prose", "target+pair:code", "target+pair:math",
                                      "target+fusechat", "target+sft", "target+sft+dpo", "target+sft+wrpo"}
    assert {"bpb", "accuracy"} <= set(results["models"]["target"])    # one row, both kinds of figure
    assert set(results["models"]["target+sft+wrpo"]["accuracy"]) >= {"first", "last", "count", "all"}
    out = capsys.readouterr().out
    assert "bits per byte" in out and "accuracy on held-out task prompts" in out and "results:" in out
    assert "target+sft+dpo is more accurate than target" in " ".join(out.split())
    log = (tmp_path / "d" / "implicit.log").read_text()  # the implicit family's output, printed here at the end
    assert "implicit fusion runs beside" in out and log and log in out
    report = tmp_path / "d" / "report.html"
    assert f"report:  {report}" in " ".join(out.split()) or str(report) in out
    html = report.read_text()
    assert "target+fusechat" in html and "data:image/png;base64," in html


def test_world_checks_are_computed() -> None:
    from polyfuse.demo.run import world_checks

    world = {"domains": ["a", "b"], "models": {
        "sa": {"role": "source", "emphasis": "a"}, "sb": {"role": "source", "emphasis": "b"},
        "t": {"role": "target", "emphasis": "general"}}}
    good = {"models": {"sa": {"bpb": {"a": 1.0, "b": 3.0}}, "sb": {"bpb": {"a": 3.0, "b": 1.0}},
                       "t": {"bpb": {"a": 2.0, "b": 2.0}}}}
    assert all(ok for _, ok in world_checks(good, world))
    bad = json.loads(json.dumps(good))
    bad["models"]["t"]["bpb"]["b"] = 0.5  # the target beats source sb on its own domain
    verdicts = dict(world_checks(bad, world))
    assert verdicts["source sb has the lowest bits per byte on b"] is False
    assert verdicts["target is behind the best source on b"] is False
    assert verdicts["source sa has the lowest bits per byte on a"] is True


def test_fusion_check_compares_fused_with_clm() -> None:
    from polyfuse.demo.run import world_checks

    world = {"domains": ["a"], "models": {"s": {"role": "source", "emphasis": "a"},
                                          "t": {"role": "target", "emphasis": "general"}}}
    results = {"models": {"s": {"bpb": {"a": 1.0, "all": 1.0}}, "t": {"bpb": {"a": 2.0, "all": 2.0}},
                          "t+clm": {"bpb": {"a": 1.9, "all": 1.9}}, "t+fused": {"bpb": {"a": 1.8, "all": 1.8}}}}
    assert dict(world_checks(results, world))["t+fused beats t+clm on the mixed held-out set"] is True
    results["models"]["t+fused"]["bpb"]["all"] = 1.95
    assert dict(world_checks(results, world))["t+fused beats t+clm on the mixed held-out set"] is False


def test_world_checks_skip_what_was_not_evaluated() -> None:
    """An implicit-only run has accuracy rows and no bits per byte: no world check fails on it."""
    from polyfuse.demo.run import world_checks

    world = {"domains": ["a"], "models": {"s": {"role": "source", "emphasis": "a"},
                                          "t": {"role": "target", "emphasis": "general"}}}
    results = {"models": {"s": {"accuracy": {"all": 0.5}}, "t": {"accuracy": {"all": 0.2}},
                          "t+sft": {"accuracy": {"all": 0.3}}}}
    assert world_checks(results, world) == []


def test_real_family_adds_its_rows_beside_the_main_run(tmp_path: Path, tiny_world: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``demo --family real`` runs the recipe with a fourth teacher in ``OUT/real`` and adds its clm and
    fused rows, suffixed ``:real``, to ``OUT/results.json`` (a world model stands in for SmolLM2 here)."""
    import polyfuse.demo.real as real
    from polyfuse.demo.run import REAL_TEACHER

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    shutil.copytree(world / "models" / "prose", world / "models" / REAL_TEACHER)
    converted = []
    monkeypatch.setattr(real, "build_real_world", lambda world_dir, include: converted.append((world_dir, include)))
    small = ["corpus.max_bytes_per_domain=3000", "blocks.max_tokens=96", "train.max_steps=2", "train.batch_size=4",
             "eval.max_bytes_per_domain=1500"]
    assert main(["demo", "--preset", "test", "--world", str(world), "--out", str(tmp_path / "d"),
                 "--family", "real", *small]) == 0
    assert converted == [(world, (REAL_TEACHER,))]
    rows = json.loads((tmp_path / "d" / "results.json").read_text())["models"]
    assert set(rows) == {"target+clm:real", "target+fused:real"}
    inner = json.loads((tmp_path / "d" / "real" / "results.json").read_text())["models"]
    assert REAL_TEACHER in inner and rows["target+fused:real"] == inner["target+fused"]
    manifest = {stage: json.loads((tmp_path / "d" / "real" / stage / "manifest.json").read_text())["config"]
                for stage in ("train/fused", "train/clm", "fuse")}
    assert manifest["train/fused"]["train"]["lm_loss_weight"] == 0.2  # REAL_OVERRIDES
    assert manifest["fuse"]["fuse"]["include_target"] is False
    assert manifest["train/fused"]["train"]["learning_rate"] == 2e-3  # each run at its own rate
    assert manifest["train/clm"]["train"]["learning_rate"] == 1e-3


def test_fusechat_check_compares_merge_with_mean_of_pairs() -> None:
    from polyfuse.demo.run import world_checks

    world = {"domains": ["a"], "models": {"s": {"role": "source", "emphasis": "a"},
                                          "t": {"role": "target", "emphasis": "general"}}}
    results = {"models": {"s": {"bpb": {"a": 1.0, "all": 1.0}}, "t": {"bpb": {"a": 2.0, "all": 2.0}},
                          "t+pair:s": {"bpb": {"all": 1.8}}, "t+pair:u": {"bpb": {"all": 2.0}},
                          "t+fusechat": {"bpb": {"all": 1.85}}}}
    verdict = [ok for text, ok in world_checks(results, world) if text.startswith("t+fusechat")]
    assert verdict == [True]                                            # 1.85 <= mean(1.8, 2.0) = 1.9
    results["models"]["t+fusechat"]["bpb"]["all"] = 1.95
    assert [ok for text, ok in world_checks(results, world) if text.startswith("t+fusechat")] == [False]


def test_prefix_masses_are_captured_for_sources_and_change_the_inside_positions(tmp_path: Path, tiny_world: Path) -> None:
    """capture.prefix_bytes: the sources' stores carry prefix masses (the target's does not, and stays
    current); the align stage reruns and conditions the inside positions on them."""
    from polyfuse.capture.store import StoreReader

    path = _recipe(tmp_path, tiny_world)
    small = ["corpus.max_bytes_per_domain=1500", "blocks.max_tokens=96", "capture.top_k=4",
             "--only", "blocks", "--only", "capture", "--only", "vocab", "--only", "align"]
    run = tmp_path / "run"
    assert main(["run", str(path), *small]) == 0
    before = StoreReader(run / "align" / "math")
    rows_before = {b: before[b].logprobs.copy() for b in before.block_ids}
    target_manifest = (run / "capture" / "target" / "manifest.json").read_text()
    assert main(["run", str(path), *small, "capture.prefix_bytes=8"]) == 0
    assert StoreReader(run / "capture" / "math").prefix_bytes == 8
    assert StoreReader(run / "capture" / "target").prefix_bytes == 0
    assert (run / "capture" / "target" / "manifest.json").read_text() == target_manifest   # not rebuilt
    after = StoreReader(run / "align" / "math")
    assert any(not np.array_equal(rows_before[b], after[b].logprobs) for b in after.block_ids)
