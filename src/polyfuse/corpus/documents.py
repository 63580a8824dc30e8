"""The corpus layout: ``<root>/<split>/<domain>.jsonl``, one ``{"id": str, "text": str}`` per line.

The layout is readable with ``datasets.load_dataset("json", data_files=...)`` and by
:func:`read_documents`, which reports a bad row with its file and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from polyfuse.errors import DataError

ROW_FIX = 'each line must be one JSON object like {"id": "doc-1", "text": "..."}'


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id and its text."""

    id: str
    text: str


def domain_path(root: str | Path, split: str, domain: str) -> Path:
    """Where the documents of one domain and split live."""
    return Path(root) / split / f"{domain}.jsonl"


def write_documents(path: Path, docs: Iterable[Document]) -> dict[str, int]:
    """Write documents as JSONL (one object per line); returns counts of documents and UTF-8 bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n_docs = n_bytes = 0
    with path.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
            n_docs += 1
            n_bytes += len(doc.text.encode("utf-8"))
    return {"documents": n_docs, "bytes": n_bytes}


def read_documents(path: str | Path) -> Iterator[Document]:
    """Yield the documents of a JSONL file; a malformed row raises :class:`DataError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected <corpus>/<split>/<domain>.jsonl")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); {ROW_FIX}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                got = "no 'text' key" if isinstance(row, dict) else f"a {type(row).__name__}"
                if isinstance(row, dict) and "text" in row:
                    got = f"'text' is a {type(row['text']).__name__}"
                raise DataError(f"{path}:{lineno}: {got}; {ROW_FIX}")
            yield Document(id=str(row.get("id", f"{path.stem}-{lineno}")), text=row["text"])


def list_domains(root: str | Path, split: str) -> list[str]:
    """Domains present in one split of a corpus directory, sorted."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such split directory; expected <corpus>/{split}/<domain>.jsonl")
    return sorted(p.stem for p in split_dir.glob("*.jsonl"))
