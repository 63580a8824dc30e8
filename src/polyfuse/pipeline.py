"""Stages of a recipe and the runner that executes the stale ones.

One table maps a stage name to the function that runs it; ``polyfuse run`` walks the table in
order and each function decides (through :func:`polyfuse.workspace.run_stage`) whether its
artifact is current.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyfuse.errors import DataError, RecipeError
from polyfuse.recipe import Recipe
from polyfuse.workspace import (
    StageResult,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_ranks,
    run_stage,
    workdir_lock,
)

if TYPE_CHECKING:
    from polyfuse.recipe import ImplicitRecipe


def resolve_models(recipe: Recipe) -> list:
    """``(name, ResolvedModel, tokenizer)`` for the target and every source; a missing one fails here."""
    from polyfuse.models import resolve_all

    return resolve_all([(s.name, s.ref.model, s.ref.revision, s.tokenizer) for s in recipe.models()],
                       world_dir=recipe.world)


def stage_dir(recipe: Recipe, *parts: str) -> Path:
    """Where a stage writes: ``<workdir>/<stage>[/<model>]``."""
    return Path(recipe.workdir).joinpath(*parts)


def _tokenizers(recipe: Recipe) -> dict:
    """Every model's tokenizer (target first), loaded once per stage."""
    from polyfuse.models import load_tokenizer

    return {name: load_tokenizer(res, tok) for name, res, tok in resolve_models(recipe)}


def _contexts(recipe: Recipe) -> list[int]:
    """Each model's context length from its config (models that declare none are left out)."""
    from transformers import AutoConfig

    from polyfuse.models import context_length

    lengths = (context_length(AutoConfig.from_pretrained(res.location, revision=res.revision))
               for _, res, _ in resolve_models(recipe))
    return [n for n in lengths if n is not None]


BLOCKS_RULES = 2
"""Version of the rules that pick documents for blocks, in the blocks stage's config: blocks built under
older rules are stale and rebuilt. 2: a document larger than the domain's budget is skipped (it used to
end the domain) and a chat corpus without an assistant turn is refused."""


def blocks_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Documents of the fusion corpus → blocks that fit every participating tokenizer."""
    from polyfuse.corpus.blocks import make_blocks, write_blocks
    from polyfuse.corpus.documents import domain_path, list_domains, read_documents, render_key
    from polyfuse.models import data_dir

    corpus = data_dir(recipe.corpus.path, recipe.world)
    resolved = resolve_models(recipe)
    cfg = {"corpus": recipe.section_dict("corpus"), "blocks": recipe.section_dict("blocks"),
           "tokenizers": {name: str(res) for name, res, _ in resolved}, "chat_render": render_key(),
           "rules": BLOCKS_RULES}
    inputs = {"corpus": corpus, **{f"tokenizer:{name}": res.location for name, res, _ in resolved}}

    def build(out: Path) -> dict:
        c = recipe.corpus
        domains = c.domains or list_domains(corpus, c.split)
        toks = _tokenizers(recipe)
        oversized: dict[str, int] = {}

        def docs():
            for domain in domains:
                path = domain_path(corpus, c.split, domain)
                budget = c.max_bytes_per_domain
                chat = supervised = 0
                for doc in read_documents(path, format=c.format, tokenizer=toks[recipe.target.name]):
                    size = len(doc.text.encode("utf-8"))
                    if budget is not None and size > c.max_bytes_per_domain:  # could never fit: skip it
                        oversized[domain] = oversized.get(domain, 0) + 1
                        continue
                    if budget is not None and size > budget:  # the domain's budget is spent
                        break
                    if doc.response_spans is not None:
                        chat += 1
                        supervised += any(b > a for a, b in doc.response_spans)
                    else:
                        supervised += 1
                    yield domain, doc
                    if budget is not None:
                        budget -= size
                if chat and not supervised:
                    raise DataError(f"{path}: none of its {chat} chat rows has an assistant turn, so training would "
                                    "learn nothing from this domain; add assistant responses (role 'assistant' or "
                                    "from 'gpt') or leave the domain out with corpus.domains")

        max_tokens = min([recipe.blocks.max_tokens, *_contexts(recipe)])
        stats = write_blocks(out / "blocks.jsonl",
                             make_blocks(docs(), list(toks.values()), max_tokens))
        return {**stats, "domains": domains, "max_tokens": max_tokens, "oversized_skipped": oversized}

    return run_stage(stage_dir(recipe, "blocks"), "blocks", cfg, inputs, build, force=force)


def _blocks(recipe: Recipe) -> list:
    from polyfuse.corpus.blocks import read_blocks

    return read_blocks(stage_dir(recipe, "blocks") / "blocks.jsonl")


def capture_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Top-k next-token log-probs of the target and every source over the blocks (resumable shards)."""
    from polyfuse.align.normalize import token_table
    from polyfuse.capture.hf import capture
    from polyfuse.capture.store import FORMAT_VERSION
    from polyfuse.models import load_model, load_tokenizer

    opts = recipe.capture
    if opts.backend == "vllm":  # fail fast, naming the extra, when vLLM is not installed
        from polyfuse.capture.vllm import capture as vllm_capture
        from polyfuse.capture.vllm import import_vllm

        import_vllm()
        if opts.samples:
            raise RecipeError("capture.samples needs the hf backend (vLLM returns only top-k prompt log-probs); "
                              "set capture.samples=0 or capture.backend=hf")
    blocks = _blocks(recipe)
    pairs = [(b.block_id, b.text, b.response_spans) for b in blocks]
    results = {}
    for name, res, tok in resolve_models(recipe):
        # prefix masses: sources only (positions inside *their* tokens), and only where the whole
        # distribution is at hand (hf); recorded only when on, so other captures stay current
        prefix_bytes = opts.prefix_bytes if opts.backend == "hf" and name != recipe.target.name else 0
        section = {k: v for k, v in recipe.section_dict("capture").items() if k != "prefix_bytes"}
        cfg = {"capture": section, "model": str(res), "store_format": FORMAT_VERSION,
               **({"seed": recipe.seed} if opts.samples else {}), **({"prefix_bytes": prefix_bytes} if prefix_bytes else {})}

        def build(out: Path, res=res, tok=tok, prefix_bytes=prefix_bytes) -> dict:
            if opts.backend == "vllm":
                return vllm_capture(res, load_tokenizer(res, tok), pairs, out, k=opts.top_k, batch_size=opts.batch_size,
                                    shard_size=opts.shard_size, progress=progress, meta={"model": str(res)},
                                    dtype=opts.dtype, device=opts.device, seed=recipe.seed)
            model, tokenizer = load_model(res, dtype=opts.dtype, device=opts.device), load_tokenizer(res, tok)
            return capture(model, tokenizer, pairs, out, k=opts.top_k, samples=opts.samples,
                           seed=recipe.seed, batch_size=opts.batch_size,
                           shard_size=opts.shard_size, progress=progress, meta={"model": str(res)},
                           prefix_bytes=prefix_bytes, pieces=token_table(tokenizer).pieces if prefix_bytes else None)

        results[name] = run_stage(stage_dir(recipe, "capture", name), "capture", cfg,
                                  {"blocks": stage_dir(recipe, "blocks"), "model": res.location}, build,
                                  force=force, resumable=True, collective=True)
    return results


def _entries(recipe: Recipe) -> int:
    """Entries per position in a captured store: the top-k plus the sampled tail."""
    return recipe.capture.top_k + recipe.capture.samples


def vocab_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """A source → target vocabulary map per source."""
    from polyfuse.align.vocab import vocab_map

    toks = _tokenizers(recipe)
    target = recipe.target.name
    resolved = {name: res for name, res, _ in resolve_models(recipe)}
    opts = recipe.vocab
    results = {}
    for spec in recipe.sources:
        cfg = {"vocab": recipe.section_dict("vocab"), "source": str(resolved[spec.name]),
               "target": str(resolved[target])}
        inputs = {"source": resolved[spec.name].location, "target": resolved[target].location}
        if opts.method == "stats":  # counted on the blocks: they are an input
            inputs["blocks"] = stage_dir(recipe, "blocks")

        def build(out: Path, name=spec.name) -> dict:
            if opts.method == "stats":
                vmap = _stats_map(recipe, toks[name], toks[target],
                                  vocab_map(toks[name], toks[target], opts.stats_fallback))
            else:
                vmap = vocab_map(toks[name], toks[target], opts.method)
            vmap.save(out)
            return vmap.summary()

        results[spec.name] = run_stage(stage_dir(recipe, "vocab", spec.name), "vocab", cfg, inputs, build,
                                       force=force)
    return results


def _stats_map(recipe: Recipe, src_tok, tgt_tok, fallback):
    """FuseChat-2.0's statistics map, counted over DTW alignments of the recipe's blocks.

    DTW, not offsets: pairs with identical character spans would only re-discover the exact map;
    DTW also pairs differently cut tokens, which is where the statistics add information.
    """
    from polyfuse.align.tokens import align_blocks
    from polyfuse.align.vocab import count_aligned_pairs, stats_map
    from polyfuse.corpus.tokens import encode_blocks

    blocks = _blocks(recipe)
    texts, chat = [b.text for b in blocks], [b.response_spans is not None for b in blocks]
    src_enc, tgt_enc = encode_blocks(src_tok, texts, chat), encode_blocks(tgt_tok, texts, chat)
    alignments = (align_blocks(s, t, method="dtw", src_tokenizer=src_tok, tgt_tokenizer=tgt_tok)
                  for s, t in zip(src_enc, tgt_enc, strict=True))
    counts = count_aligned_pairs(src_enc, tgt_enc, alignments)
    return stats_map(counts, len(src_tok), len(tgt_tok), fallback=fallback,
                     min_count=recipe.vocab.stats_min_count)


def align_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Each source's captured top-k carried to the target's positions and vocabulary."""
    from polyfuse.align.normalize import token_table
    from polyfuse.align.tokens import align_blocks
    from polyfuse.align.transfer import (
        RemainderMap,
        TargetCuts,
        TransferStats,
        aligned_source_positions,
        consistent_entries,
        drop_special_mismatches,
        inside_token_entries,
        shared_start_positions,
        transfer_block,
    )
    from polyfuse.align.vocab import VocabMap
    from polyfuse.capture.store import FORMAT_VERSION, StoreReader, StoreWriter
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.progress import progress_bar

    toks = _tokenizers(recipe)
    target = recipe.target.name
    blocks = _blocks(recipe)
    texts, chat = [b.text for b in blocks], [b.response_spans is not None for b in blocks]
    tgt_enc = encode_blocks(toks[target], texts, chat)
    shard = recipe.capture.shard_size
    results = {}
    for spec in recipe.sources:
        name = spec.name
        cfg = {"align": recipe.section_dict("align"), "k": _entries(recipe), "store_format": FORMAT_VERSION}
        inputs = {"capture": stage_dir(recipe, "capture", name), "vocab": stage_dir(recipe, "vocab", name),
                  "target_capture": stage_dir(recipe, "capture", target)}

        def build(out: Path, name=name) -> dict:
            method = recipe.align.method
            vmap = VocabMap.load(stage_dir(recipe, "vocab", name))
            reader = StoreReader(stage_dir(recipe, "capture", name))
            src_enc = encode_blocks(toks[name], texts, chat)
            writer = StoreWriter(out, k=reader.k, vocab_size=len(toks[target]),
                                 meta={"kind": "aligned", "source": name, "target": target, "align": method,
                                       "vocab": vmap.method, "temperature": reader.temperature})
            stats = TransferStats()
            inside = recipe.align.inside
            src_table, tgt_table = token_table(toks[name]), token_table(toks[target])
            remainder = RemainderMap(tgt_table) if inside else None
            # a source with the target's own vocabulary already follows the target's cuts
            cuts = TargetCuts(toks[target]) if recipe.align.cuts and src_table.pieces != tgt_table.pieces else None
            with progress_bar(f"align {name}", len(blocks), progress) as advance:
                for start in range(0, len(blocks), shard):
                    rows = []
                    for i in range(start, min(start + shard, len(blocks))):
                        if method == "starts":
                            pos = drop_special_mismatches(shared_start_positions(src_enc[i], tgt_enc[i]),
                                                          src_enc[i], tgt_enc[i], src_table, tgt_table)
                        else:
                            alignment = align_blocks(src_enc[i], tgt_enc[i], method=method,
                                                     src_tokenizer=toks[name], tgt_tokenizer=toks[target])
                            pos = aligned_source_positions(alignment, src_enc[i], tgt_enc[i],
                                                           vmap if method == "dtw" else None)
                        src_row = reader[blocks[i].block_id]
                        extra = (inside_token_entries(src_row, src_enc[i], tgt_enc[i], texts[i], src_table,
                                                      remainder, pos, cuts) if inside else None)
                        keep = (consistent_entries(src_row, pos, src_enc[i], tgt_enc[i], texts[i], src_table, cuts)
                                if cuts is not None else None)
                        rows.append(transfer_block(src_row, pos, vmap, reader.k, extra, keep))
                        stats.add(src_row, pos, rows[-1], tgt_enc[i].ids[1:], extra)
                        advance()
                    writer.write_shard(start // shard, rows)
            writer.finalize()
            return {**stats.as_dict(), "cuts": cuts is not None}

        results[name] = run_stage(stage_dir(recipe, "align", name), "align", cfg, inputs, build, force=force)
    return results


def _teachers(recipe: Recipe, target_row, aligned_rows: list, next_ids=None, source_nll: list | None = None) -> list:
    """Fusion's teachers at the target's positions: the fallback (if any), the target, then each source.

    Positions that some source reaches are fused from the target (``fuse.include_target``, FuseLLM's
    teacher 0) and the sources. Positions no source reaches learn from ``fuse.fallback``: the target's
    own distribution (``target``; it is the target's row itself when the target is a teacher), a
    one-hot on the next token (``label``, FuseLLM's fallback) or nothing (``none``; only without the
    target, which otherwise covers every position). A fallback that
    is not the target is teacher 0 and never valid: the strategies use teacher 0 exactly where no
    teacher has a usable prediction (:mod:`polyfuse.fuse.strategies`). ``next_ids`` [P]: the
    target's next tokens (the ``label`` fallback). ``source_nll`` [P] per source: what each is scored by
    at token level instead of its aligned ``target_logprob`` (``fuse.criterion: span``), where it has one.
    """
    import numpy as np

    from polyfuse.fuse.strategies import TeacherBlock

    def teacher(row, valid, seq_nll=None, nll=None):
        own = -row.target_logprob.astype(np.float64)
        nll = own if nll is None else np.where(np.isnan(own) | np.isnan(nll), own, nll)
        return TeacherBlock(row.ids, row.logprobs.astype(np.float32), nll, valid,
                            row.nll_sum if seq_nll is None else seq_nll)

    p = target_row.n_positions
    opts = recipe.fuse
    scores = source_nll if source_nll is not None else [None] * len(aligned_rows)
    sources = [teacher(row, ~np.isnan(row.target_logprob), nll=nll) for row, nll in zip(aligned_rows, scores, strict=True)]
    covered = np.any([t.valid for t in sources], axis=0) if sources else np.zeros(p, dtype=bool)
    out = []
    if opts.fallback == "label":
        out.append(TeacherBlock(np.asarray(next_ids, dtype=np.int64)[:, None], np.zeros((p, 1), np.float32),
                                np.full(p, np.nan), np.zeros(p, dtype=bool), float("nan")))
    elif opts.fallback == "target" and not opts.include_target:  # NaN sequence NLL: never chosen for a block
        out.append(teacher(target_row, np.zeros(p, dtype=bool), float("nan")))
    if opts.include_target:
        out.append(teacher(target_row, covered if opts.fallback == "label" else np.ones(p, dtype=bool)))
    return out + sources


def _n_teacher0(recipe: Recipe) -> int:
    """How many teachers come before the sources (the fallback and/or the target)."""
    opts = recipe.fuse
    fallback = opts.fallback == "label" or (opts.fallback == "target" and not opts.include_target)
    return int(fallback) + int(opts.include_target)


def _teacher_names(recipe: Recipe, names: list[str]) -> list[str]:
    """Fusion's teacher names, in :func:`_teachers` order (a label fallback is ``label``)."""
    opts, target = recipe.fuse, recipe.target.name
    lead = {0: [], 1: ["label" if opts.fallback == "label" and not opts.include_target else target],
            2: ["label", target]}[_n_teacher0(recipe)]
    return lead + names


def fuse_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Fused next-token distributions at the target's positions (MinCE, AvgCE, ...)."""
    return _fuse_into(recipe, [s.name for s in recipe.sources], stage_dir(recipe, "fuse"), force=force,
                      progress=progress)


def _fuse_into(recipe: Recipe, names: list[str], out_dir: Path, *, force: bool, progress: bool) -> StageResult:
    """Fuse the target (when ``fuse.include_target``) with the aligned sources ``names`` into ``out_dir``."""
    from polyfuse.capture.store import FORMAT_VERSION, StoreReader, StoreWriter
    from polyfuse.fuse.strategies import fuse_block, tag_teacher
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
        blocks = _blocks(recipe)
        own = StoreReader(stage_dir(recipe, "capture", target))
        aligned = [StoreReader(stage_dir(recipe, "align", n)) for n in names]
        n_tgt = own.meta.get("vocab_size", 0) or own.meta["tokenizer_len"]
        groups = _teacher_groups(recipe, names, n_tgt)
        next_ids = None
        if opts.fallback == "label" or span:  # only these need the tokenizers
            from polyfuse.corpus.tokens import encode_blocks

            toks = _tokenizers(recipe)
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
        widths = [r.k for r in [own] * _n_teacher0(recipe) + aligned]
        # default: lose no teacher entry (a mixture can hold the union of its teachers' entries)
        k_out = opts.top_k or (sum(widths) if opts.strategy == "avg_ce" else max(widths))
        if groups is not None:  # entries carry their teacher: id = teacher * n_tgt + target id
            atomic_write_bytes(out / GROUPS_NAME, _npz(groups=groups))
        writer = StoreWriter(out, k=k_out, vocab_size=n_tgt * (1 if groups is None else len(groups)),
                             meta={"kind": "fused", "strategy": opts.strategy, "level": opts.level,
                                   "teachers": _teacher_names(recipe, names),
                                   "temperature": own.temperature})
        stats, by_domain = None, {}
        shard = recipe.capture.shard_size
        with progress_bar(f"fuse ({opts.strategy}, {opts.level})", len(blocks), progress) as advance:
            for start in range(0, len(blocks), shard):
                rows = []
                for b in blocks[start:start + shard]:
                    t_row = own[b.block_id]
                    teachers = _teachers(recipe, t_row, [a[b.block_id] for a in aligned],
                                         next_ids[b.block_id] if opts.fallback == "label" else None,
                                         source_nll[b.block_id] if source_nll is not None else None)
                    if groups is not None:
                        teachers = [tag_teacher(t, m, n_tgt) for m, t in enumerate(teachers)]
                    fused = fuse_block(teachers,
                                       strategy=opts.strategy, level=opts.level, k_out=k_out,
                                       n_bytes=b.metric_bytes)
                    stats = fused.stats if stats is None else stats + fused.stats
                    seen = by_domain.get(b.domain)
                    by_domain[b.domain] = fused.stats if seen is None else seen + fused.stats
                    rows.append(_fused_row(b.block_id, fused, t_row, k_out))
                    advance()
                writer.write_shard(start // shard, rows)
        writer.finalize()
        return {"teacher_share": stats.as_dict() if stats is not None else {},
                "teacher_share_by_domain": {d: s.share.tolist() for d, s in sorted(by_domain.items())},
                "teachers": _teacher_names(recipe, names)}

    return run_stage(out_dir, "fuse", cfg, inputs, build, force=force)


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
    rows = [np.arange(n_tgt)] * _n_teacher0(recipe)
    rows += [np.arange(n_tgt) if m.tgt_group is None else m.tgt_group for m in maps]
    return np.stack(rows).astype(np.int64)


def _npz(**arrays) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _fused_row(block_id: int, fused, target_row, k: int):
    """A fused block in the store format (k entries per position, padded)."""
    import numpy as np

    from polyfuse.capture.store import BlockTopK

    ids = np.full((fused.ids.shape[0], k), -1, dtype=np.int64)
    logprobs = np.full((fused.ids.shape[0], k), -np.inf, dtype=np.float16)
    width = min(k, fused.ids.shape[1])
    ids[:, :width] = fused.ids[:, :width]
    logprobs[:, :width] = fused.logprobs[:, :width]
    return BlockTopK(block_id, ids, logprobs, target_row.target_logprob, target_row.nll_sum)


def _train_rows(recipe: Recipe, fuse_dir: Path | None) -> list[dict]:
    """Training rows: the target's tokens of each block, plus the fused targets when fusing."""
    import numpy as np

    from polyfuse.capture.store import StoreReader
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.fuse.trainer import training_row

    blocks = _blocks(recipe)
    tok = _tokenizers(recipe)[recipe.target.name]
    encoded = encode_blocks(tok, [b.text for b in blocks], [b.response_spans is not None for b in blocks])
    rows = [training_row(enc, b.response_spans) for enc, b in zip(encoded, blocks, strict=True)]
    if rows and all("labels" in r and not (np.asarray(r["labels"]) != -100).any() for r in rows):
        raise DataError(f"{stage_dir(recipe, 'blocks') / 'blocks.jsonl'}: no block has a response token to train on "
                        "(chat rows without an assistant turn); add assistant responses to the corpus, then rerun "
                        "'polyfuse run RECIPE'")
    if fuse_dir is not None:
        fused = StoreReader(fuse_dir)
        for row, b in zip(rows, blocks, strict=True):
            f = fused[b.block_id]
            row["teacher_ids"] = f.ids
            row["teacher_logprobs"] = f.logprobs.astype(np.float32)
    return rows


DISTILL_KEYS = ("lm_loss_weight", "distill_loss", "temperature", "schedule", "teacher_mass", "baseline")
"""Train settings that only the fused run reads; changing them leaves target+clm current."""


def train_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Continual training of the target: fused (w·CLM + (1−w)·distill) and the plain-CLM baseline."""
    results = {}
    if recipe.fuse.strategy != "none":
        results["fused"] = _train_run(recipe, stage_dir(recipe, "fuse"), stage_dir(recipe, "train", "fused"),
                                      force=force, progress=progress)
    if recipe.train.baseline or recipe.fuse.strategy == "none":
        results["clm"] = _train_run(recipe, None, stage_dir(recipe, "train", "clm"), force=force,
                                    progress=progress)
    return results


def _train_run(recipe: Recipe, fuse_dir: Path | None, out_dir: Path, *, force: bool, progress: bool,
               overrides: dict[str, Any] | None = None, description: str | None = None) -> StageResult:
    """Train the target on the blocks into ``out_dir``: with the fused targets in ``fuse_dir``, or plain CLM;
    ``overrides`` replace ``train`` settings (``None`` values are ignored)."""
    from polyfuse.fuse.trainer import FusionConfig, train_fusion

    opts = recipe.train.model_copy(update={k: v for k, v in (overrides or {}).items() if v is not None})
    with_teacher = fuse_dir is not None
    target = next(res for name, res, _ in resolve_models(recipe) if name == recipe.target.name)
    train_cfg = opts.model_dump(mode="json")
    if not with_teacher:  # the baseline does not depend on the distillation settings
        train_cfg = {k: v for k, v in train_cfg.items() if k not in DISTILL_KEYS}
    cfg = {"train": train_cfg, "seed": recipe.seed, "teacher": with_teacher,
           "fuse": recipe.section_dict("fuse") if with_teacher else None}
    inputs = {"target": target.location, "blocks": stage_dir(recipe, "blocks"),
              **({"fuse": fuse_dir} if with_teacher else {})}

    def build(out: Path) -> dict:
        import torch

        from polyfuse.models import resolve_bf16

        config = FusionConfig(
            output_dir=str(out), max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
            gradient_accumulation_steps=opts.gradient_accumulation_steps, learning_rate=opts.learning_rate,
            warmup_steps=opts.warmup_ratio, weight_decay=opts.weight_decay, lr_scheduler_type=opts.lr_scheduler_type,
            adam_beta2=opts.adam_beta2, max_grad_norm=opts.max_grad_norm, seed=recipe.seed, data_seed=recipe.seed,
            bf16=resolve_bf16(opts.bf16), logging_steps=opts.logging_steps or max(1, opts.max_steps // 20),
            save_strategy="steps", save_steps=opts.save_steps or max(1, opts.max_steps // 4), save_total_limit=1,
            report_to=[],
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for copies to a GPU (else a warning)
            disable_tqdm=not progress, lm_loss_weight=opts.lm_loss_weight if with_teacher else 1.0,
            distill_loss=opts.distill_loss, distill_temperature=opts.temperature,
            distill_schedule=opts.schedule, teacher_mass=opts.teacher_mass,
            fusion=recipe.fuse.strategy if with_teacher else "none")
        groups = None
        if fuse_dir is not None and (fuse_dir / GROUPS_NAME).is_file():
            import numpy as np

            with np.load(fuse_dir / GROUPS_NAME) as z:
                groups = z["groups"]
        result = train_fusion(target.location, _train_rows(recipe, fuse_dir), out, config, teacher_groups=groups,
                              description=description or f"train {out_dir.name}")
        return {"final_loss": result["metrics"].get("train_loss"), "steps": opts.max_steps}

    return run_stage(out_dir, "train", cfg, inputs, build, force=force, resumable=True, collective=True)


def pairs_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """FuseChat's pairwise fusion: per source, fuse the target with that source alone and train a target.

    Writes ``pairs/<source>/fuse`` and ``pairs/<source>/train``; each trained target has the target's
    architecture, so :func:`merge_stage` can merge them in parameter space.
    """
    results = {}
    for spec in recipe.sources:
        fuse_dir = stage_dir(recipe, "pairs", spec.name, "fuse")
        results[f"{spec.name}/fuse"] = _fuse_into(recipe, [spec.name], fuse_dir, force=force, progress=progress)
        results[f"{spec.name}/train"] = _train_run(recipe, fuse_dir, stage_dir(recipe, "pairs", spec.name, "train"),
                                                   force=force, progress=progress, overrides=recipe.section_dict("pairs"),
                                                   description=f"train pair:{spec.name}")
    return results


def merge_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> StageResult:
    """Merge the pairwise targets onto the original target (FuseChat: SCE) with the streaming engine.

    The merged model is ``merge/model``; ``merge/merge.yaml`` is the mergekit-style config used.
    """
    from polyfuse.merge import parse_merge_config, run_merge

    target = next(res for name, res, _ in resolve_models(recipe) if name == recipe.target.name)
    pairs = {s.name: stage_dir(recipe, "pairs", s.name, "train") for s in recipe.sources}
    opts = recipe.merge
    config = {"merge_method": opts.method, "base_model": str(target.location),
              "models": [{"model": str(path.resolve())} for path in pairs.values()],
              "parameters": dict(opts.parameters), "dtype": opts.dtype}
    cfg = {"merge": recipe.section_dict("merge"), "seed": recipe.seed}
    inputs = {"target": target.location, **{f"pair:{n}": p for n, p in pairs.items()}}

    def build(out: Path) -> dict:
        atomic_write_text(out / "merge.yaml", _yaml_dump(config))
        result = run_merge(parse_merge_config(config, source=str(out / "merge.yaml")), out / "model",
                           seed=recipe.seed, world_dir=recipe.world, progress=progress)
        return {"tensors": result.tensors, "input_bytes": result.input_bytes, "seconds": result.seconds}

    return run_stage(stage_dir(recipe, "merge"), "merge", cfg, inputs, build, force=force)


def _yaml_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def trained_rows(recipe: Recipe) -> dict[str, Path]:
    """Row name -> model directory for every finished training or merge of the target.

    ``target+clm``, ``target+fused`` (FuseLLM), ``target+pair:SOURCE`` and ``target+fusechat``
    (FuseChat), each present once its stage has a manifest.
    """
    name = recipe.target.name
    candidates = {f"{name}+clm": stage_dir(recipe, "train", "clm"),
                  f"{name}+fused": stage_dir(recipe, "train", "fused"),
                  **{f"{name}+pair:{s.name}": stage_dir(recipe, "pairs", s.name, "train") for s in recipe.sources}}
    rows = {row: path for row, path in candidates.items() if (path / "manifest.json").is_file()}
    if (stage_dir(recipe, "merge") / "manifest.json").is_file():
        rows[f"{name}+fusechat"] = stage_dir(recipe, "merge", "model")
    return rows


def eval_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Bits per byte of every model (sources, target, trained targets) per held-out domain.

    Each model is its own stage (``eval/<name>``), so adding a trained model evaluates only it.
    Rows go into ``<workdir>/results.json``.
    """
    from polyfuse.evaluate.bpb import evaluate_bpb, load_domain_texts
    from polyfuse.evaluate.results import update_results
    from polyfuse.models import data_dir, lazy_loaders, resolve_all

    opts = recipe.eval
    models = resolve_models(recipe)
    for row, path in trained_rows(recipe).items():
        models += resolve_all([(row, str(path.resolve()), None, None)], world_dir=recipe.world)
    corpus = data_dir(recipe.data.eval, recipe.world)
    texts: dict | None = None
    results = {}
    for name, res, tok in models:
        cfg = {"data": recipe.section_dict("data"), "eval": recipe.section_dict("eval"), "model": str(res)}

        def build(out: Path, entry=(name, res, tok)) -> dict:
            nonlocal texts
            if texts is None:
                texts = load_domain_texts(corpus, recipe.data.split, recipe.data.domains, opts.max_bytes_per_domain)
            result = evaluate_bpb(lazy_loaders([entry], dtype=opts.dtype, device=opts.device), texts,
                                  batch_size=opts.batch_size, max_length=opts.max_length,
                                  stride=opts.effective_stride, progress=progress)[entry[0]]
            atomic_write_json(out / "bpb.json", result)
            return {"bpb": result["bpb"]}

        res_stage = run_stage(stage_dir(recipe, "eval", name), "eval", cfg,
                              {"data": corpus, "model": res.location}, build, force=force)
        if current_ranks().main:
            update_results(Path(recipe.workdir) / "results.json", {name: {"bpb": res_stage.manifest.outputs["bpb"]}},
                           meta={"bpb": {"split": recipe.data.split, **recipe.section_dict("eval")}})
        results[name] = res_stage
    return results


STAGES: dict[str, Callable[..., StageResult | dict[str, StageResult]]] = {
    "blocks": blocks_stage,
    "capture": capture_stage,
    "vocab": vocab_stage,
    "align": align_stage,
    "fuse": fuse_stage,
    "train": train_stage,
    "pairs": pairs_stage,
    "merge": merge_stage,
    "eval": eval_stage,
}

MODE_STAGES: dict[str, tuple[str, ...]] = {
    "fusellm": ("blocks", "capture", "vocab", "align", "fuse", "train", "eval"),
    "fusechat": ("blocks", "capture", "vocab", "align", "pairs", "merge", "eval"),
}
"""The stages ``polyfuse run`` runs for each recipe ``mode``, in order."""


def run_recipe(recipe: Recipe | ImplicitRecipe, *, only: Sequence[str] | None = None, force: bool = False,
               progress: bool = True) -> dict[str, StageResult]:
    """Run every stage of the recipe (or ``only`` these), skipping the ones whose manifest is current.

    Returns every artifact's result keyed ``stage`` or ``stage/<model>``. An implicit recipe
    (``mode: implicit``) runs through :func:`polyfuse.implicit.pipeline.run_implicit`. The whole run
    holds the workdir's lock (:func:`polyfuse.workspace.workdir_lock`): one run per workdir.
    """
    with workdir_lock(recipe.workdir):
        return _run_locked(recipe, only=only, force=force, progress=progress)


def _run_locked(recipe: Recipe | ImplicitRecipe, *, only: Sequence[str] | None, force: bool,
                progress: bool) -> dict[str, StageResult]:
    """:func:`run_recipe` while holding the workdir's lock."""
    if recipe.mode == "implicit":
        from polyfuse.implicit.pipeline import run_implicit

        return run_implicit(recipe, only=only, force=force, progress=progress)  # type: ignore[arg-type]
    names = list(only) if only else list(MODE_STAGES[recipe.mode])
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise RecipeError(f"unknown stage {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    out: dict[str, StageResult] = {}
    for name in names:
        result = STAGES[name](recipe, force=force, progress=progress)
        if isinstance(result, dict):
            out.update({f"{name}/{part}": res for part, res in result.items()})
        else:
            out[name] = result
    return out
