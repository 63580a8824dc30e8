"""The sample stage: per-source parameters and templates, seeded batches, resume after a kill, records."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from polyfuse.corpus.chat import DEFAULT_CHAT_TEMPLATE
from polyfuse.errors import DataError, PolyfuseError
from polyfuse.generate import HFBackend, SamplingParams, SourceSpec, batch_seed, make_backend
from polyfuse.implicit.sample import partial_path, sample_prompts

PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"What is the first letter of: {' '.join('abcde'[i % 5:])}?",
            "answer": "abcde"[i % 5], "category": "math", "task": "first"} for i in range(5)]


class FakeBackend:
    """Deterministic stand-in: the response names the seed, the prompt and the sample index; counts calls."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[int] = []
        self.fail_after = fail_after

    def generate(self, prompts: Sequence[list[dict]], params: SamplingParams, seed: int) -> list[list[str]]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # a kill between two batches
        self.calls.append(seed)
        return [[f"{seed}|{p[-1]['content']}|{k}|{params.temperature}" for k in range(params.n)] for p in prompts]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_follow_each_source_params(tmp_path: Path) -> None:
    specs = [SourceSpec("a", "unused", SamplingParams(n=2, temperature=0.7)),
             SourceSpec("b", "unused", SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=7))]
    out = tmp_path / "samples.jsonl"
    stats = sample_prompts(PROMPTS, specs, out, batch_size=2, seed=5, progress=False,
                           backends={"a": FakeBackend(), "b": FakeBackend()})
    rows = read(out)
    assert stats["records"] == len(rows) == 5 * 2 + 5 * 3
    assert {tuple(sorted(r)) for r in rows} == {("answer", "category", "params", "prompt", "prompt_id", "response",
                                                 "sample_index", "source", "task")}
    by = {(r["prompt_id"], r["source"], r["sample_index"]): r for r in rows}
    assert len(by) == len(rows)
    assert by[("p0", "a", 1)]["params"] == {"n": 2, "temperature": 0.7, "top_p": 1.0, "repetition_penalty": 1.0,
                                            "max_new_tokens": 256, "seed": 5, "backend": "hf"}
    assert by[("p4", "b", 2)]["params"]["top_p"] == 0.9 and by[("p4", "b", 2)]["response"].endswith("|2|1.0")
    assert by[("p3", "a", 0)]["prompt"] == [{"role": "user", "content": PROMPTS[3]["prompt"]}]
    # batch b of source s has seed batch_seed(5, s, b): p2, p3 are the second batch
    assert by[("p3", "b", 0)]["response"].startswith(f"{batch_seed(5, 'b', 1)}|")
    assert not partial_path(out).exists()


def test_resume_after_a_kill_redoes_only_unfinished_batches(tmp_path: Path) -> None:
    specs = [SourceSpec("a", "unused", SamplingParams(n=2)), SourceSpec("b", "unused", SamplingParams(n=1))]
    whole = tmp_path / "whole.jsonl"
    sample_prompts(PROMPTS, specs, whole, batch_size=2, progress=False, backends={"a": FakeBackend(), "b": FakeBackend()})

    out = tmp_path / "resumed.jsonl"
    a, b = FakeBackend(), FakeBackend(fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        sample_prompts(PROMPTS, specs, out, batch_size=2, progress=False, backends={"a": a, "b": b})
    assert not out.exists() and len(read(partial_path(out))) == 5 * 2 + 2 * 1  # a done, b's first batch
    with partial_path(out).open("a") as f:
        f.write('{"prompt_id": "p2", "source": "b", "sam')  # a torn write of the next batch
    a2, b2 = FakeBackend(), FakeBackend()
    stats = sample_prompts(PROMPTS, specs, out, batch_size=2, progress=False, backends={"a": a2, "b": b2})
    assert a2.calls == [] and len(b2.calls) == 2  # only b's second and third batches run again
    assert stats["batches_skipped"] == 3 + 1 and stats["batches_done"] == 2
    assert out.read_text() == whole.read_text()  # same bytes as a run that was never interrupted
    # a rerun with other parameters for one source redoes only that source
    specs2 = [specs[0], SourceSpec("b", "unused", SamplingParams(n=1, temperature=0.5))]
    partial_path(out).write_text(out.read_text())
    a3, b3 = FakeBackend(), FakeBackend()
    sample_prompts(PROMPTS, specs2, out, batch_size=2, progress=False, backends={"a": a3, "b": b3})
    assert a3.calls == [] and len(b3.calls) == 3
    assert {r["params"]["temperature"] for r in read(out) if r["source"] == "b"} == {0.5}


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PolyfuseError, match="greedy"):
        SamplingParams(n=2, temperature=0)
    with pytest.raises(PolyfuseError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(DataError, match="prompt_id"):
        sample_prompts([{"prompt": "x"}], [SourceSpec("a", "m")], tmp_path / "o.jsonl", backends={"a": FakeBackend()})
    with pytest.raises(DataError, match="'p9'.*'prompt' must be"):
        sample_prompts([{"prompt_id": "p9", "prompt": [{"role": "user"}]}], [SourceSpec("a", "m")],
                       tmp_path / "o.jsonl", backends={"a": FakeBackend()})
    with pytest.raises(PolyfuseError, match="unique name"):
        sample_prompts(PROMPTS, [SourceSpec("a", "m"), SourceSpec("a", "n")], tmp_path / "o.jsonl")
    with pytest.raises(PolyfuseError, match="choose hf"):
        make_backend("tgi", SourceSpec("a", "m"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_says_how_to_install(tiny_world: Path) -> None:
    with pytest.raises(PolyfuseError, match="pip install vllm"):
        make_backend("vllm", SourceSpec("t", str(tiny_world / "models" / "target")))


# --------------------------------------------------------------------------------------------------
# the Hugging Face backend on the tiny world


@pytest.fixture(scope="module")
def hf(tiny_world: Path) -> HFBackend:
    return HFBackend(SourceSpec("target", str(tiny_world / "models" / "target")), device="cpu")


def test_hf_backend_uses_the_default_template_and_left_padding(hf: HFBackend) -> None:
    assert hf.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE and hf.tokenizer.padding_side == "left"
    ids = hf.encode([{"role": "user", "content": "Hi"}])
    assert hf.tokenizer.decode(ids).endswith("### Assistant:\n")
    msgs = [[{"role": "user", "content": p["prompt"]}] for p in PROMPTS]
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=6)
    batched = hf.generate(msgs, greedy, seed=0)
    alone = [hf.generate([m], greedy, seed=0)[0] for m in msgs]
    assert batched == alone  # left padding: a prompt's answer does not depend on its batch


def test_hf_sampling_is_seeded(hf: HFBackend, tmp_path: Path) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    msgs = [[{"role": "user", "content": p["prompt"]}] for p in PROMPTS[:2]]
    first = hf.generate(msgs, params, seed=11)
    assert first == hf.generate(msgs, params, seed=11)
    assert first != hf.generate(msgs, params, seed=12)
    assert all(len(r) == 3 for r in first)
    spec = SourceSpec("target", "unused", params)
    one = sample_prompts(PROMPTS, [spec], tmp_path / "a.jsonl", batch_size=2, progress=False, backends={"target": hf})
    sample_prompts(PROMPTS, [spec], tmp_path / "b.jsonl", batch_size=2, progress=False, backends={"target": hf})
    assert one["records"] == 15 and (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_vllm_backend_against_a_stand_in_of_its_api(tiny_world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM adapter (real vLLM needs a GPU): what it passes to ``LLM`` / ``LLM.chat`` and how it reads
    ``RequestOutput``s, through a stand-in module with vLLM's call shapes."""
    import sys
    import types

    calls: dict = {}

    class Completion:
        def __init__(self, text: str):
            self.text = text

    class Output:
        def __init__(self, texts: list[str]):
            self.outputs = [Completion(t) for t in texts]

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def chat(self, messages, sampling_params, *, chat_template=None, use_tqdm=True):
            calls["chat"] = {"messages": messages, "params": sampling_params, "template": chat_template}
            return [Output([f"  {m[-1]['content']} #{k} " for k in range(sampling_params.n)]) for m in messages]

    class VParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, VParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    model = tiny_world / "models" / "target"
    backend = make_backend("vllm", SourceSpec("t", str(model), chat_template=DEFAULT_CHAT_TEMPLATE), dtype="float32")
    assert calls["llm"]["model"] == str(model.resolve()) and calls["llm"]["dtype"] == "float32"
    prompts = [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    params = SamplingParams(n=2, temperature=0.7, top_p=0.8, repetition_penalty=1.05, max_new_tokens=9)
    got = backend.generate(prompts, params, seed=123)
    assert got == [["a? #0", "a? #1"], ["b? #0", "b? #1"]]  # one list per prompt, n each, stripped
    sent = calls["chat"]["params"].__dict__
    assert sent == {"n": 2, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05, "max_tokens": 9,
                    "seed": 123}
    assert calls["chat"]["messages"] == prompts and "Assistant" in calls["chat"]["template"]
