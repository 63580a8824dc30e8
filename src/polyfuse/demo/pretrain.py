"""A short, seeded pre-training loop for the tiny world's models (nanoGPT-sized on purpose).

Fusion training proper runs on the Hugging Face Trainer (``polyfuse.fuse``); this loop only gives
the tiny world its deliberately specialised sources, so it stays small and fully deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> np.ndarray:
    """Documents joined into one id stream: ``<bos> doc [<eos>]`` each (no eos when it equals bos)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    out: list[int] = []
    for doc in ids:
        out.append(bos)
        out.extend(doc)
        if eos is not None and eos != bos:
            out.append(eos)
    return np.asarray(out, dtype=np.int32)


def pretrain(model: PreTrainedModel, streams: Mapping[str, np.ndarray], mix: Mapping[str, float], *,
             steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` for ``steps`` AdamW steps on random windows drawn from ``streams`` by ``mix``.

    Each batch row picks a domain with probability ``mix[domain]`` and a uniformly random window
    of ``seq_len`` tokens in it. Returns the loss of every step.
    """
    domains = [d for d in mix if mix[d] > 0]
    weights = torch.tensor([mix[d] for d in domains], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    tensors = {d: torch.from_numpy(streams[d].astype(np.int64)) for d in domains}
    for d in domains:
        if len(tensors[d]) <= seq_len + 1:
            raise ValueError(f"domain {d!r} has only {len(tensors[d])} tokens; need more than {seq_len + 1}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, max(1, math.ceil(0.05 * steps)), steps)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        picks = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        rows = []
        for k in picks.tolist():
            stream = tensors[domains[k]]
            start = int(torch.randint(0, len(stream) - seq_len, (1,), generator=gen))
            rows.append(stream[start:start + seq_len])
        x = torch.stack(rows)  # [B, T]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
