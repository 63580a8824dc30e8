"""On-policy fusion (``mode: online``): the target writes the text it trains on, the sources score it.

Offline fusion (FuseLLM) distils the sources' distributions on a fixed corpus. Here each of ``online.rounds``
rounds (a) lets the current target continue the starts of its share of the corpus blocks (round N takes
blocks N, N + rounds, N + 2·rounds, ..., so the rounds together write one continuation per block, as much
text as the offline corpus) into ``online/round-N/corpus``, a corpus directory like any other, then (b)
runs the explicit stages on that text in ``online/round-N`` -- ``blocks``, ``capture`` (every source and
the current target), ``vocab``, ``align``, ``fuse`` and ``train`` with ``train.max_steps / rounds`` steps
--, and the trained model is the next round's target. ``online.on_policy_share`` below 1 keeps the rest of
each round's blocks as corpus text (GKD's mixture of on-policy and fixed data; 0 is offline fusion in
rounds). The loss, the projection across tokenizers and the fusion are exactly the offline ones, so the
comparison with ``target+fused`` at the same optimizer steps isolates what on-policy text changes. The row
is ``target+online``.

TRL's on-policy trainers do not fit here: ``DistillationTrainer`` (GKD) needs a teacher with the student's
vocabulary and GOLD takes one cross-tokenizer teacher with its own ULD projection, while polyfuse fuses
several teachers through its own projection. Each round restarts the learning-rate schedule (warm-up
included) and the optimizer state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from polyfuse.corpus.blocks import Block
from polyfuse.recipe import Recipe
from polyfuse.stages.common import blocks_stage, recipe_blocks, resolve_models, stage_dir
from polyfuse.stages.fusion import fuse_stage, train_stage
from polyfuse.stages.teachers import align_stage, capture_stage, vocab_stage
from polyfuse.workspace import StageResult, run_stage

__all__ = ["final_online_dir", "on_policy", "online_stage", "prompt_of", "round_blocks"]


def prompt_of(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, cut back to the last space when there is one."""
    head = text[:chars]
    if len(text) > chars and " " in head.strip():
        head = head[:head.rstrip().rindex(" ")]
    return head


def round_recipe(recipe: Recipe, round_index: int, student: str) -> Recipe:
    """The fusellm recipe of round ``round_index`` (1-based): its workdir, corpus, target and step budget."""
    workdir = stage_dir(recipe, "online", f"round-{round_index}")
    steps = math.ceil(recipe.train.max_steps / recipe.online.rounds)
    corpus = recipe.corpus.model_copy(update={"path": str((workdir / "corpus").resolve()), "split": "train",
                                              "domains": None, "max_bytes_per_domain": None, "format": "text"})
    return recipe.model_copy(update={
        "mode": "fusellm", "workdir": str(workdir), "corpus": corpus,
        "target": recipe.target.model_copy(update={"model": student, "revision": None, "tokenizer": None}),
        "train": recipe.train.model_copy(update={"max_steps": steps, "baseline": False}),
    })


def final_online_dir(recipe: Recipe) -> Path:
    """The last round's trained model directory (``target+online``)."""
    return stage_dir(recipe, "online", f"round-{recipe.online.rounds}", "train", "fused")


def round_blocks(blocks: list[Block], round_index: int, rounds: int) -> list[Block]:
    """Round ``round_index``'s (1-based) share of the blocks: every ``rounds``-th one from its index."""
    return blocks[round_index - 1::rounds]


def on_policy(count: int, share: float) -> list[bool]:
    """Which of ``count`` blocks the target continues: ``floor(count * share)`` of them, spread evenly."""
    return [math.floor((i + 1) * share + 1e-9) > math.floor(i * share + 1e-9) for i in range(count)]


def _write_corpus(recipe: Recipe, student: str, round_index: int, out: Path, progress: bool) -> dict:
    """The student's continuation of this round's block starts, one document per block, ``train/<domain>.jsonl``."""
    from polyfuse.generate import SamplingParams, continue_texts
    from polyfuse.models import load_model, load_tokenizer, resolve_model_ref

    opts = recipe.online
    blocks = round_blocks(recipe_blocks(recipe), round_index, opts.rounds)
    chosen = on_policy(len(blocks), opts.on_policy_share)
    prompts = [prompt_of(b.text, opts.prompt_chars) for b, c in zip(blocks, chosen, strict=True) if c]
    pairs: Iterator[tuple[str, str]] = iter(())
    if prompts:
        model = load_model(resolve_model_ref(student, world_dir=recipe.world))
        tokenizer = load_tokenizer(resolve_model_ref(student, world_dir=recipe.world))
        params = SamplingParams(temperature=opts.temperature, top_p=opts.top_p, max_new_tokens=opts.max_new_tokens)
        texts = continue_texts(model, tokenizer, prompts, params, seed=recipe.seed * 1000 + round_index,
                               batch_size=opts.batch_size)
        pairs = iter(zip(prompts, texts, strict=True))
    by_domain: dict[str, list[str]] = {}
    written = 0
    for block, continued in zip(blocks, chosen, strict=True):
        if continued:
            prompt, text = next(pairs)
            written += len(text.encode("utf-8"))
            row = {"id": f"{block.block_id}-r{round_index}", "text": prompt + text}
        else:
            row = {"id": f"{block.block_id}-corpus", "text": block.text}
        by_domain.setdefault(block.domain, []).append(json.dumps(row, ensure_ascii=False))
    (out / "train").mkdir(parents=True, exist_ok=True)
    for domain, rows in by_domain.items():
        (out / "train" / f"{domain}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"documents": len(blocks), "continued": len(prompts), "generated_bytes": written,
            "domains": sorted(by_domain)}


def online_stage(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, StageResult]:
    """Run the rounds of on-policy fusion (module docstring); the last round's model is ``target+online``."""
    target = next(res for name, res, _ in resolve_models(recipe) if name == recipe.target.name)
    student = str(target.location)
    results: dict[str, StageResult] = {}
    for r in range(1, recipe.online.rounds + 1):
        sub = round_recipe(recipe, r, student)
        cfg = {"online": recipe.section_dict("online"), "round": r, "seed": recipe.seed,
               "blocks": recipe.section_dict("blocks"), "corpus": recipe.section_dict("corpus")}
        results[f"round-{r}/corpus"] = run_stage(
            Path(sub.workdir) / "corpus", "online.corpus", cfg, {"student": student, "blocks": stage_dir(recipe, "blocks")},
            lambda out, student=student, r=r: _write_corpus(recipe, student, r, out, progress), force=force)
        for stage in (blocks_stage, capture_stage, vocab_stage, align_stage, fuse_stage, train_stage):
            out = stage(sub, force=force, progress=progress)
            for key, value in (out.items() if isinstance(out, dict) else [(stage.__name__, out)]):
                results[f"round-{r}/{key}"] = value
        student = str(stage_dir(sub, "train", "fused").resolve())
    return results
