"""Tokenizer-aware merging: embedding and LM-head rows matched by token text, not by position.

Checkpoints fine-tuned from one base often end up with vocabularies that differ in size (tokens added
for a chat template, a padded vocabulary) or in order; merging their embedding rows by position then
mixes the vectors of different tokens without any error when the sizes agree. :func:`plan_vocab`
compares each input's vocabulary with the output's (the reference model's: the base, or the first
model without one) and, where they differ, gives the input a *row map*: for each output row, the
input's row for the same token text, or ``-1`` where the input has no such token. The engine reads the
mapped rows (:func:`gather_rows`) and fills the ``-1`` rows from the fallback model (the base, else the
reference), so a task-vector method sees no change there. The :class:`VocabMatch` of each input says
what was done and is written to ``vocab_map.json`` and the model card.

A tensor is vocabulary-indexed when its first dimension equals the model's ``vocab_size`` (embeddings,
untied LM heads and their biases). Rows past the tokenizer (padding) have no text and come from the
fallback model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from polyfuse.errors import ModelLoadError
from polyfuse.merge.shards import TensorInfo, read_rows

__all__ = ["VocabMatch", "gather_rows", "read_vocab", "row_map", "vocab_rows"]


def read_vocab(path: Path) -> dict[str, int] | None:
    """Token text -> id of the tokenizer in ``path`` (added tokens included), or None without one.

    Reads ``tokenizer.json`` with the tokenizers library; a directory with only slow-tokenizer files is
    read through transformers (local files only).
    """
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
        except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
            raise ModelLoadError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
    if not any((path / f).is_file() for f in ("tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(path), local_files_only=True).get_vocab())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: its tokenizer files cannot be read ({e})") from None


def vocab_rows(path: Path) -> int | None:
    """``vocab_size`` of the model config in ``path`` (text config of a multimodal model), or None."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(rows) if isinstance(rows, int) else None


@dataclass(frozen=True)
class VocabMatch:
    """How one input's vocabulary was matched to the output's."""

    model: str
    """The input's label and reference, e.g. ``models[1] (./chat)``."""
    output_rows: int
    input_rows: int
    matched: int
    """Output tokens found in the input (by text)."""
    moved: int
    """Matched tokens whose input id differs from the output id."""
    from_fallback: int
    """Output rows the input has no token for (filled from the fallback model)."""
    dropped: int
    """Input tokens the output vocabulary does not have (their rows are not used)."""
    examples_missing: list[str]
    examples_dropped: list[str]

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.model}: {self.matched} of {self.output_rows} rows matched by token text ({self.moved} at "
                f"another id), {self.from_fallback} from the fallback model, {self.dropped} input tokens dropped")


def row_map(output: dict[str, int], output_rows: int, input_vocab: dict[str, int], input_rows: int,
            label: str) -> tuple[torch.Tensor, VocabMatch]:
    """For every output row, the input row with the same token text (``-1``: none); and what was matched."""
    rows = torch.full((output_rows,), -1, dtype=torch.long)
    moved, missing = 0, []
    for token, out_id in output.items():
        if out_id >= output_rows:
            continue
        in_id = input_vocab.get(token)
        if in_id is None or in_id >= input_rows:
            missing.append(token)
            continue
        rows[out_id] = in_id
        moved += in_id != out_id
    dropped = [t for t, i in input_vocab.items() if t not in output and i < input_rows]
    matched = int((rows >= 0).sum())
    match = VocabMatch(label, output_rows, input_rows, matched, moved, output_rows - matched, len(dropped),
                       sorted(missing)[:10], sorted(dropped)[:10])
    return rows, match


def gather_rows(info: TensorInfo, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (all ``>= 0``) of a tensor as float32, read in runs of consecutive ids."""
    parts, start = [], 0
    values = ids.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            first = values[start]
            parts.append(read_rows(info, first, first + i - start).to(torch.float32))
            start = i
    if not parts:
        return torch.empty((0, *info.shape[1:]), dtype=torch.float32)
    return torch.cat(parts).reshape(len(values), *info.shape[1:])
