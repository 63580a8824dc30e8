"""Real tokenizers converted from llama.cpp's vocabulary GGUFs: test vectors, cache reuse, errors.

Tests never download: those that need the sdist or a converted vocabulary use the polyfuse cache that
``make install`` fills, and skip (naming ``make install``) when it is empty.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyfuse.demo import vocabs
from polyfuse.demo.vocabs import (
    SDIST_FILE,
    VOCABS,
    cached_vocab_dir,
    check_test_vectors,
    fetch_vocabs,
    read_gguf_metadata,
    read_test_vectors,
    real_tokenizer,
    vocab_cache_dir,
)
from polyfuse.errors import PolyfuseError

TEXTS = st.lists(st.one_of(
    st.sampled_from(["Hello", " world", "naïve", "日本語", "🦙", "e\u0301", "ﬁ", "3.14", "'s", "<s>", "</s>",
                     " ", "   ", "\t", "\n", "\n\n", " \n ", "\u00a0"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=3),
), max_size=16).map("".join)


def _cached(name: str) -> Path:
    path = cached_vocab_dir(name)
    if path is None:
        pytest.skip(f"{name} vocabulary not in the cache {vocab_cache_dir()}: run make install")
    return path


def _sdist() -> Path:
    path = vocab_cache_dir() / SDIST_FILE
    if not path.is_file():
        pytest.skip(f"the llama-cpp-python sdist is not in the cache {vocab_cache_dir()}: run make install")
    return path


@pytest.mark.parametrize("name", ["mpt", "qwen2", "llama-spm", "gpt-2", "phi-3"])
def test_conversion_matches_the_shipped_test_vectors_exactly(name: str) -> None:
    _cached(name)
    matched, total = check_test_vectors(name)
    assert total == 46  # every reference text of the sdist was read
    assert matched == total


@pytest.mark.parametrize(("fixture", "name", "size"),
                         [("mpt", "mpt", 50432), ("qwen2", "qwen2", 151936), ("llama_spm", "llama-spm", 32000)])
def test_vocabulary_sizes_and_roles(request: pytest.FixtureRequest, fixture: str, name: str, size: int) -> None:
    tok = request.getfixturevalue(fixture)  # the conftest session fixtures (skip when not cached)
    assert len(tok) == size == VOCABS[name].size
    assert tok.eos_token_id is not None
    # llama.cpp's [PADnnnn] filler rows are specials without text: never produced from text
    pads = [t for t in tok.all_special_tokens if t.startswith("[PAD")]
    if pads:
        ids = tok(pads[-1], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.convert_tokens_to_ids(pads[-1]) not in ids


def test_same_vocabularies_as_the_original_tokenizer_files(gpt2, llama2) -> None:
    _cached("gpt-2"), _cached("llama-spm")
    assert _tokenizer("gpt-2").get_vocab() == gpt2.get_vocab()
    assert _tokenizer("llama-spm").get_vocab() == llama2.get_vocab()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS)
def test_gpt2_from_gguf_equals_gpt2_from_its_original_files(gpt2, text: str) -> None:
    _cached("gpt-2")
    tok = _tokenizer("gpt-2")
    kw = {"add_special_tokens": False, "return_offsets_mapping": True}
    assert tok(text, **kw) == gpt2(text, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS)
def test_llama_spm_from_gguf_equals_the_llama2_tokenizer_json(llama2, text: str) -> None:
    _cached("llama-spm")
    tok = _tokenizer("llama-spm")
    assert tok(text)["input_ids"] == llama2(text)["input_ids"]  # <s> in front, as Llama-2
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == llama2.decode(
        llama2(text, add_special_tokens=False)["input_ids"])


_LOADED: dict[str, object] = {}


def _tokenizer(name: str):
    if name not in _LOADED:
        _LOADED[name] = real_tokenizer(name)
    return _LOADED[name]


@pytest.fixture
def cache_with_sdist(tmp_path: Path) -> Path:
    """An empty vocabulary cache that holds (a link to) the already downloaded sdist, so nothing downloads."""
    sdist = _sdist()
    (tmp_path / SDIST_FILE).symlink_to(sdist)
    return tmp_path


def test_one_pass_extraction_then_the_cache_is_reused_until_the_converter_changes(cache_with_sdist: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    extract = vocabs._extract

    def spy(sdist: Path, names, dest: Path):
        calls.append(list(names))
        return extract(sdist, names, dest)

    def no_pip(dest: Path) -> list[str]:
        raise AssertionError("pip must not run when the sdist is cached")

    monkeypatch.setattr(vocabs, "_extract", spy)
    monkeypatch.setattr(vocabs, "_pip_command", no_pip)
    paths = fetch_vocabs(["llama-spm", "gpt-2"], cache_with_sdist)
    assert calls == [["llama-spm", "gpt-2"]]  # both from one pass over the archive
    for name, path in paths.items():
        assert path == cache_with_sdist / name and cached_vocab_dir(name, cache_with_sdist) == path
        assert (path / "tokenizer.json").is_file() and (path / f"ggml-vocab-{name}.gguf.out").is_file()
    assert sorted(p.name for p in cache_with_sdist.iterdir()) == sorted([SDIST_FILE, "gpt-2", "llama-spm"])

    def must_not_extract(*args, **kwargs):
        raise AssertionError("a cached vocabulary must not be extracted again")

    monkeypatch.setattr(vocabs, "_extract", must_not_extract)
    tok = real_tokenizer("llama-spm", cache_dir=cache_with_sdist)
    assert len(tok) == 32000 and tok("Hello world")["input_ids"] == [1, 15043, 3186]
    assert check_test_vectors("llama-spm", cache_with_sdist) == (46, 46)

    # a conversion by another converter version is not current: it is extracted and converted again
    manifest = paths["llama-spm"] / vocabs.MANIFEST
    manifest.write_text(manifest.read_text().replace(f'"converter_version": {vocabs.CONVERTER_VERSION}',
                                                     '"converter_version": 0'))
    assert cached_vocab_dir("llama-spm", cache_with_sdist) is None
    monkeypatch.setattr(vocabs, "_extract", spy)
    assert fetch_vocabs(["llama-spm"], cache_with_sdist)["llama-spm"] == paths["llama-spm"]
    assert calls[-1] == ["llama-spm"] and cached_vocab_dir("llama-spm", cache_with_sdist) == paths["llama-spm"]


def test_unknown_name_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolyfuseError, match=r"unknown vocabulary 'gpt-3'; choose from: gpt-2, .*mpt.*qwen2"):
        real_tokenizer("gpt-3", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # rejected before any download


def test_no_test_vectors_for_gpt_neox_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolyfuseError, match="ships no test vectors for 'gpt-neox'"):
        check_test_vectors("gpt-neox", tmp_path)


def test_registry_unavailable_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = [sys.executable, "-c", "import sys; sys.exit('ERROR: No matching distribution found (offline)')"]
    monkeypatch.setattr(vocabs, "_pip_command", lambda dest: failing)
    with pytest.raises(PolyfuseError) as err:
        real_tokenizer("mpt", cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "No matching distribution found (offline)" in message
    assert f"pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d {tmp_path}" in message
    assert "make install" in message
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-downloaded leftovers


def test_cli_reports_a_download_failure_with_exit_code_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(vocabs, "_pip_command", lambda dest: [sys.executable, "-c", "raise SystemExit(1)"])
    assert vocabs.main(["fetch", "mpt", "--cache-dir", str(tmp_path)]) == 2
    assert "error: could not download" in capsys.readouterr().err


def test_default_cache_dir_follows_polyfuse_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYFUSE_CACHE_DIR", str(tmp_path))
    assert vocab_cache_dir() == tmp_path / "vocabs"
    assert vocab_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_read_test_vectors(tmp_path: Path) -> None:
    sep = vocabs.TEST_SEPARATOR
    (tmp_path / "v.inp").write_text(f"Hello world{sep}{sep}a\nb{sep}", encoding="utf-8")
    (tmp_path / "v.out").write_text(" 1 2\n\n 3 4 5\n", encoding="utf-8")
    assert read_test_vectors(tmp_path / "v.inp", tmp_path / "v.out") == [
        ("Hello world", [1, 2]), ("", []), ("a\nb", [3, 4, 5])]
    (tmp_path / "v.out").write_text(" 1 2\n", encoding="utf-8")
    with pytest.raises(PolyfuseError, match="1 id lines for 3 texts"):
        read_test_vectors(tmp_path / "v.inp", tmp_path / "v.out")


def test_read_gguf_metadata_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "▁the", "日本", ""])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.25, 3.0])
    writer.add_array("tokenizer.ggml.token_type", [2, 1, 1, 1])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 7)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = read_gguf_metadata(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        got, want = meta[key], field.contents()
        assert (np.asarray(got).tolist() if isinstance(got, np.ndarray) else got) == want, key
    assert meta["tokenizer.ggml.tokens"] == ["<unk>", "▁the", "日本", ""]
    assert meta["tokenizer.ggml.scores"].dtype == np.float32 and meta["tokenizer.ggml.add_bos_token"] is True
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(PolyfuseError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "bad.gguf")
