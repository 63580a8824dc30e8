"""Alignment properties over random texts (non-ASCII, emoji, whitespace runs) for real tokenizer pairs.

Real tokenizers: GPT-2 and Llama-2 (installed as data), MPT, Qwen2 and Llama-2 SentencePiece converted
from llama.cpp's vocabulary GGUFs (polyfuse cache, filled by ``make install``), and the tiny world's four.
"""

from __future__ import annotations

import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from conftest import GPT2_DATA, LLAMA2_FILE, cached_real_vocab
from polyfuse.align import (
    TokenTable,
    align_blocks,
    align_dtw,
    align_dtw_reference,
    one_to_one,
    token_table,
    token_texts,
)
from polyfuse.corpus.tokens import encode_block

PAIRS = [("gpt2", "llama2"), ("llama2", "gpt2"), ("prose", "target"), ("code", "target"), ("math", "target"),
         ("target", "math"), ("code", "math"), ("gpt2", "code")]
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GGUF_PAIRS = [("mpt", "llama2"), ("qwen2", "gpt2"), ("llama_spm", "mpt"), ("qwen2", "mpt"), ("mpt", "qwen2"),
              ("llama_spm", "qwen2")]
"""Pairs with the vocabularies converted from llama.cpp GGUFs (MPT 50,432; Qwen2 151,936; Llama-2 SPM 32,000)."""
GGUF_VOCABS = {"mpt": "mpt", "qwen2": "qwen2", "llama_spm": "llama-spm"}
NFC_NAMES = {"mpt", "qwen2"}
"""Tokenizers with an NFC normaliser (as upstream): ``e`` + U+0301 becomes one ``é`` whose offsets cover only
the ``e`` (tokenizers maps a composed character to its first source character); encode_blocks gives the
combining mark to that token (:func:`test_nfc_offsets_cover_combining_marks`). Other NFC compositions (e.g.
Hangul jamo) can still leave characters uncovered, so coverage is checked on NFC texts only."""

WORDS = st.sampled_from(["the", " cat", "naïve", "café", "Straße", "日本語", "Привет", "x", "42", "3.14",
                         "def", "(", "):", "=", "--", "'s", "ﬁ", "e\u0301"])
SPACES = st.sampled_from([" ", "  ", "    ", "\t", "\n", "\n\n", " \n", "\r\n", "\t\t", "\u00a0", "\u3000"])
EMOJI = st.sampled_from(["😀", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧", "✨", "🙂"])
CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
TEXTS = st.lists(st.one_of(WORDS, SPACES, EMOJI, st.text(CHARS, min_size=1, max_size=4)), max_size=24).map("".join)


class _Quiet(dict):
    """A dict that hypothesis reports as one short word (the tokenizers' reprs are huge)."""

    def __repr__(self) -> str:
        return f"<{len(self)} tokenizers>"


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> dict[str, PreTrainedTokenizerBase]:
    """Every tokenizer once per module: GPT-2, Llama-2, the cached GGUF vocabularies and the tiny world's four."""
    out: dict[str, PreTrainedTokenizerBase] = _Quiet({
        name: AutoTokenizer.from_pretrained(tiny_world / "models" / name)
        for name in ("prose", "code", "math", "target")
    })
    if (GPT2_DATA / "encoder.json").is_file():
        path = tmp_path_factory.mktemp("gpt2")
        shutil.copy(GPT2_DATA / "encoder.json", path / "vocab.json")
        shutil.copy(GPT2_DATA / "vocab.bpe", path / "merges.txt")
        out["gpt2"] = GPT2TokenizerFast.from_pretrained(path)
    if LLAMA2_FILE.is_file():
        out["llama2"] = PreTrainedTokenizerFast(tokenizer_file=str(LLAMA2_FILE), bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    for key, name in GGUF_VOCABS.items():
        if (tok := cached_real_vocab(name)) is not None:
            out[key] = tok
    return out


@pytest.fixture(scope="module")
def tables(toks: dict[str, PreTrainedTokenizerBase]) -> dict[str, TokenTable]:
    return _Quiet({name: token_table(tok) for name, tok in toks.items()})


def _pair(toks: dict[str, PreTrainedTokenizerBase], src: str, tgt: str) -> tuple[PreTrainedTokenizerBase, ...]:
    if src not in toks or tgt not in toks:
        pytest.skip(f"{src} or {tgt} tokenizer data not installed (make install fetches it)")
    return toks[src], toks[tgt]


@pytest.mark.parametrize(("src_name", "tgt_name"), PAIRS)
@PROPERTY_SETTINGS
@given(text=TEXTS)
def test_offset_alignment_properties(toks: dict[str, PreTrainedTokenizerBase], tables: dict[str, TokenTable],
                                     src_name: str, tgt_name: str, text: str) -> None:
    _check_offset_alignment(toks, tables, src_name, tgt_name, text)


@pytest.mark.parametrize(("src_name", "tgt_name"), GGUF_PAIRS)
@PROPERTY_SETTINGS
@given(text=TEXTS)
def test_offset_alignment_properties_gguf_vocabs(toks: dict[str, PreTrainedTokenizerBase],
                                                 tables: dict[str, TokenTable], src_name: str, tgt_name: str,
                                                 text: str) -> None:
    for variant in dict.fromkeys([text, unicodedata.normalize("NFC", text)]):  # NFC: every property applies
        _check_offset_alignment(toks, tables, src_name, tgt_name, variant)


def _check_offset_alignment(toks: dict[str, PreTrainedTokenizerBase], tables: dict[str, TokenTable],
                            src_name: str, tgt_name: str, text: str) -> None:
    """Offsets pairs exactly the tokens whose spans overlap; one-to-one pairs stand for the same bytes.

    Coverage and same-bytes hold only where the offsets cover the text: not for a text that is not in
    NFC beside an NFC tokenizer (``NFC_NAMES``).
    """
    src_tok, tgt_tok = _pair(toks, src_name, tgt_name)
    offsets_cover_text = not ({src_name, tgt_name} & NFC_NAMES) or unicodedata.normalize("NFC", text) == text
    s, t = encode_block(src_tok, text), encode_block(tgt_tok, text)
    al = align_blocks(s, t)
    so, to = s.offsets.astype(np.int64), t.offsets.astype(np.int64)
    assert al.n_src == len(s) and al.n_tgt == len(t)

    # exactly the positive-length overlaps (plus the context pair): never a non-overlapping pair
    inter = np.minimum(to[:, None, 1], so[None, :, 1]) - np.maximum(to[:, None, 0], so[None, :, 0])  # [m, n]
    expect = inter > 0
    if s.has_context and t.has_context:
        expect[0, 0] = True
    got = np.zeros_like(expect)
    tgt_pos, src_pos = al.pairs()
    got[tgt_pos, src_pos] = True
    assert np.array_equal(got, expect)

    # every target token with a non-empty span gets at least one source token
    covered = al.tgt_degree() >= 1
    if offsets_cover_text:
        assert covered[to[:, 1] > to[:, 0]].all()

    # one_to_one pairs have identical spans and are mutual and exclusive
    pos = one_to_one(al)
    j = np.nonzero(pos >= 0)[0]
    assert np.array_equal(so[pos[j]], to[j])
    assert (al.tgt_degree()[j] == 1).all() and (al.src_degree()[pos[j]] == 1).all()
    assert len(set(pos[j].tolist())) == j.size

    if not offsets_cover_text:
        return
    # ... and stand for the same bytes, up to the space a metaspace tokenizer prepends to the first
    # word of a segment (at 0, or after a special token such as a literal "<s>" in the text)
    src_pieces, tgt_pieces = tables[src_name].pieces, tables[tgt_name].pieces
    for jj, ii in zip(j.tolist(), pos[j].tolist(), strict=True):
        sp, tp = src_pieces[int(s.ids[ii])], tgt_pieces[int(t.ids[jj])]
        if sp is None or tp is None:  # specials: the context pair, or a special token's text on both sides
            assert sp is None and tp is None
            continue
        span = text[to[jj, 0]:to[jj, 1]].encode()
        assert sp == tp or (sp.lstrip(b" ") == tp.lstrip(b" ") and span in (sp, tp))


def test_only_combining_mark_gaps_are_closed() -> None:
    from polyfuse.corpus.tokens import _cover_combining_marks

    text = "a b\u0301\u0327 c\u20dd"  # a space gap stays; Mn marks and a trailing Me mark join their token
    off = np.array([[0, 0], [0, 1], [2, 3], [6, 7], [7, 7]], dtype=np.int32)  # context and zero-width rows
    got = _cover_combining_marks(text, off)
    assert got.tolist() == [[0, 0], [0, 1], [2, 5], [6, 8], [7, 7]]
    assert off.tolist()[2] == [2, 3]  # the input is not modified
    text2 = "ab\u0301"
    assert _cover_combining_marks(text2, np.array([[0, 1], [1, 2]], dtype=np.int32)).tolist() == [[0, 1], [1, 3]]


@pytest.mark.parametrize("name", sorted(NFC_NAMES))
def test_nfc_offsets_cover_combining_marks(toks: dict[str, PreTrainedTokenizerBase], name: str) -> None:
    if name not in toks:
        pytest.skip(f"{name} vocabulary not cached (make install fetches it)")
    text = "cafe\u0301 au lait"
    enc = encode_block(toks[name], text)
    covered = np.zeros(len(text), dtype=bool)
    for a, b in enc.offsets.tolist():
        covered[a:b] = True
    assert covered.all(), f"uncovered characters: {[text[i] for i in np.nonzero(~covered)[0]]}"


@pytest.mark.parametrize("name", ["gpt2", "llama2", "prose", "code", "math", "target"])
@PROPERTY_SETTINGS
@given(text=TEXTS)
def test_token_bytes_are_lossless(toks: dict[str, PreTrainedTokenizerBase], tables: dict[str, TokenTable],
                                  name: str, text: str) -> None:
    _check_lossless(toks, tables, name, text)


@pytest.mark.parametrize("name", list(GGUF_VOCABS))
@PROPERTY_SETTINGS
@given(text=TEXTS)
def test_token_bytes_are_lossless_gguf_vocabs(toks: dict[str, PreTrainedTokenizerBase],
                                              tables: dict[str, TokenTable], name: str, text: str) -> None:
    _check_lossless(toks, tables, name, text)


def _check_lossless(toks: dict[str, PreTrainedTokenizerBase], tables: dict[str, TokenTable], name: str,
                    text: str) -> None:
    """The tokens' bytes join to the text (NFC-normalised for MPT and Qwen2, whose tokenizers normalise)."""
    if name not in toks:
        pytest.skip(f"{name} tokenizer data not installed")
    text = text.replace("\u2581", "")  # a literal "▁" is a space to every metaspace tokenizer (lossy by design)
    ids = toks[name](text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    pieces = [tables[name].pieces[i] for i in ids]
    assert all(p is not None for p in pieces)
    joined = b"".join(pieces)  # type: ignore[arg-type]
    if name in NFC_NAMES:
        text = unicodedata.normalize("NFC", text)
    assert joined in (text.encode(), b" " + text.encode())


@pytest.mark.parametrize(("src_name", "tgt_name"), [("gpt2", "llama2"), ("math", "code")])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.one_of(WORDS, SPACES, EMOJI), max_size=12).map("".join))
def test_dtw_equals_reference_and_covers_both_sides(toks: dict[str, PreTrainedTokenizerBase], src_name: str,
                                                   tgt_name: str, text: str) -> None:
    src_tok, tgt_tok = _pair(toks, src_name, tgt_name)
    a = token_texts(src_tok, encode_block(src_tok, text).ids)
    c = token_texts(tgt_tok, encode_block(tgt_tok, text).ids)
    fast, ref = align_dtw(a, c), align_dtw_reference(a, c)
    assert np.array_equal(fast.indptr, ref.indptr) and np.array_equal(fast.src, ref.src)
    assert (fast.tgt_degree() >= 1).all() and (fast.src_degree() >= 1).all()  # a warping path covers all
    tgt_pos, src_pos = fast.pairs()
    assert (np.diff(tgt_pos) >= 0).all() and (np.diff(src_pos) >= 0).all()  # monotone
    assert fast[0][0] == 0  # the path starts at the two context tokens
