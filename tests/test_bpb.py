"""Bits per byte: hand-computed references, windowing, batching invariance, byte counting, data loading."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import json
import math
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from polyfuse.errors import DataError
from polyfuse.evaluate import (
    BpbResult,
    Window,
    bits_per_byte,
    evaluate_bpb,
    format_bpb_table,
    load_domain_texts,
    plan_windows,
    score_token_windows,
)

VOCAB_ROWS = 320  # embedding rows, padded beyond the 300-token tokenizer
SHORT_TEXTS = [
    "Hello world.",
    "def f(x):\n    return x + 1\n",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Naïve café — 🙂 déjà vu",
]


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


def make_tokenizer(special: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (300 tokens with <s>, </s>) trained on the stdlib's pydoc topics."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"] if special else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(topics.values())[:40], trainer)
    if special:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_model(seed: int = 0, max_positions: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_ROWS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_model()


@pytest.fixture(scope="module")
def long_texts() -> list[str]:
    """Documents of varied length, several far longer than a 32-token window."""
    values = list(topics.values())
    return [values[i][: 80 + 170 * (i % 5)] for i in range(50, 62)] + SHORT_TEXTS


def plain_nll_nats(model: LlamaForCausalLM, seq: list[int]) -> torch.Tensor:
    """Reference: one unbatched forward over the whole sequence, manual float64 log-softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()  # [T, V]
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # [T, V]
    return -logprobs[:-1].gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)  # [T - 1]


# ---- plan_windows ------------------------------------------------------------------------------


def test_plan_windows_docstring_example() -> None:
    assert plan_windows(10, 4, 2) == [
        Window(0, 4, 0),
        Window(2, 6, 2),
        Window(4, 8, 2),
        Window(6, 9, 2),
    ]
    assert plan_windows(10, 4, 4) == [Window(0, 4, 0), Window(4, 8, 0), Window(8, 9, 0)]


@pytest.mark.parametrize(
    ("n", "max_length", "stride", "expected"),
    [
        (0, 4, 4, []),
        (1, 4, 4, []),  # context token only: nothing to score
        (2, 4, 4, [Window(0, 1, 0)]),
        (5, 4, 4, [Window(0, 4, 0)]),  # exactly one full window
        (6, 4, 4, [Window(0, 4, 0), Window(4, 5, 0)]),
        (6, 4, 1, [Window(0, 4, 0), Window(1, 5, 3)]),
        (3, 1, 1, [Window(0, 1, 0), Window(1, 2, 0)]),
    ],
)
def test_plan_windows_cases(n: int, max_length: int, stride: int, expected: list[Window]) -> None:
    assert plan_windows(n, max_length, stride) == expected


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 8])
def test_plan_windows_scores_every_target_once(max_length: int) -> None:
    for stride in range(1, max_length + 1):
        for n in range(0, 40):
            windows = plan_windows(n, max_length, stride)
            scored = [
                t for w in windows for t in range(w.start + 1 + w.score_from, w.end + 1)
            ]  # target indices into seq
            assert scored == list(range(1, n)), (n, max_length, stride)
            for i, w in enumerate(windows):
                assert w.start == i * stride
                assert 1 <= w.length <= max_length
                assert 0 <= w.score_from < w.length
                if i > 0:  # later windows keep at least L - S + 1 tokens of context
                    assert w.score_from + 1 >= min(max_length - stride + 1, w.length)


def test_plan_windows_rejects_bad_stride() -> None:
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 0)
    with pytest.raises(ValueError, match="max_length"):
        plan_windows(10, 0, 1)


# ---- hand-computed references ------------------------------------------------------------------


def test_bpb_matches_plain_forward(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    bos = tokenizer.bos_token_id
    nats, n_tokens = 0.0, 0
    for text in SHORT_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) + 1 <= 64  # fits the model's context: one window per document
        nats += float(plain_nll_nats(model, [bos, *ids]).sum())
        n_tokens += len(ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in SHORT_TEXTS)

    result = bits_per_byte(model, tokenizer, SHORT_TEXTS, batch_size=3)
    assert result.n_tokens == n_tokens
    assert result.n_bytes == n_bytes
    assert result.nll_bits == pytest.approx(nats / math.log(2), rel=1e-6)
    assert result.bpb == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


def test_uniform_model_gives_log2_vocab_bits_per_token(tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1 / 320 for every token, padded rows included
    texts = ["Uniform predictions everywhere.", "ünïcödé 🙂", "x = [i for i in range(10)]"]
    result = bits_per_byte(model, tokenizer, texts, max_length=8)
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result.n_tokens == n_tokens
    # exact up to float32 rounding of logsumexp(0, ..., 0) = log(320)
    assert result.bpb == pytest.approx(n_tokens * math.log2(VOCAB_ROWS) / n_bytes, rel=1e-6)


def test_stride_one_gives_every_target_full_context(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    """With stride 1, target t > L is predicted from exactly s[t - L : t] (naive reference below)."""
    max_length = 6
    text = "Sliding windows score each token once."
    seq = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    expected = []
    for t in range(1, len(seq)):
        ctx = seq[max(0, t - max_length) : t]
        expected.append(plain_nll_nats(model, [*ctx, seq[t]])[-1])
    (got,) = score_token_windows(model, [seq], max_length=max_length, stride=1, batch_size=4)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_one_document_equals_its_windows_as_documents(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    text = list(topics.values())[60][:600]
    seq = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    max_length = 16
    assert len(seq) > 4 * max_length
    (whole,) = score_token_windows(model, [seq], max_length=max_length, batch_size=4)
    # Window k sees seq[16k : 16k + 16] and predicts seq[16k + 1 : 16k + 17]: the same as a
    # "document" seq[16k : 16k + 17] whose first token is its context.
    pieces = [seq[b : b + max_length + 1] for b in range(0, len(seq) - 1, max_length)]
    parts = score_token_windows(model, pieces, max_length=max_length, batch_size=3)
    assert whole.shape == (len(seq) - 1,)
    assert [len(p) for p in parts] == [len(p) - 1 for p in pieces]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=1e-6)
    assert bool((whole > 0).all())


# ---- batching invariance -----------------------------------------------------------------------


@pytest.mark.parametrize("stride", [32, 20])
def test_batch_size_does_not_change_bpb(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, long_texts: list[str], stride: int
) -> None:
    one = bits_per_byte(model, tokenizer, long_texts, batch_size=1, max_length=32, stride=stride)
    eight = bits_per_byte(model, tokenizer, long_texts, batch_size=8, max_length=32, stride=stride)
    assert one.n_tokens == eight.n_tokens > 32 * 4
    assert one.n_bytes == eight.n_bytes
    assert abs(one.bpb - eight.bpb) < 1e-4
    assert one.bpb == pytest.approx(eight.bpb, rel=1e-5)


def test_per_token_scores_do_not_depend_on_batching(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, long_texts: list[str]
) -> None:
    seqs = [
        [tokenizer.bos_token_id, *ids] for ids in tokenizer(long_texts, add_special_tokens=False)["input_ids"]
    ]
    one = score_token_windows(model, seqs, max_length=24, stride=16, batch_size=1)
    many = score_token_windows(model, seqs, max_length=24, stride=16, batch_size=7)
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_default_max_length_is_model_context(
    tokenizer: PreTrainedTokenizerFast, long_texts: list[str]
) -> None:
    model = make_model(max_positions=40)
    assert bits_per_byte(model, tokenizer, long_texts).nll_bits == pytest.approx(
        bits_per_byte(model, tokenizer, long_texts, max_length=40).nll_bits, rel=1e-9
    )


def test_training_mode_is_restored_and_progress_bar_runs(
    tokenizer: PreTrainedTokenizerFast, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model().train()
    bits_per_byte(model, tokenizer, SHORT_TEXTS, progress=True)
    assert model.training


# ---- byte counting -----------------------------------------------------------------------------


def test_non_ascii_bytes_are_counted(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    text = "Crème brûlée, señor! 🙂🚀 naïve"
    result = bits_per_byte(model, tokenizer, [text])
    assert result.n_bytes == len(text.encode("utf-8")) == 40
    assert result.n_bytes > len(text)
    assert result.n_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_without_context_token_first_token_and_its_bytes_are_dropped(model: LlamaForCausalLM) -> None:
    tokenizer = make_tokenizer(special=False)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    texts = ["🙂 hello world", "Hello again, world."]
    result = bits_per_byte(model, tokenizer, texts)

    first = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids = first["input_ids"]
    assert first["offset_mapping"][0][0] == (0, 1)  # first token lies inside the emoji
    first_token_bytes = [4, len(texts[1][: first["offset_mapping"][1][0][1]].encode())]
    assert result.n_bytes == sum(len(t.encode()) for t in texts) - sum(first_token_bytes)
    assert result.n_tokens == sum(len(x) - 1 for x in ids)
    nats = sum(float(plain_nll_nats(model, x).sum()) for x in ids)
    assert result.nll_bits == pytest.approx(nats / math.log(2), rel=1e-6)


def test_empty_texts_and_result_pooling(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    assert bits_per_byte(model, tokenizer, []) == BpbResult(0.0, 0, 0)
    assert math.isnan(BpbResult(0.0, 0, 0).bpb)
    a = bits_per_byte(model, tokenizer, SHORT_TEXTS[:2])
    b = bits_per_byte(model, tokenizer, ["", *SHORT_TEXTS[2:]])
    both = bits_per_byte(model, tokenizer, SHORT_TEXTS)
    pooled = a + b
    assert (pooled.n_bytes, pooled.n_tokens) == (both.n_bytes, both.n_tokens)
    assert pooled.bpb == pytest.approx(both.bpb, rel=1e-6)


# ---- evaluate_bpb / table ----------------------------------------------------------------------


def test_evaluate_bpb_pools_domains_and_loads_lazily(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    data = {"prose": SHORT_TEXTS[:3], "code": ["import os\nprint(os.getcwd())\n", "x = 1"]}
    other = make_model(seed=1)
    calls = []

    def load() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
        calls.append("b")
        return other, tokenizer

    results = evaluate_bpb([("a", model, tokenizer), ("b", load)], data, max_length=16)
    assert calls == ["b"]
    assert list(results) == ["a", "b"]
    for name, m in [("a", model), ("b", other)]:
        per = {d: bits_per_byte(m, tokenizer, texts, max_length=16) for d, texts in data.items()}
        bpb = results[name]["bpb"]
        assert list(bpb) == ["prose", "code", "all"]
        for d in data:
            assert bpb[d] == pytest.approx(per[d].bpb, rel=1e-9)
        pooled = (per["prose"].nll_bits + per["code"].nll_bits) / (per["prose"].n_bytes + per["code"].n_bytes)
        assert bpb["all"] == pytest.approx(pooled, rel=1e-9)
        assert bpb["all"] != pytest.approx((bpb["prose"] + bpb["code"]) / 2, rel=1e-6)  # pooled, not a mean
        assert results[name]["n_bytes"]["all"] == per["prose"].n_bytes + per["code"].n_bytes

    with pytest.raises(DataError, match="reserved"):
        evaluate_bpb([("a", model, tokenizer)], {"all": ["x"]})


def test_format_bpb_table_marks_best_per_column() -> None:
    results = {
        "src": {"bpb": {"prose": 1.5, "code": 0.9, "all": 1.2}},
        "fused": {"bpb": {"prose": 1.25, "code": 1.1, "all": 1.15}},
    }
    table = format_bpb_table(results)
    assert [c.header for c in table.columns] == ["model", "prose", "code", "all"]
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["model"] == ["src", "fused"]
    assert cells["prose"] == ["1.5000", "[bold]1.2500[/bold]"]
    assert cells["code"] == ["[bold]0.9000[/bold]", "1.1000"]
    assert cells["all"] == ["1.2000", "[bold]1.1500[/bold]"]


def test_format_table_of_accuracy_bolds_the_highest_and_skips_rows_without_it() -> None:
    results = {
        "t": {"accuracy": {"first": 0.25, "all": 0.5}, "bpb": {"all": 3.0}},
        "t+sft": {"accuracy": {"first": 0.75, "all": 0.25}},
        "src": {"bpb": {"all": 2.0}},
    }
    table = format_bpb_table(results, metric="accuracy", digits=3, lower_is_better=False, title="acc")
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["model"] == ["t", "t+sft"]
    assert cells["first"] == ["0.250", "[bold]0.750[/bold]"]
    assert cells["all"] == ["[bold]0.500[/bold]", "0.250"]


# ---- load_domain_texts -------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


def test_load_domain_texts_reads_domains(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "heldout" / "prose.jsonl", [{"id": "p1", "text": "one"}, "", {"id": "p2", "text": "two"}]
    )
    write_jsonl(tmp_path / "heldout" / "code.jsonl", [{"id": "c1", "text": "x = 1"}])
    write_jsonl(tmp_path / "train" / "prose.jsonl", [{"id": "t", "text": "train"}])
    assert load_domain_texts(tmp_path) == {"code": ["x = 1"], "prose": ["one", "two"]}
    assert load_domain_texts(tmp_path, domains=["prose"]) == {"prose": ["one", "two"]}
    assert load_domain_texts(tmp_path, split="train") == {"prose": ["train"]}


def test_load_domain_texts_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        load_domain_texts(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    write_jsonl(tmp_path / "train" / "prose.jsonl", [{"id": "t", "text": "train"}])
    with pytest.raises(DataError, match="splits found: train") as err:
        load_domain_texts(tmp_path)
    assert str(tmp_path / "heldout") in str(err.value)
    with pytest.raises(DataError, match="domains found: prose"):
        load_domain_texts(tmp_path, split="train", domains=["code"])


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ('{"id": "x", "text": ', "not valid JSON"),
        ({"id": "x", "body": "hi"}, "no 'text' key"),
        ({"id": "x", "text": 3}, "'text' is a int"),
        (["hi"], "a list"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path: Path, bad: object, why: str) -> None:
    path = tmp_path / "heldout" / "prose.jsonl"
    write_jsonl(path, [{"id": "a", "text": "fine"}, {"id": "b", "text": "fine"}, bad])
    with pytest.raises(DataError) as err:
        load_domain_texts(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ")
    assert why in msg
    assert '{"id": "doc-1", "text": "..."}' in msg


def test_max_bytes_keeps_whole_documents_then_cuts_at_a_character(tmp_path: Path) -> None:
    docs = ["aaaa", "bbbb", "cc🙂dd", "never read"]
    write_jsonl(tmp_path / "heldout" / "prose.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(docs)])
    load = lambda cap: load_domain_texts(tmp_path, max_bytes_per_domain=cap)["prose"]  # noqa: E731
    assert load(8) == ["aaaa", "bbbb"]
    assert load(10) == ["aaaa", "bbbb", "cc"]
    assert load(11) == ["aaaa", "bbbb", "cc"]  # the 4-byte emoji does not fit: dropped whole
    assert load(14) == ["aaaa", "bbbb", "cc🙂"]
    assert load(9) == ["aaaa", "bbbb", "c"]
    assert load(None) == docs
    for cap in range(0, 30):
        assert sum(len(t.encode()) for t in load(cap)) <= cap
