"""Build the embedded tiny world: a real multi-domain corpus, three heterogeneous sources, one target.

Layout of a world directory (every part is a stage with its own ``manifest.json``)::

    <world>/corpus/{train,heldout}/<domain>.jsonl
    <world>/models/<name>/   config.json, model.safetensors, tokenizer.json, manifest.json
    <world>/world.json       roles, domains and what each model emphasises

With ``oracles=True`` oracle teachers join them (:func:`oracle_plans`): ``models/oracle`` (the target's
own tokenizer and architecture, trained as long as a source), ``models/oracle-twin`` (the same but with
a ``metaspace_bpe`` tokenizer), to tell distillation apart from cross-tokenizer transfer, and one
``models/oracle-<source>`` per source (the target's tokenizer and architecture, the source's data and
steps), to tell fusion apart from crossing tokenizers.

Everything is seeded; the step counts come from the preset times ``budget`` (never from a clock),
so one seed and one budget give the same bytes on the same software stack.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from polyfuse.corpus.documents import Document, domain_path, read_documents, write_documents
from polyfuse.demo.corpus import split_documents
from polyfuse.demo.threads import DEMO_THREADS, fixed_threads
from polyfuse.demo.tokenizers import TOKENIZER_VERSIONS, TokenizerKind, to_transformers, train_tokenizer
from polyfuse.progress import progress_bar
from polyfuse.workspace import (
    Manifest,
    atomic_write_json,
    hash_inputs,
    hash_path,
    is_current,
    run_stage,
    workdir_lock,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPlan:
    """One model of the world: architecture, tokenizer kind and what it is trained on."""

    name: str
    role: Literal["source", "target", "oracle"]
    arch: str
    tokenizer: TokenizerKind
    vocab_size: int
    mix: dict[str, float]
    steps: int


@dataclass(frozen=True)
class WorldPreset:
    """Everything that defines a world, apart from the seed and the budget."""

    domains: dict[str, str]
    models: tuple[ModelPlan, ...]
    max_train_bytes: int
    max_heldout_bytes: int
    heldout_fraction: float = 0.05
    tokenizer_sample_bytes: int = 1_000_000
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 512
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    nominal_minutes: float = field(default=4.0, metadata={"help": "build time at budget 1.0 on 2 cores"})


def _emphasis(own: str, domains: tuple[str, ...], weight: float = 0.8) -> dict[str, float]:
    rest = (1.0 - weight) / (len(domains) - 1)
    return {d: (weight if d == own else rest) for d in domains}


def _plans(steps: int, target_steps: int, vocab: int, unigram_vocab: int) -> tuple[ModelPlan, ...]:
    doms = ("prose", "code", "math")
    uniform = {d: 1 / 3 for d in doms}
    return (
        ModelPlan("prose", "source", "gpt2", "byte_bpe", vocab, _emphasis("prose", doms), steps),
        ModelPlan("code", "source", "gpt_neox", "metaspace_bpe", vocab, _emphasis("code", doms), steps),
        ModelPlan("math", "source", "mistral", "unigram", unigram_vocab, _emphasis("math", doms), steps),
        ModelPlan("target", "target", "llama", "byte_bpe", vocab, uniform, target_steps),
    )


PRESETS: dict[str, WorldPreset] = {
    # The demo's world: fortunes prose, stdlib code, CHAMP maths; ~4 minutes on 2 cores.
    "demo": WorldPreset(
        domains={"prose": "fortunes", "code": "stdlib", "math": "champ"},
        models=_plans(steps=110, target_steps=45, vocab=4096, unigram_vocab=3072),
        max_train_bytes=2_000_000, max_heldout_bytes=200_000, nominal_minutes=4.0,
    ),
    # The test suite's world: zero-install prose, seconds to build.
    "test": WorldPreset(
        domains={"prose": "pydoc", "code": "stdlib", "math": "champ"},
        models=_plans(steps=30, target_steps=12, vocab=512, unigram_vocab=512),
        max_train_bytes=300_000, max_heldout_bytes=30_000, tokenizer_sample_bytes=200_000,
        hidden=64, layers=2, heads=2, context=256, seq_len=64, batch_size=8, lr=3e-3, nominal_minutes=0.3,
    ),
}


ORACLES = ("oracle", "oracle-twin")
"""Names of the opt-in oracle teachers (``build_world(..., oracles=True)``, ``polyfuse world --oracles``)."""


SPECIALIST_PREFIX = "oracle-"
"""``oracle-<source>``: a same-tokenizer specialist per source (:func:`oracle_plans`)."""


def oracle_plans(spec: WorldPreset) -> tuple[ModelPlan, ...]:
    """The oracle teachers of a (scaled) preset: ``oracle``, ``oracle-twin``, then one specialist per source.

    ``oracle`` and ``oracle-twin`` are the target's plan (llama, uniform mix, the target's vocab size)
    trained for the sources' step count, so they clearly beat the target. ``oracle`` reuses the built
    target's tokenizer (see :func:`build_world`); ``oracle-twin`` trains a ``metaspace_bpe`` tokenizer
    on the same sample instead. ``oracle-<source>`` is the target's plan with that source's mix and
    steps and the target's own tokenizer: fusing them is fusion with nothing lost across tokenizers.
    """
    target = next(m for m in spec.models if m.role == "target")
    sources = [m for m in spec.models if m.role == "source"]
    steps = max(m.steps for m in sources)
    oracle = replace(target, name=ORACLES[0], role="oracle", steps=steps)
    specialists = tuple(replace(oracle, name=SPECIALIST_PREFIX + m.name, mix=m.mix, steps=m.steps) for m in sources)
    return oracle, replace(oracle, name=ORACLES[1], tokenizer="metaspace_bpe"), *specialists


def scaled(preset: WorldPreset, budget: float) -> WorldPreset:
    """The preset with every model's step count scaled by ``budget`` (at least one step)."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0 (got {budget}); 1.0 is the preset, 0.5 halves the training")
    return replace(preset, models=tuple(replace(m, steps=max(1, round(m.steps * budget)))
                                        for m in preset.models))


def build_corpus(out: Path, preset: WorldPreset, seed: int) -> dict:
    """Write ``<out>/{train,heldout}/<domain>.jsonl`` from the preset's providers."""
    stats = {}
    for domain, provider in preset.domains.items():
        train, heldout = split_documents(provider, heldout_fraction=preset.heldout_fraction, seed=seed,
                                         max_train_bytes=preset.max_train_bytes,
                                         max_heldout_bytes=preset.max_heldout_bytes)
        stats[domain] = {"provider": provider,
                         "train": write_documents(domain_path(out, "train", domain), train),
                         "heldout": write_documents(domain_path(out, "heldout", domain), heldout)}
    return stats


def _sample(docs: list[Document], max_bytes: int) -> list[str]:
    out, size = [], 0
    for doc in docs:
        size += len(doc.text.encode("utf-8"))
        if size > max_bytes:
            break
        out.append(doc.text)
    return out


def build_model(out: Path, plan: ModelPlan, preset: WorldPreset, corpus: Path, seed: int, *,
                tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Train the plan's tokenizer (unless ``tokenizer`` is given) and model on the corpus; save both."""
    import torch
    from transformers import AutoModelForCausalLM

    from polyfuse.demo.architectures import tiny_config
    from polyfuse.demo.pretrain import pretrain, token_stream

    t0 = time.perf_counter()
    docs = {d: list(read_documents(domain_path(corpus, "train", d))) for d in preset.domains}
    # The tokenizer learns from the model's own emphasis: a byte budget split by the mix weights.
    if tokenizer is None:
        tok_texts = [t for d, w in plan.mix.items()
                     for t in _sample(docs[d], int(preset.tokenizer_sample_bytes * w))]
        tokenizer = to_transformers(train_tokenizer(plan.tokenizer, tok_texts, plan.vocab_size), plan.tokenizer,
                                    preset.context)
    streams = {d: token_stream(tokenizer, [doc.text for doc in docs[d]]) for d in preset.domains}
    t_tok = time.perf_counter() - t0

    torch.manual_seed(seed)
    config = tiny_config(plan.arch, vocab_size=len(tokenizer), hidden=preset.hidden, layers=preset.layers,
                         heads=preset.heads, context=preset.context, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    with progress_bar(f"train {plan.name} ({plan.arch})", plan.steps) as advance, fixed_threads(DEMO_THREADS):
        losses = pretrain(model, streams, plan.mix, steps=plan.steps, batch_size=preset.batch_size,
                          seq_len=preset.seq_len, lr=preset.lr, seed=seed,
                          on_step=lambda step, loss: advance(loss=f"{loss:.3f}"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - t0
    tokens = plan.steps * preset.batch_size * preset.seq_len
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
            "train_tokens": tokens, "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "tokenizer_seconds": round(t_tok, 2), "seconds": round(seconds, 2),
            "stream_tokens": {d: int(len(s)) for d, s in streams.items()}}


def _entry(plan: ModelPlan, path: Path, manifest: Manifest) -> dict:
    """The model's ``world.json`` entry."""
    emphasis = max(plan.mix, key=plan.mix.get) if len(set(plan.mix.values())) > 1 else "general"
    return {"role": plan.role, "arch": plan.arch, "tokenizer": plan.tokenizer, "emphasis": emphasis,
            "path": str(path), **{k: manifest.outputs.get(k) for k in ("params", "vocab", "seconds")}}


def build_world(world_dir: str | Path, *, preset: str = "demo", seed: int = 0, budget: float = 1.0,
                force: bool = False, oracles: bool = False) -> dict:
    """Build (or reuse) the tiny world in ``world_dir``; returns the ``world.json`` summary.

    Each part is a stage: a part whose manifest matches its config and inputs is reused, so a
    killed build resumes at the first model not yet written.

    ``oracles`` also builds the oracle teachers (:func:`oracle_plans`): ``oracle`` and ``oracle-twin``
    seeded with ``seed + 4`` (the index after the four world models), the specialists with ``seed + 5``
    onwards. ``oracle`` and the specialists use the built target's tokenizer
    loaded from ``models/target`` (whose content hash is an input, so a rebuilt target makes it stale),
    ``oracle-twin`` with its own ``metaspace_bpe`` tokenizer. Without ``oracles`` they are neither built
    nor removed: ``world.json`` lists an oracle only while its directory's manifest is current.

    The build holds the world directory's lock (:func:`polyfuse.workspace.workdir_lock`), whoever calls
    it (``polyfuse world``, the demo, the benches): a second build into the same directory fails at once.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; choose one of {', '.join(PRESETS)}")
    Path(world_dir).mkdir(parents=True, exist_ok=True)
    with workdir_lock(world_dir):
        return _build_world(Path(world_dir), preset=preset, seed=seed, budget=budget, force=force, oracles=oracles)


def _build_world(world: Path, *, preset: str, seed: int, budget: float, force: bool, oracles: bool) -> dict:
    """:func:`build_world`'s body, under the lock."""
    spec = scaled(PRESETS[preset], budget)
    common = {k: v for k, v in asdict(spec).items() if k not in ("models",)}
    corpus_cfg = {"domains": spec.domains, "max_train_bytes": spec.max_train_bytes,
                  "max_heldout_bytes": spec.max_heldout_bytes, "heldout_fraction": spec.heldout_fraction,
                  "seed": seed}
    corpus = run_stage(world / "corpus", "world.corpus", corpus_cfg, {},
                       lambda out: build_corpus(out, spec, seed), force=force)
    corpus_hash = hash_path(world / "corpus")
    summary: dict = {"preset": preset, "seed": seed, "budget": budget, "domains": list(spec.domains),
                     "corpus": str(world / "corpus"), "models": {}}
    for i, plan in enumerate(spec.models):
        # Training runs with DEMO_THREADS (2) torch threads; not recorded in the config, so worlds built before
        # the pin on two-core machines (the same bytes) stay current.
        cfg = {"plan": asdict(plan), "preset": common, "seed": seed + i}
        if TOKENIZER_VERSIONS[plan.tokenizer] > 1:  # version 1 is implied: worlds built before it stay current
            cfg["tokenizer_version"] = TOKENIZER_VERSIONS[plan.tokenizer]
        res = run_stage(world / "models" / plan.name, "world.model", cfg, {"corpus": corpus_hash},
                        lambda out, plan=plan, i=i: build_model(out, plan, spec, world / "corpus", seed + i),
                        force=force)
        summary["models"][plan.name] = _entry(plan, res.path, res.manifest)
    oracle_seed = seed + len(spec.models)
    target_dir = world / "models" / "target"
    for j, plan in enumerate(oracle_plans(spec)):
        out_dir = world / "models" / plan.name
        if not oracles and not out_dir.is_dir():
            continue
        plan_seed = oracle_seed if j < len(ORACLES) else oracle_seed + j - 1
        cfg = {"plan": asdict(plan), "preset": common, "seed": plan_seed}
        inputs = {"corpus": corpus_hash}
        if plan.name != ORACLES[1]:  # the target's tokenizer, as built: its bytes are an input
            cfg["tokenizer_from"] = "target"
            inputs["target"] = hash_path(target_dir)
        else:
            cfg["tokenizer_version"] = TOKENIZER_VERSIONS[plan.tokenizer]
        if oracles:
            res = run_stage(out_dir, "world.model", cfg, inputs,
                            lambda out, plan=plan, plan_seed=plan_seed: build_model(
                                out, plan, spec, world / "corpus", plan_seed,
                                tokenizer=_target_tokenizer(plan, target_dir)),
                            force=force)
            summary["models"][plan.name] = _entry(plan, res.path, res.manifest)
        elif is_current(out_dir, "world.model", cfg, hash_inputs(inputs)):
            summary["models"][plan.name] = _entry(plan, out_dir, Manifest.from_path(out_dir))
    summary["corpus_stats"] = corpus.manifest.outputs
    atomic_write_json(world / "world.json", summary)
    return summary


def _target_tokenizer(plan: ModelPlan, target_dir: Path) -> PreTrainedTokenizerBase | None:
    """The built target's own tokenizer for every oracle but ``oracle-twin`` (``None``: train one)."""
    if plan.name == ORACLES[1]:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    for key in ("is_local", "local_files_only"):  # loader bookkeeping: keep the saved files the target's bytes
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def load_world(world_dir: str | Path) -> Mapping:
    """The ``world.json`` summary of a built world."""
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        from polyfuse.errors import DataError

        raise DataError(f"{path}: no tiny world here; build it with 'polyfuse world --out {world_dir}'")
    return json.loads(path.read_text())
