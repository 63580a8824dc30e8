"""Transfer of source top-k to target positions: the worked example, duplicate summing (B10), no
one-hot on the current token (B1), DTW acceptance through the vocabulary map."""

from __future__ import annotations

import numpy as np
import pytest

from polyfuse.align.tokens import align_offsets
from polyfuse.align.transfer import TransferStats, aligned_source_positions, transfer_block
from polyfuse.align.vocab import VocabMap
from polyfuse.capture.store import BlockTopK
from polyfuse.corpus.tokens import EncodedBlock

# text " unbelievable!" ; target keeps the word whole, the source splits it in three.
TGT = EncodedBlock(ids=np.array([0, 7, 8]), offsets=np.array([[0, 0], [0, 13], [13, 14]]), has_context=True)
SRC = EncodedBlock(ids=np.array([0, 1, 2, 3, 4]),
                   offsets=np.array([[0, 0], [0, 3], [3, 9], [9, 13], [13, 14]]), has_context=True)


def _vmap(src_to_tgt: list[int], n_tgt: int = 10) -> VocabMap:
    return VocabMap(src_to_tgt=np.array(src_to_tgt), kind=np.ones(len(src_to_tgt), dtype=np.uint8),
                    method="exact", n_tgt=n_tgt)


def _topk(ids: list[list[int]], probs: list[list[float]], target_lp: list[float], nll: float = 5.0) -> BlockTopK:
    lp = np.log(np.array(probs, dtype=np.float32)).astype(np.float16)
    return BlockTopK(block_id=3, ids=np.array(ids), logprobs=lp,
                     target_logprob=np.array(target_lp, dtype=np.float16), nll_sum=nll)


def test_worked_example_positions() -> None:
    alignment = align_offsets(SRC.offsets, TGT.offsets)
    pos = aligned_source_positions(alignment, SRC, TGT)
    # t=0 predicts " unbelievable" (one-to-many: no transfer); t=1 predicts "!" ← source position 3
    assert pos.tolist() == [-1, 3]


def test_transfer_maps_ids_and_sums_duplicates() -> None:
    # source ids 4 and 5 both map to target id 8 ("!" written two ways): their mass is summed (B10)
    vmap = _vmap([0, -1, -1, -1, 8, 8, 9])
    src = _topk(ids=[[1, 2, 3]] * 3 + [[4, 5, 6]], probs=[[0.5, 0.3, 0.2]] * 3 + [[0.5, 0.3, 0.1]],
                target_lp=[-1.0, -1.0, -1.0, -0.7])
    out = transfer_block(src, np.array([-1, 3]), vmap, k=3)
    assert out.ids.shape == (2, 3) and out.block_id == 3 and out.nll_sum == 5.0
    assert out.ids[1].tolist() == [8, 9, -1]
    np.testing.assert_allclose(np.exp(out.logprobs[1, :2].astype(np.float32)), [0.8, 0.1], rtol=2e-3)
    assert np.isneginf(out.logprobs[1, 2])
    assert float(out.target_logprob[1]) == np.float16(-0.7)


def test_invalid_position_gets_no_one_hot_on_the_current_token() -> None:
    """B1: the reference emits a one-hot on the *current* token where alignment fails; we emit nothing."""
    vmap = _vmap([0, 7, 7, 7, 8])
    src = _topk(ids=[[1, 2, 3]] * 4, probs=[[0.5, 0.3, 0.2]] * 4, target_lp=[-1.0] * 4)
    out = transfer_block(src, np.array([-1, 3]), vmap, k=3)
    assert out.ids[0].tolist() == [-1, -1, -1]
    assert np.isnan(float(out.target_logprob[0]))
    assert TGT.ids[0] not in out.ids[0]  # never the current token


def test_unmapped_entries_dropped_and_topk_truncated() -> None:
    vmap = _vmap([0, 1, 2, -1, 4], n_tgt=6)
    src = _topk(ids=[[4, 3, 2, 1]], probs=[[0.4, 0.3, 0.2, 0.1]], target_lp=[-0.9])
    out = transfer_block(src, np.array([0]), vmap, k=2)
    assert out.ids[0].tolist() == [4, 2]  # id 3 has no target id; top-2 of the rest


def test_dtw_pairs_must_be_accepted_by_the_map() -> None:
    from polyfuse.align.tokens import Alignment

    # a 1-1 DTW pair whose tokens differ in text is rejected unless the map sends one to the other
    alignment = Alignment.from_lists([[0], [4]], n_src=5)  # target 1 ↔ source 4 ... but target has 2 tokens
    tgt = EncodedBlock(ids=np.array([0, 8]), offsets=np.array([[0, 0], [0, 1]]), has_context=True)
    assert aligned_source_positions(alignment, SRC, tgt, _vmap([0, 1, 2, 3, 8])).tolist() == [3]
    assert aligned_source_positions(alignment, SRC, tgt, _vmap([0, 1, 2, 3, 9])).tolist() == [-1]


def test_transfer_stats() -> None:
    """Coverage, the stored and mapped mass, and the projected probability of the actual next token."""
    vmap = _vmap([0, -1, -1, -1, 8, 8, -1])
    src = _topk(ids=[[1, 2, 3]] * 3 + [[4, 5, 6]], probs=[[0.5, 0.3, 0.2]] * 3 + [[0.5, 0.3, 0.1]],
                target_lp=[-1.0, -1.0, -1.0, float(np.log(0.8))])
    pos = np.array([-1, 3])
    out = transfer_block(src, pos, vmap, k=3)
    stats = TransferStats()
    stats.add(src, pos, out, next_ids=np.array([7, 8]))
    d = stats.as_dict()
    assert d["positions"] == 2 and d["aligned_positions"] == 1 and d["coverage"] == 0.5
    assert d["stored_mass"] == pytest.approx(0.9, rel=2e-3)        # the source's 3 entries hold 0.9
    assert d["mapped_mass"] == pytest.approx(0.8 / 0.9, rel=2e-3)  # id 6 (0.1) has no target id
    assert d["actual_ratio"] == pytest.approx(1.0, rel=2e-3)      # target id 8 gets 0.5 + 0.3 = p(text)


def test_shared_starts_pair_next_tokens_that_begin_at_the_same_character() -> None:
    """" unbelievable!": the target's next token " unbelievable" starts where the source's " un" does."""
    from polyfuse.align.transfer import shared_start_positions

    assert shared_start_positions(SRC, TGT).tolist() == [0, 3]  # one-to-one alignment gives [-1, 3]
    # byte-fallback pieces of one character share its offsets: only the first of them is a start
    src = EncodedBlock(ids=np.array([0, 1, 2, 3]), offsets=np.array([[0, 0], [0, 1], [0, 1], [1, 2]]),
                       has_context=True)
    tgt = EncodedBlock(ids=np.array([0, 5, 6]), offsets=np.array([[0, 0], [0, 1], [1, 2]]), has_context=True)
    assert shared_start_positions(src, tgt).tolist() == [0, 2]
    tgt_cut = EncodedBlock(ids=np.array([0, 5, 6]), offsets=np.array([[0, 0], [0, 2], [2, 2]]), has_context=True)
    assert shared_start_positions(src, tgt_cut).tolist() == [0, -1]  # no source token starts at 2


def _inside_world():
    """Text "end.\\nok": the source glues ".\\n" (as the tiny world's twin does), the target cuts "." | "\\n"."""
    from polyfuse.align.normalize import TokenTable

    src_table = TokenTable([None, b"end", b".\n", b"ok", b". ", b"x", b".\nok"], {}, {}, np.zeros(7, bool))
    tgt_table = TokenTable([None, b"end", b".", b"\n", b" ", b"ok"], {}, {}, np.zeros(6, bool))
    src = EncodedBlock(ids=np.array([0, 1, 2, 3]), offsets=np.array([[0, 0], [0, 3], [3, 5], [5, 7]]),
                       has_context=True)
    tgt = EncodedBlock(ids=np.array([0, 1, 2, 3, 5]),
                       offsets=np.array([[0, 0], [0, 3], [3, 4], [4, 5], [5, 7]]), has_context=True)
    return src_table, tgt_table, src, tgt


def test_inside_token_entries_condition_on_the_emitted_bytes() -> None:
    """After the target emitted ".", the twin's ".\\n" (0.6) and ". " (0.3) say what follows; "x" is not
    consistent with "." and is dropped; ".\\nok" (0.05) leaves "\\nok", which the target begins with "\\n"."""
    from polyfuse.align.transfer import RemainderMap, inside_token_entries, shared_start_positions

    src_table, tgt_table, src, tgt = _inside_world()
    pos = shared_start_positions(src, tgt)
    assert pos.tolist() == [0, 1, -1, 2]                    # t = 2 predicts "\n", inside the source's ".\n"
    row = _topk(ids=[[1, 5, 4, 6]] * 3 + [[3, 5, 4, 6]], probs=[[0.5, 0.3, 0.1, 0.1]] * 3 + [[0.6, 0.1, 0.2, 0.1]],
                target_lp=[-0.7, float(np.log(0.6)), -0.5, -0.4])
    row.ids[1] = [2, 4, 5, 6]
    row.logprobs[1] = np.log(np.array([0.6, 0.3, 0.05, 0.05], dtype=np.float32)).astype(np.float16)
    inside = inside_token_entries(row, src, tgt, "end.\nok", src_table, RemainderMap(tgt_table), pos)
    assert inside.positions.tolist() == [2]
    got = dict(zip(inside.ids.tolist(), inside.probs.tolist(), strict=False))
    assert set(inside.ids.tolist()) == {3, 4} and inside.rows.tolist() == [2, 2, 2]
    mass = 0.6 + 0.3 + 0.05
    np.testing.assert_allclose(sum(p for i, p in zip(inside.ids, inside.probs, strict=True) if i == 3),
                               0.65 / mass, rtol=2e-3)
    assert got[4] == pytest.approx(0.3 / mass, rel=2e-3)
    assert float(inside.target_logprob[0]) == pytest.approx(np.log(0.6 / mass), rel=2e-3)

    out = transfer_block(row, pos, _vmap([0, 1, 2, -1, 4, -1, -1], n_tgt=6), k=3, inside=inside)
    assert out.ids[2].tolist() == [3, 4, -1]                 # the two candidates summed into "\n", then " "
    np.testing.assert_allclose(np.exp(out.logprobs[2, :2].astype(np.float32)), [0.65 / mass, 0.3 / mass], rtol=3e-3)
    assert out.ids[1].tolist()[:2] == [2, 4]                # the shared start keeps its own mapping
    stats = TransferStats()
    stats.add(row, pos, out, tgt.ids[1:], inside)
    assert stats.as_dict()["inside_positions"] == 1 and stats.as_dict()["coverage"] == 1.0


def test_inside_token_entries_add_the_actual_token_and_skip_what_they_cannot_read() -> None:
    from polyfuse.align.transfer import RemainderMap, inside_token_entries, shared_start_positions

    src_table, tgt_table, src, tgt = _inside_world()
    pos = shared_start_positions(src, tgt)
    # the stored entries miss the actual ".\n" (p = 0.6 from target_logprob): it is added
    row = _topk(ids=[[4, 5]] * 4, probs=[[0.3, 0.1]] * 4, target_lp=[-0.7, float(np.log(0.6)), -0.5, -0.4])
    inside = inside_token_entries(row, src, tgt, "end.\nok", src_table, RemainderMap(tgt_table), pos)
    assert sorted(zip(inside.ids.tolist(), np.round(inside.probs, 3).tolist(), strict=True)) == [(3, round(0.6 / 0.9, 3)),
                                                                                  (4, round(0.3 / 0.9, 3))]
    # a source token whose bytes do not end with the text after the cut (a special) teaches nothing
    special = _with_special(src_table, 2)
    assert inside_token_entries(row, src, tgt, "end.\nok", special, RemainderMap(tgt_table), pos).positions.size == 0
    # positions reached by a shared start are never taught twice
    assert inside_token_entries(row, src, tgt, "end.\nok", src_table, RemainderMap(tgt_table),
                                np.zeros(4, dtype=np.int64)).positions.size == 0


def _with_special(table, token_id: int):
    """``table`` with ``token_id`` made a special token (no bytes)."""
    from polyfuse.align.normalize import TokenTable

    pieces = list(table.pieces)
    pieces[token_id] = None
    return TokenTable(pieces, {}, {token_id: "<x>"}, table.byte_fallback)


@pytest.fixture(scope="module")
def indent_tokenizer():
    """A byte-level BPE trained on indented code: it learns newline-plus-spaces tokens, as GPT-2's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "def f(x):\n    if x:\n        return x\n    return 1\n" * 50
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_target_cuts_drop_continuations_the_target_would_have_merged(indent_tokenizer) -> None:
    """After the target's "\\n   " a fourth space cannot follow (the target would have emitted "\\n    ")."""
    from polyfuse.align.transfer import TargetCuts

    enc = indent_tokenizer("\n    if", add_special_tokens=False, return_offsets_mapping=True)
    assert enc["offset_mapping"][0] == (0, 4)                  # the target's "\n   " then " if"
    cuts = TargetCuts(indent_tokenizer)
    got = cuts([("\n   ", b" "), ("\n   ", b" if"), ("", b" "), ("\n   ", b"\xe2")])
    assert got.tolist() == [False, True, True, True]           # no previous token, partial UTF-8: kept


def test_consistent_entries_renormalise_what_the_target_cut_allows(indent_tokenizer) -> None:
    """The source (one token per space) says " " 0.5, " if" 0.3, " return" 0.2 after three spaces; the
    target emitted "\\n   ", so only " if" and " return" remain: 0.6 and 0.4."""
    from polyfuse.align.normalize import TokenTable
    from polyfuse.align.transfer import TargetCuts, consistent_entries, shared_start_positions

    text = "\n    if"
    src_table = TokenTable([None, b"\n", b" ", b" if", b" return"], {}, {}, np.zeros(5, bool))
    src = EncodedBlock(ids=np.array([0, 1, 2, 2, 2, 3]),
                       offsets=np.array([[0, 0], [0, 1], [1, 2], [2, 3], [3, 4], [4, 7]]), has_context=True)
    enc = indent_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tgt = EncodedBlock(ids=np.array([0, *enc["input_ids"]]), offsets=np.array([[0, 0], *enc["offset_mapping"]]),
                       has_context=True)
    pos = shared_start_positions(src, tgt)
    assert pos.tolist() == [0, 4]                              # " if" starts where the source's " if" does
    row = _topk(ids=[[2, 3, 4]] * 5, probs=[[0.5, 0.3, 0.2]] * 5, target_lp=[float(np.log(0.3))] * 5)
    keep = consistent_entries(row, pos, src, tgt, text, src_table, TargetCuts(indent_tokenizer))
    assert keep[1].tolist() == [False, True, True]
    n_tgt = len(indent_tokenizer)
    vmap = _vmap([0, 0, 1, 2, 3], n_tgt=n_tgt)
    out = transfer_block(row, pos, vmap, k=3, keep=keep)
    assert out.ids[1].tolist() == [2, 3, -1]
    np.testing.assert_allclose(np.exp(out.logprobs[1, :2].astype(np.float32)), [0.6, 0.4], rtol=3e-3)
    assert float(out.target_logprob[1]) == pytest.approx(np.log(0.6), abs=3e-3)   # renormalised with them


def test_consistent_entries_match_the_pairwise_rule_on_random_entries(indent_tokenizer) -> None:
    """The vectorised path gives, entry by entry, what asking :class:`TargetCuts` one pair at a time gives."""
    from polyfuse.align.normalize import token_table
    from polyfuse.align.transfer import TargetCuts, consistent_entries

    text = "def f(x):\n    if x:\n        return 1\n    return 2\n"
    enc = indent_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tgt = EncodedBlock(ids=np.array([0, *enc["input_ids"]]), offsets=np.array([[0, 0], *enc["offset_mapping"]]),
                       has_context=True)
    src, table = tgt, token_table(indent_tokenizer)              # the source is cut like the target
    rng = np.random.default_rng(0)
    n, k = len(tgt.ids) - 1, 12
    ids = rng.integers(-1, len(table), size=(n, k))
    ids[:, 0] = src.ids[1:]                                      # the actual next token is always kept
    row = BlockTopK(block_id=0, ids=ids, logprobs=np.full((n, k), -3.0, np.float16),
                    target_logprob=np.zeros(n, np.float16), nll_sum=1.0)
    pos = np.arange(n)
    pos[::5] = -1                                                # some target positions have no source position
    got = consistent_entries(row, pos, src, tgt, text, table, TargetCuts(indent_tokenizer))
    one = TargetCuts(indent_tokenizer)
    for t in range(n):
        prev = text[int(tgt.offsets[t, 0]):int(tgt.offsets[t + 1, 0])]
        for e, v in enumerate(ids[t].tolist()):
            piece = table.pieces[v] if 0 <= v < len(table) else None
            if pos[t] < 0:
                want = False
            elif v == src.ids[t + 1]:
                want = True
            elif piece is None or not prev:
                want = v >= 0
            else:
                want = bool(one([(prev, piece)])[0])
            assert got[t, e] == want, (t, e, prev, piece)
    assert (~got[pos >= 0]).any() and got[pos >= 0].any()       # the rule both keeps and drops here


def test_a_target_special_is_not_taught_from_source_text() -> None:
    """"ok<|im_end|>": the target's marker is one special token, the source spells it "<", "|im_end|>"."""
    from polyfuse.align.normalize import TokenTable
    from polyfuse.align.transfer import (
        RemainderMap,
        drop_special_mismatches,
        inside_token_entries,
        shared_start_positions,
    )

    text = "ok<|im_end|>"
    src_table = TokenTable([None, b"ok", b"<", b"|im_end|>", b"o"], {}, {}, np.zeros(5, bool))
    tgt_table = TokenTable([None, b"ok", None, b"<"], {}, {2: "<|im_end|>"}, np.zeros(4, bool))
    src = EncodedBlock(ids=np.array([0, 1, 2, 3]), offsets=np.array([[0, 0], [0, 2], [2, 3], [3, 12]]),
                       has_context=True)
    tgt = EncodedBlock(ids=np.array([0, 1, 2]), offsets=np.array([[0, 0], [0, 2], [2, 12]]), has_context=True)
    pos = shared_start_positions(src, tgt)
    assert pos.tolist() == [0, 1]                            # the marker starts where the source's "<" does
    assert drop_special_mismatches(pos, src, tgt, src_table, tgt_table).tolist() == [0, -1]
    glued = EncodedBlock(ids=np.array([0, 4, 3]), offsets=np.array([[0, 0], [0, 1], [1, 12]]), has_context=True)
    row = _topk(ids=[[4, 3]] * 2, probs=[[0.5, 0.5]] * 2, target_lp=[-0.7, -0.7])
    src_table_glued = TokenTable([None, b"ok", b"<", b"k<|im_end|>", b"o"], {}, {}, np.zeros(5, bool))
    inside = inside_token_entries(row, glued, tgt, text, src_table_glued, RemainderMap(tgt_table),
                                  np.array([0, -1]))
    assert inside.positions.size == 0                        # nor from inside a source token


def test_span_nll_scores_the_text_of_the_target_token() -> None:
    """The source's token NLLs, spread over their characters, summed over each target token's text:
    the three pieces of " unbelievable" add up; a source token longer than the target's is split."""
    from polyfuse.align.transfer import span_nll

    lp = np.log([0.5, 0.25, 0.8, 0.1])  # source tokens " un", "believ", "able", "!"
    got = span_nll(_topk([[1]] * 4, [[1.0]] * 4, lp.tolist()), SRC, TGT)
    assert got == pytest.approx([-lp[:3].sum(), -lp[3]], rel=1e-3)
    # the other way round: the target is the one that splits (" un" + "believable!" ← source whole word)
    fine = EncodedBlock(ids=np.array([0, 1, 2]), offsets=np.array([[0, 0], [0, 3], [3, 14]]), has_context=True)
    whole = EncodedBlock(ids=np.array([0, 5]), offsets=np.array([[0, 0], [0, 14]]), has_context=True)
    got = span_nll(_topk([[5]], [[1.0]], [float(np.log(0.2))]), whole, fine)
    assert got == pytest.approx([-np.log(0.2) * 3 / 14, -np.log(0.2) * 11 / 14], rel=1e-3)


def test_span_nll_is_nan_where_the_source_covers_no_text() -> None:
    from polyfuse.align.transfer import span_nll

    gap = EncodedBlock(ids=np.array([0, 1]), offsets=np.array([[0, 0], [0, 13]]), has_context=True)  # no "!"
    got = span_nll(_topk([[1]], [[1.0]], [float(np.log(0.5))]), gap, TGT)
    assert got[0] == pytest.approx(np.log(2), rel=1e-3) and np.isnan(got[1])
