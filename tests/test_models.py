"""Model/tokenizer references, loading from tiny local checkpoints, dtype/device picking, vocab facts."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from polyfuse.errors import ModelLoadError, PolyfuseError
from polyfuse.models import (
    ResolvedModel,
    bos_context_id,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_ref,
    vocab_facts,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and OpenMP spin-waits badly on shared CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer(vocab_size: int = 300, special: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the stdlib's pydoc topics."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"] if special else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(topics.values())[:40], trainer)
    if special:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_model(vocab_size: int, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny Llama with 320 embedding rows (padded beyond the 300-token tokenizer), saved to disk."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_model(320).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- resolve_model_ref -------------------------------------------------------------------------


def test_world_ref_resolves_to_world_models_dir(tmp_path: Path, checkpoint: Path) -> None:
    world = tmp_path / "world"
    (world / "models").mkdir(parents=True)
    (world / "models" / "prose").symlink_to(checkpoint, target_is_directory=True)
    resolved = resolve_model_ref("world:prose", world_dir=world)
    assert resolved.is_local
    assert resolved.revision is None
    assert resolved.ref == "world:prose"
    assert Path(resolved.location) == (world / "models" / "prose").resolve()


def test_missing_world_model_says_how_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        resolve_model_ref("world:prose")
    assert str(err.value) == (
        "model 'world:prose' not found at runs/world/models/prose; build the tiny world first with 'polyfuse world'"
    )


@pytest.mark.parametrize(
    "ref", ["./nope", "../nope/x", "/definitely/not/here", "~/not-here-polyfuse", "a/b/c"]
)
def test_missing_local_path_names_path_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        resolve_model_ref(ref)
    msg = str(err.value)
    assert msg == f"model path {ref!r} does not exist; check the path, or give a hub id like org/name"


def test_existing_local_dir_is_local(checkpoint: Path) -> None:
    resolved = resolve_model_ref(str(checkpoint))
    assert resolved == ResolvedModel(ref=str(checkpoint), location=str(checkpoint.resolve()), is_local=True)


@pytest.mark.parametrize(
    ("ref", "location", "revision"),
    [
        ("org/name", "org/name", None),
        ("org/name@v1.0", "org/name", "v1.0"),
        ("Qwen/Qwen2.5-0.5B@main", "Qwen/Qwen2.5-0.5B", "main"),
        ("gpt2", "gpt2", None),
    ],
)
def test_hub_id_with_optional_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref: str, location: str, revision: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model_ref(ref)
    assert (resolved.location, resolved.is_local, resolved.revision) == (location, False, revision)
    assert str(resolved) == (location if revision is None else f"{location}@{revision}")


def test_hub_revision_keyword_and_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_ref("org/name", revision="abc").revision == "abc"
    assert resolve_model_ref("org/name@abc", revision="abc").revision == "abc"
    with pytest.raises(ModelLoadError, match="keep one of them"):
        resolve_model_ref("org/name@abc", revision="def")
    with pytest.raises(ModelLoadError, match="names no revision"):
        resolve_model_ref("org/name@")
    with pytest.raises(ModelLoadError, match="hub id like org/name"):
        resolve_model_ref("org/na me")


def test_dir_without_config_lists_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError) as err:
        resolve_model_ref(str(tmp_path))
    msg = str(err.value)
    assert "missing config.json and model weights" in msg
    assert "model.safetensors" in msg
    assert "found: notes.txt" in msg
    assert "save_pretrained" in msg


def test_dir_with_config_but_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as err:
        resolve_model_ref(str(tmp_path))
    assert "missing model weights" in str(err.value)
    assert "config.json" not in str(err.value).split("missing")[1].split(";")[0]


# ---- device / dtype ----------------------------------------------------------------------------


def test_pick_device_and_dtype_on_cpu() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype("float16", "cpu") == torch.float16
    assert pick_dtype(torch.float64, "cpu") == torch.float64
    with pytest.raises(PolyfuseError, match="choose one of"):
        pick_dtype("float8", "cpu")
    with pytest.raises(PolyfuseError, match="unknown device"):
        pick_device("toaster")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(PolyfuseError, match="use device=cpu"):
        pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_dtype_on_cuda() -> None:
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert pick_dtype("auto", pick_device("auto")) == expected


# ---- loading -----------------------------------------------------------------------------------


def test_load_model_and_tokenizer_roundtrip(checkpoint: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    resolved = resolve_model_ref(str(checkpoint))
    model = load_model(resolved, dtype="float32", device="cpu")
    tok = load_tokenizer(resolved)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device == torch.device("cpu")
    ids = tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]
    assert tok("def f(x): return x", add_special_tokens=False)["input_ids"] == ids
    reference = make_model(320)
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(model(x).logits, reference(x).logits)


def test_load_model_accepts_string_and_dtype(checkpoint: Path) -> None:
    model = load_model(str(checkpoint), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_separate_tokenizer_ref(tmp_path: Path, checkpoint: Path) -> None:
    tok_dir = tmp_path / "tok"
    make_tokenizer(vocab_size=280).save_pretrained(tok_dir)
    tok = load_tokenizer(str(checkpoint), tokenizer=str(tok_dir))
    assert len(tok) == 280


def test_broken_checkpoint_is_wrapped(tmp_path: Path, checkpoint: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError) as err:
        load_model(str(broken), device="cpu")
    assert str(broken) in str(err.value)
    assert "save_pretrained" in str(err.value)


def test_uncached_hub_id_offline_is_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer("polyfuse-test/does-not-exist@v1")
    msg = str(err.value)
    assert "polyfuse-test/does-not-exist@v1" in msg
    assert "HF_HUB_OFFLINE" in msg


# ---- vocab facts / context token ---------------------------------------------------------------


def test_vocab_facts_from_model_and_config(tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_model(320)
    facts = vocab_facts(model, tokenizer)
    assert (facts.tokenizer_len, facts.embedding_rows, facts.tied) == (300, 320, False)
    assert facts.padding_rows == 20
    assert vocab_facts(model.config, tokenizer) == facts
    facts.check()

    tied = make_model(320, tie=True)
    assert vocab_facts(tied, tokenizer).tied
    assert vocab_facts(tied.config, tokenizer).tied

    with pytest.raises(ModelLoadError, match="300 tokens but the model has only 256"):
        vocab_facts(make_model(256), tokenizer).check()


def test_bos_context_id_falls_back_to_eos_then_none(tokenizer: PreTrainedTokenizerFast) -> None:
    assert bos_context_id(tokenizer) == tokenizer.convert_tokens_to_ids("<s>")
    eos_only = make_tokenizer()
    eos_only.bos_token = None
    assert bos_context_id(eos_only) == eos_only.convert_tokens_to_ids("</s>")
    assert bos_context_id(make_tokenizer(special=False)) is None


def test_bf16_null_is_auto_and_true_needs_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from polyfuse.models import resolve_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_bf16(None) is False and resolve_bf16(False) is False
    with pytest.raises(PolyfuseError, match="bf16=true needs a CUDA device"):
        resolve_bf16(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_bf16(None) is True and resolve_bf16(False) is False   # auto turns it on; false keeps it off
