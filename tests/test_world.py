"""The tiny world: real corpus split without leaks, heterogeneous tokenizers and models, determinism."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from polyfuse.corpus.documents import domain_path, read_documents
from polyfuse.demo.corpus import group_of
from polyfuse.demo.world import build_world, load_world
from polyfuse.workspace import LOCK_NAME


def _files(root: Path) -> dict[str, bytes]:
    """The world's content: not its manifests, its summary or the build's lock file (which names its holder)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "world.json", LOCK_NAME)}


def test_same_seed_same_bytes_whatever_the_callers_thread_count(tmp_path: Path) -> None:
    """GPT-2 and GPT-NeoX trained with 1 and 2 torch threads differ: the world pins its own count."""
    from polyfuse.demo.threads import DEMO_THREADS, fixed_threads

    a, b = tmp_path / "a", tmp_path / "b"
    build_world(a, preset="test", seed=3, budget=0.2)
    with fixed_threads(DEMO_THREADS + 1):
        build_world(b, preset="test", seed=3, budget=0.2)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert any(k.endswith("model.safetensors") for k in fa)
    different = [k for k in fa if fa[k] != fb[k]]
    assert different == []


def test_other_seed_other_weights(tmp_path: Path, tiny_world: Path) -> None:
    other = tmp_path / "other"
    build_world(other, preset="test", seed=1, budget=0.2)
    assert (other / "models/prose/model.safetensors").read_bytes() != \
        (tiny_world / "models/prose/model.safetensors").read_bytes()


def test_heterogeneous_models(tiny_world: Path) -> None:
    world = load_world(tiny_world)
    models = world["models"]
    assert {m["role"] for m in models.values()} == {"source", "target"}
    sources = [n for n, m in models.items() if m["role"] == "source"]
    assert len(sources) == 3
    archs = {AutoConfig.from_pretrained(tiny_world / "models" / n).model_type for n in models}
    assert archs == {"gpt2", "gpt_neox", "mistral", "llama"}
    kinds = {json.loads((tiny_world / "models" / n / "tokenizer.json").read_text())["model"]["type"]
             for n in sources}
    assert kinds == {"BPE", "Unigram"}
    assert {models[n]["emphasis"] for n in sources} == {"prose", "code", "math"}


def test_tokenizers_lossless_on_heldout(tiny_world: Path) -> None:
    texts = [d.text for dom in ("prose", "code", "math")
             for d in list(read_documents(domain_path(tiny_world / "corpus", "heldout", dom)))[:5]]
    for name in ("prose", "code", "math", "target"):
        tok = AutoTokenizer.from_pretrained(tiny_world / "models" / name)
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text, name


def test_special_token_strings_in_plain_text_stay_text(tiny_world: Path) -> None:
    """ "<s>" written in a document is text to every world tokenizer (the Unigram trainer's control pieces
    used to win the segmentation and turn it into BOS)."""
    text = "if a <s> b and </s> or <unk> and <|endoftext|> then"
    for name in ("prose", "code", "math", "target"):
        tok = AutoTokenizer.from_pretrained(tiny_world / "models" / name)
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert not set(ids) & set(tok.all_special_ids), (name, tok.convert_ids_to_tokens(ids))


def test_heldout_never_shares_a_group_with_train(tiny_world: Path) -> None:
    corpus = tiny_world / "corpus"
    for dom in ("prose", "code", "math"):
        train = {group_of(d.id) for d in read_documents(domain_path(corpus, "train", dom))}
        held = {group_of(d.id) for d in read_documents(domain_path(corpus, "heldout", dom))}
        assert held, dom
        assert not train & held, dom


def test_rebuild_is_skipped(tiny_world: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_world.rglob("model.safetensors")}
    build_world(tiny_world, preset="test", seed=0)
    assert {p: p.stat().st_mtime_ns for p in tiny_world.rglob("model.safetensors")} == before
