"""What every explicit stage shares: the recipe's models and tokenizers, where stages write, the blocks
(the first stage: documents of the fusion corpus cut into blocks every tokenizer can read), and
:func:`split_over_ranks` for stages with one artifact per model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from polyfuse.errors import DataError
from polyfuse.recipe import Recipe
from polyfuse.workspace import Ranks, StageResult, current_ranks, run_stage

T = TypeVar("T")


def section_config(recipe: Recipe, name: str, *runtime: str) -> dict:
    """``recipe.section_dict(name)`` for a stage's manifest, less the ``runtime`` keys: settings such as
    ``workers`` that change how a stage runs but not what it writes, so changing them keeps it current."""
    return {k: v for k, v in recipe.section_dict(name).items() if k not in runtime}


def resolve_models(recipe: Recipe) -> list:
    """``(name, ResolvedModel, tokenizer)`` for the target and every source; a missing one fails here."""
    from polyfuse.models import resolve_all

    return resolve_all([(s.name, s.ref.model, s.ref.revision, s.tokenizer) for s in recipe.models()],
                       world_dir=recipe.world)


def stage_dir(recipe: Recipe, *parts: str) -> Path:
    """Where a stage writes: ``<workdir>/<stage>[/<model>]``."""
    return Path(recipe.workdir).joinpath(*parts)


def tokenizers(recipe: Recipe) -> dict:
    """Every model's tokenizer (target first), loaded once per stage."""
    from polyfuse.models import load_tokenizer

    return {name: load_tokenizer(res, tok) for name, res, tok in resolve_models(recipe)}


def contexts(recipe: Recipe) -> list[int]:
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
        toks = tokenizers(recipe)
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

        max_tokens = min([recipe.blocks.max_tokens, *contexts(recipe)])
        stats = write_blocks(out / "blocks.jsonl",
                             make_blocks(docs(), list(toks.values()), max_tokens))
        return {**stats, "domains": domains, "max_tokens": max_tokens, "oversized_skipped": oversized}

    return run_stage(stage_dir(recipe, "blocks"), "blocks", cfg, inputs, build, force=force)


def recipe_blocks(recipe: Recipe) -> list:
    from polyfuse.corpus.blocks import read_blocks

    return read_blocks(stage_dir(recipe, "blocks") / "blocks.jsonl")


def split_over_ranks(items: Sequence[T], run: Callable[[T, Ranks], StageResult], what: str) -> list[StageResult]:
    """``run(item, Ranks())`` for this process's share of ``items`` (item i on rank ``i % world_size``), each a
    stage this process builds alone; returns every item's result, in order, on every rank once all are done.

    For stages with one artifact per model (evaluation, accuracy): under N processes each model is loaded
    and evaluated by one rank, N at a time, instead of every rank waiting for rank 0 to do them all.
    """
    ranks = current_ranks()
    mine: dict[int, StageResult] = {}
    with ranks.together(what):
        for i in range(ranks.rank, len(items), ranks.world_size):
            mine[i] = run(items[i], Ranks())
    every = {i: res for share in ranks.gather(mine) for i, res in share.items()}
    return [every[i] for i in range(len(items))]
