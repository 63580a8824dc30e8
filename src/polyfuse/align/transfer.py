"""Carry a source's top-k distributions to the target's positions and vocabulary.

Target position ``t`` predicts target token ``t + 1``. Which source position teaches it depends on
``align.method``:

* ``starts`` (the default, with ``vocab.method`` groups): the source position whose next token
  starts at the same character (:func:`shared_start_positions`); both models predict from the same
  text, whatever length their next tokens have. With ``align.inside``, positions whose next target
  token starts *inside* a source token learn the source's prediction before that token, conditioned
  on the bytes already emitted (:func:`inside_token_entries`); with ``align.cuts``, only source
  continuations after which the target's tokenizer still cuts where it did are kept
  (:class:`TargetCuts`). A target special token is never taught from source text
  (:func:`drop_special_mismatches`).
* ``offsets`` / ``dtw`` (FuseLLM): only where source token ``s + 1`` and target token ``t + 1`` are
  aligned one to one (same character span; a mutual, exclusive DTW pair the vocabulary map accepts):
  both models then predict the same next piece of text.

The chosen entries are mapped to target ids (entries without a target id are dropped), and entries
that land on the same target id are **summed** in probability space (FuseLLM's reference code keeps
only the first entry for an id and drops the rest).

A position no source reaches gets no distribution: ``valid`` is False, the ids are −1 and
``target_logprob`` is NaN; fusion then uses the other teachers or ``fuse.fallback`` (by default the
target's own distribution; ``label`` is a one-hot on the **next** target token, where FuseLLM's
reference code put it on the current one, teaching the model to repeat it). Worked example of the
one-to-one rule (source splits "unbelievable" in three, target keeps it whole)::

    text     " unbelievable!"
    target   <s> | " unbelievable" | "!"        positions 0, 1 predict tokens 1, 2
    source   <s> | " un" | "believ" | "able" | "!"
    t = 0 → next target token " unbelievable" is one-to-many: no transfer (valid False)
    t = 1 → next target token "!" is 1-1 with source token 4: source position 3's top-k
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from polyfuse.align.normalize import TokenTable
from polyfuse.align.tokens import Alignment, one_to_one
from polyfuse.align.vocab import VocabMap, _longest_prefix, _preferred_ids
from polyfuse.capture.store import BlockTopK
from polyfuse.corpus.tokens import EncodedBlock


def aligned_source_positions(alignment: Alignment, src: EncodedBlock, tgt: EncodedBlock,
                             vmap: VocabMap | None = None) -> np.ndarray:
    """[P_tgt] int64: the source position whose prediction matches target position ``t``'s, else −1.

    With ``vmap`` (used for DTW alignments, whose pairs may differ in text) the pair must also
    be accepted by the map: ``vmap(source token) == target token``.
    """
    o2o = one_to_one(alignment)[1:]  # [P_tgt] source token 1-1 with target token t + 1
    pos = np.where(o2o >= 1, o2o - 1, -1)
    if vmap is not None:
        ok = pos >= 0
        mapped = vmap(src.ids[o2o[ok]])
        accept = mapped == tgt.ids[1:][ok]
        pos[np.nonzero(ok)[0][~accept]] = -1
    return pos


def _fresh_starts(block: EncodedBlock) -> np.ndarray:
    """[n - 1] start character of tokens 1..n-1, −1 for a token that starts where one before it did
    (byte-fallback pieces of one character: only the first of them starts anything)."""
    begin = block.offsets[1:, 0].astype(np.int64)
    fresh = np.ones(len(begin), dtype=bool)
    fresh[1:] = begin[1:] > np.maximum.accumulate(begin)[:-1]
    return np.where(fresh, begin, -1)


def shared_start_positions(src: EncodedBlock, tgt: EncodedBlock) -> np.ndarray:
    """[P_tgt] int64: the source position whose next token starts where target position ``t``'s does, else −1.

    Both models then predict from the same text: the same context, whatever length their next
    tokens have. That is all a projection that respects token granularity needs (``groups``: a
    source token's mass goes to the target tokens its text begins, or to the target piece that
    begins its text); a one-to-one map needs the stricter :func:`aligned_source_positions`.
    Training only where both cuts agree on the *end* of the next token too would teach the student
    to prefer tokens that align (the condition depends on the next token), so this coverage
    matters. Tokens that share a start offset with the token before them (byte-fallback pieces of
    one character) never count as a start. Both blocks need their context token.
    """
    if not (src.has_context and tgt.has_context):
        raise ValueError("shared_start_positions needs blocks with a context token (position t predicts t + 1)")
    s_begin, t_begin = _fresh_starts(src), _fresh_starts(tgt)
    keys = np.nonzero(s_begin >= 0)[0]                                 # source positions with a fresh start
    if not keys.size:
        return np.full(len(t_begin), -1, dtype=np.int64)
    order = np.argsort(s_begin[keys], kind="stable")
    sorted_begin, sorted_pos = s_begin[keys][order], keys[order]
    at = np.searchsorted(sorted_begin, t_begin).clip(max=len(sorted_begin) - 1)
    hit = (t_begin >= 0) & (sorted_begin[at] == t_begin)
    return np.where(hit, sorted_pos[at], -1).astype(np.int64)


@dataclass(frozen=True)
class InsideEntries:
    """Teacher entries at target positions that fall inside a source token (:func:`inside_token_entries`).

    Entry ``e`` gives target position ``rows[e]`` probability ``probs[e]`` on target id ``ids[e]``
    (several entries of one row may share an id: they are summed); ``target_logprob[r]`` is the
    source's conditional log-probability of its actual token at row ``positions[r]``.
    """

    rows: np.ndarray
    ids: np.ndarray
    probs: np.ndarray
    positions: np.ndarray
    target_logprob: np.ndarray

    @classmethod
    def empty(cls) -> InsideEntries:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, np.zeros(0), none, np.zeros(0))


class RemainderMap:
    """Bytes left of a source token → the target piece the target would emit first for them.

    The longest target piece that is a prefix of the bytes (the bytes themselves when the target has
    them), as :func:`polyfuse.align.vocab.prefix_map` does for whole tokens; memoised, −1 when none.
    """

    def __init__(self, tgt: TokenTable) -> None:
        self.special = np.array([p is None for p in tgt.pieces], dtype=bool)
        """[V_tgt] bool: target ids without bytes (special tokens): no remainder begins them."""
        self._by_bytes = _preferred_ids(tgt)
        self._longest = max((len(p) for p in self._by_bytes), default=0)
        self._memo: dict[bytes, int] = {}

    def __call__(self, rest: bytes) -> int:
        hit = self._memo.get(rest)
        if hit is None:
            hit = self._memo[rest] = _longest_prefix(rest, self._by_bytes, self._longest)
        return hit


class TargetCuts:
    """Would the target's tokenizer end its previous token where the source's continuation begins?

    A target that emitted ``"\n   "`` (newline and three spaces) as one token did so because no
    fourth space follows (else it would have emitted the longer token): the target's position carries
    information about the text ahead that the source's position, at the same text, does not have. A
    source continuation ``c`` is consistent with the target's cut when tokenizing the target's previous
    token's text followed by ``c`` still cuts before ``c``; the others are dropped and the rest
    renormalised (the source's distribution conditioned on the target's tokenization). The check sees
    only the previous token and the continuation, not the text after it; it is memoised and run in
    batches. Continuations that are not whole UTF-8 are kept.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._memo: dict[tuple[str, bytes], bool] = {}
        self._prev_ids: dict[str, int] = {}
        self._prev_texts: list[str] = []
        self._pieces: Sequence[bytes | None] | None = None
        self._has_piece = np.zeros(0, dtype=bool)
        self._by_key: dict[int, bool] = {}

    def _survives(self, pairs: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Tokenize each ``prev + cont`` (Rust tokenizer, one batch): does a token start at ``len(prev)``?"""
        out, texts, where = [True] * len(pairs), [], []
        for i, (prev, cont) in enumerate(pairs):
            try:
                texts.append(prev + cont.decode("utf-8"))
                where.append(i)
            except UnicodeDecodeError:
                pass  # not whole UTF-8: kept
        if texts:  # the Rust tokenizer directly: transformers' per-encoding conversion costs twice the encoding
            backend = getattr(self._tokenizer, "backend_tokenizer", self._tokenizer)
            for i, enc in zip(where, backend.encode_batch(texts, add_special_tokens=False), strict=True):
                prev = pairs[i][0]
                out[i] = not prev or any(start == len(prev) for start, _ in enc.offsets)
        return out

    def __call__(self, pairs: Sequence[tuple[str, bytes]]) -> np.ndarray:
        """[len(pairs)] bool: the cut between ``prev`` and ``cont`` survives, for each ``(prev, cont)``."""
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self._memo]
        self._memo.update(zip(missing, self._survives(missing), strict=True))
        return np.fromiter((self._memo[p] for p in pairs), dtype=bool, count=len(pairs))

    def has_piece(self, pieces: Sequence[bytes | None]) -> np.ndarray:
        """[V_src] bool: the source id has bytes (not a special token). Binds ``pieces`` (see :meth:`for_ids`)."""
        if pieces is not self._pieces:
            self._pieces, self._by_key = pieces, {}
            self._has_piece = np.fromiter((p is not None for p in pieces), dtype=bool, count=len(pieces))
        return self._has_piece

    def for_ids(self, prevs: Sequence[str], ids: np.ndarray, ask: np.ndarray,
                pieces: Sequence[bytes | None]) -> np.ndarray:
        """:meth:`__call__` for the entries ``ids[ask]`` (``[R, k]`` source ids, row ``r`` after ``prevs[r]``),
        vectorised: pairs are keyed by integers, each distinct pair of the call is looked up once."""
        self.has_piece(pieces)
        pid = np.empty(len(prevs), dtype=np.int64)
        for i, prev in enumerate(prevs):
            j = self._prev_ids.get(prev)
            if j is None:
                j = self._prev_ids[prev] = len(self._prev_texts)
                self._prev_texts.append(prev)
            pid[i] = j
        keys = ((pid[:, None] << 32) | ids.astype(np.int64))[ask]
        uniq, inverse = np.unique(keys, return_inverse=True)
        distinct, known = uniq.tolist(), self._by_key
        todo = [k for k in distinct if k not in known]
        if todo:
            pairs = [(self._prev_texts[k >> 32], pieces[k & 0xFFFFFFFF]) for k in todo]
            known.update(zip(todo, self._survives(pairs), strict=True))
        return np.fromiter((known[k] for k in distinct), dtype=bool, count=len(distinct))[inverse]


def consistent_entries(src_topk: BlockTopK, src_pos: np.ndarray, src: EncodedBlock, tgt: EncodedBlock,
                       text: str, src_table: TokenTable, cuts: TargetCuts) -> np.ndarray:
    """[P_tgt, k_src] bool: which of the source's entries at ``src_pos[t]`` keep the target's cut (:class:`TargetCuts`).

    Rows without a source position are all False; specials and the source's actual next token are
    always kept.
    """
    keep = np.zeros((len(src_pos), src_topk.ids.shape[1]), dtype=bool)
    rows = np.nonzero(src_pos >= 0)[0]
    if not rows.size:
        return keep
    ids = src_topk.ids[src_pos[rows]]                                          # [R, k]
    prevs = [text[a:b] for a, b in zip(tgt.offsets[rows, 0].tolist(), tgt.offsets[rows + 1, 0].tolist(),
                                       strict=True)]                           # empty after the context token
    has_piece = cuts.has_piece(src_table.pieces)
    ask = (ids >= 0) & (ids < len(has_piece))
    ask[ask] = has_piece[ids[ask]]
    ask &= np.fromiter((bool(p) for p in prevs), dtype=bool, count=len(prevs))[:, None]
    out = ids >= 0                                                             # specials, and no previous token
    if ask.any():
        out[ask] = cuts.for_ids(prevs, ids, ask, src_table.pieces)
    actual = ids == src.ids[src_pos[rows] + 1][:, None]                        # the text that came next
    keep[rows] = out | actual
    return keep


def inside_token_entries(src_topk: BlockTopK, src: EncodedBlock, tgt: EncodedBlock, text: str,
                         src_table: TokenTable, remainder: RemainderMap, src_pos: np.ndarray,
                         cuts: TargetCuts | None = None) -> InsideEntries:
    """The source's prediction at target positions whose next token starts *inside* a source token.

    Target position ``t`` (not reached by ``src_pos``) predicts a target token that begins at character
    ``b`` inside source token ``j``; the target has already emitted ``u``, the bytes of ``j`` before
    ``b``. The source's distribution before ``j`` (position ``j − 1``) says which tokens follow; those
    whose bytes start with ``u`` and go on past it are the ones consistent with the text so far, and
    each one's remaining bytes begin what the target emits next. So each consistent candidate's
    probability goes to the target piece its remaining bytes begin (:class:`RemainderMap`), divided by
    the consistent mass (the source's distribution conditioned on ``u``); candidates that end inside
    ``u`` or spell other text are dropped. Example: the twin's ``".\n"`` at 0.6 and ``". "`` at 0.3
    after "end", the target has emitted ``"."``: the target's next ``"\n"`` gets 2/3 and ``" "`` 1/3.

    Positions where nothing is consistent (or whose source token cannot be read byte for byte:
    specials, byte-fallback pieces of one character) get no entry. The source's actual token ``j`` is
    always consistent; when the stored entries miss it, it is added with its own log-probability.
    The consistent mass is the exact one where the capture stored it (``prefix_logmass``, see
    :mod:`polyfuse.capture.prefix`); the entries then sum to less than 1 and the rest is the tail. Without
    it, the mass is summed from the stored entries, which nearly always hold the actual token and
    rarely the others that extend ``u``, so the conditional comes out near one-hot on the actual text.
    With ``cuts``, candidates whose remaining bytes the target would not begin a token with, after its
    previous token, are dropped too (:class:`TargetCuts`).
    """
    if not (src.has_context and tgt.has_context):
        raise ValueError("inside_token_entries needs blocks with a context token (position t predicts t + 1)")
    t_begin = tgt.offsets[1:, 0].astype(np.int64)
    s_begin = src.offsets[1:, 0].astype(np.int64)
    s_end = src.offsets[1:, 1].astype(np.int64)
    keys = np.nonzero(_fresh_starts(src) >= 0)[0]
    if not keys.size:
        return InsideEntries.empty()
    at = np.searchsorted(s_begin[keys], t_begin, side="right") - 1    # the last source start at or before b
    j = np.where(at >= 0, keys[at.clip(min=0)], -1)                    # source position predicting that token
    inside = (src_pos < 0) & (j >= 0) & (s_begin[j.clip(min=0)] < t_begin) & (t_begin < s_end[j.clip(min=0)])
    inside &= ~remainder.special[tgt.ids[1:]]                          # a special is not text the source spells
    rows, e_ids, e_probs, done, target_lp = [], [], [], [], []
    pieces = src_table.pieces
    exact_lm = src_topk.prefix_logmass                                  # [P_src, L] or None
    for t in np.nonzero(inside)[0].tolist():
        i = int(j[t])
        actual = int(src.ids[i + 1])
        piece = pieces[actual] if 0 <= actual < len(pieces) else None
        tail = text[t_begin[t]:s_end[i]].encode("utf-8")
        if piece is None or not tail or len(tail) >= len(piece) or not piece.endswith(tail):
            continue
        emitted = piece[:len(piece) - len(tail)]
        cand_ids = src_topk.ids[i].tolist()
        cand_probs = np.exp(src_topk.logprobs[i].astype(np.float64)).tolist()
        if actual not in cand_ids:
            cand_ids.append(actual)
            cand_probs.append(float(np.exp(np.float64(src_topk.target_logprob[i]))))
        consistent = []
        for v, p in zip(cand_ids, cand_probs, strict=True):
            cand = pieces[v] if 0 <= v < len(pieces) else None
            if cand is not None and p > 0 and len(cand) > len(emitted) and cand.startswith(emitted):
                consistent.append((v, p, cand[len(emitted):]))
        if cuts is not None and consistent:
            prev = text[int(tgt.offsets[t, 0]):int(t_begin[t])]
            cut = cuts([(prev, rest) for _, _, rest in consistent])
            consistent = [c for c, ok in zip(consistent, cut.tolist(), strict=True) if ok or c[0] == actual]
        mass = actual_p = 0.0
        out_ids, out_probs = [], []
        for v, p, rest in consistent:
            mass += p
            actual_p += p if v == actual else 0.0
            target_id = remainder(rest)
            if target_id >= 0:
                out_ids.append(target_id)
                out_probs.append(p)
        if exact_lm is not None and len(emitted) <= exact_lm.shape[1]:
            exact = float(exact_lm[i, len(emitted) - 1])
            if np.isfinite(exact):
                mass = max(mass, float(np.exp(exact)))
        if mass <= 0 or not out_ids or actual_p <= 0:
            continue
        rows.extend([t] * len(out_ids))
        e_ids.extend(out_ids)
        e_probs.extend(p / mass for p in out_probs)
        done.append(t)
        target_lp.append(np.log(actual_p / mass))
    if not done:
        return InsideEntries.empty()
    return InsideEntries(np.asarray(rows, dtype=np.int64), np.asarray(e_ids, dtype=np.int64),
                         np.asarray(e_probs, dtype=np.float64), np.asarray(done, dtype=np.int64),
                         np.asarray(target_lp, dtype=np.float64))


def drop_special_mismatches(src_pos: np.ndarray, src: EncodedBlock, tgt: EncodedBlock, src_table: TokenTable,
                            tgt_table: TokenTable) -> np.ndarray:
    """``src_pos`` with −1 where the target's next token is a special token and the source's is not.

    A chat marker such as ``<|im_end|>`` is one special token for a target that has it and plain text
    (``<``, ``|``, ...) for a source that does not: both start at the same character, but the source's
    prediction of ``<`` says nothing about the marker (and would teach the target to spell it as text).
    """
    out = src_pos.copy()
    t_special = np.array([tgt_table.pieces[i] is None for i in tgt.ids[1:].tolist()], dtype=bool)
    rows = np.nonzero(t_special & (out >= 0))[0]
    for t in rows.tolist():
        if src_table.pieces[int(src.ids[out[t] + 1])] is not None:
            out[t] = -1
    return out


def span_nll(src_topk: BlockTopK, src: EncodedBlock, tgt: EncodedBlock) -> np.ndarray:
    """[P_tgt]: the source's negative log-likelihood of the *text* of each next target token.

    A source token's NLL is spread evenly over its characters; target position ``t`` gets the sum over
    the characters of target token ``t + 1``. Unlike the source's NLL of its own next token, this
    scores the same piece of text for every teacher, whatever its tokenizer cuts: where the source's
    token is longer than the target's it is not charged for text the target has not emitted yet,
    and where it is shorter it is charged for all of the target token's text. For the target itself
    it is its own token NLL. NaN where no source token covers any character of the target token (a
    context token, or text the source leaves out).
    """
    p_src = src_topk.n_positions
    spans = src.offsets[1:1 + p_src].astype(np.int64)  # token j + 1, predicted at position j
    nll = -src_topk.target_logprob.astype(np.float64)[:p_src]
    width = spans[:, 1] - spans[:, 0]
    n_chars = int(max(spans[:, 1].max(initial=0), tgt.offsets[:, 1].max(initial=0)))
    rate = np.zeros(n_chars + 1)
    seen = np.zeros(n_chars + 1)
    has = (width > 0) & np.isfinite(nll)
    # difference arrays: each source token adds nll / width to every character of its span
    np.add.at(rate, spans[has, 0], nll[has] / width[has])
    np.add.at(rate, spans[has, 1], -nll[has] / width[has])
    np.add.at(seen, spans[has, 0], 1.0)
    np.add.at(seen, spans[has, 1], -1.0)
    rate, seen = np.cumsum(rate)[:-1], np.cumsum(seen)[:-1] > 0.5
    cum = np.concatenate([[0.0], np.cumsum(rate)])
    cum_seen = np.concatenate([[0], np.cumsum(seen)])
    t_spans = tgt.offsets[1:].astype(np.int64)
    a, b = t_spans[:, 0], t_spans[:, 1]
    out = cum[b] - cum[a]
    return np.where(cum_seen[b] - cum_seen[a] > 0, out, np.nan)


def transfer_block(src_topk: BlockTopK, src_pos: np.ndarray, vmap: VocabMap, k: int,
                   inside: InsideEntries | None = None, keep: np.ndarray | None = None) -> BlockTopK:
    """The source's top-k at target positions, in target vocabulary ids (see the module docstring).

    Args:
        src_topk: the source's captured block (``ids`` [P_src, k_src]).
        src_pos: [P_tgt] from :func:`aligned_source_positions` (−1 = no transfer).
        vmap: source → target vocabulary map.
        k: entries kept per target position.
    Returns:
        A :class:`BlockTopK` with P_tgt positions: ``ids``/``logprobs`` [P_tgt, k] (−1/−inf padding),
        ``target_logprob`` [P_tgt] = the source's log-prob of the aligned next token (NaN where
        invalid) and ``nll_sum`` = the source's own total NLL of the block (tokenizer-neutral: the
        same text).
        inside: entries for positions inside source tokens (:func:`inside_token_entries`), added.
        keep: [P_tgt, k_src] the entries to keep (:func:`consistent_entries`); the kept ones are
            renormalised to the row's stored mass, and ``target_logprob`` with them.
    """
    n_tgt = len(src_pos)
    ids = np.full((n_tgt, k), -1, dtype=np.int64)
    logprobs = np.full((n_tgt, k), -np.inf, dtype=np.float32)
    target_lp = np.full(n_tgt, np.nan, dtype=np.float32)
    rows = np.nonzero(src_pos >= 0)[0]
    e_rows, e_ids, e_probs = [], [], []
    if rows.size:
        s = src_pos[rows]
        target_lp[rows] = src_topk.target_logprob[s].astype(np.float32)
        src_ids = src_topk.ids[s]  # [R, k_src]
        mapped = np.where(src_ids >= 0, vmap(np.maximum(src_ids, 0)), -1)
        probs = np.exp(src_topk.logprobs[s].astype(np.float32))
        if keep is not None:
            kept = np.where(keep[rows], probs, 0.0)
            scale = probs.sum(axis=1) / np.maximum(kept.sum(axis=1), 1e-30)   # [R]: renormalise
            probs = kept * scale[:, None]
            target_lp[rows] += np.log(scale).astype(np.float32)
        use = (mapped >= 0) if keep is None else (mapped >= 0) & (probs > 0)
        e_rows.append(np.broadcast_to(rows[:, None], mapped.shape)[use])
        e_ids.append(mapped[use])
        e_probs.append(probs[use])
    if inside is not None and inside.positions.size:
        target_lp[inside.positions] = inside.target_logprob.astype(np.float32)
        e_rows.append(inside.rows)
        e_ids.append(inside.ids)
        e_probs.append(inside.probs)
    if e_rows:
        keys = np.concatenate(e_rows).astype(np.int64) * vmap.n_tgt + np.concatenate(e_ids)
        uniq, inverse = np.unique(keys, return_inverse=True)
        summed = np.bincount(inverse, weights=np.concatenate(e_probs))  # duplicates summed
        u_row, u_id = uniq // vmap.n_tgt, uniq % vmap.n_tgt
        order = np.lexsort((-summed, u_row))  # by row, then descending probability
        u_row, u_id, summed = u_row[order], u_id[order], summed[order]
        first = np.searchsorted(u_row, u_row, side="left")
        rank = np.arange(u_row.size) - first
        top = rank < k
        ids[u_row[top], rank[top]] = u_id[top]
        logprobs[u_row[top], rank[top]] = np.log(summed[top])
    return BlockTopK(block_id=src_topk.block_id, ids=ids, logprobs=logprobs.astype(np.float16),
                     target_logprob=target_lp.astype(np.float16), nll_sum=src_topk.nll_sum)


class TransferStats:
    """What survives the trip from a source's store to the target's positions; add blocks with :meth:`add`.

    Over the target positions that received a source distribution (``aligned``):

    * ``stored_mass``: the source probability its stored entries hold (1 for a sampled tail, the
      top-k's share of the distribution otherwise);
    * ``mapped_mass``: the share of that probability that found a target id;
    * ``actual_ratio``: the projected probability of the actual next target token divided by the
      source's own probability of the same text (the same next piece of text, by construction of
      the alignment): below 1 where the projection moved mass away from what comes next, above 1
      where it credited a target token with more than the source gave that text.

    ``inside_positions`` counts the positions taught from inside a source token
    (:func:`inside_token_entries`); ``coverage`` counts them too, the mass figures do not.
    """

    def __init__(self) -> None:
        self.positions = self.aligned = self.inside = 0
        self.stored = self.mapped = self.projected_actual = self.source_actual = 0.0

    def add(self, src_topk: BlockTopK, src_pos: np.ndarray, out: BlockTopK, next_ids: np.ndarray,
            inside: InsideEntries | None = None) -> None:
        """One block: the source store row, :func:`aligned_source_positions`, the transferred row,
        the target's next-token ids ``[P_tgt]`` and the inside-token entries, if any."""
        self.positions += len(src_pos)
        self.inside += 0 if inside is None else int(inside.positions.size)
        rows = np.nonzero(src_pos >= 0)[0]
        if not rows.size:
            return
        self.aligned += rows.size
        stored = np.exp(src_topk.logprobs[src_pos[rows]].astype(np.float64)).sum()
        mapped = np.exp(out.logprobs[rows].astype(np.float64))  # [R, k], 0 on padding
        self.stored += float(stored)
        self.mapped += float(mapped.sum())
        hit = out.ids[rows] == next_ids[rows, None]
        self.projected_actual += float((mapped * hit).sum())
        self.source_actual += float(np.exp(out.target_logprob[rows].astype(np.float64)).sum())

    def __add__(self, other: TransferStats) -> TransferStats:
        """The statistics of both sets of blocks (e.g. two ranks' shares)."""
        out = TransferStats()
        for name in vars(out):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def as_dict(self) -> dict[str, float | int]:
        return {"positions": self.positions, "aligned_positions": self.aligned,
                "inside_positions": self.inside,
                "coverage": (self.aligned + self.inside) / max(self.positions, 1),
                "stored_mass": self.stored / max(self.aligned, 1),
                "mapped_mass": self.mapped / max(self.stored, 1e-30),
                "actual_ratio": self.projected_actual / max(self.source_actual, 1e-30)}
