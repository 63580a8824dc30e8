"""Response spans of chat documents and the one rule that maps them onto tokens.

A response span is a half-open character range ``(start, end)`` of a document's (or block's) text
that holds an assistant turn's content and the end-of-turn marker right after it, when the chat
template writes one (:mod:`polyfuse.corpus.documents`). ``None`` instead of a tuple of spans means *plain text*:
every token counts, as for any pretraining corpus. An empty tuple means a chat text with no
response inside (e.g. a block cut from the prompt part of a conversation): no token counts.

**The token rule** (:func:`response_tokens`; capture, training and everything else use it): a
token is a response token when its character span ``[s, e)`` overlaps a response span ``[a, b)``,
i.e. ``s < b and e > a``. Zero-width tokens (the context token, offsets ``[0, 0]``) never count.
Position ``t`` of a model's output predicts token ``t + 1``, so position ``t`` is a *response
position* when token ``t + 1`` is a response token (:func:`response_positions`).

A token that straddles a span's edge (``" yes"`` when the response is ``"yes"``) counts.

Example (a block ``"Q: hi\nA: yes"`` whose response ``"yes"`` is characters 9..12)::

    >>> offsets = np.array([[0, 0], [0, 2], [2, 5], [5, 8], [8, 12]])   # <bos> "Q:" " hi" "\nA:" " yes"
    >>> response_tokens(offsets, ((9, 12),))
    array([False, False, False, False,  True])
    >>> response_positions(EncodedBlock(ids, offsets, True), ((9, 12),))   # the position predicting " yes"
    array([False, False, False,  True])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from polyfuse.corpus.tokens import EncodedBlock
from polyfuse.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "Spans",
    "clip_spans",
    "locate_responses",
    "normalise_spans",
    "response_labels",
    "response_positions",
    "response_tokens",
    "span_bytes",
]

Spans = tuple[tuple[int, int], ...]
IGNORE_INDEX = -100
"""The label of a token that is not trained on (Hugging Face's ``ignore_index``)."""


def normalise_spans(spans: Iterable[Sequence[int]] | None) -> Spans | None:
    """``None`` stays ``None``; otherwise a tuple of ``(start, end)`` int pairs with ``0 <= start <= end``."""
    if spans is None:
        return None
    out = []
    for span in spans:
        if len(span) != 2 or not all(isinstance(x, int | np.integer) for x in span):
            raise DataError(f"response span {span!r} is not a [start, end] pair of integers")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start <= end:
            raise DataError(f"response span {span!r} must have 0 <= start <= end")
        out.append((start, end))
    return tuple(out)


def response_tokens(offsets: np.ndarray, spans: Spans | None) -> np.ndarray:
    """``[n]`` bool: which tokens (character offsets ``[n, 2]``) are response tokens (module docstring).

    All True when ``spans`` is None (plain text), except zero-width tokens, which are never
    predicted content either way.
    """
    offsets = np.asarray(offsets).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    if spans is None:
        return np.ones(len(offsets), dtype=bool)
    hit = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        hit |= (starts < b) & (ends > a)
    return hit & (ends > starts)


def response_positions(enc: EncodedBlock, spans: Spans | None) -> np.ndarray:
    """``[n - 1]`` bool: positions whose next token is a response token (all True for plain text)."""
    if spans is None:
        return np.ones(max(len(enc) - 1, 0), dtype=bool)
    return response_tokens(enc.offsets, spans)[1:]


def response_labels(enc: EncodedBlock, spans: Spans | None) -> np.ndarray:
    """``[n]`` int64 training labels: the token ids, :data:`IGNORE_INDEX` on tokens that are not responses.

    Label ``t`` is the target of position ``t - 1`` (the causal-LM shift happens in the loss), so a
    position is supervised exactly when :func:`response_positions` holds. Plain text: the ids.
    """
    labels = np.asarray(enc.ids, dtype=np.int64).copy()
    if spans is not None:
        labels[~response_tokens(enc.offsets, spans)] = IGNORE_INDEX
    return labels


def clip_spans(spans: Spans | None, start: int, end: int) -> Spans | None:
    """The parts of ``spans`` inside ``[start, end)``, relative to ``start`` (None stays None)."""
    if spans is None:
        return None
    return tuple((max(a, start) - start, min(b, end) - start) for a, b in spans if a < end and b > start)


def span_bytes(text: str, spans: Spans | None) -> int:
    """UTF-8 bytes of the response characters of ``text`` (all of it when ``spans`` is None)."""
    if spans is None:
        return len(text.encode("utf-8"))
    return sum(len(text[a:b].encode("utf-8")) for a, b in spans)


def locate_responses(text: str, turns: Sequence[tuple[str, str]], where: str) -> Spans:
    """Character spans of the assistant contents of ``turns`` (``(role, content)``) in the rendered ``text``.

    The contents alone: :func:`polyfuse.corpus.documents.render_chat` then adds the end-of-turn markers.

    The turns are searched in order, each from the end of the previous one found, so an assistant
    content is never matched inside an earlier turn (``"Say hi"`` → ``"hi"``). Other turns' contents
    advance the search when found verbatim and are skipped otherwise (templates may rewrite them);
    an assistant content must be found verbatim or, failing that, stripped of surrounding whitespace
    (templates that ``trim``); else :class:`DataError` naming ``where``. Empty contents give no span.
    """
    pos, spans = 0, []
    for n, (role, content) in enumerate(turns):
        if not content:
            continue
        i = text.find(content, pos)
        if role != "assistant":
            if i >= 0:
                pos = i + len(content)
            continue
        found = content
        if i < 0 and content.strip() and content.strip() != content:
            found = content.strip()
            i = text.find(found, pos)
        if i < 0:
            preview = content if len(content) <= 40 else content[:37] + "..."
            raise DataError(
                f"{where}: assistant turn {n} ({preview!r}) is not in the text the chat template rendered; "
                "the template must copy assistant contents verbatim (use a tokenizer whose chat template does, "
                "or remove the tokenizer's chat_template so polyfuse's default is used)"
            )
        spans.append((i, i + len(found)))
        pos = i + len(found)
    return tuple(spans)
