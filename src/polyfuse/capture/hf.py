"""The ``hf`` capture backend: teacher forward passes with transformers, written as a top-k store.

Per shard of ``shard_size`` blocks (block order as given; shard s holds blocks
``[s * shard_size, (s + 1) * shard_size)``):

1. encode the blocks with :func:`polyfuse.corpus.tokens.encode_blocks` (context token first;
   position t predicts token t + 1);
2. sort them by length (longest first, ties by position: deterministic) and cut batches of
   ``batch_size``, right-padded;
3. run the model with a forward pre-hook on its output head that keeps the head's input (the
   final hidden states, after the final norm and whatever the architecture applies before the
   head) and hands the head an empty slice, so no ``[B, T, V]`` logits are ever built;
4. gather the real positions ``[N, d]`` (never padding, never a block's last token) and apply the
   head in chunks of at most ``_HEAD_CHUNK_ELEMENTS // V`` rows, plus the logit transforms the
   model's forward reads from its config (``logit_scale``, ``logits_scaling``,
   ``final_logit_softcapping``); in float32: log-softmax, top-k, the log-prob of the actual next
   token and its NLL;
5. the block's sequence metric ``nll_sum``: the sum of the NLLs at every position, or, for a
   block with response spans (chat; see below), at the response positions only;
6. write the shard atomically (:class:`polyfuse.capture.store.StoreWriter`).

Before the first batch a probe compares the chunked head with ``model(...).logits`` on one short
sequence (the first ``_PROBE_TOKENS`` tokens of the longest block; one forward pass that keeps the
head's input and lets the head run), so an architecture with an unknown logit transform fails
loudly instead of storing wrong numbers.

**Chat blocks.** A block given as ``(block_id, text, response_spans)`` with spans not None has its
``nll_sum`` summed over the positions whose next token is a response token
(:func:`polyfuse.corpus.spans.response_positions`, the one token rule): the teacher's NLL of the
responses given their prompts, FuseChat's ``--mask_instruction`` metric. It stays a total, not
FuseChat's per-token mean, because totals are what fusion compares across tokenizers
(:mod:`polyfuse.fuse.strategies`). A block with no response token gets ``nll_sum = 0.0`` for every
teacher (defined, never NaN): the sequence-level choice ties and falls to teacher 0, and the block
adds nothing to training anyway (all its labels are masked). The stored top-k rows, target
log-probs and everything else stay for every position: alignment and fusion need them.

**Resume.** A shard file exists only once complete, so a rerun (same arguments, same directory)
skips the shards already there and produces the same bytes for the rest: batching depends only
on the shard's blocks.

**Shared with the ``vllm`` backend** (:mod:`polyfuse.capture.common`): the rows of step 5, the
shard loop, resume, ranks and finalize, so both backends write the same store.

**Several processes.** Under ``accelerate launch`` / ``torchrun`` (``torch.distributed``
initialised, or ``WORLD_SIZE`` > 1 in the environment, then via ``accelerate.PartialState``) rank r
captures the shards s with ``s % world_size == r``; all ranks meet at a barrier, rank 0 writes
``store.json`` and a second barrier lets every rank return a finished store. Ranks given
explicitly (``rank=``, ``world_size=``; e.g. independent jobs on a shared filesystem) have no
barrier: ranks != 0 return after their own shards, rank 0 polls the directory until every shard
exists (up to ``wait_s``) and then finalizes. Rerunning with ``world_size=1`` finishes and
finalizes any incomplete store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from polyfuse.capture.common import (
    FP16_MIN,
    block_parts,
    block_rows,
    blocks_digest,
    check_unique,
    empty_row,
    fp16_logprobs,
    ranks,
    run_shards,
)
from polyfuse.capture.prefix import PrefixRanges
from polyfuse.capture.store import BlockTopK, StoreWriter  # noqa: F401  (StoreWriter: importable here as before)
from polyfuse.corpus.spans import Spans
from polyfuse.corpus.tokens import EncodedBlock
from polyfuse.errors import DataError, PolyfuseError
from polyfuse.models import bos_context_id, context_length, pick_device, pick_dtype, vocab_facts

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["capture", "capture_meta", "capture_ref", "head_logits", "topk_of_hidden"]

logger = logging.getLogger(__name__)

_HEAD_CHUNK_ELEMENTS = 1 << 26  # [chunk, V] float32 logits per head chunk: 256 MiB
_PROBE_TOKENS = 16


# --------------------------------------------------------------------------------------------------
# the output head, applied to gathered hidden states


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits ``[N, V]`` of hidden states ``[N, d]``: the output head, then the config's transforms.

    The transforms are those transformers' causal-LM forwards apply after ``lm_head``, read from
    ``model.config`` as the forward reads them: ``logit_scale`` (Cohere: multiply),
    ``logits_scaling`` (Granite: divide), ``final_logit_softcapping`` (Gemma 2/3:
    ``cap * tanh(x / cap)``). GPT-2, GPT-NeoX, Llama, Mistral and Qwen2 apply none.
    """
    config = model.config
    logits = model.get_output_embeddings()(hidden).float()  # [N, V]
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, int | float):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, int | float):
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def topk_of_hidden(
    model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor, k: int, *, samples: int = 0,
    generator: torch.Generator | None = None, prefix: PrefixRanges | None = None, prefix_out: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs, their ids and the targets' log-probs for hidden states ``[N, d]``, head in chunks.

    Returns ``(values [N, k + samples] float32 sorted descending, ids [N, k + samples] int64,
    target_logprob [N] float32)``; the naive version is ``log_softmax(head_logits(h), -1)`` followed
    by ``topk`` and ``gather``, which builds ``[N, V]`` at once. With ``samples`` > 0 the entries
    after the top-k are a sampled tail (:func:`sampled_tail`); unused slots are id -1, value -inf.
    With ``prefix``, the targets' prefix masses (:meth:`PrefixRanges.logmass`, ``[N, L]`` float64) are
    appended to ``prefix_out``, chunk by chunk, from the same logits.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, _HEAD_CHUNK_ELEMENTS // vocab)
    values, ids, target_lp = [], [], []
    for start in range(0, hidden.shape[0], rows):
        # top-k of the logits is the top-k of the log-probs; subtracting the log-partition from the
        # k + 1 needed values avoids writing a second [c, V] tensor (log_softmax) and reading it again
        logits = head_logits(model, hidden[start : start + rows]).float()  # [c, V]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [c, 1]
        _check_finite(model, lse)
        top = torch.topk(logits, k, dim=-1)  # [c, k], sorted descending
        target_lp.append((logits.gather(-1, targets[start : start + rows, None]) - lse)[:, 0])  # [c]
        if prefix is not None and prefix_out is not None:
            prefix_out.append(prefix.logmass(logits, targets[start : start + rows], lse))  # [c, L]
        if samples:
            v, i = sampled_tail(logits.sub_(lse), top.indices, samples, generator)  # logits now log-probs
            values.append(v)
            ids.append(i)
        else:
            values.append(top.values - lse)
            ids.append(top.indices)
    if not values:
        empty = hidden.new_zeros((0, k + samples), dtype=torch.float32)
        return empty, empty.long(), hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(values), torch.cat(ids), torch.cat(target_lp)


def sampled_tail(
    logprobs: torch.Tensor, head: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's exact entries plus an unbiased sample of the rest of each distribution.

    ``logprobs`` [c, V] (overwritten), ``head`` [c, k] ids. The mass outside the head, ``r``, is
    represented by ``samples`` draws (with replacement) from the teacher's own distribution restricted
    to the tail; a drawn id ``j`` drawn ``n_j`` times gets the weight ``r * n_j / samples``. The entries
    then sum to 1 and ``-sum_entries w log q`` is an unbiased estimate of the full cross-entropy
    ``-sum_V p log q`` (the teacher's whole distribution, not its top-k; random-sampling knowledge
    distillation). Returns ``(values [c, k + samples], ids [c, k + samples])``, sorted descending by
    value (log of the weight), unused slots -inf / -1.
    """
    c, k = head.shape
    probs = logprobs.exp_()  # [c, V], in place
    head_lp = probs.gather(-1, head).log()  # [c, k]
    probs.scatter_(-1, head, 0.0)
    rest = probs.sum(-1, keepdim=True)  # [c, 1]
    empty = rest[:, 0] <= 0
    if empty.any():  # every id is in the head: nothing to draw; keep multinomial well defined
        probs[empty] = 1.0
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator).sort(-1).values  # [c, S]
    # run-length count of the sorted draws: run r of a row holds one distinct id and its count
    fresh = torch.ones_like(draws, dtype=torch.bool)
    fresh[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = fresh.cumsum(-1) - 1                                                  # [c, S] run index
    drawn = torch.full_like(draws, -1).scatter_(-1, run, draws)
    n = torch.zeros_like(draws, dtype=probs.dtype).scatter_add_(-1, run, torch.ones_like(draws, dtype=probs.dtype))
    tail_lp = (rest * n / samples).log()  # -inf where n == 0 (or r == 0)
    tail_lp[empty] = float("-inf")
    drawn = torch.where(torch.isfinite(tail_lp), drawn, -1)
    values, order = torch.cat([head_lp, tail_lp], -1).sort(-1, descending=True)
    return values, torch.cat([head, drawn], -1).gather(-1, order)


@contextmanager
def _head_input(model: PreTrainedModel, *, skip_head: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the output head records its input under ``"hidden"`` and (``skip_head``) computes nothing."""
    head = model.get_output_embeddings()
    if head is None:
        raise PolyfuseError(
            f"{type(model).__name__} has no output head (get_output_embeddings() is None); "
            "capture needs a causal LM loaded with AutoModelForCausalLM"
        )
    seen: dict[str, torch.Tensor] = {}

    def keep_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        seen["hidden"] = args[0]  # [B, T, d]
        return (args[0][..., :0, :], *args[1:]) if skip_head else None  # the head runs on [B, 0, d]

    handle = head.register_forward_pre_hook(keep_input)
    try:
        yield seen
    finally:
        handle.remove()


def _hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The output head's input ``[B, T, d]`` for a right-padded batch."""
    with _head_input(model) as seen:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if "hidden" not in seen:
        raise PolyfuseError(
            f"{type(model).__name__}.forward never called its output head; "
            "capture supports causal LMs whose forward applies get_output_embeddings()"
        )
    return seen["hidden"]


def _input_device(model: PreTrainedModel) -> torch.device:
    return model.get_input_embeddings().weight.device


def _check_finite(model: PreTrainedModel, lse: torch.Tensor) -> None:
    """Raise when a position's log-partition is NaN or +inf (NaN or +inf logits: no distribution to store)."""
    if bool(torch.isfinite(lse).all()):
        return
    bad = int((~torch.isfinite(lse)).sum())
    name = getattr(model, "name_or_path", "") or type(model).__name__
    fix = ("check the checkpoint" if model.dtype == torch.float32 else
           f"check the checkpoint, or capture in float32 ({model.dtype} may overflow): capture.dtype=float32")
    raise DataError(f"model {name}: NaN or infinite logits at {bad} of {lse.numel()} positions; its weights are "
                    f"broken: {fix}")


def _probe(model: PreTrainedModel, ids: np.ndarray) -> None:
    """Check the hook + chunked head against ``model(...).logits`` on one short sequence."""
    x = torch.as_tensor(ids[:_PROBE_TOKENS], device=_input_device(model))[None]  # [1, T]
    with _head_input(model, skip_head=False) as seen:  # one pass: the head's input and its logits
        ref = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float()  # [T, V]
    if "hidden" not in seen:
        raise PolyfuseError(
            f"{type(model).__name__}.forward never called its output head; "
            "capture supports causal LMs whose forward applies get_output_embeddings()"
        )
    _check_finite(model, torch.logsumexp(ref, dim=-1))
    ours = head_logits(model, seen["hidden"][0])  # [T, V]
    ref = ref.to(ours.device)
    err = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    tol = 1e-4 if model.get_output_embeddings().weight.dtype == torch.float32 else 2e-2
    if not err <= tol * scale:
        raise PolyfuseError(
            f"capture: the chunked output head of {type(model).__name__} differs from model(...).logits by "
            f"{err:.3g} (tolerance {tol * scale:.3g}); the architecture transforms its logits in a way "
            "polyfuse.capture.hf.head_logits does not know; add the transform there"
        )


# --------------------------------------------------------------------------------------------------
# one batch, one shard


def _capture_batch(
    model: PreTrainedModel, encoded: Sequence[EncodedBlock], k: int, spans: Sequence[Spans | None] | None = None,
    *, samples: int = 0, generator: torch.Generator | None = None, prefix: PrefixRanges | None = None,
) -> list[tuple]:
    """Per block: ``(ids [P, k + samples] int64, logprobs [P, k + samples] f16, target_logprob [P] f16, nll_sum)``,
    plus ``prefix_logmass [P, L] f16`` with ``prefix``.

    ``nll_sum`` covers the response positions of blocks whose ``spans`` are not None, else all.
    """
    spans = [None] * len(encoded) if spans is None else spans
    lengths = [len(e) for e in encoded]
    T = max(lengths)
    device = _input_device(model)
    input_ids = np.zeros((len(encoded), T), dtype=np.int64)  # [B, T], right-padded with id 0
    attention = np.zeros((len(encoded), T), dtype=np.int64)  # [B, T]
    for b, e in enumerate(encoded):
        input_ids[b, : len(e)] = e.ids
        attention[b, : len(e)] = 1
    predicts = np.arange(T)[None, :] < (np.asarray(lengths)[:, None] - 1)  # [B, T]: t predicts t + 1
    ids_t = torch.from_numpy(input_ids).to(device)
    hidden = _hidden_states(model, ids_t, torch.from_numpy(attention).to(device))  # [B, T, d]
    where = torch.from_numpy(predicts).to(hidden.device)
    real = hidden[where]  # [N, d], block by block, position order
    targets = ids_t[:, 1:].to(hidden.device)[where[:, :-1]]  # [N]
    masses: list[torch.Tensor] = []
    values, top_ids, target_lp = topk_of_hidden(model, real, targets, k, samples=samples, generator=generator,
                                                prefix=prefix, prefix_out=masses)  # [N, k + S], [N, k + S], [N]
    rows = block_rows(encoded, spans, top_ids.cpu().numpy(), fp16_logprobs(values, top_ids),
                      target_lp.cpu().numpy())
    if prefix is None:
        return rows
    mass = (torch.cat(masses).clamp(min=FP16_MIN).to(torch.float16).cpu().numpy() if masses
            else np.zeros((0, prefix.max_bytes), np.float16))  # [N, L]; NaN stays NaN
    cuts = np.cumsum([0, *(max(len(e) - 1, 0) for e in encoded)])
    return [(*row, mass[a:b]) for row, a, b in zip(rows, cuts[:-1], cuts[1:], strict=True)]


def _batch_generator(seed: int, block_ids: Sequence[int], device: torch.device) -> torch.Generator:
    """A generator seeded by ``seed`` and the batch's block ids (deterministic per batch, any rank)."""
    digest = hashlib.sha256(f"{int(seed)}:{','.join(str(int(b)) for b in block_ids)}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _capture_shard(
    model: PreTrainedModel,
    encoded: Sequence[EncodedBlock],
    block_ids: Sequence[int],
    *,
    k: int,
    batch_size: int,
    advance: Callable[..., None],
    spans: Sequence[Spans | None] | None = None,
    samples: int = 0,
    seed: int = 0,
    prefix: PrefixRanges | None = None,
) -> list[BlockTopK]:
    """Rows of one shard, in the given block order (batched by length, longest first).

    Sampled tails draw from a generator seeded by ``seed`` and the batch's block ids, so a resumed
    or re-ranked capture draws the same ids.
    """
    spans = [None] * len(encoded) if spans is None else spans
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    results: list[tuple | None] = [None] * len(encoded)
    empty = empty_row(k + samples) + ((np.zeros((0, prefix.max_bytes), np.float16),) if prefix else ())
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        scored = [i for i in batch if len(encoded[i]) > 1]
        for i in batch:
            results[i] = empty
        if scored:
            generator = _batch_generator(seed, [block_ids[i] for i in scored], _input_device(model)) if samples else None
            rows = _capture_batch(model, [encoded[i] for i in scored], k, [spans[i] for i in scored],
                                  samples=samples, generator=generator, prefix=prefix)
            for i, row in zip(scored, rows, strict=True):
                results[i] = row
        for i in batch:
            advance(tokens=max(len(encoded[i]) - 1, 0))
    return [
        BlockTopK(block_id=int(bid), ids=r[0], logprobs=r[1], target_logprob=r[2], nll_sum=r[3],
                  prefix_logmass=r[4] if prefix is not None else None)
        for bid, r in zip(block_ids, results, strict=True)
        if r is not None
    ]


# --------------------------------------------------------------------------------------------------
# the entry point

def capture_meta(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What a store records about its teacher: model ref, revision, architecture, dtype, tokenizer."""
    config = model.config
    return {
        "backend": "hf",
        "model": str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "")),
        "model_revision": getattr(config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "dtype": str(model.get_output_embeddings().weight.dtype).removeprefix("torch."),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_len": len(tokenizer),
        "context_token": bos_context_id(tokenizer),
        "temperature": 1.0,
    }


def _max_positions(model: PreTrainedModel) -> int | None:
    return context_length(model.config)

def _place(model: PreTrainedModel, device: str | torch.device | None, fallback: torch.device | None) -> None:
    """Move the model to ``device`` (or accelerate's) if it is elsewhere, in that device's auto dtype."""
    wanted = device if device is not None else fallback
    if wanted is None:
        return
    dev = pick_device(wanted)
    here = _input_device(model)
    if here.type != dev.type or (dev.index is not None and here.index != dev.index):
        model.to(device=dev, dtype=pick_dtype("auto", dev))


@torch.inference_mode()
def capture(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    blocks: Sequence[tuple[int, str] | tuple[int, str, Spans | None]],
    out_dir: str | Path,
    *,
    k: int = 10,
    samples: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    shard_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    wait_s: float = 3600.0,
    prefix_bytes: int = 0,
    pieces: Sequence[bytes | None] | None = None,
) -> dict[str, Any]:
    """Capture the top-k next-token log-probs of ``model`` over ``blocks`` into a store at ``out_dir``.

    Args:
        model: a causal LM (``AutoModelForCausalLM``); put in eval mode. Where ``device`` (or
            accelerate's device) differs from the model's, the model is moved there in place, in
            bf16 on CUDA and fp32 on CPU (:func:`polyfuse.models.pick_dtype`).
        tokenizer: the model's tokenizer (fast; see :func:`polyfuse.corpus.tokens.encode_blocks`).
        blocks: ``(block_id, text)`` pairs or ``(block_id, text, response_spans)`` triples, in store
            order; block ids must be unique. Spans (not None) restrict ``nll_sum`` to the response
            positions (module docstring).
        out_dir: the store directory; a rerun with the same arguments resumes.
        k: log-probs kept per position (the exact head).
        samples: draws from the rest of each distribution, stored after the head as an unbiased
            sampled tail (:func:`sampled_tail`); the store then has ``k + samples`` entries per position.
        seed: seeds the sampled tail (with the block ids of each batch).
        batch_size: blocks per forward pass.
        shard_size: blocks per shard (the unit of resume and of work between processes).
        device: ``None`` keeps the model where it is.
        progress: show a progress bar over blocks.
        meta: merged over :func:`capture_meta` into the store's ``meta`` (e.g. ``{"model": "world:prose"}``).
        rank, world_size: this process's share (see the module docstring); default: detected.
        wait_s: how long rank 0 waits for other ranks' shards when there is no barrier.
        prefix_bytes: with L > 0, also store each position's prefix masses for the first L bytes of
            the actual next token (:mod:`polyfuse.capture.prefix`); needs ``pieces``.
        pieces: the bytes each token id stands for (``None`` for specials), as
            :func:`polyfuse.align.normalize.token_table` reads them from the tokenizer.

    Returns:
        Stats: ``blocks`` and ``tokens`` captured by this call, ``seconds``, ``tokens_per_s``,
        ``shards_written``, ``shards_skipped``, ``finalized`` and, once finalized, the store's
        ``store_blocks``, ``store_tokens`` and ``bytes_per_token``.

    Raises:
        DataError: duplicate block ids, a block longer than the model's context, or ``out_dir``
            holding a store made with other settings.
    """
    if k < 1 or batch_size < 1 or shard_size < 1 or samples < 0:
        raise ValueError(f"k, batch_size and shard_size must be >= 1 and samples >= 0 "
                         f"(got {k}, {batch_size}, {shard_size}, {samples})")
    rank, world_size, barrier, state_device = ranks(rank, world_size)
    _place(model, device, state_device)
    model.eval()
    blocks = block_parts(blocks)
    check_unique(blocks)
    vocab_facts(model, tokenizer).check(str(getattr(model, "name_or_path", "") or type(model).__name__))
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if k > vocab:
        raise ValueError(f"k={k} is larger than the vocabulary ({vocab})")
    full_meta = {
        **capture_meta(model, tokenizer),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "blocks_sha256": blocks_digest(blocks),
        **({"head_k": k, "samples": samples, "sample_seed": seed} if samples else {}),
        **(meta or {}),
    }
    if prefix_bytes and pieces is None:
        raise ValueError("prefix_bytes > 0 needs the tokenizer's byte pieces (pieces=token_table(tokenizer).pieces)")
    prefix = PrefixRanges(pieces, vocab, prefix_bytes) if prefix_bytes else None
    probed = False

    def capture_shard(
        encoded: Sequence[EncodedBlock],
        block_ids: Sequence[int],
        spans: Sequence[Spans | None],
        advance: Callable[..., None],
    ) -> list[BlockTopK]:
        nonlocal probed
        if not probed:
            longest = max(encoded, key=len, default=None)
            if longest is not None and len(longest) > 1:
                _probe(model, longest.ids)
                probed = True
        return _capture_shard(model, encoded, block_ids, k=k, batch_size=batch_size, advance=advance, spans=spans,
                              samples=samples, seed=seed, prefix=prefix)

    return run_shards(
        capture_shard, tokenizer, blocks, out_dir, k=k + samples, vocab_size=vocab, shard_size=shard_size, meta=full_meta,
        prefix_bytes=prefix_bytes, max_len=_max_positions(model), rank=rank, world_size=world_size, barrier=barrier, wait_s=wait_s,
        progress=progress, log=logger,
    )


def capture_ref(model: Any, tokenizer: str | None, blocks: Sequence[tuple[int, str] | tuple[int, str, Spans | None]],
                out_dir: str | Path, *, dtype: str = "auto", device: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """:func:`capture` for a model *reference* (a :class:`~polyfuse.models.ResolvedModel` or what
    :func:`polyfuse.models.resolve_model_ref` reads; ``tokenizer``: another tokenizer reference or None):
    loads the model in ``dtype`` on ``device`` and its tokenizer, then captures (the backend registry's
    entry point, :func:`polyfuse.capture.get_backend`)."""
    from polyfuse.models import load_model, load_tokenizer

    return capture(load_model(model, dtype=dtype, device=device), load_tokenizer(model, tokenizer), blocks, out_dir,
                   **kwargs)

