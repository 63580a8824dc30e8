"""Token normal form (bytes) and vocabulary maps: exact, MinED, statistics; reference bugs B3 and B5."""

from __future__ import annotations

import doctest
import time
from pathlib import Path

import numpy as np
import pytest
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

import polyfuse.align.normalize as normalize_mod
import polyfuse.align.vocab as vocab_mod
from conftest import LLAMA2_FILE
from polyfuse.align import (
    Alignment,
    MapKind,
    PairCounts,
    TokenTable,
    VocabMap,
    count_aligned_pairs,
    exact_map,
    mined_map,
    prefix_map,
    special_roles,
    stats_map,
    token_bytes,
    token_table,
    token_texts,
    vocab_map,
)
from polyfuse.corpus.tokens import encode_blocks
from polyfuse.errors import DataError


@pytest.fixture(scope="module")
def world_toks(tiny_world: Path) -> dict[str, PreTrainedTokenizerFast]:
    return {name: AutoTokenizer.from_pretrained(tiny_world / "models" / name)
            for name in ("prose", "code", "math", "target")}


def _table(pieces: list[bytes | None], roles: dict[str, int] | None = None,
           special: dict[int, str] | None = None, fallback: list[int] = ()) -> TokenTable:
    mask = np.zeros(len(pieces), dtype=bool)
    mask[list(fallback)] = True
    return TokenTable(pieces, roles or {}, special or {}, mask)


# -- normal form ------------------------------------------------------------------------------------

def test_docstring_examples(gpt2: GPT2TokenizerFast, llama2: PreTrainedTokenizerFast) -> None:
    for mod in (normalize_mod, vocab_mod):
        result = doctest.testmod(mod, extraglobs={"gpt2": gpt2, "llama": llama2, "np": np})
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_byte_level_glyphs(gpt2: GPT2TokenizerFast) -> None:
    pieces = token_bytes(gpt2)
    assert len(pieces) == len(gpt2) == 50257
    vocab = gpt2.get_vocab()
    assert pieces[vocab["Ġthe"]] == b" the"
    assert pieces[vocab["Ċ"]] == b"\n" and pieces[vocab["ĉ"]] == b"\t"
    assert pieces[vocab["Ã©"]] == "é".encode()
    assert pieces[vocab["ðŁĺ"]] == b"\xf0\x9f\x98"  # a partial UTF-8 sequence stays raw bytes
    assert pieces[vocab["<|endoftext|>"]] is None
    assert sum(p is None for p in pieces) == 1


def test_metaspace_and_byte_fallback(llama2: PreTrainedTokenizerFast) -> None:
    table = token_table(llama2)
    vocab = llama2.get_vocab()
    assert table.pieces[vocab["▁the"]] == b" the"
    assert table.pieces[vocab["<0x0A>"]] == b"\n" and table.pieces[vocab["<0xF0>"]] == b"\xf0"
    assert table.pieces[vocab["▁"]] == b" "
    assert [table.pieces[i] for i in (0, 1, 2)] == [None, None, None]  # <unk> <s> </s>
    assert table.special == {0: "<unk>", 1: "<s>", 2: "</s>"}
    assert int(table.byte_fallback.sum()) == 256 and table.byte_fallback[vocab["<0x41>"]]


def test_roles_read_from_the_tokenizer(gpt2: GPT2TokenizerFast) -> None:
    assert special_roles(gpt2) == {"bos": 50256, "eos": 50256, "unk": 50256}
    bare = PreTrainedTokenizerFast(tokenizer_file=str(LLAMA2_FILE)) if LLAMA2_FILE.is_file() else None
    if bare is not None:  # no bos/eos attributes set: only the model's unk piece is known
        assert special_roles(bare) == {"unk": 0}


def test_tiny_world_kinds(world_toks: dict[str, PreTrainedTokenizerFast]) -> None:
    text = "héllo 😀  x\n\tfoo = 3.5"
    for name, tok in world_toks.items():
        table = token_table(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined = b"".join(table.pieces[i] for i in ids)  # type: ignore[misc]
        assert joined in (text.encode(), b" " + text.encode()), name  # metaspace may prepend a space
        roles = special_roles(tok)
        assert roles.get("eos") == tok.eos_token_id and all(table.pieces[i] is None for i in roles.values())
    assert not token_table(world_toks["prose"]).byte_fallback.any()
    assert token_table(world_toks["math"]).byte_fallback.sum() == 256


def test_non_special_added_tokens_are_text(tmp_path: Path) -> None:
    """GPT-NeoX style added tokens for runs of spaces are literal text, not specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "Ġ": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken("   ", normalized=False)])
    tok.add_special_tokens(["<|eos|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    assert token_bytes(hf) == [b"a", b" ", b"   ", None]


def test_token_texts(gpt2: GPT2TokenizerFast) -> None:
    ids = gpt2("a 😀", add_special_tokens=False)["input_ids"]
    assert token_texts(gpt2, [50256, *ids]) == ["", "a", " \ufffd", "\ufffd"]
    table = token_table(gpt2)
    assert token_texts(table, [198, 220]) == ["\n", " "]


# -- exact and mined maps ---------------------------------------------------------------------------

def test_exact_map_specials_by_role() -> None:
    src = _table([None, b" the", b"\n", b"zz", None], roles={"bos": 0, "eos": 0, "pad": 4},
                 special={0: "<|endoftext|>", 4: "<pad>"})
    tgt = _table([None, None, b"\n", b" the", b"A", b"A"], roles={"bos": 0, "eos": 1},
                 special={0: "<s>", 1: "</s>"}, fallback=[4])
    m = exact_map(src, tgt)
    # <|endoftext|> (bos+eos) → eos first; <pad> has no target role or content match
    assert m.src_to_tgt.tolist() == [1, 3, 2, -1, -1]
    assert m.kind.tolist() == [MapKind.SPECIAL, MapKind.EXACT, MapKind.EXACT, MapKind.NONE, MapKind.NONE]
    # the regular piece wins over the <0xNN> byte-fallback piece with the same bytes
    assert exact_map(_table([b"A"]), tgt).src_to_tgt.tolist() == [5]


def test_specials_by_content_without_role() -> None:
    src = _table([None, b"x"], special={0: "<|im_start|>"})
    tgt = _table([b"x", None], special={1: "<|im_start|>"})
    assert exact_map(src, tgt).src_to_tgt.tolist() == [1, 0]


def test_b5_newline_and_space_match_across_kinds(gpt2: GPT2TokenizerFast, llama2: PreTrainedTokenizerFast) -> None:
    """Spec §6 B5: GPT-2 ``Ċ``/``Ġ`` and Llama-2 ``<0x0A>``/``▁`` are the same tokens by bytes."""
    g, ll = gpt2.get_vocab(), llama2.get_vocab()
    g2l, l2g = exact_map(gpt2, llama2), exact_map(llama2, gpt2)
    assert g2l.src_to_tgt[g["Ċ"]] == ll["<0x0A>"] and g2l.kind[g["Ċ"]] == MapKind.EXACT
    assert g2l.src_to_tgt[g["Ġ"]] == ll["▁"]
    assert g2l.src_to_tgt[g["Ġthe"]] == ll["▁the"]
    assert l2g.src_to_tgt[ll["<0x0A>"]] == g["Ċ"] and l2g.src_to_tgt[ll["▁"]] == g["Ġ"]
    assert l2g.src_to_tgt[ll["<0x09>"]] == g["ĉ"]
    assert g2l.src_to_tgt[50256] == llama2.eos_token_id  # <|endoftext|> → </s>
    assert l2g.src_to_tgt[llama2.bos_token_id] == 50256


def test_b3_mined_maps_to_the_real_nearest_neighbour(world_toks: dict[str, PreTrainedTokenizerFast]) -> None:
    """Spec §6 B3: FuseChat's ``soft`` map sent every non-exact token to id 0; ours finds the argmin."""
    src, tgt = token_table(world_toks["code"]), token_table(world_toks["target"])
    m = mined_map(src, tgt)
    mined = np.nonzero(m.kind == MapKind.MINED)[0]
    assert mined.size > 20
    assert len(set(m.src_to_tgt[mined].tolist())) > mined.size // 4  # not one constant id
    by_bytes = vocab_mod._preferred_ids(tgt)
    choice_ids = np.array(sorted(by_bytes.values()))
    choices = [tgt.pieces[i].decode("latin-1") for i in choice_ids]  # type: ignore[union-attr]
    queries = [src.pieces[i].decode("latin-1") for i in mined]  # type: ignore[union-attr]
    dist = process.cdist(queries, choices, scorer=Levenshtein.distance, dtype=np.int32)  # brute force
    np.testing.assert_array_equal(m.src_to_tgt[mined], choice_ids[dist.argmin(axis=1)])
    assert (m.src_to_tgt[mined] != 0).all()
    assert (dist.min(axis=1) > 0).all()  # exact matches were taken first


def test_mined_ties_go_to_lowest_target_id() -> None:
    tgt = _table([b"zzzz", b" help", b" hello", b" hellp"])
    src = _table([b" helo", b" hel"])
    # " helo": " help" (id 1) and " hello" (id 2) both at distance 1 → 1; " hel" → " help" (1)
    assert mined_map(src, tgt).src_to_tgt.tolist() == [1, 1]


def test_mined_with_length_rings_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    alphabet = list("ab c\n")

    def rand(n: int) -> list[bytes]:
        return list({"".join(rng.choice(alphabet, rng.integers(1, 9))).encode() for _ in range(n)})

    tgt, src = _table(rand(300)), _table(rand(200))  # type: ignore[arg-type]
    m = mined_map(src, tgt)
    choices = [p.decode("latin-1") for p in tgt.pieces]  # type: ignore[union-attr]
    dist = process.cdist([p.decode("latin-1") for p in src.pieces], choices,  # type: ignore[union-attr]
                         scorer=Levenshtein.distance, dtype=np.int32)
    np.testing.assert_array_equal(m.src_to_tgt, dist.argmin(axis=1))


def test_mined_tiny_world_all_pairs(world_toks: dict[str, PreTrainedTokenizerFast]) -> None:
    tgt = world_toks["target"]
    for name in ("prose", "code", "math"):
        m = vocab_map(world_toks[name], tgt, method="mined")
        s = m.summary()
        assert s["none"] == sum(1 for p in token_table(world_toks[name]).pieces if p is None) - s["special"]
        assert s["exact"] + s["mined"] + s["special"] + s["none"] == s["n_src"] == len(world_toks[name])
        assert (m.src_to_tgt[m.kind != MapKind.NONE] >= 0).all()
    with pytest.raises(ValueError, match="stats_map"):
        vocab_map(tgt, tgt, method="stats")


def test_identity_map(world_toks: dict[str, PreTrainedTokenizerFast]) -> None:
    tok = world_toks["math"]
    m = mined_map(tok, tok)
    assert m.summary()["mined"] == 0
    ids = np.nonzero(m.kind == MapKind.EXACT)[0]
    table = token_table(tok)
    assert all(table.pieces[m.src_to_tgt[i]] == table.pieces[i] for i in ids)
    regular = ids[~table.byte_fallback[ids]]
    np.testing.assert_array_equal(m.src_to_tgt[regular], regular)  # duplicates of <0xNN> go to the regular piece


def test_prefix_map_sends_mass_to_a_piece_the_target_can_emit_next() -> None:
    tgt = _table([None, b" the", b" there", b" t", b"x", b"\n"], roles={"eos": 0}, special={0: "</s>"})
    src = _table([None, b" therefore", b" the", b" theirs", b"\n", b"zz", b" th"], roles={"eos": 0},
                 special={0: "<eos>"})
    m = prefix_map(src, tgt)
    # " therefore" -> " there" (the longest target prefix; mined would pick the nearest string), " the"
    # exact, " theirs" -> " the", "zz" has no target prefix, " th" -> " t" (" the" is longer than it)
    assert m.src_to_tgt.tolist() == [0, 2, 1, 1, 5, -1, 3]
    assert m.kind.tolist() == [MapKind.SPECIAL, MapKind.PREFIX, MapKind.EXACT, MapKind.PREFIX, MapKind.EXACT,
                               MapKind.NONE, MapKind.PREFIX]
    assert m.method == "prefix"


def _source_maps(world_toks: dict[str, PreTrainedTokenizerFast], method: str):
    """``(map, source pieces, target pieces)`` of every tiny-world source onto the target."""
    tgt = world_toks["target"]
    tgt_pieces = token_table(tgt).pieces
    for name in ("prose", "code", "math"):
        yield vocab_map(world_toks[name], tgt, method=method), token_table(world_toks[name]).pieces, tgt_pieces


def test_prefix_map_tiny_world_maps_every_text_token(world_toks: dict[str, PreTrainedTokenizerFast]) -> None:
    for m, pieces, tgt_pieces in _source_maps(world_toks, "prefix"):
        for i in np.nonzero(m.kind == MapKind.PREFIX)[0].tolist():
            assert pieces[i].startswith(tgt_pieces[m.src_to_tgt[i]]) and pieces[i] != tgt_pieces[m.src_to_tgt[i]]
        text = [i for i, p in enumerate(pieces) if p is not None]
        assert (m.src_to_tgt[text] >= 0).all()  # the byte-level target spells every text token's first byte


def test_group_map_tiny_world_groups_are_prefix_consistent(world_toks: dict[str, PreTrainedTokenizerFast]) -> None:
    for m, pieces, tgt_pieces in _source_maps(world_toks, "groups"):
        groups = m.tgt_group
        assert sorted(set(groups.tolist())) == list(range(int(groups.max()) + 1))  # dense 0..G-1
        members: dict[int, list[int]] = {}
        for t, g in enumerate(groups.tolist()):
            members.setdefault(g, []).append(t)
        for i, y in enumerate(pieces):
            rep = int(m.src_to_tgt[i])
            if y is None or rep < 0:
                continue
            if m.kind[i] in (MapKind.EXACT, MapKind.GROUP):  # y owns its group: every member begins with y
                assert all(tgt_pieces[t] is not None and tgt_pieces[t].startswith(y) for t in members[groups[rep]])
            else:  # borrowed: the target begins y's text with the representative
                assert m.kind[i] == MapKind.PREFIX and y.startswith(tgt_pieces[rep])


@pytest.mark.slow
def test_mined_gpt2_to_llama2_is_fast(gpt2: GPT2TokenizerFast, llama2: PreTrainedTokenizerFast) -> None:
    t0 = time.perf_counter()
    src, tgt = token_table(gpt2), token_table(llama2)
    t1 = time.perf_counter()
    m = mined_map(src, tgt)
    t2 = time.perf_counter()
    s = m.summary()
    print(f"\nGPT-2 → Llama-2 mined map: tables {t1 - t0:.2f} s + map {t2 - t1:.2f} s; {s}")
    assert s["exact"] > 15000 and s["mined"] + s["exact"] + s["special"] == len(gpt2)
    assert t2 - t0 < 15.0


# -- statistics --------------------------------------------------------------------------------------

def test_pair_counts_merge_chunks() -> None:
    c = PairCounts()
    c.add(np.array([3, 3, 1]), np.array([2, 2, 0]))
    c.add([3], [5]).add([], [])
    assert (c.src.tolist(), c.tgt.tolist(), c.count.tolist(), c.total) == ([1, 3, 3], [0, 2, 5], [1, 2, 1], 4)
    with pytest.raises(ValueError, match="same length"):
        c.add([1, 2], [1])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        c.add([-1], [1])


def test_pair_counts_flush_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PairCounts, "_FLUSH", 4)
    c = PairCounts()
    for _ in range(5):
        c.add([7, 7, 8], [1, 2, 1])
    assert c.count.tolist() == [5, 5, 5] and c.total == 15


def test_stats_map_most_frequent_with_fallback() -> None:
    src = _table([b" the", b" cat", b"dog", None], roles={"eos": 3}, special={3: "</s>"})
    tgt = _table([b" the", b" ca", b"t", b" dog", None], roles={"eos": 4}, special={4: "</s>"})
    fallback = mined_map(src, tgt)
    pairs = [(np.array([0, 1, 1, 1, 0]), np.array([1, 1, 2, 1, 0])), ([3], [0])]
    m = stats_map(pairs, n_src=4, n_tgt=5, fallback=fallback)
    # " the" is exact (kept), " cat" → " ca" (2 of 3), "dog" keeps its mined " dog", </s> stays special
    assert m.src_to_tgt.tolist() == [0, 1, 3, 4]
    assert m.kind.tolist() == [MapKind.EXACT, MapKind.STATS, MapKind.MINED, MapKind.SPECIAL]
    ids, w = m.candidates(1)
    assert ids.tolist() == [1, 2] and np.allclose(w, [2 / 3, 1 / 3])
    assert m.candidates(2)[0].size == 0
    assert m.indptr.tolist() == [0, 2, 4, 4, 5]  # type: ignore[union-attr]
    loose = stats_map(pairs, n_src=4, n_tgt=5, fallback=fallback, prefer_exact=False)
    assert loose.src_to_tgt[0] == 0 and loose.kind[0] == MapKind.STATS  # (0→1 once, 0→0 once: tie → 0)
    strict = stats_map(pairs, n_src=4, n_tgt=5, fallback=fallback, min_count=3)
    assert strict.kind[1] == MapKind.MINED
    assert m.meta["pairs"] == 6 and m.summary()["nnz"] == 5


def test_stats_map_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="exceed"):
        stats_map([([5], [0])], n_src=5, n_tgt=2)
    with pytest.raises(ValueError, match="fallback"):
        stats_map([], n_src=3, n_tgt=2, fallback=exact_map(_table([b"a"]), _table([b"a", b"b"])))


def test_count_aligned_pairs_uses_one_to_one_positions() -> None:
    # target positions: 0 ↔ 0 (1-1), 1 and 2 share source 1 (many-to-one), 3 ↔ 2 (1-1)
    al = Alignment.from_lists([[0], [1], [1], [2]], n_src=3)
    counts = count_aligned_pairs([np.array([10, 11, 12])], [np.array([20, 21, 22, 23])], [al])
    assert list(zip(counts.src.tolist(), counts.tgt.tolist(), strict=True)) == [(10, 20), (12, 23)]
    with pytest.raises(ValueError, match="alignment is"):
        count_aligned_pairs([np.array([1, 2])], [np.array([1, 2, 3, 4])], [al])


def test_stats_map_over_tiny_world_corpus(world_toks: dict[str, PreTrainedTokenizerFast]) -> None:
    from polyfuse.align import align_blocks

    texts = ["The cat sat on the mat.\n", "def add(a, b):\n    return a + b\n", "x = 3.14 * r ** 2  # area",
             "Ünïcödé 😀 text\twith tabs"] * 3
    src_tok, tgt_tok = world_toks["code"], world_toks["target"]
    s_blocks, t_blocks = encode_blocks(src_tok, texts), encode_blocks(tgt_tok, texts)
    alignments = [align_blocks(s, t) for s, t in zip(s_blocks, t_blocks, strict=True)]
    counts = count_aligned_pairs(s_blocks, t_blocks, alignments)
    src_t, tgt_t = token_table(src_tok), token_table(tgt_tok)
    for s, t in zip(counts.src.tolist(), counts.tgt.tolist(), strict=True):  # 1-1 spans ⇒ same bytes
        sp, tp = src_t.pieces[s], tgt_t.pieces[t]
        assert sp is None and tp is None or sp is not None and tp is not None and sp.strip() == tp.strip()
    m = stats_map(counts, len(src_tok), len(tgt_tok), fallback=mined_map(src_t, tgt_t))
    assert m.summary()["n_src"] == len(src_tok) and m.summary()["nnz"] == counts.src.size
    assert m.src_to_tgt[src_tok.bos_token_id] == tgt_tok.bos_token_id


# -- artifact ----------------------------------------------------------------------------------------

def test_save_load_roundtrip(tmp_path: Path) -> None:
    m = stats_map([([0, 0, 2], [1, 1, 0])], n_src=3, n_tgt=2)
    m.meta["source"] = "world:code"
    m.save(tmp_path / "map")
    back = VocabMap.load(tmp_path / "map")
    assert back.method == "stats" and back.n_tgt == 2 and back.meta["source"] == "world:code"
    for name in ("src_to_tgt", "kind", "indptr", "indices", "weights", "counts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    assert back([[0, 1], [2, 2]]).tolist() == [[1, -1], [0, 0]]
    plain = exact_map(_table([b"a"]), _table([b"a"]))
    plain.save(tmp_path / "plain")
    loaded = VocabMap.load(tmp_path / "plain")
    assert loaded.indptr is None and not loaded.has_stats and loaded.summary()["exact"] == 1
    with pytest.raises(ValueError, match="no statistics"):
        loaded.candidates(0)
    with pytest.raises(DataError, match="no vocabulary map"):
        VocabMap.load(tmp_path / "missing")


def test_vocab_map_validates() -> None:
    with pytest.raises(ValueError, match="target ids"):
        VocabMap(np.array([3]), np.array([1]), "exact", n_tgt=2)
    with pytest.raises(ValueError, match="equal 1-D"):
        VocabMap(np.array([0, 1]), np.array([1]), "exact", n_tgt=2)
