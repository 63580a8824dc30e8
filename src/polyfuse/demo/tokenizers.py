"""Train the tiny world's tokenizers with Hugging Face ``tokenizers``: three different kinds.

* ``byte_bpe``      — GPT-2 style byte-level BPE (``Ġ`` marks a leading space, ``Ċ`` a newline).
* ``metaspace_bpe`` — Llama-2 / SentencePiece style BPE: ``▁`` marks word starts, unknown
  characters fall back to byte tokens ``<0x..>``.
* ``unigram``       — SentencePiece style Unigram LM with ``▁`` and byte fallback.

Every tokenizer is lossless on its training domain (decode(encode(x)) == x) and is saved as an
ordinary ``PreTrainedTokenizerFast`` with bos/eos/pad tokens set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TokenizerKind = Literal["byte_bpe", "metaspace_bpe", "unigram"]
#: Bumped when what a kind's trainer produces changes (part of the world's model stage config).
#: unigram 2: <unk>, <s> and </s> can no longer encode plain text.
TOKENIZER_VERSIONS: dict[str, int] = {"byte_bpe": 1, "metaspace_bpe": 1, "unigram": 2}
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _add_byte_fallback(tok: Tokenizer) -> Tokenizer:
    """Append the 256 ``<0x..>`` byte tokens to a trained model's vocabulary and enable byte fallback."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model["type"] == "BPE":
        vocab = model["vocab"]
        for piece in BYTE_TOKENS:
            vocab.setdefault(piece, len(vocab))
    else:  # Unigram: vocab is a list of [piece, score]
        # Unigram training is not reproducible bit for bit: scores are summed in parallel and pieces
        # with equal scores come out of a hash map. Round the scores and order ties by piece.
        # The trainer also appends the leftover required characters in hash order with scores
        # stepping down from the minimum: give those tail scores to the characters in sorted order.
        n_special = 3  # <unk>, <s>, </s> keep their ids
        vocab = sorted(([piece, round(score, 8)] for piece, score in model["vocab"][n_special:]),
                       key=lambda ps: (-ps[1], ps[0]))
        floor_multi = min((score for piece, score in vocab if len(piece) > 1), default=0.0)
        head = [ps for ps in vocab if ps[1] >= floor_multi]
        tail = [ps for ps in vocab if ps[1] < floor_multi]
        tail = [[piece, score] for (piece, _), score in zip(sorted(tail), [sc for _, sc in tail], strict=True)]
        model["vocab"] = model["vocab"][:n_special] + head + tail
        have = {piece for piece, _ in model["vocab"]}
        floor = min(score for _, score in model["vocab"]) - 1.0
        model["vocab"].extend([piece, floor] for piece in BYTE_TOKENS if piece not in have)
        # The trainer gives the special pieces score 0 (the most likely piece), so "<s>" written in
        # plain text would encode as BOS even with split_special_tokens. SentencePiece never emits
        # control symbols for text: give <unk>, <s> and </s> a score no segmentation ever prefers
        # (unknown characters get the model's own unk penalty, not this score).
        for entry in model["vocab"][:n_special]:
            entry[1] = floor - 1e3
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def train_tokenizer(kind: TokenizerKind, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a tokenizer of ``kind`` with ``vocab_size`` pieces (byte tokens come on top for metaspace kinds)."""
    if kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return tok
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    if kind == "metaspace_bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                      show_progress=False)
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                          unk_token="<unk>", max_piece_length=12, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose byte_bpe, metaspace_bpe or unigram")
    tok.pre_tokenizer = metaspace
    tok.train_from_iterator(texts, trainer=trainer)
    tok = _add_byte_fallback(tok)
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def to_transformers(tok: Tokenizer, kind: TokenizerKind, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer as a ``PreTrainedTokenizerFast`` with its special tokens named."""
    if kind == "byte_bpe":
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    else:
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False, **special)
