"""Fusion's teachers at the target's positions, in one order: the fallback (if any), the target, the sources.

FuseLLM fuses the target's own distribution (teacher 0, ``include_target``) with the aligned sources.
Positions no source reaches learn from the ``fallback``: the target's own distribution (``target``; the
target's row itself when the target is a teacher), a one-hot on the next token (``label``, FuseLLM's
fallback) or nothing (``none``; only without the target, which otherwise covers every position). A fallback
that is not the target is teacher 0 and never valid: the strategies use teacher 0 exactly where no teacher
has a usable prediction (:mod:`polyfuse.fuse.strategies`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polyfuse.capture.store import BlockTopK
from polyfuse.fuse.strategies import FusedBlock, TeacherBlock

__all__ = ["fused_store_row", "fusion_teachers", "lead_teachers", "teacher_names"]


def lead_teachers(fallback: str, include_target: bool) -> int:
    """How many teachers come before the sources (a fallback that is not the target, and/or the target)."""
    has_fallback = fallback == "label" or (fallback == "target" and not include_target)
    return int(has_fallback) + int(include_target)


def teacher_names(target: str, sources: Sequence[str], fallback: str, include_target: bool) -> list[str]:
    """Teacher names in :func:`fusion_teachers` order (a label fallback is ``label``)."""
    lead = {0: [], 1: ["label" if fallback == "label" and not include_target else target],
            2: ["label", target]}[lead_teachers(fallback, include_target)]
    return lead + list(sources)


def fusion_teachers(target_row: BlockTopK, aligned_rows: Sequence[BlockTopK], *, fallback: str,
                    include_target: bool, next_ids: np.ndarray | None = None,
                    source_nll: Sequence[np.ndarray | None] | None = None) -> list[TeacherBlock]:
    """The teachers of one block: ``target_row`` (the target's capture), the sources' ``aligned_rows``.

    ``next_ids`` [P]: the target's next tokens (the ``label`` fallback). ``source_nll`` [P] per source:
    what each is scored by at token level instead of its aligned ``target_logprob`` (``fuse.criterion:
    span``), where it has one (NaN elsewhere).
    """

    def teacher(row: BlockTopK, valid: np.ndarray, seq_nll: float | None = None,
                nll: np.ndarray | None = None) -> TeacherBlock:
        own = -row.target_logprob.astype(np.float64)
        nll = own if nll is None else np.where(np.isnan(own) | np.isnan(nll), own, nll)
        return TeacherBlock(row.ids, row.logprobs.astype(np.float32), nll, valid,
                            row.nll_sum if seq_nll is None else seq_nll)

    p = target_row.n_positions
    scores = source_nll if source_nll is not None else [None] * len(aligned_rows)
    sources = [teacher(row, ~np.isnan(row.target_logprob), nll=nll) for row, nll in zip(aligned_rows, scores, strict=True)]
    covered = np.any([t.valid for t in sources], axis=0) if sources else np.zeros(p, dtype=bool)
    out = []
    if fallback == "label":
        out.append(TeacherBlock(np.asarray(next_ids, dtype=np.int64)[:, None], np.zeros((p, 1), np.float32),
                                np.full(p, np.nan), np.zeros(p, dtype=bool), float("nan")))
    elif fallback == "target" and not include_target:  # NaN sequence NLL: never chosen for a block
        out.append(teacher(target_row, np.zeros(p, dtype=bool), float("nan")))
    if include_target:
        out.append(teacher(target_row, covered if fallback == "label" else np.ones(p, dtype=bool)))
    return out + sources


def fused_store_row(block_id: int, fused: FusedBlock, target_row: BlockTopK, k: int) -> BlockTopK:
    """A fused block (``fused.ids`` / ``fused.logprobs`` [P, k'] from :func:`polyfuse.fuse.strategies.fuse_block`)
    in the store format: ``k`` entries per position, padded with id −1 at −inf, the target's own
    ``target_logprob`` and ``nll_sum`` kept."""
    ids = np.full((fused.ids.shape[0], k), -1, dtype=np.int64)
    logprobs = np.full((fused.ids.shape[0], k), -np.inf, dtype=np.float16)
    width = min(k, fused.ids.shape[1])
    ids[:, :width] = fused.ids[:, :width]
    logprobs[:, :width] = fused.logprobs[:, :width]
    return BlockTopK(block_id, ids, logprobs, target_row.target_logprob, target_row.nll_sum)
