"""The corpus layout: ``<root>/<split>/<domain>.jsonl``, one document per line.

A row is plain text or a chat conversation:

* text: ``{"id": str, "text": str}``;
* chat, ``messages`` form: ``{"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
* chat, ShareGPT form: ``{"id": str, "conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``.

A chat row is rendered to text with **one** chat template, the target tokenizer's
(``tokenizer.apply_chat_template(messages, tokenize=False)``; a tokenizer without a template gets
:data:`polyfuse.corpus.chat.DEFAULT_CHAT_TEMPLATE`), so every model scores the same text
(FuseChat). A leading BOS string the template writes is dropped: the context token is the BOS
already (:mod:`polyfuse.corpus.tokens`). The document keeps the character spans of its
assistant responses (:mod:`polyfuse.corpus.spans`); a text document has none (every token counts).

**A response span is the assistant's content plus its end-of-turn marker.** The span of each
assistant content found in the rendered text (:func:`~polyfuse.corpus.spans.locate_responses`) is
extended over the marker that *immediately* follows it, when the text there starts with one of the
target tokenizer's special-token strings (:func:`special_strings`: ``all_special_tokens`` plus the
added tokens flagged special; the longest match wins). So the target is trained to end its turn,
as FuseChat's labels do::

    ChatML   "<|im_start|>assistant\\nhi<|im_end|>\\n<|im_start|>user..."   span "hi<|im_end|>"
    Llama-3  "...<|end_header_id|>\\n\\nhi<|eot_id|><|start_header_id|>..."  span "hi<|eot_id|>"
    default  "### Assistant:\\nhi</s>"                                      span "hi</s>" (the EOS)

Only one marker is taken (never the next turn's ``<|im_start|>``), and only when it touches the
content: a template that writes whitespace first (Llama-2's ``content + ' ' + eos``) keeps the
content alone. Chat blocks are tokenized with special tokens parsed
(:func:`polyfuse.corpus.tokens.encode_blocks`), so the marker is one special token.

The layout is readable with ``datasets.load_dataset("json", data_files=...)`` and by
:func:`read_documents`, which reports a bad row with its file and line number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from polyfuse.corpus.chat import DEFAULT_CHAT_TEMPLATE
from polyfuse.corpus.spans import Spans, locate_responses, normalise_spans
from polyfuse.errors import DataError
from polyfuse.workspace import iter_jsonl

__all__ = ["CHAT_KEYS", "RENDER_VERSION", "Document", "DocumentFormat", "chat_template_of", "domain_path",
           "extend_over_markers", "list_domains", "read_documents", "render_chat", "render_key", "special_strings",
           "write_documents"]

ROW_FIX = ('each line must be one JSON object like {"id": "doc-1", "text": "..."} or, for chat, '
           '{"id": "c-1", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
DocumentFormat = Literal["auto", "text", "chat"]
CHAT_KEYS = ("messages", "conversations")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
RENDER_VERSION = 2
"""Bumped whenever rendering or span location changes what a chat document becomes (2: spans take the
end-of-turn marker)."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id, its text and (chat) the assistant responses' character spans."""

    id: str
    text: str
    response_spans: Spans | None = None
    """``None``: plain text, every token counts; otherwise ``(start, end)`` spans of ``text``."""


def domain_path(root: str | Path, split: str, domain: str) -> Path:
    """Where the documents of one domain and split live."""
    return Path(root) / split / f"{domain}.jsonl"


def write_documents(path: Path, docs: Iterable[Document]) -> dict[str, int]:
    """Write documents as text JSONL (one object per line); returns counts of documents and UTF-8 bytes.

    Chat documents are written as their rendered text (the spans are not kept).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    n_docs = n_bytes = 0
    with path.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
            n_docs += 1
            n_bytes += len(doc.text.encode("utf-8"))
    return {"documents": n_docs, "bytes": n_bytes}


def chat_template_of(tokenizer: Any) -> str:
    """The template chat rows are rendered with: the tokenizer's own, else polyfuse's default."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE


def render_key() -> str:
    """What stage configs record about rendering: :data:`RENDER_VERSION` and the default template's hash.

    (The tokenizer's own template is part of the tokenizer files, which stages hash as inputs.)
    """
    digest = hashlib.sha256(DEFAULT_CHAT_TEMPLATE.encode("utf-8")).hexdigest()[:16]
    return f"v{RENDER_VERSION}:{digest}"


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any, where: str = "chat row") -> tuple[str, Spans]:
    """``(text, response spans)`` of ``messages`` (``role``/``content`` dicts) under the tokenizer's template."""
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, chat_template=chat_template_of(tokenizer))
    except Exception as exc:  # jinja errors (e.g. a template that rejects a role order)
        raise DataError(f"{where}: the chat template failed to render the conversation ({exc})") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: apply_chat_template returned {type(text).__name__}, not text")
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and text.startswith(bos):
        text = text[len(bos):]
    spans = locate_responses(text, [(m["role"], m["content"]) for m in messages], where)
    return text, extend_over_markers(text, spans, special_strings(tokenizer))


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special-token strings, longest first: ``all_special_tokens`` and added tokens flagged special."""
    found = {t for t in getattr(tokenizer, "all_special_tokens", None) or [] if isinstance(t, str)}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {t.content for t in decoder.values() if getattr(t, "special", False) and isinstance(t.content, str)}
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


def extend_over_markers(text: str, spans: Spans, markers: Sequence[str]) -> Spans:
    """Each span extended over the first of ``markers`` (longest first) that ``text`` has right at its end.

        >>> extend_over_markers("hi<|im_end|>\\n<|im_start|>", ((0, 2),), ("<|im_start|>", "<|im_end|>"))
        ((0, 12),)
    """
    out = []
    for a, b in spans:
        marker = next((m for m in markers if text.startswith(m, b)), "")
        out.append((a, b + len(marker)))
    return tuple(out)


def _messages(row: dict, where: str) -> list[dict[str, str]]:
    """The conversation of a chat row as ``role``/``content`` dicts (ShareGPT ``from``/``value`` mapped)."""
    key = next(k for k in CHAT_KEYS if k in row)
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns; {ROW_FIX}")
    role_key, content_key, roles = ("role", "content", {r: r for r in ROLES}) if key == "messages" else (
        "from", "value", SHAREGPT_ROLES)
    out = []
    for n, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        content = turn.get(content_key) if isinstance(turn, dict) else None
        if role not in roles or not isinstance(content, str):
            raise DataError(f"{where}: {key}[{n}] must be {{{role_key!r}: one of {', '.join(roles)}, "
                            f"{content_key!r}: str}}; got {json.dumps(turn, ensure_ascii=False)[:120]}")
        out.append({"role": roles[role], "content": content})
    return out


def read_documents(path: str | Path, *, format: DocumentFormat = "auto", tokenizer: Any = None) -> Iterator[Document]:
    """Yield the documents of a JSONL file; a malformed row raises :class:`DataError` naming file and line.

    ``format``: ``text`` (rows need ``text``), ``chat`` (rows need ``messages`` or ``conversations``) or
    ``auto`` (each row by its keys). Chat rows are rendered with ``tokenizer``'s chat template (the
    target's; see the module docstring), which chat rows therefore need.
    """
    path = Path(path)
    for where, row in iter_jsonl(path, missing="no such file; expected <corpus>/<split>/<domain>.jsonl", fix=ROW_FIX):
        doc_id = str(row.get("id", f"{path.stem}-{where.rsplit(':', 1)[1]}"))
        chat = any(k in row for k in CHAT_KEYS) and format != "text"
        if chat and not (format == "auto" and isinstance(row.get("text"), str)):
            if tokenizer is None:
                raise DataError(f"{where}: a chat row needs the target tokenizer to render it; pass tokenizer=")
            text, spans = render_chat(_messages(row, where), tokenizer, where)
            yield Document(id=doc_id, text=text, response_spans=normalise_spans(spans))
            continue
        if format == "chat":
            raise DataError(f"{where}: corpus.format is chat but the row has no 'messages' or 'conversations'; "
                            f"{ROW_FIX}")
        if not isinstance(row.get("text"), str):
            got = f"'text' is a {type(row['text']).__name__}" if "text" in row else "no 'text' key"
            raise DataError(f"{where}: {got}; {ROW_FIX}")
        yield Document(id=doc_id, text=row["text"])


def list_domains(root: str | Path, split: str) -> list[str]:
    """Domains present in one split of a corpus directory, sorted."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such split directory; expected <corpus>/{split}/<domain>.jsonl")
    return sorted(p.stem for p in split_dir.glob("*.jsonl"))
