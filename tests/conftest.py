"""Session fixtures: the tiny world is built once per test session (the 'test' preset, seconds)."""

from __future__ import annotations

import os
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
