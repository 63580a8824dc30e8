"""Bits per byte: a tokenizer-neutral language-modelling metric.

``bpb = (sum of next-token NLL over the scored tokens, in bits) / (UTF-8 bytes of the scored text)``.
Tokens are a model-specific unit, bytes are not, so bpb compares models with different tokenizers
fairly (a model with a coarser tokenizer predicts fewer, harder tokens for the same bytes).

Per document, ``ids = tokenizer(text, add_special_tokens=False)`` and the scored sequence is
``[ctx] + ids`` with ``ctx = bos_context_id(tokenizer)`` (BOS, else EOS): every token of ``ids``
is predicted, so the byte count is ``len(text.encode())``. When the tokenizer has neither BOS nor
EOS, the first token has no context and is not scored; its bytes (the text up to the end of its
character span, from the offsets mapping) are left out of the byte count too. If that token is a
partial UTF-8 character (byte-level BPE), the whole character's bytes are left out, so such a
document is off by at most 3 bytes.

Long documents are split with the standard sliding window (:func:`plan_windows`); every target
token is scored exactly once. Windows of all documents are sorted by length and batched; results
do not depend on the batch size.
"""

from __future__ import annotations

import gc
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polyfuse.corpus.documents import read_documents
from polyfuse.errors import DataError
from polyfuse.models import bos_context_id, context_length
from polyfuse.progress import progress_bar

if TYPE_CHECKING:
    from rich.table import Table
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BpbResult",
    "Window",
    "bits_per_byte",
    "evaluate_bpb",
    "format_bpb_table",
    "load_domain_texts",
    "plan_windows",
    "score_token_windows",
]

DEFAULT_MAX_LENGTH = 2048
"""Upper bound for the default window length (the model's context is used when shorter)."""
_CHUNK_ELEMENTS = 2**25
"""float32 logit elements converted at once when gathering label log-probs (128 MiB)."""
_LN2 = math.log(2.0)

ModelEntry = (
    tuple[str, "PreTrainedModel", "PreTrainedTokenizerBase"]
    | tuple[str, Callable[[], tuple["PreTrainedModel", "PreTrainedTokenizerBase"]]]
)


@dataclass
class BpbResult:
    """Pooled counts; ``a + b`` pools two results (sum of bits over sum of bytes)."""

    nll_bits: float
    """Sum of next-token NLL over the scored tokens, in bits."""
    n_bytes: int
    """UTF-8 bytes of the scored text."""
    n_tokens: int
    """Number of scored tokens."""

    @property
    def bpb(self) -> float:
        """Bits per byte (``nan`` when nothing was scored)."""
        return self.nll_bits / self.n_bytes if self.n_bytes else math.nan

    def __add__(self, other: BpbResult) -> BpbResult:
        if not isinstance(other, BpbResult):
            return NotImplemented
        return BpbResult(
            self.nll_bits + other.nll_bits, self.n_bytes + other.n_bytes, self.n_tokens + other.n_tokens
        )


@dataclass(frozen=True)
class Window:
    """One model call over ``seq[start:end]`` predicting ``seq[start + 1 : end + 1]``.

    Only labels from index ``score_from`` of the window on are counted; earlier ones were scored
    by a previous window (with more context).
    """

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_windows(n_tokens_with_ctx: int, max_length: int, stride: int) -> list[Window]:
    """Sliding windows over a sequence of ``n_tokens_with_ctx`` ids (context token included).

    Targets are ``seq[1:]``. Window ``i`` starts at ``b = i * stride``, feeds ``seq[b : b + L]``
    and predicts ``seq[b + 1 : b + L + 1]``, counting only targets that no earlier window scored;
    so every target is scored exactly once, with at least ``L - stride + 1`` tokens of context once
    the first window is full. ``stride == max_length`` gives disjoint windows.

    Worked example, ``n_tokens_with_ctx=10`` (targets ``seq[1..9]``), ``max_length=4, stride=2``::

        Window(start=0, end=4, score_from=0)  # inputs seq[0:4] -> targets 1,2,3,4
        Window(start=2, end=6, score_from=2)  # inputs seq[2:6] -> labels 3..6, scores 5,6
        Window(start=4, end=8, score_from=2)  # inputs seq[4:8] -> labels 5..8, scores 7,8
        Window(start=6, end=9, score_from=2)  # inputs seq[6:9] -> labels 7..9, scores 9

    >>> plan_windows(10, 4, 4)
    [Window(start=0, end=4, score_from=0), Window(start=4, end=8, score_from=0), Window(start=8, end=9, score_from=0)]
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (got {max_length})")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length={max_length} (got {stride})")
    last_target = n_tokens_with_ctx - 1
    windows: list[Window] = []
    scored_until = 0  # index of the last target scored so far
    start = 0
    while scored_until < last_target:
        end = min(start + max_length, last_target)
        first_new = max(scored_until + 1, start + 1)
        windows.append(Window(start=start, end=end, score_from=first_new - (start + 1)))
        scored_until = end
        start += stride
    return windows


def _model_context(model: PreTrainedModel) -> int | None:
    """The model's maximum sequence length from its config, if it declares one."""
    config = getattr(model, "config", None)
    return context_length(config) if config is not None else None


def _default_max_length(model: PreTrainedModel) -> int:
    context = _model_context(model)
    return min(context, DEFAULT_MAX_LENGTH) if context else DEFAULT_MAX_LENGTH


def _model_device(model: PreTrainedModel) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _label_logprobs(logits: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float(), -1).gather(-1, labels)[scored]`` without the full float32 copy.

    Args:
        logits: [B, T, V] in any dtype.
        labels: [B, T] target ids.
        scored: [B, T] bool, positions to keep.
    Returns:
        [N] float32 log-probs of the labels at the scored positions, in row-major order.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # [B*T, V]
    positions = scored.reshape(-1).nonzero().squeeze(1)  # [N]
    targets = labels.reshape(-1)[positions]  # [N]
    out = torch.empty(positions.numel(), dtype=torch.float32, device=logits.device)
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    for i in range(0, positions.numel(), chunk):
        rows = flat[positions[i : i + chunk]].float()  # [n, V]
        picked = rows.gather(1, targets[i : i + chunk, None]).squeeze(1)  # [n]
        out[i : i + chunk] = picked - torch.logsumexp(rows, dim=-1)
    return out


def _accepts(model: PreTrainedModel, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def score_token_windows(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    description: str = "bpb",
) -> list[torch.Tensor]:
    """Next-token NLL (nats) of every target ``seq[1:]`` of each pre-tokenized sequence.

    ``seq[0]`` is context only (e.g. BOS). Long sequences are split by :func:`plan_windows`
    (``stride`` defaults to ``max_length``, which defaults to the model's context, at most 2048);
    windows of all sequences are sorted by length (longest first, ties by sequence then start),
    right-padded into batches of ``batch_size`` and run with an attention mask and explicit
    ``position_ids`` (each window starts at position 0).

    Returns:
        One float64 CPU tensor of shape [len(seq) - 1] per sequence (empty for length <= 1).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    max_length = max_length or _default_max_length(model)
    context = _model_context(model)
    if context is not None and max_length > context:  # a window never exceeds what the model can attend
        max_length = context
    stride = min(stride or max_length, max_length)
    device = torch.device(device) if device is not None else _model_device(model)

    jobs = [(i, w) for i, seq in enumerate(sequences) for w in plan_windows(len(seq), max_length, stride)]
    jobs.sort(key=lambda job: (-job[1].length, job[0], job[1].start))
    results = [torch.zeros(max(len(seq) - 1, 0), dtype=torch.float64) for seq in sequences]
    extra: dict[str, Any] = {"use_cache": False} if _accepts(model, "use_cache") else {}
    use_positions = _accepts(model, "position_ids")

    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    with (
        _eval_mode(model),
        torch.inference_mode(),
        progress_bar(description, len(batches), progress) as advance,
    ):
        for batch in batches:
            width = batch[0][1].length  # longest first
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]; pad id 0 is never scored
            labels = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
            scored = torch.zeros(len(batch), width, dtype=torch.bool)  # [B, T]
            for row, (i, w) in enumerate(batch):
                seq = sequences[i]
                input_ids[row, : w.length] = torch.as_tensor(seq[w.start : w.end])
                labels[row, : w.length] = torch.as_tensor(seq[w.start + 1 : w.end + 1])
                attention_mask[row, : w.length] = 1
                scored[row, w.score_from : w.length] = True
            kwargs = dict(extra, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            if use_positions:  # [B, T]; every window starts at position 0, padding sits on the right
                kwargs["position_ids"] = torch.arange(width, device=device).expand(len(batch), -1)
            logits = model(**kwargs).logits  # [B, T, V]
            logprobs = _label_logprobs(logits, labels.to(device), scored.to(device)).double().cpu()  # [N]
            del logits
            offset = 0
            for i, w in batch:  # row-major order matches _label_logprobs
                n = w.length - w.score_from
                first_target = w.start + w.score_from  # index into seq[1:]
                results[i][first_target : first_target + n] = -logprobs[offset : offset + n]
                offset += n
            advance()
    return results


def bits_per_byte(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    description: str = "bpb",
) -> BpbResult:
    """Pooled bits per byte of ``model`` over ``texts`` (see the module docstring for the rules).

    ``max_length`` defaults to the model's context (``max_position_embeddings`` or ``n_positions``),
    at most 2048; ``stride`` defaults to ``max_length``. Empty texts are skipped.
    """
    texts = [t for t in texts if t]
    if not texts:
        return BpbResult(0.0, 0, 0)
    ctx = bos_context_id(tokenizer)
    if ctx is None:
        sequences, n_bytes = _sequences_without_context(tokenizer, texts)
    else:
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        sequences = [[ctx, *ids] for ids in encoded]
        n_bytes = [len(t.encode("utf-8")) if ids else 0 for t, ids in zip(texts, encoded, strict=True)]
    nll = score_token_windows(
        model,
        sequences,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        device=device,
        progress=progress,
        description=description,
    )
    nats = sum(float(x.sum()) for x in nll)
    return BpbResult(nll_bits=nats / _LN2, n_bytes=sum(n_bytes), n_tokens=sum(x.numel() for x in nll))


def _sequences_without_context(
    tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> tuple[list[list[int]], list[int]]:
    """Sequences ``ids`` (first token = context only) and the bytes of the text after the first token."""
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        first_ends = [offsets[0][1] if offsets else 0 for offsets in enc["offset_mapping"]]
        prefix_bytes = [len(t[:end].encode("utf-8")) for t, end in zip(texts, first_ends, strict=True)]
    except NotImplementedError:  # slow tokenizers have no offsets: decode the first token instead
        enc = tokenizer(texts, add_special_tokens=False, verbose=False)
        prefix_bytes = [len(tokenizer.decode(ids[:1]).encode("utf-8")) for ids in enc["input_ids"]]
    sequences = [list(ids) for ids in enc["input_ids"]]
    n_bytes = [
        len(t.encode("utf-8")) - prefix if len(ids) > 1 else 0
        for t, ids, prefix in zip(texts, sequences, prefix_bytes, strict=True)
    ]
    return sequences, n_bytes


def evaluate_bpb(
    models: Sequence[ModelEntry],
    data: Mapping[str, Sequence[str]],
    **opts: Any,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Bits per byte of each model on each domain, plus ``all``: pooled over every domain.

    Each entry of ``models`` is ``(name, model, tokenizer)`` or ``(name, load)`` where ``load()``
    returns ``(model, tokenizer)``; loaded models are evaluated one at a time and released before
    the next is loaded. ``opts`` go to :func:`bits_per_byte`, except ``progress``: one bar per model,
    a step per domain.

    Returns:
        ``{name: {"bpb": {domain: float, ..., "all": float}, "n_tokens": {...}, "n_bytes": {...}}}``;
        ``all`` is total bits over total bytes (the mixed held-out set), not a mean of domains.
    """
    if "all" in data:
        raise DataError("a domain is named 'all', which is reserved for the pooled score; rename its file")
    progress = opts.pop("progress", None)
    results: dict[str, dict[str, dict[str, float | int]]] = {}
    for entry in models:
        name = entry[0]
        if len(entry) == 2:
            model, tokenizer = entry[1]()
            owned = True
        elif len(entry) == 3:
            model, tokenizer = entry[1], entry[2]
            owned = False
        else:
            raise ValueError(f"model entry {entry!r} must be (name, model, tokenizer) or (name, load)")
        per_domain: dict[str, BpbResult] = {}
        with progress_bar(f"bpb {name}", len(data), progress) as advance:  # one bar per model, a step per domain
            for domain, texts in data.items():
                per_domain[domain] = bits_per_byte(model, tokenizer, texts, description=f"bpb {name}/{domain}",
                                                   progress=False, **opts)
                advance(domain=domain)
        pooled = sum(per_domain.values(), BpbResult(0.0, 0, 0))
        per_domain["all"] = pooled
        results[name] = {
            "bpb": {d: r.bpb for d, r in per_domain.items()},
            "n_tokens": {d: r.n_tokens for d, r in per_domain.items()},
            "n_bytes": {d: r.n_bytes for d, r in per_domain.items()},
        }
        if owned:
            del model, tokenizer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def load_domain_texts(
    data_dir: str | Path,
    split: str = "heldout",
    domains: Sequence[str] | None = None,
    max_bytes_per_domain: int | None = None,
) -> dict[str, list[str]]:
    """Read ``<data_dir>/<split>/<domain>.jsonl`` (one ``{"id": ..., "text": ...}`` object per line).

    ``domains=None`` reads every ``*.jsonl`` in the split, sorted by name. ``max_bytes_per_domain``
    keeps whole documents in file order until the cap; the last one is cut at a character boundary
    so the UTF-8 total never exceeds the cap. Blank lines are skipped.

    Raises:
        DataError: a missing directory, split or domain file, or a malformed row (file and line named).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"data directory {str(root)!r} does not exist; check the path (or build the corpus first)"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"split directory {str(split_dir)!r} does not exist; splits found: {', '.join(found) or 'none'}"
        )
    if domains is None:
        files = sorted(split_dir.glob("*.jsonl"))
        if not files:
            raise DataError(f"no <domain>.jsonl files in {str(split_dir)!r}; write one file per domain there")
    else:
        files = [split_dir / f"{d}.jsonl" for d in domains]
        for f in files:
            if not f.is_file():
                found = sorted(p.stem for p in split_dir.glob("*.jsonl"))
                raise DataError(
                    f"domain file {str(f)!r} does not exist; domains found: {', '.join(found) or 'none'}"
                )
    return {f.stem: _read_texts(f, max_bytes_per_domain) for f in files}


def _read_texts(path: Path, max_bytes: int | None) -> list[str]:
    texts: list[str] = []
    budget = max_bytes
    for doc in read_documents(path):
        text = doc.text
        if budget is not None:
            data = text.encode("utf-8")
            if len(data) > budget:
                text = data[:budget].decode("utf-8", errors="ignore")  # drops a cut character
                if text:
                    texts.append(text)
                break
            budget -= len(data)
        texts.append(text)
        if budget == 0:
            break
    return texts




def format_bpb_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], title: str | None = None, *,
    metric: str = "bpb", digits: int = 4, lower_is_better: bool = True,
) -> Table:
    """A rich table of per-model figures (``results[model][metric][column]``, by default the
    :func:`evaluate_bpb` results): one row per model that has ``metric``, one column per domain or task
    then ``all``; the best value of each column (lowest, or highest with ``lower_is_better=False``) is
    bold. Pure: nothing is printed."""
    from rich.table import Table

    results = {name: res for name, res in results.items() if metric in res}
    domains: list[str] = []
    for res in results.values():
        domains += [d for d in res[metric] if d != "all" and d not in domains]
    columns = [*domains, "all"]
    best = {}
    pick = min if lower_is_better else max
    for col in columns:
        values = [res[metric].get(col, math.nan) for res in results.values()]
        finite = [v for v in values if not math.isnan(v)]
        best[col] = pick(finite) if finite else None

    table = Table(title=title or "bits per byte (lower is better)")
    table.add_column("model")
    for col in columns:
        table.add_column(col, justify="right")
    for name, res in results.items():
        cells = [name]
        for col in columns:
            value = res[metric].get(col, math.nan)
            if math.isnan(value):
                cells.append("-")
            else:
                text = f"{value:.{digits}f}"
                cells.append(f"[bold]{text}[/bold]" if value == best[col] else text)
        table.add_row(*cells)
    return table
