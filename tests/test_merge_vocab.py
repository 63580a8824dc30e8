"""Tokenizer-aware merging: inputs whose vocabularies differ in order and size are matched by token text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from polyfuse.errors import PolyfuseError
from polyfuse.merge import parse_merge_config, run_merge
from polyfuse.merge.vocab import gather_rows, row_map

ADDED = ["<|tool|>", "<|think|>", "<|end_think|>"]


def test_row_map_matches_by_text_and_reports() -> None:
    output = {"a": 0, "b": 1, "c": 2, "d": 3}
    rows, match = row_map(output, 5, {"d": 0, "a": 1, "b": 2, "x": 3}, 4, "models[1] (m)")
    assert rows.tolist() == [1, 2, -1, 0, -1]  # row 4: padding, no text
    assert (match.matched, match.moved, match.from_fallback, match.dropped) == (3, 3, 2, 1)
    assert match.examples_missing == ["c"] and match.examples_dropped == ["x"]


def test_gather_rows_reads_runs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from polyfuse.merge.shards import read_index

    table = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    save_file({"w": table}, str(tmp_path / "model.safetensors"))
    info = read_index(tmp_path)["w"]
    ids = torch.tensor([7, 8, 9, 0, 3, 4, 2])
    assert torch.equal(gather_rows(info, ids), table[ids])


# --------------------------------------------------------------------------------------------------
# two tiny-world checkpoints with different vocabularies


def _leaf_tokens(data: dict, count: int) -> list[str]:
    """BPE tokens made by a merge and used by no other merge: removing them keeps the tokenizer valid."""
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    parts = {p for m in merges for p in m}
    results = ["".join(m) for m in merges]
    return [t for t in reversed(results) if t not in parts][:count]


def _revocab(tuned: Path, out: Path, drop: int) -> dict:
    """``tuned`` with its ids reversed, ``drop`` leaf tokens removed and ``ADDED`` tokens appended."""
    from safetensors.torch import load_file, save_file

    data = json.loads((tuned / "tokenizer.json").read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    dropped = set(_leaf_tokens(data, drop))
    special = {t["content"] for t in data["added_tokens"]}
    keep = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in dropped]
    order = [t for t in keep if t in special] + [t for t in reversed(keep) if t not in special]
    new_vocab = {t: i for i, t in enumerate(order)}
    data["model"]["vocab"] = new_vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if "".join(m.split(" ") if isinstance(m, str) else m) not in dropped]
    for t in data["added_tokens"]:
        t["id"] = new_vocab[t["content"]]
    for i, token in enumerate(ADDED):
        data["added_tokens"].append({"id": len(order) + i, "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(tuned / "tokenizer_config.json", out / "tokenizer_config.json")
    config = json.loads((tuned / "config.json").read_text())
    config["vocab_size"] = len(order) + len(ADDED)
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(str(tuned / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    new_rows = torch.stack([embed[vocab[t]] for t in order] + [torch.randn(embed.shape[1]) * 0.02 for _ in ADDED])
    weights["model.embed_tokens.weight"] = new_rows
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"dropped": sorted(dropped), "vocab": new_vocab}


@pytest.fixture(scope="module")
def two_vocabularies(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The world's target (base), a copy trained on held-in prose, and that copy with another vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyfuse.evaluate.bpb import load_domain_texts

    root = tmp_path_factory.mktemp("vocab-merge")
    base = tiny_world / "models" / "target"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    texts = load_domain_texts(tiny_world / "corpus", "train", ["prose"], max_bytes_per_domain=60_000)["prose"]
    ids = torch.tensor(tokenizer("".join(texts))["input_ids"])
    blocks = ids[: (len(ids) // 64) * 64].view(-1, 64)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(40):
        batch = blocks[(step * 8) % len(blocks):][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned = root / "tuned"
    model.save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    info = _revocab(tuned, root / "other", drop=5)
    return {"root": root, "base": base, "tuned": tuned, "other": root / "other", **info}


def _bpb(path: Path, world: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyfuse.evaluate.bpb import bits_per_byte, load_domain_texts

    texts = load_domain_texts(world / "corpus", "heldout", ["prose"], max_bytes_per_domain=20_000)["prose"]
    model = AutoModelForCausalLM.from_pretrained(path)
    return bits_per_byte(model, AutoTokenizer.from_pretrained(path), texts, progress=False).bpb


def test_different_vocabularies_merge_by_token_text(two_vocabularies: dict, tiny_world: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    v = two_vocabularies
    config = parse_merge_config({"merge_method": "linear", "dtype": "float32",
                                 "models": [{"model": str(v["base"]), "parameters": {"weight": 0.5}},
                                            {"model": str(v["other"]), "parameters": {"weight": 0.5}}]})
    result = run_merge(config, tmp_path / "merged", seed=0, progress=False)
    [match] = result.vocab
    report = json.loads((tmp_path / "merged" / "vocab_map.json").read_text())
    assert report["inputs"][0] == match.as_dict() and report["output_vocabulary"] == "models[0]"
    assert match.from_fallback == 5 and match.dropped == len(ADDED)
    assert sorted(match.examples_missing) == v["dropped"][:10] and match.moved > 400
    assert "vocabulary: models[1]" in (tmp_path / "merged" / "README.md").read_text()

    # rows: each the mean of the base row and the other model's row of the same token; dropped tokens: base
    base_vocab = json.loads((v["base"] / "tokenizer.json").read_text())["model"]["vocab"]
    embed = {name: load_file(str(p / "model.safetensors"))["model.embed_tokens.weight"]
             for name, p in (("base", v["base"]), ("tuned", v["tuned"]), ("other", v["other"]),
                             ("merged", tmp_path / "merged"))}
    assert embed["merged"].shape == embed["base"].shape
    for token in ["Ġthe", "e", v["dropped"][0]]:
        i = base_vocab[token]
        j = v["vocab"].get(token)
        other = embed["other"][j] if j is not None else embed["base"][i]
        torch.testing.assert_close(embed["merged"][i], 0.5 * embed["base"][i] + 0.5 * other)
    assert torch.equal(embed["other"][v["vocab"]["Ġthe"]], embed["tuned"][base_vocab["Ġthe"]])

    # held-out bits per byte: no worse than the base (the tuned model is better, the merge in between)
    base, tuned, merged = (_bpb(p, tiny_world) for p in (v["base"], v["tuned"], tmp_path / "merged"))
    assert tuned < base
    assert merged <= base


def test_a_positional_merge_of_the_same_vocabularies_is_refused_only_on_shape(two_vocabularies: dict,
                                                                             tmp_path: Path) -> None:
    """Without tokenizer files the rows cannot be matched: sizes that differ are an error naming the fix."""
    v = two_vocabularies
    bare = tmp_path / "bare"
    shutil.copytree(v["other"], bare)
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink()
    config = parse_merge_config({"merge_method": "linear", "models": [
        {"model": str(v["base"]), "parameters": {"weight": 0.5}}, {"model": str(bare), "parameters": {"weight": 0.5}}]})
    with pytest.raises(PolyfuseError, match="matched by token text when every model directory holds its tokenizer"):
        run_merge(config, tmp_path / "merged", seed=0, progress=False)


def test_the_output_tokenizer_must_be_the_reference_vocabulary(two_vocabularies: dict, tmp_path: Path) -> None:
    v = two_vocabularies
    config = parse_merge_config({"merge_method": "linear", "tokenizer_source": str(v["other"]), "models": [
        {"model": str(v["base"]), "parameters": {"weight": 0.5}},
        {"model": str(v["other"]), "parameters": {"weight": 0.5}}]})
    with pytest.raises(PolyfuseError, match="tokenizer_source: the inputs' vocabularies differ"):
        run_merge(config, tmp_path / "merged", seed=0, progress=False)
