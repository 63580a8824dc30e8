"""What a token means, as bytes: one normal form for every tokenizer's vocabulary.

Tokenizers spell the same text differently: GPT-2 style byte-level BPE writes a space as ``Ġ``
and a newline as ``Ċ``; SentencePiece style (Llama-2, Gemma) writes a space as ``▁`` and a
newline as the byte-fallback piece ``<0x0A>``. FuseLLM compared the raw strings and only swapped
the space markers, so ``Ċ`` and ``<0x0A>`` never matched. Here every id becomes the
UTF-8 bytes it stands for in text, read from the tokenizer's own ``backend_tokenizer`` JSON
(pre-tokenizer, decoder, normalizer, model), never from a model or class name.

The rule, for each id in ``range(len(tokenizer))``:

1. **special** tokens (``added_tokens`` with ``special=True``, the bos/eos/pad/unk ids and the
   model's unk piece) → ``None``; they are matched by role (:func:`special_roles`), not by text.
   Non-special added tokens (e.g. GPT-NeoX's runs of spaces) are literal text: their content,
   with space markers replaced, as UTF-8.
2. **byte-level** tokenizers (a ``ByteLevel`` pre-tokenizer or decoder): each character is one
   byte through GPT-2's ``bytes_to_unicode`` table (``Ġ`` → ``b" "``, ``Ċ`` → ``b"\\n"``,
   ``Ã©`` → ``b"\\xc3\\xa9"``). Pieces of a multi-byte character stay raw bytes (``ðŁĺ`` →
   ``b"\\xf0\\x9f\\x98"``), so they can only match the same bytes.
3. **byte fallback** (``model.byte_fallback`` or a ``ByteFallback`` decoder): ``<0xNN>`` → the
   single byte ``NN``.
4. otherwise the piece is text: every space marker (``Metaspace`` replacement, a decoder
   ``Replace(marker → " ")``, a normalizer ``Replace(" " → marker)``) becomes ``b" "``; a
   WordPiece continuation prefix (``##``) is dropped and a BPE end-of-word suffix (``</w>``)
   becomes a space. The result is UTF-8 encoded.

Example (GPT-2 and Llama-2 agree on whitespace)::

    >>> token_bytes(gpt2)[198], token_bytes(gpt2)[220]      # 'Ċ', 'Ġ'
    (b'\\n', b' ')
    >>> token_bytes(llama)[13], token_bytes(llama)[29871]   # '<0x0A>', '▁'
    (b'\\n', b' ')
    >>> token_bytes(llama)[1]                                # '<s>' is special
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ROLES",
    "TokenTable",
    "bytes_to_unicode",
    "special_roles",
    "token_bytes",
    "token_table",
    "token_texts",
]

ROLES = ("bos", "eos", "pad", "unk")
"""Special-token roles matched across tokenizers (source bos → target bos, ...)."""
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (``0x20`` → ``Ġ``, ``0x0A`` → ``Ċ``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _glyph_table() -> dict[int, int]:
    """``str.translate`` table: byte-level glyph → the latin-1 character of its byte."""
    return {ord(c): b for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True, eq=False)
class TokenTable:
    """A tokenizer's vocabulary in normal form: everything the vocabulary maps need, no tokenizer.

    Built by :func:`token_table`, or by hand in tests::

        >>> t = TokenTable(pieces=[None, b" the", b"\\n"], roles={"bos": 0, "eos": 0},
        ...                special={0: "<|endoftext|>"}, byte_fallback=np.zeros(3, bool))
        >>> len(t), t.pieces[2]
        (3, b'\\n')
    """

    pieces: list[bytes | None]
    """[V] the UTF-8 bytes each id stands for in text; ``None`` for special tokens."""
    roles: dict[str, int]
    """Role (bos/eos/pad/unk) → id, for the roles the tokenizer has."""
    special: dict[int, str]
    """Id → content of every special token (the ids whose piece is ``None``)."""
    byte_fallback: np.ndarray
    """[V] bool: the id is a ``<0xNN>`` byte-fallback piece (the tokenizer prefers any other
    piece with the same bytes, so vocabulary maps do too)."""

    def __len__(self) -> int:
        return len(self.pieces)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every component of a (possibly nested ``Sequence``) tokenizers JSON node."""
    if isinstance(node, dict):
        yield node
        for key in ("pretokenizers", "decoders", "normalizers", "processors"):
            for child in node.get(key) or []:
                yield from _walk(child)


@dataclass(frozen=True)
class _Scheme:
    byte_level: bool
    byte_fallback: bool
    markers: tuple[str, ...]
    continuing_prefix: str | None
    word_suffix: str | None
    unk_piece: str | None


def _scheme(spec: dict[str, Any]) -> _Scheme:
    """Read how pieces spell text from the ``backend_tokenizer`` JSON."""
    pre = list(_walk(spec.get("pre_tokenizer")))
    dec = list(_walk(spec.get("decoder")))
    norm = list(_walk(spec.get("normalizer")))
    model = spec.get("model") or {}
    markers: list[str] = []
    for node in pre + dec:
        if node.get("type") == "Metaspace":
            markers.append(node.get("replacement", "▁"))
    for node in dec:  # Replace(marker → " ")
        pattern = (node.get("pattern") or {}).get("String")
        if node.get("type") == "Replace" and node.get("content") == " " and pattern and pattern != " ":
            markers.append(pattern)
    for node in norm:  # Replace(" " → marker)
        pattern = (node.get("pattern") or {}).get("String")
        if node.get("type") == "Replace" and pattern == " " and node.get("content"):
            markers.append(node["content"])
    prefix = model.get("continuing_subword_prefix") or None
    suffix = model.get("end_of_word_suffix") or None
    for node in dec:
        if node.get("type") == "WordPiece":
            prefix = node.get("prefix", "##")
        if node.get("type") == "BPEDecoder":
            suffix = node.get("suffix", "</w>")
    unk = model.get("unk_token")
    if unk is None and model.get("type") == "Unigram" and model.get("unk_id") is not None:
        unk = model["vocab"][model["unk_id"]][0]
    return _Scheme(
        byte_level=any(n.get("type") == "ByteLevel" for n in pre + dec),
        byte_fallback=bool(model.get("byte_fallback")) or any(n.get("type") == "ByteFallback" for n in dec),
        markers=tuple(dict.fromkeys(markers)),
        continuing_prefix=prefix,
        word_suffix=suffix,
        unk_piece=unk,
    )


def _text_bytes(piece: str, scheme: _Scheme) -> bytes:
    """Rule 4: a text piece with markers, prefixes and suffixes resolved."""
    if scheme.continuing_prefix and piece.startswith(scheme.continuing_prefix) and piece != scheme.continuing_prefix:
        piece = piece[len(scheme.continuing_prefix):]
    if scheme.word_suffix and piece.endswith(scheme.word_suffix) and piece != scheme.word_suffix:
        piece = piece[: -len(scheme.word_suffix)] + " "
    for marker in scheme.markers:
        piece = piece.replace(marker, " ")
    return piece.encode("utf-8")


def _piece_bytes(piece: str, scheme: _Scheme) -> tuple[bytes, bool]:
    """Rules 2-4 for one model piece: (bytes, is a byte-fallback piece)."""
    if scheme.byte_fallback and (m := _BYTE_PIECE.match(piece)):
        return bytes([int(m.group(1), 16)]), True
    if scheme.byte_level:
        try:
            return piece.translate(_glyph_table()).encode("latin-1"), False
        except UnicodeEncodeError:  # not a glyph string (e.g. an added token's raw text)
            pass
    return _text_bytes(piece, scheme), False


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "id_to_token"):
        backend = tokenizer  # a raw tokenizers.Tokenizer
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} has no backend_tokenizer; load a fast tokenizer "
            "(AutoTokenizer.from_pretrained(path) or PreTrainedTokenizerFast(tokenizer_file=...))"
        )
    return backend


def special_roles(tokenizer: Any) -> dict[str, int]:
    """Role → id for the bos/eos/pad/unk tokens the tokenizer has (absent roles are left out).

    Read from the tokenizer's ``bos_token_id`` etc.; ``unk`` falls back to the model's unk piece
    (SentencePiece models declare it even when no ``unk_token`` attribute is set)::

        >>> special_roles(gpt2)
        {'bos': 50256, 'eos': 50256, 'unk': 50256}
    """
    roles: dict[str, int] = {}
    for role in ROLES:
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            roles[role] = int(token_id)
    if "unk" not in roles:
        backend = _backend(tokenizer)
        unk = _scheme(json.loads(backend.to_str())).unk_piece
        unk_id = backend.token_to_id(unk) if unk is not None else None
        if unk_id is not None:
            roles["unk"] = int(unk_id)
    return roles


def _vocab_size(tokenizer: Any, backend: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(backend.get_vocab_size(with_added_tokens=True))


def token_table(tokenizer: Any) -> TokenTable:
    """The normal form of a (fast) tokenizer's whole vocabulary; see the module docstring for the rule."""
    backend = _backend(tokenizer)
    spec = json.loads(backend.to_str())
    scheme = _scheme(spec)
    roles = special_roles(tokenizer)
    added = {int(i): tok for i, tok in backend.get_added_tokens_decoder().items()}
    n = _vocab_size(tokenizer, backend)
    pieces: list[bytes | None] = [None] * n
    fallback = np.zeros(n, dtype=bool)
    special: dict[int, str] = {}
    role_ids = set(roles.values())
    id_to_piece: list[str | None] = [None] * n
    for piece, token_id in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= token_id < n:
            id_to_piece[token_id] = piece
    for token_id, piece in enumerate(id_to_piece):
        if token_id in added and not added[token_id].special and token_id not in role_ids:
            pieces[token_id] = _text_bytes(added[token_id].content, scheme)
        elif token_id in added or token_id in role_ids or (piece is not None and piece == scheme.unk_piece):
            special[token_id] = added[token_id].content if token_id in added else (piece or "")
        elif piece is not None:
            pieces[token_id], fallback[token_id] = _piece_bytes(piece, scheme)
    return TokenTable(pieces=pieces, roles=roles, special=special, byte_fallback=fallback)


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """[V] the UTF-8 bytes every id stands for in text (``None`` for special tokens)."""
    return list(_cached_table(tokenizer).pieces)


def token_texts(tokenizer: Any | TokenTable, ids: Any) -> list[str]:
    """Token texts for DTW: normalised bytes decoded with ``errors="replace"``; specials → ``""``.

    A partial UTF-8 piece becomes U+FFFD (``b"\\xf0\\x9f"`` → ``"\\ufffd"``), like FuseChat's
    decoded strings; specials (the BOS context token) become ``""`` so that two context tokens
    cost nothing to align::

        >>> token_texts(gpt2, [50256, 15496, 198])
        ['', 'Hello', '\\n']
    """
    table = tokenizer if isinstance(tokenizer, TokenTable) else _cached_table(tokenizer)
    texts = []
    for token_id in np.asarray(ids, dtype=np.int64).tolist():
        piece = table.pieces[token_id] if 0 <= token_id < len(table.pieces) else None
        texts.append("" if piece is None else piece.decode("utf-8", errors="replace"))
    return texts


_TABLES: dict[int, tuple[Any, TokenTable]] = {}


def _cached_table(tokenizer: Any) -> TokenTable:
    """token_table memoised per tokenizer object (token_texts is called once per block); a
    tokenizer that grew (``add_tokens``) is read again."""
    hit = _TABLES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and len(hit[1]) == _vocab_size(tokenizer, _backend(tokenizer)):
        return hit[1]
    table = token_table(tokenizer)
    if len(_TABLES) > 16:
        _TABLES.clear()
    _TABLES[id(tokenizer)] = (tokenizer, table)
    return table
