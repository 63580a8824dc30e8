"""Fusing the aligned teachers per position (MinCE, AvgCE, ...) and the continual training of the target on
``w·CLM + (1−w)·distill``, beside the plain-CLM baseline on the same blocks and steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyfuse.errors import DataError
from polyfuse.recipe import Recipe
from polyfuse.recipe.explicit import TrainSection
from polyfuse.stages.common import recipe_blocks, resolve_models, stage_dir, tokenizers
from polyfuse.workspace import StageResult, atomic_write_bytes, current_ranks, run_stage

if TYPE_CHECKING:
    from polyfuse.fuse.trainer import FusionConfig


def fuse_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Fused next-token distributions at the target's positions (MinCE, AvgCE, ...)."""
    return fuse_into(recipe, [s.name for s in recipe.sources], stage_dir(recipe, "fuse"), force=force,
                      progress=progress)


def fuse_into(recipe: Recipe, names: list[str], out_dir: Path, *, force: bool, progress: bool) -> StageResult:
    """Fuse the target (when ``fuse.include_target``) with the aligned sources ``names`` into ``out_dir``."""
    from polyfuse.capture.store import FORMAT_VERSION, StoreReader, StoreWriter
    from polyfuse.fuse.stores import fuse_stores
    from polyfuse.fuse.teachers import lead_teachers, teacher_names
    from polyfuse.progress import progress_bar

    opts = recipe.fuse
    target = recipe.target.name
    cfg = {"fuse": recipe.section_dict("fuse"), "store_format": FORMAT_VERSION, "sources": names}
    span = opts.criterion == "span" and opts.level == "token"
    inputs = {"target_capture": stage_dir(recipe, "capture", target),
              **{f"align:{n}": stage_dir(recipe, "align", n) for n in names},
              **{f"vocab:{n}": stage_dir(recipe, "vocab", n) for n in names},
              **({f"capture:{n}": stage_dir(recipe, "capture", n) for n in names} if span else {})}

    def build(out: Path) -> dict:
        blocks = recipe_blocks(recipe)
        own = StoreReader(stage_dir(recipe, "capture", target))
        aligned = [StoreReader(stage_dir(recipe, "align", n)) for n in names]
        n_tgt = own.meta.get("vocab_size", 0) or own.meta["tokenizer_len"]
        groups = _teacher_groups(recipe, names, n_tgt)
        next_ids = None
        if opts.fallback == "label" or span:  # only these need the tokenizers
            from polyfuse.corpus.tokens import encode_blocks

            toks = tokenizers(recipe)
            texts, chat = [b.text for b in blocks], [b.response_spans is not None for b in blocks]
            encoded = encode_blocks(toks[target], texts, chat)
            next_ids = {b.block_id: e.ids[1:] for b, e in zip(blocks, encoded, strict=True)}
        source_nll = None
        if span:  # each source's NLL of the text of the target's next token, per block
            from polyfuse.align.transfer import span_nll

            source_nll = {b.block_id: [] for b in blocks}
            for n in names:
                raw = StoreReader(stage_dir(recipe, "capture", n))
                for b, src, tgt in zip(blocks, encode_blocks(toks[n], texts, chat), encoded, strict=True):
                    source_nll[b.block_id].append(span_nll(raw[b.block_id], src, tgt))
        widths = [r.k for r in [own] * lead_teachers(opts.fallback, opts.include_target) + aligned]
        # default: lose no teacher entry (a mixture can hold the union of its teachers' entries)
        k_out = opts.top_k or (sum(widths) if opts.strategy == "avg_ce" else max(widths))
        if groups is not None and current_ranks().main:  # entries carry their teacher: id = teacher * n_tgt + id
            atomic_write_bytes(out / GROUPS_NAME, _npz(groups=groups))
        writer = StoreWriter(out, k=k_out, vocab_size=n_tgt * (1 if groups is None else len(groups)),
                             meta={"kind": "fused", "strategy": opts.strategy, "level": opts.level,
                                   "teachers": teacher_names(target, names, opts.fallback, opts.include_target),
                                   "temperature": own.temperature})
        ranks, size = current_ranks(), recipe.capture.shard_size
        mine = sum(len(blocks[s * size:(s + 1) * size]) for s in ranks.shards((len(blocks) + size - 1) // size))
        with progress_bar(f"fuse ({opts.strategy}, {opts.level})", mine, progress) as advance:
            stats, by_domain = fuse_stores(blocks, own, aligned, writer, strategy=opts.strategy, level=opts.level,
                                           k_out=k_out, fallback=opts.fallback, include_target=opts.include_target,
                                           groups=groups, n_tgt=n_tgt, next_ids=next_ids, source_nll=source_nll,
                                           shard_size=size, ranks=ranks, advance=advance)
        return {"teacher_share": stats.as_dict() if stats is not None else {},
                "teacher_share_by_domain": {d: s.share.tolist() for d, s in sorted(by_domain.items())},
                "teachers": teacher_names(target, names, opts.fallback, opts.include_target)}

    # collective: under several processes each rank fuses its share of the shards
    return run_stage(out_dir, "fuse", cfg, inputs, build, force=force, resumable=True, collective=True)


GROUPS_NAME = "groups.npz"
"""Beside a fused store whose sources use ``groups`` maps: ``groups`` [teachers, V_tgt], each teacher's
group of every target id (:func:`polyfuse.align.vocab.group_map`; the target's own row is the identity)."""


def _teacher_groups(recipe: Recipe, names: list[str], n_tgt: int):
    """[teachers, n_tgt] group index of every target id per teacher, or None when no source uses groups."""
    import numpy as np

    from polyfuse.align.vocab import VocabMap

    maps = [VocabMap.load(stage_dir(recipe, "vocab", n)) for n in names]
    if all(m.tgt_group is None for m in maps):
        return None
    from polyfuse.fuse.teachers import lead_teachers

    rows = [np.arange(n_tgt)] * lead_teachers(recipe.fuse.fallback, recipe.fuse.include_target)
    rows += [np.arange(n_tgt) if m.tgt_group is None else m.tgt_group for m in maps]
    return np.stack(rows).astype(np.int64)


def _npz(**arrays) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _train_rows(recipe: Recipe, fuse_dir: Path | None) -> Sequence[dict]:
    """Training rows: the target's tokens of each block, plus the fused targets when fusing (read from the
    store only when the data loader fetches a row, so each rank reads its own share)."""
    import numpy as np

    from polyfuse.capture.store import StoreReader
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.fuse.trainer import TeacherRows, training_row

    blocks = recipe_blocks(recipe)
    tok = tokenizers(recipe)[recipe.target.name]
    encoded = encode_blocks(tok, [b.text for b in blocks], [b.response_spans is not None for b in blocks])
    rows = [training_row(enc, b.response_spans) for enc, b in zip(encoded, blocks, strict=True)]
    if rows and all("labels" in r and not (np.asarray(r["labels"]) != -100).any() for r in rows):
        raise DataError(f"{stage_dir(recipe, 'blocks') / 'blocks.jsonl'}: no block has a response token to train on "
                        "(chat rows without an assistant turn); add assistant responses to the corpus, then rerun "
                        "'polyfuse run RECIPE'")
    if fuse_dir is None:
        return rows
    return TeacherRows(rows, StoreReader(fuse_dir), [b.block_id for b in blocks])  # read per fetched row


DISTILL_KEYS = ("lm_loss_weight", "distill_loss", "divergence_beta", "skew_alpha", "temperature", "schedule",
                "teacher_mass", "baseline")
"""Train settings that only the fused run reads; changing them leaves target+clm current."""

DIVERGENCE_PARAMETERS = {"divergence_beta": ("jsd",), "skew_alpha": ("skew_forward_kl", "skew_reverse_kl")}
"""Train settings read by some distillation losses only: left out of the other runs' configs, so changing
them (or their arrival, with defaults, in recipes of earlier versions) does not make those runs stale."""


def train_config(opts: TrainSection, with_teacher: bool) -> dict[str, Any]:
    """The ``train`` settings a train run's manifest records: the baseline's without :data:`DISTILL_KEYS`, the
    fused run's without the parameters its distillation loss does not read, ``forward_kl`` recorded as ``kl``.
    ``baseline_learning_rate`` is never recorded: the baseline's run has it as its ``learning_rate``."""
    cfg = opts.model_dump(mode="json")
    cfg.pop("baseline_learning_rate", None)
    if not with_teacher:  # the baseline does not depend on the distillation settings
        return {k: v for k, v in cfg.items() if k not in DISTILL_KEYS}
    unread = {k for k, kinds in DIVERGENCE_PARAMETERS.items() if opts.distill_loss not in kinds}
    cfg = {k: v for k, v in cfg.items() if k not in unread}
    if cfg["distill_loss"] == "forward_kl":  # one loss, one config: the alias's older name
        cfg["distill_loss"] = "kl"
    return cfg


def fusion_config(recipe: Recipe, opts: TrainSection, out: Path, *, with_teacher: bool,
                  progress: bool) -> FusionConfig:
    """The trainer's configuration of a train run: ``opts`` (the recipe's ``train`` section, overrides applied)."""
    import torch

    from polyfuse.fuse.trainer import FusionConfig
    from polyfuse.models import resolve_bf16

    return FusionConfig(
        output_dir=str(out), max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.gradient_accumulation_steps, learning_rate=opts.learning_rate,
        warmup_steps=opts.warmup_ratio, weight_decay=opts.weight_decay, lr_scheduler_type=opts.lr_scheduler_type,
        adam_beta2=opts.adam_beta2, max_grad_norm=opts.max_grad_norm, seed=recipe.seed, data_seed=recipe.seed,
        bf16=resolve_bf16(opts.bf16), logging_steps=opts.logging_steps or max(1, opts.max_steps // 20),
        save_strategy="steps", save_steps=opts.save_steps or max(1, opts.max_steps // 4), save_total_limit=1,
        report_to=[],
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for copies to a GPU (else a warning)
        disable_tqdm=not progress, lm_loss_weight=opts.lm_loss_weight if with_teacher else 1.0,
        distill_loss=opts.distill_loss, divergence_beta=opts.divergence_beta, skew_alpha=opts.skew_alpha,
        distill_temperature=opts.temperature, distill_schedule=opts.schedule, teacher_mass=opts.teacher_mass,
        fusion=recipe.fuse.strategy if with_teacher else "none")


def train_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Continual training of the target: fused (w·CLM + (1−w)·distill) and the plain-CLM baseline."""
    results = {}
    if recipe.fuse.strategy != "none":
        results["fused"] = train_run(recipe, stage_dir(recipe, "fuse"), stage_dir(recipe, "train", "fused"),
                                      force=force, progress=progress)
    if recipe.train.baseline or recipe.fuse.strategy == "none":
        results["clm"] = train_run(recipe, None, stage_dir(recipe, "train", "clm"), force=force,
                                    progress=progress,
                                    overrides={"learning_rate": recipe.train.baseline_learning_rate})
    return results


def train_run(recipe: Recipe, fuse_dir: Path | None, out_dir: Path, *, force: bool, progress: bool,
               overrides: dict[str, Any] | None = None, description: str | None = None) -> StageResult:
    """Train the target on the blocks into ``out_dir``: with the fused targets in ``fuse_dir``, or plain CLM;
    ``overrides`` replace ``train`` settings (``None`` values are ignored)."""
    from polyfuse.fuse.trainer import train_fusion

    opts = recipe.train.model_copy(update={k: v for k, v in (overrides or {}).items() if v is not None})
    with_teacher = fuse_dir is not None
    target = next(res for name, res, _ in resolve_models(recipe) if name == recipe.target.name)
    cfg = {"train": train_config(opts, with_teacher), "seed": recipe.seed, "teacher": with_teacher,
           "fuse": recipe.section_dict("fuse") if with_teacher else None}
    inputs = {"target": target.location, "blocks": stage_dir(recipe, "blocks"),
              **({"fuse": fuse_dir} if with_teacher else {})}

    def build(out: Path) -> dict:
        config = fusion_config(recipe, opts, out, with_teacher=with_teacher, progress=progress)
        groups = None
        if fuse_dir is not None and (fuse_dir / GROUPS_NAME).is_file():
            import numpy as np

            with np.load(fuse_dir / GROUPS_NAME) as z:
                groups = z["groups"]
        result = train_fusion(target.location, _train_rows(recipe, fuse_dir), out, config, teacher_groups=groups,
                              description=description or f"train {out_dir.name}")
        return {"final_loss": result["metrics"].get("train_loss"), "steps": opts.max_steps}

    return run_stage(out_dir, "train", cfg, inputs, build, force=force, resumable=True, collective=True)
