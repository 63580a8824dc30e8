"""Chat templates' special markers: parsed as special tokens in chat blocks, text in plain blocks; the
end-of-turn marker belongs to the response (labels), and a source without the marker gives no top-k there.

The tokenizer is the tiny world's target plus ``<|im_start|>`` / ``<|im_end|>`` as special tokens and a
ChatML template (a Qwen-style chat model in miniature); the end-to-end test resizes the model to match.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from polyfuse.align.tokens import align_blocks
from polyfuse.align.transfer import aligned_source_positions, transfer_block
from polyfuse.align.vocab import vocab_map
from polyfuse.capture.store import BlockTopK, StoreReader
from polyfuse.corpus.blocks import make_blocks, read_blocks
from polyfuse.corpus.documents import (
    Document,
    extend_over_markers,
    read_documents,
    render_chat,
    render_key,
    special_strings,
)
from polyfuse.corpus.spans import IGNORE_INDEX, response_tokens
from polyfuse.corpus.tokens import encode_block, encode_blocks
from polyfuse.fuse.strategies import TeacherBlock, fuse_block
from polyfuse.fuse.trainer import training_row
from polyfuse.models import load_model, load_tokenizer

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}")
MARKERS = ("<|im_start|>", "<|im_end|>")
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "What is the first letter of: c a b?"},
    {"role": "assistant", "content": "The answer is c."},
]


def add_chatml(tok):
    """A copy of ``tok`` with the ChatML markers as special tokens and the ChatML template."""
    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def base_tok(tiny_world: Path):
    return load_tokenizer(str(tiny_world / "models" / "target"))


@pytest.fixture(scope="module")
def chat_tok(base_tok):
    tok = add_chatml(base_tok)
    assert all(tok.convert_tokens_to_ids(m) >= len(base_tok) for m in MARKERS)
    return tok


@pytest.fixture(scope="module")
def prose_tok(tiny_world: Path):
    tok = load_tokenizer(str(tiny_world / "models" / "prose"))
    assert not set(MARKERS) & set(special_strings(tok))     # a source without the chat markers
    return tok


def ids_of(tok) -> tuple[int, int]:
    return tuple(tok.convert_tokens_to_ids(m) for m in MARKERS)


def marker_positions(text: str, marker: str) -> list[tuple[int, int]]:
    out, at = [], text.find(marker)
    while at >= 0:
        out.append((at, at + len(marker)))
        at = text.find(marker, at + 1)
    return out


# ---- tokenization ------------------------------------------------------------------------------------


def test_chat_blocks_parse_markers_plain_blocks_keep_them_text(chat_tok, base_tok):
    text, _ = render_chat(CONVERSATION, chat_tok)
    start, end = ids_of(chat_tok)
    chat, plain = encode_blocks(chat_tok, [text, text], [True, False])
    for marker, mid in zip(MARKERS, (start, end), strict=True):
        where = np.nonzero(chat.ids == mid)[0]
        # one special id per marker, its offsets over the marker's characters
        assert [tuple(chat.offsets[i]) for i in where] == marker_positions(text, marker)
        assert all(text[a:b] == marker for a, b in chat.offsets[where].tolist())
    assert len(chat) < len(plain)
    # plain text: the marker strings stay text, token for token as a tokenizer without those specials
    assert not np.isin(plain.ids, [start, end]).any()
    ref = encode_block(base_tok, text)
    assert plain.ids.tolist() == ref.ids.tolist() and plain.offsets.tolist() == ref.offsets.tolist()
    # the default (no flag) is plain text; one flag for all; mixed batches keep their order
    assert encode_block(chat_tok, text).ids.tolist() == plain.ids.tolist()
    assert encode_block(chat_tok, text, parse_special=True).ids.tolist() == chat.ids.tolist()
    eos_text = "plain <|endoftext|> text"
    mixed = encode_blocks(chat_tok, [eos_text, text, eos_text], [False, True, False])
    assert [e.ids.tolist() for e in mixed] == [encode_block(chat_tok, eos_text).ids.tolist(), chat.ids.tolist(),
                                                encode_block(chat_tok, eos_text).ids.tolist()]
    assert chat_tok.eos_token_id not in mixed[0].ids[1:].tolist()    # "<|endoftext|>" in plain text is text
    assert chat_tok.eos_token_id in encode_block(chat_tok, eos_text, True).ids[1:].tolist()
    assert [e.ids.tolist() for e in encode_blocks(chat_tok, [text, text], True)] == [chat.ids.tolist()] * 2
    with pytest.raises(ValueError, match="2 flags for 1 texts"):
        encode_blocks(chat_tok, [text], [True, False])


# ---- response spans ----------------------------------------------------------------------------------


def test_response_span_takes_the_end_of_turn_marker(tmp_path, chat_tok, base_tok):
    text, spans = render_chat(CONVERSATION, chat_tok)
    assert text.startswith("<|im_start|>system\n")
    assert [text[a:b] for a, b in spans] == ["hi<|im_end|>", "The answer is c.<|im_end|>"]
    assert text[spans[0][1]:].startswith("\n<|im_start|>user")          # the next turn's markers stay out
    # a tokenizer without those specials: the same text, the contents alone
    plain_tok = copy.deepcopy(base_tok)
    plain_tok.chat_template = CHATML
    text2, spans2 = render_chat(CONVERSATION, plain_tok)
    assert text2 == text and [text[a:b] for a, b in spans2] == ["hi", "The answer is c."]
    # both row forms, read from a file
    path = tmp_path / "train" / "chat.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"id": "c", "messages": CONVERSATION}) + "\n", encoding="utf-8")
    (doc,) = read_documents(path, tokenizer=chat_tok)
    assert doc.response_spans == spans
    # the marker strings: specials and added special tokens, longest first, longest match wins
    strings = special_strings(chat_tok)
    assert set(MARKERS) | {chat_tok.eos_token} <= set(strings)
    assert [len(s) for s in strings] == sorted((len(s) for s in strings), reverse=True)
    assert extend_over_markers("ok<|eot_id|>x", ((0, 2),), ("<|eot_id|>", "<|eot")) == ((0, 12),)
    assert extend_over_markers("ok <|eot_id|>", ((0, 2),), ("<|eot_id|>",)) == ((0, 2),)  # not touching
    assert render_key().startswith("v2:")                               # stale blocks rerun


def test_labels_include_im_end_and_nothing_else_off_the_responses(chat_tok):
    text, spans = render_chat(CONVERSATION, chat_tok)
    start, end = ids_of(chat_tok)
    enc = encode_block(chat_tok, text, parse_special=True)
    labels = training_row(enc, spans)["labels"]
    kept = labels != IGNORE_INDEX
    assert labels[kept].tolist().count(end) == 2 and start not in labels.tolist()
    # supervised exactly: the answer tokens and the <|im_end|> right after each
    expected = [(a, b) for a, b in enc.offsets.tolist()
                if b > a and any(a < e and b > s for s, e in spans)]
    assert enc.offsets[kept].tolist() == [list(x) for x in expected]
    decoded = chat_tok.decode(labels[kept].tolist())
    assert decoded.replace(" ", "") == "hi<|im_end|>Theanswerisc.<|im_end|>"
    # every <|im_end|> that closes an answer is a label; the system's and users' are not
    im_end_rows = np.nonzero(enc.ids == end)[0]
    assert kept[im_end_rows].tolist() == [False, False, True, False, True]


# ---- alignment ---------------------------------------------------------------------------------------


def test_no_source_topk_at_the_position_predicting_im_end(chat_tok, prose_tok):
    text, _ = render_chat(CONVERSATION, chat_tok)
    start, end = ids_of(chat_tok)
    tgt = encode_block(chat_tok, text, parse_special=True)
    src = encode_block(prose_tok, text, parse_special=True)       # the source reads the markers as text
    predicting = np.isin(tgt.ids[1:], [start, end])               # position t predicts token t + 1
    assert predicting.sum() == 2 * 5                              # 5 turns, two markers each
    vmap = vocab_map(prose_tok, chat_tok, "exact")
    for method in ("offsets", "dtw"):
        al = align_blocks(src, tgt, method=method, src_tokenizer=prose_tok, tgt_tokenizer=chat_tok)
        pos = aligned_source_positions(al, src, tgt, vmap if method == "dtw" else None)
        assert (pos[predicting] == -1).all(), method
        assert (pos[~predicting] >= 0).sum() > 10, method          # the rest does transfer
    pos = aligned_source_positions(align_blocks(src, tgt), src, tgt)
    # a source top-k over every source position: the transfer leaves the marker positions empty
    n_src, k = len(src) - 1, 3
    rng = np.random.default_rng(0)
    lp = np.sort(np.log(rng.dirichlet(np.ones(k), n_src)), axis=1)[:, ::-1]
    src_top = BlockTopK(0, rng.integers(0, 200, (n_src, k)), lp.astype(np.float16),
                        lp[:, 0].astype(np.float16), 12.0)
    moved = transfer_block(src_top, pos, vmap, k)
    assert (moved.ids[predicting] == -1).all() and np.isnan(moved.target_logprob[predicting].astype(float)).all()
    # fusion (MinCE, token level): the target's own distribution there
    p = len(tgt) - 1
    own_ids = np.tile(np.arange(k), (p, 1)) + 300
    own_lp = np.log(np.full((p, k), 1 / k, dtype=np.float32))
    own = TeacherBlock(own_ids, own_lp, np.full(p, 50.0), np.ones(p, bool), 99.0)   # a poor target
    other = TeacherBlock(moved.ids, moved.logprobs.astype(np.float32),
                         -moved.target_logprob.astype(np.float64), ~np.isnan(moved.target_logprob), 12.0)
    fused = fuse_block([own, other], strategy="min_ce", level="token", k_out=k)
    assert (np.sort(fused.ids[predicting], axis=1) == own_ids[predicting]).all()
    assert not (np.sort(fused.ids[~predicting & (pos >= 0)], axis=1) >= 300).all()


def test_a_source_with_the_same_markers_transfers_them(chat_tok, prose_tok):
    text, _ = render_chat(CONVERSATION, chat_tok)
    src_tok = add_chatml(prose_tok)
    tgt = encode_block(chat_tok, text, parse_special=True)
    src = encode_block(src_tok, text, parse_special=True)
    pos = aligned_source_positions(align_blocks(src, tgt), src, tgt)
    at_end = np.nonzero(tgt.ids[1:] == ids_of(chat_tok)[1])[0]
    assert (pos[at_end] >= 0).all()                                # identical spans: one to one
    assert (src.ids[pos[at_end] + 1] == ids_of(src_tok)[1]).all()
    assert vocab_map(src_tok, chat_tok, "exact")(np.array(ids_of(src_tok))).tolist() == list(ids_of(chat_tok))


def test_blocks_count_markers_as_one_token(chat_tok, prose_tok):
    turns = []
    for i in range(10):
        turns += [{"role": "user", "content": f"Question {i}: the first letter of: a b c?"},
                  {"role": "assistant", "content": f"The answer is a, number {i}."}]
    text, spans = render_chat(turns, chat_tok)
    blocks = list(make_blocks([("chat", Document("c", text, spans))], [chat_tok, prose_tok], 40))
    assert len(blocks) > 2
    for b in blocks:
        for tok in (chat_tok, prose_tok):
            assert len(encode_block(tok, b.text, parse_special=True)) <= 40
    # a conversation that fits as one chat block would not fit counted as text (about 6 tokens per marker)
    short, short_spans = render_chat(CONVERSATION, chat_tok)
    n = len(encode_block(chat_tok, short, parse_special=True))
    assert len(encode_block(chat_tok, short)) > n
    assert len(list(make_blocks([("chat", Document("c", short, short_spans))], [chat_tok], n))) == 1
    assert len(list(make_blocks([("text", Document("t", short))], [chat_tok], n))) > 1


# ---- end to end --------------------------------------------------------------------------------------


def chat_target(tiny_world: Path, root: Path) -> Path:
    """The world's target with the ChatML specials (embeddings resized) and template, saved to ``root``."""
    shutil.copytree(tiny_world / "models" / "target", root)
    tok = add_chatml(load_tokenizer(str(root)))
    model = load_model(str(root), device="cpu")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_chatml_recipe_end_to_end(tmp_path, tiny_world):
    from polyfuse.fuse.trainer import FusionCollator
    from polyfuse.recipe import parse_recipe
    from polyfuse.stages import run_recipe, stage_dir
    from polyfuse.stages.fusion import _train_rows

    model_dir = chat_target(tiny_world, tmp_path / "chat-target")
    tok = load_tokenizer(str(model_dir))
    start, end = ids_of(tok)
    rows = []
    for i in range(16):
        messages = [{"role": "user", "content": f"What is {i} plus one?"},
                    {"role": "assistant", "content": f"The answer is {i + 1}."}]
        rows.append({"id": f"c{i}", **({"messages": messages} if i % 2 else
                                       {"conversations": [{"from": "human" if m["role"] == "user" else "gpt",
                                                           "value": m["content"]} for m in messages]})})
    corpus = tmp_path / "chat" / "train" / "tasks.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = {"workdir": str(tmp_path / "run"), "world": str(tiny_world),
            "target": {"model": str(model_dir)},
            "sources": [{"name": "prose", "model": "world:prose"}, {"name": "math", "model": "world:math"}],
            "corpus": {"path": str(tmp_path / "chat")},
            "blocks": {"max_tokens": 96}, "capture": {"top_k": 4},
            "train": {"max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0}}
    recipe = parse_recipe(data)
    results = run_recipe(recipe, only=["blocks", "capture", "vocab", "align", "fuse", "train"], progress=False)
    assert {"train/fused", "train/clm"} <= set(results)

    blocks = read_blocks(stage_dir(recipe, "blocks") / "blocks.jsonl")
    assert len(blocks) == 16
    assert all(b.text[a:e].endswith("<|im_end|>") for b in blocks for a, e in b.response_spans)
    own = StoreReader(stage_dir(recipe, "capture", recipe.target.name))
    aligned = {n: StoreReader(stage_dir(recipe, "align", n)) for n in ("prose", "math")}
    fused = StoreReader(stage_dir(recipe, "fuse"))
    train = _train_rows(recipe, stage_dir(recipe, "fuse"))
    batch = FusionCollator(pad_token_id=0)(train[:4])
    for i, b in enumerate(blocks):
        enc = encode_block(tok, b.text, parse_special=True)
        assert (enc.ids == end).sum() == 2 and (enc.ids == start).sum() == 2
        assert own[b.block_id].n_positions == len(enc) - 1          # capture tokenized the markers as specials
        labels = train[i]["labels"]
        assert train[i]["input_ids"].tolist() == enc.ids.tolist()
        assert labels[labels != IGNORE_INDEX].tolist() == enc.ids[response_tokens(enc.offsets,
                                                                                   b.response_spans)].tolist()
        assert labels[labels != IGNORE_INDEX][-1] == end                # the answer ends with its marker
        assert labels.tolist().count(end) == 1 and start not in labels.tolist()
        if i < 4:
            n = len(enc)
            assert batch["labels"][i, :n].tolist() == labels.tolist()
        t = int(np.nonzero(enc.ids[1:] == end)[0][-1])               # the position predicting the answer's end
        for reader in aligned.values():
            row = reader[b.block_id]
            assert np.isnan(float(row.target_logprob[t])) and (row.ids[t] == -1).all()
            assert (~np.isnan(row.target_logprob.astype(float))).sum() > 3
        mine, out = own[b.block_id], fused[b.block_id]
        assert set(out.ids[t][out.ids[t] >= 0].tolist()) <= set(mine.ids[t].tolist())
