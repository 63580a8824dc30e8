"""vllm capture: the hf backend's store from vLLM's prompt log-probs (a fake vllm on CPU; the real one on a GPU).

The fake ``vllm`` module wraps the tiny world's target with transformers and answers ``LLM.generate``
in vLLM's data shapes: ``prompt_logprobs`` is a list, ``None`` at position 0, then per position a
dict token id -> Logprob(logprob, rank, decoded_token) holding the actual token first and the top-k
(k entries when the actual token is among them, else k + 1).
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from polyfuse.capture import hf as hf_capture
from polyfuse.capture import vllm as vllm_capture
from polyfuse.capture.store import STORE_NAME, StoreReader, StoreWriter, shard_name
from polyfuse.corpus.documents import read_documents
from polyfuse.corpus.spans import response_positions
from polyfuse.corpus.tokens import encode_block
from polyfuse.errors import DataError, PolyfuseError
from polyfuse.models import load_model, load_tokenizer

K = 8


# --------------------------------------------------------------------------------------------------
# the fake vllm


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None]
    outputs: list[Any]


class SamplingParams:
    def __init__(self, *, max_tokens: int = 16, prompt_logprobs: int | None = None, temperature: float = 1.0,
                 seed: int | None = None, **rest: Any) -> None:
        self.max_tokens, self.prompt_logprobs, self.temperature, self.seed = max_tokens, prompt_logprobs, temperature, seed
        self.rest = rest


def tokens_prompt(*, prompt_token_ids: list[int]) -> dict:
    """vLLM's TokensPrompt is a TypedDict."""
    assert isinstance(prompt_token_ids, list) and all(type(i) is int for i in prompt_token_ids)
    return {"prompt_token_ids": prompt_token_ids}


class FakeLLM:
    """``vllm.LLM`` over a transformers model. ``mode="forward"``: log_softmax of ``model(ids).logits``;
    ``mode="hf"``: the hf backend's own ops on one unpadded sequence (bit-identical values to hf with batch_size=1)."""

    built: list[FakeLLM] = []
    mode = "forward"

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_logprobs: int = 20, logprobs_mode: str = "raw_logprobs", revision: str | None = None,
                 **rest: Any) -> None:
        self.kwargs = dict(model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_logprobs=max_logprobs,
                           logprobs_mode=logprobs_mode, revision=revision, **rest)
        self.model = load_model(model, dtype=dtype, device="cpu")
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.calls: list[int] = []
        FakeLLM.built.append(self)

    @torch.inference_mode()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        if self.mode == "hf":
            hidden = hf_capture._hidden_states(self.model, x, torch.ones_like(x))  # [1, T, d]
            logits = hf_capture.head_logits(self.model, hidden[0, :-1].contiguous()).float()  # as hf computes them
            return logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        return torch.log_softmax(self.model(input_ids=x).logits[0, :-1].float(), dim=-1)  # [T-1, V]

    def generate(self, prompts: list[dict], sampling_params: SamplingParams, *, use_tqdm: bool = True) -> list:
        k = sampling_params.prompt_logprobs
        if k is not None and k > self.kwargs["max_logprobs"]:
            raise ValueError(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                             f"{self.kwargs['max_logprobs']}")
        self.calls.append(len(prompts))
        out = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            lp = self._logprobs(ids)  # [n-1, V] float32
            plp: list[dict[int, Logprob] | None] = [None]
            for j in range(1, len(ids)):
                row = lp[j - 1]
                actual = ids[j]
                top = torch.topk(row, k)
                entry = {actual: Logprob(row[actual].item(), int((row > row[actual]).sum()) + 1,
                                         self.tokenizer.decode([actual]))}
                for r, (tid, val) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True)):
                    entry[tid] = Logprob(val, r + 1, self.tokenizer.decode([tid]))
                plp.append(entry)
            out.append(RequestOutput(None, list(ids), plp, outputs=[]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams, fake.__version__ = FakeLLM, SamplingParams, "0.0-fake"
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = tokens_prompt
    fake.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(FakeLLM, "built", [])
    monkeypatch.setattr(FakeLLM, "mode", "forward")
    return FakeLLM


# --------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def target(tiny_world: Path) -> tuple[Path, Any, Any]:
    path = tiny_world / "models" / "target"
    return path, load_model(str(path), device="cpu"), load_tokenizer(str(path))


@pytest.fixture(scope="module")
def blocks(tiny_world: Path) -> list[tuple]:
    """Held-out text cut into blocks; every third one a chat block with a response span, plus edge cases."""
    texts = []
    for domain in ("prose", "code", "math"):
        for doc in read_documents(tiny_world / "corpus" / "heldout" / f"{domain}.jsonl"):
            texts += [doc.text[i : i + 150] for i in range(0, len(doc.text), 150)]
    rng = np.random.default_rng(1)
    out: list[tuple] = []
    for n, j in enumerate(rng.choice(len(texts), size=min(22, len(texts)), replace=False)):
        text = texts[j][: int(rng.integers(2, 151))]
        if n % 3 == 0:
            out.append((200 + n, text, ((len(text) // 2, len(text)),)))
        else:
            out.append((200 + n, text))
    return [*out, (900, ""), (901, "a"), (902, "no response here", ())]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def shard_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("shard-*"))


# --------------------------------------------------------------------------------------------------
# the store


def test_store_equals_hf_store(fake_vllm, target, blocks, tmp_path: Path) -> None:
    path, model, tokenizer = target
    kw = dict(k=K, shard_size=7, progress=False)
    hf_stats = hf_capture.capture(model, tokenizer, blocks, tmp_path / "hf", batch_size=4, **kw)
    v_stats = vllm_capture.capture(str(path), tokenizer, blocks, tmp_path / "vllm", batch_size=4, dtype="float32", **kw)

    assert shard_files(tmp_path / "vllm") == shard_files(tmp_path / "hf") == [shard_name(s) for s in range(4)]
    for key in ("blocks", "tokens", "shards_written", "finalized", "store_blocks", "store_tokens"):
        assert v_stats[key] == hf_stats[key], key
    hf_info, v_info = read_json(tmp_path / "hf" / STORE_NAME), read_json(tmp_path / "vllm" / STORE_NAME)
    assert set(v_info) == set(hf_info) and set(v_info["meta"]) == set(hf_info["meta"])
    assert v_info["meta"]["backend"] == "vllm" and hf_info["meta"]["backend"] == "hf"
    assert {**v_info["meta"], "backend": "hf"} == hf_info["meta"]
    for key in ("k", "vocab_size", "id_bits", "blocks", "positions"):
        assert v_info[key] == hf_info[key], key
    assert [(s["file"], s["rows"], s["first_block"], s["last_block"], s["positions"]) for s in v_info["shards"]] == [
        (s["file"], s["rows"], s["first_block"], s["last_block"], s["positions"]) for s in hf_info["shards"]
    ]

    hf_store, v_store = StoreReader(tmp_path / "hf"), StoreReader(tmp_path / "vllm")
    assert v_store.block_ids == hf_store.block_ids == [b[0] for b in blocks]
    chat = {b[0]: (b[1], b[2]) for b in blocks if len(b) == 3}
    partial = 0
    for a, b in zip(hf_store, v_store, strict=True):
        assert a.n_positions == b.n_positions
        np.testing.assert_array_equal(b.ids, a.ids)
        np.testing.assert_allclose(b.logprobs.astype(np.float32), a.logprobs.astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(b.target_logprob.astype(np.float32), a.target_logprob.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
        assert b.nll_sum == pytest.approx(a.nll_sum, abs=1e-3 * max(1, a.n_positions))
        if a.block_id in chat:  # the response positions only
            text, spans = chat[a.block_id]
            counted = response_positions(encode_block(tokenizer, text), spans)
            assert b.nll_sum == pytest.approx(-b.target_logprob[counted].astype(np.float64).sum(),
                                              abs=1e-3 * max(1, a.n_positions))
            partial += int(0 < counted.sum() < a.n_positions)
    assert partial >= 3
    assert v_store[900].n_positions == 0 and v_store[901].n_positions == 1
    assert v_store[902].n_positions > 0 and v_store[902].nll_sum == 0.0  # a chat block with no response

    (llm,) = fake_vllm.built  # one engine, built as documented
    assert llm.kwargs["max_logprobs"] >= K and llm.kwargs["logprobs_mode"] == "raw_logprobs"
    assert llm.kwargs["model"] == str(path.resolve()) and llm.kwargs["dtype"] == "float32"


def test_identical_logprobs_give_identical_bytes(fake_vllm, target, blocks, tmp_path: Path) -> None:
    """Given the very float32 log-probs hf computes, the vllm backend writes byte-identical shards."""
    path, model, tokenizer = target
    fake_vllm.mode = "hf"
    kw = dict(k=K, shard_size=9, progress=False)
    hf_capture.capture(model, tokenizer, blocks, tmp_path / "hf", batch_size=1, **kw)
    vllm_capture.capture(path, tokenizer, blocks, tmp_path / "vllm", dtype="float32", **kw)
    names = shard_files(tmp_path / "hf")
    assert names == shard_files(tmp_path / "vllm") and len(names) == 3
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "hf", tmp_path / "vllm", names, shallow=False)
    assert match == names and not mismatch and not errors
    hf_info, v_info = read_json(tmp_path / "hf" / STORE_NAME), read_json(tmp_path / "vllm" / STORE_NAME)
    assert v_info["shards"] == hf_info["shards"]  # sha256 and bytes included
    assert {**v_info, "meta": None} == {**hf_info, "meta": None}


def test_resume_after_partial_run(fake_vllm, target, blocks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, tokenizer = target
    kw = dict(k=K, shard_size=5, progress=False, dtype="float32")
    write = StoreWriter.write_shard

    def failing_write(self, index, rows):
        if index == 2:
            raise RuntimeError("disk full")
        return write(self, index, rows)

    monkeypatch.setattr(StoreWriter, "write_shard", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        vllm_capture.capture(path, tokenizer, blocks, tmp_path / "resumed", **kw)
    assert shard_files(tmp_path / "resumed") == [shard_name(0), shard_name(1)]
    assert not (tmp_path / "resumed" / STORE_NAME).exists()
    monkeypatch.setattr(StoreWriter, "write_shard", write)

    stats = vllm_capture.capture(path, tokenizer, blocks, tmp_path / "resumed", **kw)
    assert stats["finalized"] and stats["shards_skipped"] == 2 and stats["shards_written"] == 3
    vllm_capture.capture(path, tokenizer, blocks, tmp_path / "straight", **kw)
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "resumed", tmp_path / "straight", names, shallow=False)
    assert not mismatch and not errors

    built = len(fake_vllm.built)
    again = vllm_capture.capture(path, tokenizer, blocks, tmp_path / "straight", **kw)
    assert again["shards_written"] == 0 and again["finalized"]
    assert len(fake_vllm.built) == built  # nothing left to capture: no engine is built


def test_explicit_ranks_and_other_backend_store(fake_vllm, target, blocks, tmp_path: Path) -> None:
    path, model, tokenizer = target
    kw = dict(k=K, shard_size=10, progress=False, dtype="float32")
    first = vllm_capture.capture(path, tokenizer, blocks, tmp_path / "ranks", rank=1, world_size=2, **kw)
    assert not first["finalized"] and shard_files(tmp_path / "ranks") == [shard_name(1)]
    done = vllm_capture.capture(path, tokenizer, blocks, tmp_path / "ranks", rank=0, world_size=2, **kw)
    assert done["finalized"] and len(StoreReader(tmp_path / "ranks")) == len(blocks)

    hf_capture.capture(model, tokenizer, blocks[:3], tmp_path / "hf", k=K, progress=False)
    with pytest.raises(DataError, match="other settings"):  # never mixes two backends' rows
        vllm_capture.capture(path, tokenizer, blocks[:3], tmp_path / "hf", k=K, progress=False, dtype="float32")


def test_bad_arguments_and_outputs(fake_vllm, target, tmp_path: Path) -> None:
    path, _, tokenizer = target
    with pytest.raises(PolyfuseError, match="device='cuda:1' is not supported"):
        vllm_capture.capture(path, tokenizer, [(1, "a b")], tmp_path / "s", device="cuda:1")
    with pytest.raises(DataError, match="not unique"):
        vllm_capture.capture(path, tokenizer, [(1, "a"), (1, "b")], tmp_path / "s", progress=False)
    with pytest.raises(DataError, match="context is 256"):
        vllm_capture.capture(path, tokenizer, [(1, "word " * 400)], tmp_path / "s2", progress=False)

    ids = np.array([1, 5, 6])
    good = {5: Logprob(-0.5, 1), 7: Logprob(-1.5, 2)}
    with pytest.raises(PolyfuseError, match="block 3: expected prompt log-probs for 3 tokens, got 2"):
        vllm_capture.position_topk([None, good], ids, 2, 3)
    with pytest.raises(PolyfuseError, match="position 1: vLLM's prompt log-probs lack the actual token 6"):
        vllm_capture.position_topk([None, good, good], ids, 2, 3)
    with pytest.raises(PolyfuseError, match="position 1: 1 prompt log-probs, expected 2 or 3"):
        vllm_capture.position_topk([None, good, {6: Logprob(-0.1, 1)}], ids, 2, 3)


def test_position_mapping_by_hand() -> None:
    """Entry t + 1 is position t; the actual token is dropped from k + 1 entries, kept among k; sorted by log-prob."""
    ids = np.array([0, 4, 9])
    plp = [
        None,
        {4: Logprob(-2.0, 3), 1: Logprob(-0.25, 1), 2: Logprob(-1.0, 2)},  # actual outside the top-2: 3 entries
        {9: Logprob(-0.5, 1), 3: Logprob(-1.5, 2)},  # actual is the top-1: 2 entries
    ]
    top_ids, values, target = vllm_capture.position_topk(plp, ids, 2, 0)
    np.testing.assert_array_equal(top_ids, [[1, 2], [9, 3]])
    np.testing.assert_array_equal(values, np.array([[-0.25, -1.0], [-0.5, -1.5]], np.float32))
    np.testing.assert_array_equal(target, np.array([-2.0, -0.5], np.float32))


def test_missing_extra_is_a_clear_error(target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, tokenizer = target
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(PolyfuseError, match=r"pip install 'polyfuse\[vllm\]'"):
        vllm_capture.capture(path, tokenizer, [(1, "a b")], tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------------
# the real vLLM


def _real_vllm_missing() -> str | None:
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vllm is not installed (pip install 'polyfuse[vllm]')")
    if not torch.cuda.is_available():
        missing.append("CUDA is not available")
    return "; ".join(missing) or None


@pytest.mark.gpu
@pytest.mark.skipif(_real_vllm_missing() is not None, reason=f"needs vllm and CUDA: {_real_vllm_missing()}")
def test_real_vllm_matches_hf_on_the_tiny_target(target, blocks, tmp_path: Path) -> None:
    path, _, tokenizer = target
    model = load_model(str(path), dtype="float32", device="cuda")
    kw = dict(k=K, shard_size=8, progress=False)
    hf_capture.capture(model, tokenizer, blocks, tmp_path / "hf", **kw)
    stats = vllm_capture.capture(path, tokenizer, blocks, tmp_path / "vllm", dtype="float32",
                                 llm_kwargs={"gpu_memory_utilization": 0.3, "enforce_eager": True}, **kw)
    assert stats["finalized"]
    hf_store, v_store = StoreReader(tmp_path / "hf"), StoreReader(tmp_path / "vllm")
    assert v_store.block_ids == hf_store.block_ids
    same, total = 0, 0
    for a, b in zip(hf_store, v_store, strict=True):
        assert a.n_positions == b.n_positions
        same += int((a.ids[:, 0] == b.ids[:, 0]).sum())
        total += a.n_positions
        np.testing.assert_allclose(b.target_logprob.astype(np.float32), a.target_logprob.astype(np.float32),
                                   rtol=1e-2, atol=2e-2)
        assert b.nll_sum == pytest.approx(a.nll_sum, rel=1e-2, abs=2e-2 * max(1, a.n_positions))
    assert same >= 0.99 * total  # argmax agrees (near-ties may flip between kernels)


# --------------------------------------------------------------------------------------------------
# the pipeline


def test_pipeline_capture_stage_with_vllm(fake_vllm, tiny_world: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from polyfuse.recipe import parse_recipe
    from polyfuse.stages import run_recipe, stage_dir
    from polyfuse.stages.teachers import capture_stage

    def recipe(workdir: Path, backend: str):
        return parse_recipe({
            "workdir": str(workdir), "world": str(tiny_world), "target": {"model": "world:target"},
            "sources": [{"name": "prose", "model": "world:prose"}],
            "corpus": {"max_bytes_per_domain": 1500}, "blocks": {"max_tokens": 64},
            "capture": {"backend": backend, "top_k": 4, "dtype": "float32"},
        })

    hf_recipe, v_recipe = recipe(tmp_path / "hf", "hf"), recipe(tmp_path / "vllm", "vllm")
    run_recipe(hf_recipe, only=["blocks", "capture"], progress=False)
    run_recipe(v_recipe, only=["blocks", "capture"], progress=False)
    assert len(fake_vllm.built) == 2  # one engine per model
    for name in ("target", "prose"):
        a, b = StoreReader(stage_dir(hf_recipe, "capture", name)), StoreReader(stage_dir(v_recipe, "capture", name))
        assert b.meta["backend"] == "vllm" and b.meta["model"] == a.meta["model"]
        assert b.block_ids == a.block_ids and len(a) > 3
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(y.ids, x.ids)
            assert y.nll_sum == pytest.approx(x.nll_sum, abs=1e-3 * max(1, x.n_positions))

    monkeypatch.setitem(sys.modules, "vllm", None)  # the stage names the extra before doing anything
    with pytest.raises(PolyfuseError, match=r"polyfuse\[vllm\]"):
        capture_stage(recipe(tmp_path / "none", "vllm"), progress=False)


def test_vllm_with_a_sampled_tail_is_a_recipe_error() -> None:
    from polyfuse.errors import RecipeError
    from polyfuse.recipe import parse_recipe

    with pytest.raises(RecipeError, match="capture: capture.samples needs the hf backend"):
        parse_recipe({"target": {"model": "world:target"}, "sources": [{"name": "a", "model": "world:prose"}],
                      "capture": {"backend": "vllm", "samples": 8}})

