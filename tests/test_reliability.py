"""Faults and bad input (issue 13): each is one line naming the file and the fix, or is handled.

Every test here is a row of ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml

from polyfuse import workspace
from polyfuse.cli import main
from polyfuse.errors import DataError, ModelLoadError
from polyfuse.workspace import iter_jsonl, run_stage

# ---- helpers ---------------------------------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


def _recipe(path: Path, world: Path, workdir: Path, **sections) -> Path:
    data = {"workdir": str(workdir), "world": str(world), "target": {"model": "world:target"},
            "sources": [{"name": "prose", "model": "world:prose"}, {"name": "math", "model": "world:math"}],
            "eval": {"batch_size": 4, "max_length": 128, "max_bytes_per_domain": 1000}, **sections}
    path.write_text(yaml.safe_dump(data))
    return path


SMALL = ["corpus.max_bytes_per_domain=3000", "blocks.max_tokens=96", "capture.shard_size=8", "capture.top_k=4",
         "train.max_steps=2", "train.batch_size=4", "train.baseline=false"]


def _write_rows(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


# ---- a small finished run, shared by the artifact tests (never modified: tests copy it) --------------


@pytest.fixture(scope="module")
def finished(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fusellm run (blocks → … → train → eval) on the test world; returns its directory."""
    root = tmp_path_factory.mktemp("finished")
    recipe = _recipe(root / "recipe.yaml", tiny_world, root / "run")
    assert main(["run", str(recipe), *SMALL]) == 0
    return root / "run"


def _copy_run(finished: Path, tiny_world: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run, _recipe(tmp_path / "recipe.yaml", tiny_world, run)


# ---- artifacts (defect 2) ----------------------------------------------------------------------------


def test_train_manifest_records_the_final_loss(finished: Path) -> None:
    """Defect 10: the train manifest read the wrong dict and recorded ``final_loss: null``."""
    outputs = json.loads((finished / "train" / "fused" / "manifest.json").read_text())["outputs"]
    assert isinstance(outputs["final_loss"], float) and np.isfinite(outputs["final_loss"])


def test_manifest_records_every_file(finished: Path) -> None:
    manifest = json.loads((finished / "blocks" / "manifest.json").read_text())
    record = manifest["files"]["blocks.jsonl"]
    assert record["bytes"] == (finished / "blocks" / "blocks.jsonl").stat().st_size
    assert len(record["blake2b"]) == 64


def test_blocks_cut_in_place_is_refused(finished: Path, tiny_world: Path, tmp_path: Path, capsys) -> None:
    """Cutting blocks.jsonl to fewer lines made every later stage rebuild on the cut blocks, exit 0."""
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    blocks = run / "blocks" / "blocks.jsonl"
    lines = blocks.read_text().splitlines(keepends=True)
    blocks.write_text("".join(lines[: len(lines) // 2]))
    capture = (run / "capture" / "target" / "manifest.json").read_text()
    assert main(["run", str(recipe), *SMALL]) == 2
    err = _one_line_error(capsys)
    assert str(blocks) in err and "--only blocks --force" in err
    assert (run / "capture" / "target" / "manifest.json").read_text() == capture  # nothing rebuilt on it


def _scale_first_block(store: Path, factor: float) -> Path:
    """Scale the first block's stored log-probs in place (the shard keeps its size)."""
    from polyfuse.capture.store import StoreReader

    reader = StoreReader(store)
    row = reader[reader.block_ids[0]]
    old = np.ascontiguousarray(row.logprobs).tobytes()
    new = (row.logprobs.astype(np.float32) * factor).astype(np.float16).tobytes()
    shard = store / reader.info["shards"][0]["file"]
    del reader, row
    data = shard.read_bytes()
    assert data.count(old) == 1
    shard.write_bytes(data.replace(old, new))
    return shard


def test_scaled_shard_is_refused_by_its_reader(finished: Path, tiny_world: Path, tmp_path: Path, capsys) -> None:
    """Scaling a shard's log-probs by 0.25 (same size) retrained the target on them, exit 0."""
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    shard = _scale_first_block(run / "capture" / "prose", 0.25)
    assert main(["run", str(recipe), *SMALL]) == 2
    err = _one_line_error(capsys)
    assert str(shard) in err and "content differs" in err and "--only capture --force" in err


def test_verify_rehashes_skipped_stages(finished: Path, tiny_world: Path, tmp_path: Path, capsys) -> None:
    """Skipped stages check sizes every time; ``--verify`` also re-hashes their files."""
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    config = run / "train" / "fused" / "config.json"
    config.write_text(config.read_text().replace('"', "'", 2))  # same size, other content
    assert main(["run", str(recipe), *SMALL, "--only", "train"]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe), *SMALL, "--only", "train", "--verify"]) == 2
    err = _one_line_error(capsys)
    assert str(config) in err and "--only train --force" in err
    config.write_text(config.read_text() + " ")  # another size: caught without --verify
    assert main(["run", str(recipe), *SMALL, "--only", "train"]) == 2
    assert "bytes" in _one_line_error(capsys)


def test_artifact_checks_in_run_stage(tmp_path: Path) -> None:
    """The workspace rules: removed, resized and rewritten files; added files and old manifests are not checked."""
    def build(out: Path) -> dict:
        (out / "a.txt").write_text("aaaa")
        return {}

    out = tmp_path / "up"
    run_stage(out, "up", {}, {}, build)
    workspace.verify_artifact(out, full=True)
    (out / "a.txt").write_text("bbbb")
    workspace.verify_artifact(out)  # sizes only
    with pytest.raises(DataError, match="content differs"), workspace.full_verification():
        run_stage(out, "up", {}, {}, build)
    with pytest.raises(DataError, match="content differs"):  # read as an input: always hashed
        run_stage(tmp_path / "down", "down", {}, {"up": out}, build)
    (out / "a.txt").write_text("aaaa")
    (out / "extra.txt").write_text("x")  # not promised by the manifest: not checked
    workspace.verify_artifact(out, full=True)
    (out / "a.txt").unlink()
    with pytest.raises(DataError, match="a.txt: missing"):
        run_stage(out, "up", {}, {}, build)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]  # a manifest from before file records: accepted, not checked
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_stage(out, "up", {}, {}, build).skipped


# ---- inputs (defects 3, 4, 6) ------------------------------------------------------------------------


def _corpus_recipe(tmp_path: Path, world: Path, rows: dict[str, list], **corpus) -> Path:
    for domain, domain_rows in rows.items():
        _write_rows(tmp_path / "corpus" / "train" / f"{domain}.jsonl", domain_rows)
    return _recipe(tmp_path / "recipe.yaml", world, tmp_path / "run",
                   corpus={"path": str(tmp_path / "corpus"), **corpus}, blocks={"max_tokens": 96})


def test_oversized_document_is_skipped_not_the_domain(tmp_path: Path, tiny_world: Path) -> None:
    """Defect 3: a document larger than corpus.max_bytes_per_domain on line 1 left its domain empty."""
    small = [{"id": f"d{i}", "text": f"Document {i} is short and plain. " * 8} for i in range(20)]
    huge = {"id": "huge", "text": "word " * 20_000}
    recipe = _corpus_recipe(tmp_path, tiny_world, {"first": [huge, *small], "middle": [*small[:5], huge, *small[5:]]},
                            max_bytes_per_domain=3000)
    assert main(["blocks", str(recipe)]) == 0
    blocks = [json.loads(line) for line in (tmp_path / "run" / "blocks" / "blocks.jsonl").read_text().splitlines()]
    docs = {d: {b["doc_id"] for b in blocks if b["domain"] == d} for d in ("first", "middle")}
    assert len(docs["first"]) == len(docs["middle"]) > 5 and "huge" not in docs["first"] | docs["middle"]
    manifest = json.loads((tmp_path / "run" / "blocks" / "manifest.json").read_text())
    assert manifest["outputs"]["oversized_skipped"] == {"first": 1, "middle": 1}


def test_blocks_built_under_older_rules_are_rebuilt(tmp_path: Path, tiny_world: Path) -> None:
    """Blocks from before the oversized-document rule stayed current: the rules' version is in the config."""
    from polyfuse.stages import common as stages_common

    small = [{"id": f"d{i}", "text": f"Document {i} is short and plain. " * 8} for i in range(20)]
    huge = {"id": "huge", "text": "word " * 20_000}
    recipe = _corpus_recipe(tmp_path, tiny_world, {"first": [huge, *small]}, max_bytes_per_domain=3000)
    manifest = tmp_path / "run" / "blocks" / "manifest.json"
    assert main(["blocks", str(recipe)]) == 0
    data = json.loads(manifest.read_text())
    assert data["config"]["rules"] == stages_common.BLOCKS_RULES
    data["config"].pop("rules")                                  # what a build before the rules' version wrote
    manifest.write_text(json.dumps(data))
    before = manifest.stat().st_mtime_ns
    assert main(["blocks", str(recipe)]) == 0
    assert manifest.stat().st_mtime_ns != before and json.loads(manifest.read_text())["config"]["rules"] == 2


def test_chat_corpus_without_assistant_turns_is_refused(tmp_path: Path, tiny_world: Path, capsys) -> None:
    """Defect 4: chat rows with no assistant turn trained on nothing (loss 0.000) and exited 0."""
    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}?"}]} for i in range(6)]
    recipe = _corpus_recipe(tmp_path, tiny_world, {"chat": rows})
    assert main(["blocks", str(recipe)]) == 2
    err = _one_line_error(capsys)
    assert "chat.jsonl" in err and "assistant" in err
    assert not (tmp_path / "run" / "blocks").exists()


def test_invalid_utf8_names_file_and_line(tmp_path: Path, tiny_world: Path, capsys) -> None:
    """Defect 6: invalid UTF-8 gave a UnicodeDecodeError traceback with no file or line."""
    good = {"id": "a", "text": "fine text"}
    path = _write_rows(tmp_path / "corpus" / "train" / "bad.jsonl",
                       [good, good, b'{"id": "b", "text": "caf\xe9"}\n', good])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid UTF-8 \(byte 0xe9"):
        list(iter_jsonl(path, missing="absent"))
    recipe = _recipe(tmp_path / "recipe.yaml", tiny_world, tmp_path / "run", corpus={"path": str(tmp_path / "corpus")})
    assert main(["blocks", str(recipe)]) == 2
    assert f"{path}:3" in _one_line_error(capsys)


# ---- one run per workdir (defect 5) ------------------------------------------------------------------

HOLDER = """
import sys, time
from polyfuse.workspace import workdir_lock
with workdir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_in_a_workdir_is_refused_then_takes_a_dead_holders_lock(
        tmp_path: Path, tiny_world: Path, capsys) -> None:
    workdir = tmp_path / "run"
    recipe = _recipe(tmp_path / "recipe.yaml", tiny_world, workdir)
    holder = _hold_lock(workdir)
    try:
        assert main(["run", str(recipe), "--only", "blocks"]) == 2
        err = _one_line_error(capsys)
        assert "in use by another polyfuse run" in err and f"pid {holder.pid}" in err and str(workdir) in err
        assert not (workdir / "blocks").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: its lock file is stale and is taken over
    assert json.loads((workdir / workspace.LOCK_NAME).read_text())["pid"] == holder.pid
    with workspace.workdir_lock(workdir):
        assert json.loads((workdir / workspace.LOCK_NAME).read_text())["pid"] == os.getpid()
        with workspace.workdir_lock(workdir):  # re-entrant in one process
            pass


def test_an_implicit_run_shares_a_workdir_with_an_explicit_one_but_not_with_another_implicit_one(
        tmp_path: Path) -> None:
    """The demo runs its implicit family beside the explicit ones: their stages are disjoint, so each kind
    of recipe holds its own lock (one explicit run, one implicit run per workdir)."""
    workdir = tmp_path / "run"
    holder = _hold_lock(workdir)  # an explicit run's lock
    try:
        with workspace.workdir_lock(workdir, name=workspace.IMPLICIT_LOCK_NAME):
            assert json.loads((workdir / workspace.IMPLICIT_LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(DataError, match="in use by another polyfuse run"):
                workspace.workdir_lock(workdir).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ---- interruptions and storage (defects 7, 8) --------------------------------------------------------


def test_killed_merge_leftovers_are_removed_by_the_next_merge(tmp_path: Path, tiny_world: Path) -> None:
    """Defect 8: a killed ``polyfuse merge`` left its ``.tmp-*`` directory (as large as the model) for good."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".tmp-merged-{dead.pid}-0badf00d"
    leftover.mkdir()
    (leftover / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
    other = tmp_path / f".tmp-merged-other-{dead.pid}-0badf00d"  # another output's: not this merge's to remove
    other.mkdir()
    config = tmp_path / "merge.yaml"
    target = str(tiny_world / "models" / "target")
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": target, "parameters": {"weight": 0.5}}, {"model": target, "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(config), str(tmp_path / "merged")]) == 0
    assert not leftover.exists() and other.exists()
    assert (tmp_path / "merged" / "config.json").is_file()


def test_truncated_weights_are_one_line(tmp_path: Path, tiny_world: Path, capsys) -> None:
    """Defect 7: truncated safetensors in ``polyfuse eval`` gave a SafetensorError traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_world / "models" / "target", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", str(model), "--world", str(tiny_world), "--max-length", "64", "--max-bytes", "200"]) == 2
    err = _one_line_error(capsys)
    assert str(model) in err and "save_pretrained" in err


def _read_only(workdir: Path, *argv: str) -> subprocess.CompletedProcess:
    """``polyfuse ARGV`` with ``workdir`` bind-mounted read-only in a private mount namespace."""
    script = (f'mount --bind -o ro "{workdir}" "{workdir}" && exec "{sys.executable}" -m polyfuse.cli '
              + " ".join(f"'{a}'" for a in argv))
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def test_read_only_workdir(finished: Path, tiny_world: Path, tmp_path: Path) -> None:
    """Defect 7: a fully current run on read-only storage failed (results.json.lock); a stale one gave a
    traceback (OSError). Now the first succeeds and the second is one line."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{tmp_path}" "{tmp_path}"'],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot bind-mount read-only here (needs a mount namespace)")
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    assert main(["run", str(recipe), *SMALL]) == 0  # the copy's trained rows (new paths) are evaluated here
    current = _read_only(run, "run", str(recipe), *SMALL)
    assert current.returncode == 0, current.stderr[-2000:]
    stale = _read_only(run, "run", str(recipe), *SMALL, "eval.max_bytes_per_domain=900")
    lines = stale.stderr.strip().splitlines()
    assert stale.returncode == 2 and "Traceback" not in stale.stderr, stale.stderr[-2000:]
    assert lines[-1].startswith("error:") and "Read-only file system" in lines[-1]


# ---- alignment (defect 11) ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mpt", "qwen2"])
def test_nfd_hangul_is_covered_under_nfc_tokenizers(name: str, request: pytest.FixtureRequest) -> None:
    """MPT and Qwen2 compose NFD jamo into syllables and report offsets over the first jamo only."""
    from polyfuse.corpus.tokens import encode_block

    tok = request.getfixturevalue(name)
    text = unicodedata.normalize("NFD", "한국어 텍스트입니다. 한글 e\u0301 문장.")
    enc = encode_block(tok, text)
    covered = np.zeros(len(text), dtype=bool)
    for a, b in enc.offsets[1:] if enc.has_context else enc.offsets:
        covered[a:b] = True
    uncovered = [text[i] for i in np.nonzero(~covered)[0]]
    assert all(c == " " for c in uncovered), uncovered


# ---- references (defect 12) ---------------------------------------------------------------------------


def test_missing_model_of_a_built_world_lists_what_it_has(tiny_world: Path) -> None:
    from polyfuse.models import resolve_model_ref

    with pytest.raises(ModelLoadError) as err:
        resolve_model_ref("world:nosuch", world_dir=tiny_world)
    assert "build the tiny world first" not in str(err.value) and "world:target" in str(err.value)


def test_unreachable_hub_fails_at_once(tmp_path: Path) -> None:
    """An uncached hub id with the hub unreachable retried for most of a minute before its error."""
    code = ("from polyfuse.models import load_tokenizer\n"
            "load_tokenizer('someorg/nosuch-model')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "cannot be reached" in proc.stderr and "Retrying" not in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - start < 60


# ---- the table ---------------------------------------------------------------------------------------


def test_every_row_of_the_reliability_table_names_an_existing_test() -> None:

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith(("| fault", "| attack"))
            and not line.startswith("| ---")]
    assert len(rows) > 40
    for row in rows:
        refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert refs, f"row without a test: {row}"
        for file, name in refs:
            assert re.search(rf"^def {name}\(", (root / "tests" / file).read_text(encoding="utf-8"), re.M), (file, name)


# ---- models that produce NaN / inf logits ---------------------------------------------------------------


def _word_tokenizer(n: int = 64):
    """A word-level tokenizer of ``n`` ids (``<unk>``, ``<s>``, ``</s>``, then ``w3`` .. ``w{n-1}``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama(vocab_size: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_logits_are_one_line_naming_the_model(tmp_path: Path, value: float) -> None:
    """Non-finite weights (NaN or inf logits) were reported as a head transform polyfuse does not know."""
    import torch

    from polyfuse.capture.hf import capture

    model = _tiny_llama()
    with torch.no_grad():
        model.get_output_embeddings().weight[3] = value
    with pytest.raises(DataError, match=r"LlamaForCausalLM: NaN or infinite logits at 6 of 6 positions; .*check the checkpoint"):
        capture(model, _word_tokenizer(), [(0, "w3 w4 w5 w6 w7")], tmp_path / "store", k=4, progress=False)


# ---- tokenizer length against embedding rows -------------------------------------------------------------


def test_tokenizer_longer_than_the_embedding_is_refused_by_capture(tmp_path: Path) -> None:
    """A tokenizer with ids the model has no embedding row for: one line before anything is stored."""
    from polyfuse.capture.hf import capture
    from polyfuse.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"tokenizer has 64 tokens but the model has only 48 embedding rows; "
                                             r"use the tokenizer saved with this model"):
        capture(_tiny_llama(48), _word_tokenizer(64), [(0, "w3 w4 w5")], tmp_path / "store", k=4, progress=False)
    assert not (tmp_path / "store" / "store.json").exists()


def test_embedding_longer_than_the_tokenizer_is_captured(tmp_path: Path) -> None:
    """Padding rows (embedding rows no token id maps to, e.g. Qwen2's) are normal: captured, never predicted ids."""
    from polyfuse.capture.hf import capture
    from polyfuse.capture.store import StoreReader

    capture(_tiny_llama(80), _word_tokenizer(64), [(0, "w3 w4 w5 w6")], tmp_path / "store", k=4, progress=False)
    row = StoreReader(tmp_path / "store")[0]
    assert row.ids.shape == (4, 4) and int(row.ids.max()) < 80


def test_tokenizer_longer_than_the_embedding_is_refused_by_eval(tmp_path: Path, tiny_world: Path, capsys) -> None:
    """``polyfuse eval`` loaded the pair and measured it (ids past the embedding would index out of range)."""
    model_dir = tmp_path / "model"
    _tiny_llama(48).save_pretrained(model_dir)
    _word_tokenizer(64).save_pretrained(model_dir)
    assert main(["eval", str(model_dir), "--world", str(tiny_world), "--max-length", "32", "--max-bytes", "100"]) == 2
    err = _one_line_error(capsys)
    assert str(model_dir) in err and "64 tokens but the model has only 48 embedding rows" in err


# ---- sandbox --------------------------------------------------------------------------------------------


def test_sandboxed_code_cannot_read_etc_shadow() -> None:
    """Held in the probe; kept here so that it stays held."""
    from polyfuse.verify.sandbox import SandboxConfig, run_code

    if not Path("/etc/shadow").is_file():
        pytest.skip("no /etc/shadow on this machine")
    result = run_code("def secret():\n    with open('/etc/shadow') as f:\n        return f.read()\n",
                      "assert ':' in secret()\n", SandboxConfig(timeout_s=5))
    assert result.status != "passed" and not result.passed, result
    assert "PermissionError" in (result.error or "") and "root:" not in result.stdout + result.stderr + result.error


# ---- results.json -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ['{"models": {"target": {"bpb": {"all": 1.5', "[]", '{"models": []}', b"\xff\xfe"])
def test_corrupt_results_file_is_one_line(tmp_path: Path, content: str | bytes) -> None:
    """A torn or foreign results.json gave a JSONDecodeError (or AttributeError) traceback at the next update."""
    from polyfuse.evaluate.results import read_results, update_results

    path = tmp_path / "results.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for call in (lambda: read_results(path), lambda: update_results(path, {"t": {"bpb": {"all": 1.0}}})):
        with pytest.raises(DataError, match=r"results\.json: not a valid results file .*delete it and rerun "
                                            r"'polyfuse run RECIPE'"):
            call()


def test_corrupt_results_file_in_a_run_is_one_line_and_rebuilt(finished: Path, tiny_world: Path, tmp_path: Path,
                                                              capsys) -> None:
    """The fix the line names works: the eval stages write their rows again (they are current: nothing reruns)."""
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    results = run / "results.json"
    rows = json.loads(results.read_text())["models"]
    results.write_text(results.read_text()[:40])
    assert main(["run", str(recipe), *SMALL]) == 2
    err = _one_line_error(capsys)
    assert str(results) in err and "delete it and rerun" in err
    results.unlink()
    assert main(["run", str(recipe), *SMALL]) == 0
    assert json.loads(results.read_text())["models"].keys() == rows.keys()


# ---- one build per world directory ------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--real"]])
def test_second_world_build_in_a_directory_is_refused(tmp_path: Path, capsys, extra: list[str]) -> None:
    """``polyfuse world`` took no lock: two builds into one directory swapped each other's parts in."""
    world = tmp_path / "world"
    holder = _hold_lock(world)
    try:
        assert main(["world", "--out", str(world), "--preset", "test", *extra]) == 2
        err = _one_line_error(capsys)
        assert "in use by another polyfuse run" in err and f"pid {holder.pid}" in err and str(world) in err
        assert sorted(p.name for p in world.iterdir()) == [workspace.LOCK_NAME]  # nothing built
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_world_build_from_the_library_takes_the_lock_too(tmp_path: Path) -> None:
    """The demo and the benches call ``build_world`` directly: the lock is taken there, not only in the CLI."""
    from polyfuse.demo.world import build_world

    world = tmp_path / "world"
    holder = _hold_lock(world)
    try:
        with pytest.raises(DataError, match="in use by another polyfuse run"):
            build_world(world, preset="test")
        assert sorted(p.name for p in world.iterdir()) == [workspace.LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ---- models given by reference ------------------------------------------------------------------------------


def _fake_world(root: Path) -> Path:
    """A world with one model directory written as a stage (config, weights, tokenizer file)."""
    def build(out: Path) -> dict:
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (out / "tokenizer.json").write_text("{}")
        return {}

    run_stage(root / "models" / "m", "world.model", {}, {}, build, log=lambda _: None)
    (root / "world.json").write_text("{}")
    return root


def test_a_changed_world_model_is_refused(tmp_path: Path) -> None:
    """``world:NAME`` was never checked against the manifest the world build wrote beside the model."""
    from polyfuse.models import resolve_model_ref

    world = _fake_world(tmp_path / "world")
    weights = world / "models" / "m" / "model.safetensors"
    location = resolve_model_ref("world:m", world_dir=world).location
    data = bytearray(weights.read_bytes())
    data[100] ^= 1  # same size: caught where a stage hashes it as an input
    weights.write_bytes(bytes(data))
    resolve_model_ref("world:m", world_dir=world)
    with pytest.raises(DataError, match=rf"{re.escape(str(weights))}: content differs .*rerun "
                                        rf"'polyfuse world --out {re.escape(str(world))}'"):
        workspace.hash_inputs({"model": location})
    weights.write_bytes(bytes(data[:500]))  # another size: caught when the reference is resolved
    with pytest.raises(DataError, match=r"500 bytes, but .* records 1024"):
        resolve_model_ref("world:m", world_dir=world)
    copy = tmp_path / "mine"  # a copy outside the world is the user's: edited on purpose, not refused
    shutil.copytree(world / "models" / "m", copy)
    workspace.hash_inputs({"model": str(copy)})
    assert resolve_model_ref(str(copy)).location == str(copy.resolve())


def test_a_trained_model_changed_in_place_is_refused_by_eval(finished: Path, tiny_world: Path, tmp_path: Path,
                                                            capsys) -> None:
    """Trained models reach the eval stage by reference (a string): a same-size edit was evaluated, exit 0."""
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    weights = run / "train" / "fused" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["run", str(recipe), *SMALL, "--only", "eval"]) == 2
    err = _one_line_error(capsys)
    assert str(weights) in err and "content differs" in err and "--only train --force" in err


def test_a_directory_inside_an_artifact_is_checked(tmp_path: Path) -> None:
    """``merge/model`` has no manifest of its own: the merge stage's manifest records its files."""
    def build(out: Path) -> dict:
        (out / "model").mkdir()
        (out / "model" / "w.bin").write_bytes(b"1234")
        return {}

    out = tmp_path / "merge"
    run_stage(out, "merge", {}, {}, build, log=lambda _: None)
    workspace.verify_artifact(out / "model", full=True)
    (out / "model" / "w.bin").write_bytes(b"4321")
    with pytest.raises(DataError, match=r"w\.bin: content differs .*--only merge --force"):
        workspace.hash_inputs({"model": out / "model"})


# ---- stores from two different corpora ------------------------------------------------------------------------


def _stage(out: Path, inputs: dict, text: str = "x") -> Path:
    def build(tmp: Path) -> dict:
        (tmp / "data.txt").write_text(text)
        return {}

    run_stage(out, out.name, {}, inputs, build, force=True, log=lambda _: None)
    return out


def test_lineage_rules(tmp_path: Path) -> None:
    """Artifacts read together must have been built on what is there now (workspace rules)."""
    blocks = _stage(tmp_path / "blocks", {}, "corpus A")
    first = _stage(tmp_path / "capture" / "target", {"blocks": blocks})
    other = tmp_path / "other"  # another run, on another corpus
    foreign = _stage(other / "capture" / "prose", {"blocks": _stage(other / "blocks", {}, "corpus B")})
    shutil.copytree(foreign, tmp_path / "capture" / "prose")
    with pytest.raises(DataError, match=r"capture/prose was built on another version of .*blocks than the one "
                                        r"there now.*'polyfuse run RECIPE'"):
        _stage(tmp_path / "align", {"capture": tmp_path / "capture" / "prose", "target_capture": first})
    _stage(tmp_path / "capture" / "prose", {"blocks": blocks})  # rebuilt in order: consistent again
    align = _stage(tmp_path / "align", {"capture": tmp_path / "capture" / "prose", "target_capture": first})
    _stage(tmp_path / "blocks", {}, "corpus C")  # blocks rebuilt, captures not: two levels down
    with pytest.raises(DataError, match=r"capture/\w+ was built on another version of .*blocks"):
        _stage(tmp_path / "train", {"blocks": blocks, "align": align})
    shutil.rmtree(blocks)  # a deleted upstream is compared only between the manifests that recorded it
    _stage(tmp_path / "train", {"align": align})
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["input_paths"] == {"blocks": "../../blocks"}
    for path in (first, tmp_path / "capture" / "prose"):  # manifests from before input_paths: not checked
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["input_paths"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    _stage(blocks, {}, "corpus D")
    _stage(tmp_path / "align", {"capture": tmp_path / "capture" / "prose", "target_capture": first})


def test_a_store_from_another_corpus_is_refused(finished: Path, tiny_world: Path, tmp_path: Path, capsys) -> None:
    """A store captured on other blocks fed to ``polyfuse align`` gave an IndexError traceback (or, with
    blocks of the same lengths, a silently wrong alignment)."""
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    manifest = run / "capture" / "prose" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["inputs"]["blocks"] = "0" * 64  # as captured on another corpus's blocks
    manifest.write_text(json.dumps(data))
    assert main(["align", str(recipe), *SMALL]) == 2
    err = _one_line_error(capsys)
    assert f"{run / 'capture' / 'prose'} was built on another version of {run / 'blocks'}" in err


def test_stores_captured_before_the_blocks_changed_are_refused(finished: Path, tiny_world: Path, tmp_path: Path,
                                                              capsys) -> None:
    """Blocks rebuilt, then one later stage run alone: it read the new blocks against the old stores."""
    run, recipe = _copy_run(finished, tiny_world, tmp_path)
    other = [*SMALL, "corpus.max_bytes_per_domain=2000"]
    assert main(["blocks", str(recipe), *other]) == 0
    for stage in ("align", "train"):
        assert main([stage, str(recipe), *other, "--force"]) == 2
        assert f"was built on another version of {run / 'blocks'} than the one there now" in _one_line_error(capsys)
