"""Scoring: input validation, reward models (chat template / text pair), verifiers, the content-hash cache."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch

from polyfuse.errors import DataError, ModelLoadError
from polyfuse.implicit.score import (
    RewardModel,
    ScoreCache,
    read_samples,
    score_file,
    score_samples,
)
from polyfuse.verify import registry as registry_mod
from polyfuse.verify.checkers import VerifierConfig
from polyfuse.verify.registry import category_of, read_prompts
from polyfuse.verify.sandbox import SandboxConfig

VERIFIER = VerifierConfig(sandbox=SandboxConfig(timeout_s=5))
CORPUS = ("What is 2 + 3 ? The answer is 5 . 6 7 boxed Write a function add that adds two numbers def "
          "return a b x y Tell me a story once upon time there was cat dog happy sad end assert check")
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}")


def make_tokenizer(chat: bool):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = sorted(set(re.findall(r"\w+|[^\w\s]", CORPUS)))
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    if chat:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
        fast.chat_template = CHAT_TEMPLATE
        return fast
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory) -> Path:
    """A tiny random LlamaForSequenceClassification (1 label) with a chat-template tokenizer, saved to disk."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tokenizer(chat=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1)
    path = tmp_path_factory.mktemp("rm") / "llama-rm"
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_rm():
    """A tiny random BertForSequenceClassification with 2 labels and a text-pair tokenizer (in memory)."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(chat=False)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64, num_labels=2,
                        id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})
    return BertForSequenceClassification(config).eval(), tok


PROMPTS = {
    "m1": {"prompt": "What is 2 + 3 ?", "answer": "5"},
    "c1": {"prompt": "Write a function add that adds two numbers", "tests": ["assert add(2, 3) == 5"],
           "entry_point": "add"},
    "o1": {"prompt": [{"role": "system", "content": "happy"}, {"role": "user", "content": "Tell me a story"}]},
}
RESPONSES = {
    "m1": ["The answer is 5 .", "The answer is 6 .", r"x = \boxed{5}"],
    "c1": ["```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"],
    "o1": ["once upon a time there was a cat", "the end", "dog happy"],
}


def sample_rows(with_gold: bool = True) -> list[dict]:
    rows = []
    for pid, responses in RESPONSES.items():
        for k, response in enumerate(responses):
            row = {"prompt_id": pid, "prompt": PROMPTS[pid]["prompt"], "source": f"src{k % 2}", "sample_index": k,
                   "response": response, "params": {"temperature": 0.8}}
            if with_gold:
                row.update({key: v for key, v in PROMPTS[pid].items() if key != "prompt"})
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingModel:
    """Wraps a RewardModel: counts scored pairs, and raises after ``fail_after`` calls (a simulated kill)."""

    def __init__(self, inner: RewardModel, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.scored = inner, fail_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, pairs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.scored += len(pairs)
        return self.inner.score(pairs)


# --------------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt_id": "p", "prompt": "q", "source": "s", "sample_index": 0, "params": {}}', r":3: missing field 'response'"),
    ('{"prompt_id": "p", "prompt": "q", "source": "s", "sample_index": "0", "response": "r", "params": {}}',
     r":3: field 'sample_index' must be int, got str"),
    ('{"prompt_id": "p", "prompt": [{"role": "user"}], "source": "s", "sample_index": 0, "response": "r", '
     '"params": {}}', r":3: field 'prompt' item 0"),
    ('{"prompt_id": "p", "prompt": "q", "source": "s", "sample_index": 0, "response": "r", "params": {}, '
     '"category": "poetry"}', r":3: field 'category' is 'poetry'"),
    ('{"prompt_id": "p", "prompt": "q",', r":3: not valid JSON"),
    ("[1, 2]", r":3: expected a JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, bad_line, message):
    rows = sample_rows()[:1]
    path = write_jsonl(tmp_path / "samples.jsonl", [rows[0], "", bad_line])
    with pytest.raises(DataError, match=re.escape(str(path)) + message):
        read_samples(path)


def test_missing_file_and_duplicate_prompt_ids(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_samples(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": "a"}, {"prompt_id": "a"}])
    with pytest.raises(DataError, match="prompt_id 'a' appears twice"):
        read_prompts(path)


def test_category_rules():
    assert category_of({"tests": ["assert 1"]}) == "code"
    assert category_of({"answer": "3"}) == "math"
    assert category_of({}) == "other"
    assert category_of({"answer": "3", "category": "other"}) == "other"


# --------------------------------------------------------------------------------------------------
# reward models


def test_chat_template_reward_model_batches_like_single_inputs(llama_rm):
    rm = RewardModel.load(str(llama_rm), device="cpu", batch_size=3)
    assert rm.uses_chat_template and rm.max_length == 128
    ids = rm.encode(PROMPTS["o1"]["prompt"], "the end")
    text = rm.tokenizer.decode(ids)
    assert text.startswith("<|system|>") and "<|assistant|>" in text and text.rstrip().endswith("</s>")
    pairs = [(r["prompt"], r["response"]) for r in sample_rows()]
    batched = rm.score(pairs)
    single = [rm.score([p])[0] for p in pairs]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) > 1  # a random head still tells responses apart


def test_long_inputs_keep_their_end(llama_rm):
    rm = RewardModel.load(str(llama_rm), device="cpu", max_length=16)
    ids = rm.encode("What is 2 + 3 ? " * 20, "The answer is 5 .")
    assert len(ids) == 16
    assert rm.tokenizer.decode(ids).rstrip().endswith("5 . </s>")
    assert len(rm.score([("What is 2 + 3 ? " * 20, "The answer is 5 .")])) == 1


def test_text_pair_reward_model_and_label_choice(bert_rm):
    model, tok = bert_rm
    with pytest.raises(ModelLoadError, match="has 2 labels .*set label"):
        RewardModel(model, tok, model_id="bert")
    with pytest.raises(ModelLoadError, match="no label 'great'"):
        RewardModel(model, tok, model_id="bert", label="great")
    rm = RewardModel(model, tok, model_id="bert", label="good", batch_size=2)
    assert rm.label_index == 1 and not rm.uses_chat_template
    ids = rm.encode("What is 2 + 3 ?", "The answer is 5 .")
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2
    pairs = [(r["prompt"], r["response"]) for r in sample_rows()]
    batched = rm.score(pairs)
    assert batched == pytest.approx([rm.score([p])[0] for p in pairs], abs=1e-5)
    with torch.inference_mode():
        direct = model(input_ids=torch.tensor([ids])).logits[0, 1].item()
    assert rm.score([("What is 2 + 3 ?", "The answer is 5 .")])[0] == pytest.approx(direct, abs=1e-5)


def test_not_a_sequence_classifier_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        RewardModel.load(str(tmp_path / "missing-model"))


# --------------------------------------------------------------------------------------------------
# scoring, cache, resume


def test_score_file_end_to_end_and_rerun_scores_nothing(tmp_path, llama_rm, monkeypatch):
    samples = write_jsonl(tmp_path / "samples.jsonl", sample_rows())
    out = tmp_path / "scored.jsonl"
    rm = CountingModel(RewardModel.load(str(llama_rm), device="cpu", batch_size=2))
    stats = score_file(samples, out, reward_model=rm, verifier=VERIFIER, workers=2, progress=False)
    rows = read_jsonl(out)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(r["prompt_id"], r["sample_index"])
                                                                   for r in sample_rows()]
    assert [r["category"] for r in rows] == ["math"] * 3 + ["code"] * 2 + ["other"] * 3
    assert [r["correct"] for r in rows] == [True, False, True, True, False, None, None, None]
    assert [r["verdict"] for r in rows] == ["match", "mismatch", "match", "passed", "failed", None, None, None]
    assert all(isinstance(r["reward"], float) for r in rows)
    assert rows[0]["params"] == {"temperature": 0.8} and rows[0]["answer"] == "5"
    assert stats.rewards_computed == 8 and stats.verdicts_computed == 5 and rm.scored == 8
    assert stats.correct == {"math": 2, "code": 1, "other": 0}
    assert (tmp_path / "scored.jsonl.cache.sqlite").is_file()

    def no_more_runs(*args, **kwargs):
        raise AssertionError("a cached verdict was computed again")

    monkeypatch.setattr(registry_mod, "verify_code", no_more_runs)
    monkeypatch.setattr(registry_mod, "verify_math", no_more_runs)
    rm2 = CountingModel(rm.inner)
    stats2 = score_file(samples, out, reward_model=rm2, verifier=VERIFIER, progress=False)
    assert rm2.scored == 0 and stats2.rewards_computed == 0 and stats2.verdicts_computed == 0
    assert stats2.rewards_cached == 8 and stats2.verdicts_cached == 5
    assert read_jsonl(out) == rows


def test_killed_run_resumes_from_committed_batches(tmp_path, llama_rm):
    rows = [{**r, "sample_index": 10 * i + r["sample_index"], "response": r["response"] + " " + "cat " * i}
            for i in range(3) for r in sample_rows(with_gold=False)]  # 24 distinct (prompt, response) pairs
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    inner = RewardModel.load(str(llama_rm), device="cpu", batch_size=2)  # 8 pairs per committed chunk
    killed = CountingModel(inner, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        score_file(samples, out, reward_model=killed, progress=False)
    assert killed.scored == 16 and not out.exists()
    with ScoreCache(tmp_path / "scored.jsonl.cache.sqlite") as cache:
        assert len(cache) == 16
    resumed = CountingModel(inner)
    stats = score_file(samples, out, reward_model=resumed, progress=False)
    assert resumed.scored == 8 and stats.rewards_cached == 16 and stats.rewards_computed == 8
    fresh, _ = score_samples(read_samples(samples), reward_model=inner)
    assert [r["reward"] for r in read_jsonl(out)] == pytest.approx([r["reward"] for r in fresh], abs=1e-6)


def test_cache_keys_follow_model_verifier_and_gold(tmp_path, llama_rm, bert_rm):
    rows = sample_rows()
    cache = ScoreCache(tmp_path / "cache.sqlite")
    rm = CountingModel(RewardModel.load(str(llama_rm), device="cpu"))
    score_samples(rows, reward_model=rm, cache=cache, verifier=VERIFIER)
    other = CountingModel(RewardModel(*bert_rm, model_id="bert", label=1))
    _, stats = score_samples(rows, reward_model=other, cache=cache, verifier=VERIFIER)
    assert other.scored == 8 and stats.verdicts_computed == 0  # new model: new rewards, same verdicts
    looser = VerifierConfig(rel_tol=1e-3, sandbox=VERIFIER.sandbox)
    _, stats = score_samples(rows, cache=cache, verifier=looser)
    assert stats.verdicts_computed == 5 and stats.rewards_computed == 0
    changed = [dict(r, answer="6") if r["prompt_id"] == "m1" else r for r in rows]
    scored, stats = score_samples(changed, cache=cache, verifier=VERIFIER)
    assert stats.verdicts_computed == 3 and [r["correct"] for r in scored[:3]] == [False, True, False]
    cache.close()


def test_duplicates_are_scored_once_and_gold_can_come_from_a_prompts_file(tmp_path, llama_rm):
    rows = sample_rows(with_gold=False)
    rows = rows + [dict(r, source="again") for r in rows]
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt_id": pid, **{k: v for k, v in p.items() if k != "prompt"}}
                           for pid, p in PROMPTS.items()])
    rm = CountingModel(RewardModel.load(str(llama_rm), device="cpu"))
    scored, stats = score_samples(rows, reward_model=rm, verifier=VERIFIER, prompts=read_prompts(prompts))
    assert rm.scored == 8 and stats.verdicts_computed == 5
    assert [r["correct"] for r in scored] == [True, False, True, True, False, None, None, None] * 2
    assert [r["reward"] for r in scored[:8]] == [r["reward"] for r in scored[8:]]


def test_without_reward_model_rewards_are_none(tmp_path):
    scored, stats = score_samples(sample_rows()[:3], verifier=VERIFIER)
    assert [r["reward"] for r in scored] == [None] * 3 and stats.rewards_computed == 0


def test_corrupt_cache_is_a_data_error(tmp_path):
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DataError, match="delete it"):
        ScoreCache(bad)


def test_cache_survives_reopen_and_is_shared(tmp_path):
    path = tmp_path / "c.sqlite"
    with ScoreCache(path) as a, ScoreCache(path) as b:
        a.put_many({"k1": 1.5, "k2": {"correct": True, "verdict": "passed"}})
        assert b.get_many(["k1", "k2", "k3"]) == {"k1": 1.5, "k2": {"correct": True, "verdict": "passed"}}
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 2
