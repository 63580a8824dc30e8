"""Chat corpora through explicit fusion: rendering, response spans, blocks, capture metric, labels, end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polyfuse.capture.hf import capture
from polyfuse.capture.store import StoreReader
from polyfuse.corpus.blocks import Block, make_blocks, read_blocks, write_blocks
from polyfuse.corpus.documents import Document, read_documents, render_chat
from polyfuse.corpus.spans import (
    IGNORE_INDEX,
    clip_spans,
    locate_responses,
    response_labels,
    response_positions,
    response_tokens,
)
from polyfuse.corpus.tokens import encode_block, encode_blocks
from polyfuse.errors import DataError
from polyfuse.fuse.losses import fusion_loss
from polyfuse.fuse.trainer import FusionCollator, training_row
from polyfuse.models import load_model, load_tokenizer

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}")
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "What is the first letter of: c a b?"},
    {"role": "assistant", "content": "The answer is c."},
]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(messages: list[dict]) -> list[dict]:
    return [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in messages]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hand_response_tokens(offsets: np.ndarray, spans) -> list[bool]:
    """The token rule written out token by token: a non-empty token overlapping a response span."""
    return [bool(e > s and any(s < b and e > a for a, b in spans)) for s, e in offsets.tolist()]


@pytest.fixture(scope="module")
def target_tok(tiny_world: Path):
    tok = load_tokenizer(str(tiny_world / "models" / "target"))
    assert not tok.chat_template  # the world's target has no template: polyfuse's default is used
    return tok


@pytest.fixture(scope="module")
def chatml_tok(target_tok):
    tok = copy.deepcopy(target_tok)
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def target(tiny_world: Path):
    return load_model(str(tiny_world / "models" / "target"), device="cpu")


# ---- rendering and spans ----------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_both_forms_render_to_the_same_text_with_response_spans(tmp_path, target_tok, chatml_tok, template):
    tok = target_tok if template == "default" else chatml_tok
    path = write_jsonl(tmp_path / "train" / "chat.jsonl", [
        {"id": "m", "messages": CONVERSATION},
        {"id": "s", "conversations": sharegpt(CONVERSATION)},
        {"id": "t", "text": "plain text"},
    ])
    m, s, t = read_documents(path, tokenizer=tok)
    assert m.text == s.text and m.response_spans == s.response_spans
    # the default template ends an answer with the EOS string, a special token: the span takes it (render v2)
    end = tok.eos_token if template == "default" else ""
    assert [m.text[a:b] for a, b in m.response_spans] == ["hi" + end, "The answer is c." + end]
    assert "Say hi" in m.text and "Answer briefly." in m.text
    # "hi" of the first answer, not the "hi" inside the user's "Say hi" before it
    assert m.response_spans[0][0] > m.text.index("Say hi") + len("Say hi") - 1
    assert (t.text, t.response_spans) == ("plain text", None)
    if template == "chatml":
        assert m.text.startswith("<|im_start|>system\n")                 # the BOS string is not kept
        assert m.text == tok.apply_chat_template(CONVERSATION, tokenize=False)[len(tok.bos_token):]
    else:
        assert m.text.startswith("### System:\nAnswer briefly.\n\n### User:\nSay hi")


def test_a_template_that_rewrites_answers_fails_naming_the_row(tmp_path, target_tok):
    tok = copy.deepcopy(target_tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    path = write_jsonl(tmp_path / "train" / "chat.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "HI"}, {"role": "assistant", "content": "OK"}]},
        {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]},
    ])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: assistant turn 1 \('fine'\) is not in the text"):
        list(read_documents(path, tokenizer=tok))
    with pytest.raises(DataError, match="not in the text"):
        locate_responses("user: x", [("user", "x"), ("assistant", "y")], "here")
    # a template that trims answers is accepted: the stripped content is found
    assert locate_responses("A: ok\n", [("assistant", " ok \n")], "here") == ((3, 5),)


def test_format_option_and_bad_rows(tmp_path, target_tok):
    chat = {"id": "c", "messages": CONVERSATION}
    path = write_jsonl(tmp_path / "train" / "mixed.jsonl", [chat, {"id": "t", "text": "x"}])
    assert [d.response_spans is None for d in read_documents(path, tokenizer=target_tok)] == [False, True]
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: corpus.format is chat"):
        list(read_documents(path, format="chat", tokenizer=target_tok))
    with pytest.raises(DataError, match=r"mixed\.jsonl:1: no 'text' key"):
        list(read_documents(path, format="text", tokenizer=target_tok))
    with pytest.raises(DataError, match=r"mixed\.jsonl:1: a chat row needs the target tokenizer"):
        list(read_documents(path))
    bad = write_jsonl(tmp_path / "train" / "bad.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: conversations\[0\] must be \{'from': one of"):
        list(read_documents(bad, tokenizer=target_tok))


def test_token_rule():
    offsets = np.array([[0, 0], [0, 2], [2, 5], [5, 8], [8, 12]])       # <bos> "Q:" " hi" "\nA:" " yes"
    assert response_tokens(offsets, ((9, 12),)).tolist() == [False, False, False, False, True]
    assert response_tokens(offsets, ((8, 9),)).tolist() == [False, False, False, False, True]
    assert response_tokens(offsets, ((5, 5),)).tolist() == [False] * 5   # an empty span covers nothing
    assert response_tokens(offsets, ()).tolist() == [False] * 5
    assert response_tokens(offsets, None).all()
    assert response_tokens(np.array([[0, 0], [0, 3], [3, 3], [3, 6]]), ((1, 5),)).tolist() == [False, True, False, True]


# ---- blocks ------------------------------------------------------------------------------------------


def test_blocks_carry_clipped_spans(tmp_path, target_tok, tiny_world):
    prose = load_tokenizer(str(tiny_world / "models" / "prose"))
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"Question {i}: what is the first letter of: a b c d?"},
                  {"role": "assistant", "content": f"The answer is a, and this is answer number {i}."}]
    text, spans = render_chat(turns, target_tok)
    doc = Document("c", text, spans)
    # 40 tokens: some cut falls inside an answer (the EOS after each answer is one special token)
    blocks = list(make_blocks([("chat", doc), ("prose", Document("p", "plain " * 40))], [target_tok, prose], 40))
    chat_blocks = [b for b in blocks if b.domain == "chat"]
    assert len(chat_blocks) > 3
    covered = set()
    for b in chat_blocks:
        assert b.text == text[b.start:b.end]
        assert b.response_spans == clip_spans(spans, b.start, b.end)
        for a, e in b.response_spans:
            assert 0 <= a < e <= len(b.text)
            covered |= set(range(b.start + a, b.start + e))
    assert covered == {c for a, e in spans for c in range(a, e)}          # the clipped spans tile the responses
    assert any(a < b.end < e for b in chat_blocks for a, e in spans)    # some cut falls inside an answer
    assert all(b.response_spans is None for b in blocks if b.domain == "prose")
    write_blocks(tmp_path / "blocks.jsonl", blocks)
    rows = [json.loads(line) for line in (tmp_path / "blocks.jsonl").read_text().splitlines()]
    assert all("response_spans" not in r for r in rows if r["domain"] == "prose")   # text rows as before
    assert read_blocks(tmp_path / "blocks.jsonl") == blocks
    assert clip_spans(((2, 10), (12, 20)), 5, 14) == ((0, 5), (7, 9))
    with pytest.raises(DataError, match="past the block"):
        Block(0, "d", "x", 0, 3, "abc", ((1, 4),))


# ---- capture -----------------------------------------------------------------------------------------


def test_capture_metric_counts_response_positions_only(tmp_path, target, target_tok):
    text, spans = render_chat(CONVERSATION, target_tok)
    cut = spans[0][1] - 1                                   # a block ending inside the first answer
    blocks = [(0, text, spans), (1, text[:cut], clip_spans(spans, 0, cut)), (2, text, None),
              (3, text[:spans[0][0]], ())]                  # the prompt alone: no response token
    capture(target, target_tok, blocks, tmp_path / "store", k=4, batch_size=2, progress=False)
    reader = StoreReader(tmp_path / "store")
    encoded = encode_blocks(target_tok, [b[1] for b in blocks], [b[2] is not None for b in blocks])
    for (block_id, _, block_spans), enc in zip(blocks, encoded, strict=True):
        row = reader[block_id]
        assert row.n_positions == len(enc) - 1              # top-k rows are kept at every position
        ids = torch.as_tensor(enc.ids)[None]
        with torch.no_grad():
            nll = -target(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        if block_spans is None:
            keep = [True] * (len(enc) - 1)
        else:
            keep = hand_response_tokens(enc.offsets, block_spans)[1:]
        expected = float(nll.numpy().astype(np.float64)[np.asarray(keep, dtype=bool)].sum())
        assert row.nll_sum == pytest.approx(expected, rel=1e-4, abs=1e-4)
        if block_spans:
            assert 0 < sum(keep) < len(keep)
    assert reader[3].nll_sum == 0.0 and reader[0].nll_sum < reader[2].nll_sum
    # the spans are part of the blocks digest a store records
    capture(target, target_tok, [(0, text, None)], tmp_path / "plain", k=4, progress=False)
    assert StoreReader(tmp_path / "plain").meta["blocks_sha256"] != reader.meta["blocks_sha256"]


# ---- training ----------------------------------------------------------------------------------------


def test_training_labels_are_masked_off_the_responses(target_tok):
    text, spans = render_chat(CONVERSATION, target_tok)
    texts = [text, text[: spans[1][0] + 5], "plain text block"]
    block_spans = [spans, clip_spans(spans, 0, len(texts[1])), None]
    encoded = encode_blocks(target_tok, texts, [s is not None for s in block_spans])
    rows = [training_row(enc, s) for enc, s in zip(encoded, block_spans, strict=True)]
    assert "labels" not in rows[2]
    batch = FusionCollator(pad_token_id=0)(rows)
    for i, (enc, s) in enumerate(zip(encoded, block_spans, strict=True)):
        n = len(enc)
        keep = hand_response_tokens(enc.offsets, s) if s is not None else [True] * n
        expected = [int(x) if k else IGNORE_INDEX for x, k in zip(enc.ids, keep, strict=True)]
        assert batch["labels"][i, :n].tolist() == expected
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["shift_labels"][i, : n - 1].ne(IGNORE_INDEX).tolist() == list(response_positions(enc, s))
    assert (response_labels(encoded[0], spans) == batch["labels"][0, : len(encoded[0])].numpy()).all()

    # both loss parts count exactly the response positions
    torch.manual_seed(0)
    b, t = batch["input_ids"].shape
    v = len(target_tok)
    logits = torch.randn(b, t, v)
    teacher_ids = torch.randint(0, v, (b, t, 3))
    teacher_lp = torch.log_softmax(torch.randn(b, t, 3), -1)
    parts = fusion_loss(logits, batch["labels"], teacher_ids, teacher_lp, shifted_labels=batch["shift_labels"])
    mask = batch["shift_labels"] != IGNORE_INDEX
    assert parts.count == parts.distill_count == mask.sum()
    nll = -torch.log_softmax(logits, -1).gather(-1, batch["shift_labels"].clamp(min=0)[..., None])[..., 0]
    assert parts.clm.item() == pytest.approx(nll[mask].mean().item(), rel=1e-5)
    # a batch without a single response token: 0, not NaN (num_items 0 from the Trainer's count)
    none = batch["labels"].clone().fill_(IGNORE_INDEX)
    empty = fusion_loss(logits, none, teacher_ids, teacher_lp, num_items=torch.tensor(0))
    assert empty.clm.item() == 0.0 and empty.distill.item() == 0.0


# ---- end to end --------------------------------------------------------------------------------------


def chat_corpus(root: Path) -> Path:
    from polyfuse.demo.tasks import generate_problems

    rows = []
    for task in ("first", "count"):
        for p in generate_problems(task, 12, "train", seed=0):
            messages = [*p["prompt"], {"role": "assistant", "content": p["response"]}]
            form = {"messages": messages} if len(rows) % 2 else {"conversations": sharegpt(messages)}
            rows.append({"id": p["prompt_id"], **form})
    write_jsonl(root / "train" / "tasks.jsonl", rows)
    return root


def test_chat_recipe_end_to_end(tmp_path, tiny_world, target_tok):
    from polyfuse.recipe import parse_recipe
    from polyfuse.stages import run_recipe, stage_dir
    from polyfuse.stages.fusion import _train_rows

    data = {"workdir": str(tmp_path / "run"), "world": str(tiny_world),
            "target": {"model": "world:target"},
            "sources": [{"name": "prose", "model": "world:prose"}, {"name": "math", "model": "world:math"}],
            "corpus": {"path": str(chat_corpus(tmp_path / "chat"))},
            "blocks": {"max_tokens": 96}, "capture": {"top_k": 4},
            "train": {"max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0}}
    recipe = parse_recipe(data)
    stages = ["blocks", "capture", "vocab", "align", "fuse", "train"]
    results = run_recipe(recipe, only=stages, progress=False)
    assert {"train/fused", "train/clm"} <= set(results)

    blocks = read_blocks(stage_dir(recipe, "blocks") / "blocks.jsonl")
    assert len(blocks) == 24 and all(b.response_spans for b in blocks)
    assert all(b.text[a:b_].startswith("The answer is") for b in blocks for a, b_ in b.response_spans)
    own = StoreReader(stage_dir(recipe, "capture", "target"))
    for b in blocks[:5]:                                    # the stored metric covers the answer only
        enc = encode_block(target_tok, b.text, parse_special=True)
        row = own[b.block_id]
        keep = response_positions(enc, b.response_spans)
        assert row.n_positions == len(enc) - 1
        assert row.nll_sum == pytest.approx(-row.target_logprob.astype(np.float64)[keep].sum(), rel=2e-3)
        assert row.nll_sum < -row.target_logprob.astype(np.float64).sum()

    rows = _train_rows(recipe, stage_dir(recipe, "fuse"))
    batch = FusionCollator(pad_token_id=0)(rows[:4])
    for i, b in enumerate(blocks[:4]):
        enc = encode_block(target_tok, b.text, parse_special=True)
        supervised = batch["shift_labels"][i, : len(enc) - 1].ne(IGNORE_INDEX).numpy()
        assert (supervised == response_positions(enc, b.response_spans)).all() and 0 < supervised.sum() < len(enc) - 1
    assert "teacher_ids" in batch

    # a format change makes the blocks (and so everything after them) stale; text refuses chat rows
    again = run_recipe(parse_recipe(data, ["corpus.format=chat"]), only=["blocks"], progress=False)
    assert not again["blocks"].skipped
    with pytest.raises(DataError, match=r"tasks\.jsonl:1: no 'text' key"):
        run_recipe(parse_recipe(data, ["corpus.format=text"]), only=["blocks"], progress=False)
