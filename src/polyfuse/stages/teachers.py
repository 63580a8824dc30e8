"""The teachers' side of explicit fusion: capture (top-k of every model over the blocks), the vocabulary
maps and the alignment that projects each source's entries onto the target's tokens."""

from __future__ import annotations

from pathlib import Path

from polyfuse.recipe import Recipe
from polyfuse.stages.common import recipe_blocks, resolve_models, section_config, stage_dir, tokenizers
from polyfuse.workspace import StageResult, current_ranks, run_stage


def capture_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Top-k next-token log-probs of the target and every source over the blocks (resumable shards)."""
    from polyfuse.align.normalize import token_table
    from polyfuse.capture import get_backend
    from polyfuse.capture.store import FORMAT_VERSION
    from polyfuse.models import load_tokenizer

    opts = recipe.capture
    run = get_backend(opts.backend)  # an unknown backend or a missing extra fails here, before any work
    blocks = recipe_blocks(recipe)
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
            pieces = token_table(load_tokenizer(res, tok)).pieces if prefix_bytes else None
            return run(res, tok, pairs, out, k=opts.top_k, samples=opts.samples, seed=recipe.seed,
                       batch_size=opts.batch_size, shard_size=opts.shard_size, progress=progress,
                       meta={"model": str(res)}, dtype=opts.dtype, device=opts.device, prefix_bytes=prefix_bytes,
                       pieces=pieces)

        results[name] = run_stage(stage_dir(recipe, "capture", name), "capture", cfg,
                                  {"blocks": stage_dir(recipe, "blocks"), "model": res.location}, build,
                                  force=force, resumable=True, collective=True)
    return results


def entries_per_position(recipe: Recipe) -> int:
    """Entries per position in a captured store: the top-k plus the sampled tail."""
    return recipe.capture.top_k + recipe.capture.samples


def vocab_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """A source → target vocabulary map per source."""
    from polyfuse.align.vocab import vocab_map

    toks = tokenizers(recipe)
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

    blocks = recipe_blocks(recipe)
    texts, chat = [b.text for b in blocks], [b.response_spans is not None for b in blocks]
    src_enc, tgt_enc = encode_blocks(src_tok, texts, chat), encode_blocks(tgt_tok, texts, chat)
    alignments = (align_blocks(s, t, method="dtw", src_tokenizer=src_tok, tgt_tokenizer=tgt_tok)
                  for s, t in zip(src_enc, tgt_enc, strict=True))
    counts = count_aligned_pairs(src_enc, tgt_enc, alignments)
    return stats_map(counts, len(src_tok), len(tgt_tok), fallback=fallback,
                     min_count=recipe.vocab.stats_min_count)


def align_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Each source's captured top-k carried to the target's positions and vocabulary."""
    from polyfuse.align.project import project_store
    from polyfuse.align.vocab import VocabMap
    from polyfuse.capture.store import FORMAT_VERSION, StoreReader, StoreWriter
    from polyfuse.corpus.tokens import encode_blocks
    from polyfuse.progress import progress_bar

    toks = tokenizers(recipe)
    target = recipe.target.name
    blocks = recipe_blocks(recipe)
    texts, chat = [b.text for b in blocks], [b.response_spans is not None for b in blocks]
    tgt_enc = encode_blocks(toks[target], texts, chat)
    shard = recipe.capture.shard_size
    results = {}
    for spec in recipe.sources:
        name = spec.name
        cfg = {"align": section_config(recipe, "align", "workers"), "k": entries_per_position(recipe),
               "store_format": FORMAT_VERSION}
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
            ranks = current_ranks()
            n_shards = (len(blocks) + shard - 1) // shard
            mine = sum(len(blocks[s * shard:(s + 1) * shard]) for s in ranks.shards(n_shards))
            with progress_bar(f"align {name}", mine, progress) as advance:
                return project_store(reader, writer, [(b.block_id, b.text) for b in blocks], src_enc, tgt_enc,
                                     method=method, vmap=vmap, src_tokenizer=toks[name], tgt_tokenizer=toks[target],
                                     inside=recipe.align.inside, cuts=recipe.align.cuts, shard_size=shard,
                                     ranks=ranks, workers=recipe.align.workers, advance=advance)

        # collective: under several processes each rank projects its share of the shards
        results[name] = run_stage(stage_dir(recipe, "align", name), "align", cfg, inputs, build, force=force,
                                  resumable=True, collective=True)
    return results
