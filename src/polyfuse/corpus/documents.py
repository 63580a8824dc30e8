"""The corpus layout: ``<root>/<split>/<domain>.jsonl``, one document per line.

A row is plain text or a chat conversation:

* text: ``{"id": str, "text": str}``;
* chat, ``messages`` form: ``{"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
* chat, ShareGPT form: ``{"id": str, "conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``.

A chat row is rendered to text with **one** chat template, the target tokenizer's
(``tokenizer.apply_chat_template(messages, tokenize=False)``; a tokenizer without a template gets
:data:`polyfuse.implicit.train.DEFAULT_CHAT_TEMPLATE`), so every model scores the same text
(FuseChat). A leading BOS string the template writes is dropped: the context token is the BOS
already (:mod:`polyfuse.corpus.tokens`). The document keeps the character spans of its
assistant contents (:mod:`polyfuse.corpus.spans`); a text document has none (every token counts).

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

from polyfuse.corpus.spans import Spans, locate_responses, normalise_spans
from polyfuse.errors import DataError

__all__ = ["CHAT_KEYS", "RENDER_VERSION", "Document", "DocumentFormat", "chat_template_of", "domain_path",
           "list_domains", "read_documents", "render_chat", "render_key", "write_documents"]

ROW_FIX = ('each line must be one JSON object like {"id": "doc-1", "text": "..."} or, for chat, '
           '{"id": "c-1", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
DocumentFormat = Literal["auto", "text", "chat"]
CHAT_KEYS = ("messages", "conversations")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
RENDER_VERSION = 1
"""Bumped whenever rendering or span location changes what a chat document becomes."""


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
    from polyfuse.implicit.train import DEFAULT_CHAT_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE


def render_key() -> str:
    """What stage configs record about rendering: :data:`RENDER_VERSION` and the default template's hash.

    (The tokenizer's own template is part of the tokenizer files, which stages hash as inputs.)
    """
    from polyfuse.implicit.train import DEFAULT_CHAT_TEMPLATE

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
    return text, spans


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
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected <corpus>/<split>/<domain>.jsonl")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); {ROW_FIX}") from None
            doc_id = str(row.get("id", f"{path.stem}-{lineno}")) if isinstance(row, dict) else ""
            chat = isinstance(row, dict) and any(k in row for k in CHAT_KEYS) and format != "text"
            if chat and not (format == "auto" and isinstance(row.get("text"), str)):
                if tokenizer is None:
                    raise DataError(f"{where}: a chat row needs the target tokenizer to render it; pass tokenizer=")
                text, spans = render_chat(_messages(row, where), tokenizer, where)
                yield Document(id=doc_id, text=text, response_spans=normalise_spans(spans))
                continue
            if format == "chat":
                raise DataError(f"{where}: corpus.format is chat but the row has no 'messages' or 'conversations'; "
                                f"{ROW_FIX}")
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                got = "no 'text' key" if isinstance(row, dict) else f"a {type(row).__name__}"
                if isinstance(row, dict) and "text" in row:
                    got = f"'text' is a {type(row['text']).__name__}"
                raise DataError(f"{where}: {got}; {ROW_FIX}")
            yield Document(id=doc_id, text=row["text"])


def list_domains(root: str | Path, split: str) -> list[str]:
    """Domains present in one split of a corpus directory, sorted."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such split directory; expected <corpus>/{split}/<domain>.jsonl")
    return sorted(p.stem for p in split_dir.glob("*.jsonl"))
