"""polyfuse report: the papers' table (order, bold, deltas, gaps), figures, side-by-side runs, timings,
the CLI, and a headless-browser render of report.html."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from polyfuse.cli import main
from polyfuse.errors import DataError
from polyfuse.evaluate.report import load_run, metric_table, write_report
from polyfuse.evaluate.results import row_order, target_name

pytest.importorskip("matplotlib", reason="matplotlib is a base dependency of polyfuse: pip install -e .")

ROOT = Path(__file__).resolve().parents[1]
EN_DASH, MINUS = "\u2013", "\u2212"

# Hand-made figures; expectations below are worked out by hand from these numbers.
MODELS = {
    "alpha": {"bpb": {"code": 2.5000, "prose": 3.6000, "all": 3.1000}, "accuracy": {"gsm": 0.30, "mbpp": 0.40}},
    "beta": {"bpb": {"code": 3.4000, "prose": 3.1000, "all": 3.3000}, "accuracy": {"gsm": 0.20}},
    "target": {"bpb": {"code": 3.0000, "prose": 3.5000, "all": 3.2500}, "accuracy": {"gsm": 0.25, "mbpp": 0.35}},
    "target+clm": {"bpb": {"code": 2.9000, "prose": 3.4000, "all": 3.1500}},
    "target+fused": {"bpb": {"code": 2.8000, "prose": 3.6500, "all": 3.0500}, "accuracy": {"gsm": 0.45, "mbpp": 0.30}},
    "target+sft+wrpo": {"bpb": {"code": 3.1000}},
    "target+pair:beta": {"bpb": {"code": 2.9500, "prose": 3.3000, "all": 3.1200}},
    "merged-by-hand+x": {"bpb": {"code": 3.3000, "prose": 3.3000, "all": 3.3000}},
}


def _manifest(path: Path, stage: str, duration: float, outputs: dict, payload: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": stage, "config": {}, "inputs": {}, "versions": {}, "created": "2026-01-01T00:00:00+00:00",
                "duration_s": duration, "outputs": outputs}
    (path / "manifest.json").write_text(json.dumps(manifest))
    if payload:
        (path / "payload.bin").write_bytes(b"\0" * payload)


def _log(steps: int, start: float, distill: bool) -> list[dict]:
    log = []
    for step in range(5, steps + 1, 5):
        clm = start - 0.01 * step
        entry = {"step": step, "clm_loss": clm, "loss": 0.9 * clm + 0.1 * (clm - 2) if distill else clm}
        if distill:
            entry["distill_loss"] = clm - 2
        log.append(entry)
    log.append({"step": steps, "train_runtime": 10.0, "train_samples_per_second": 12.5})
    return log


def make_run(path: Path, models: dict = MODELS) -> Path:
    """A run directory with a results file, stage manifests and two trainer logs."""
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"models": models, "meta": {"bpb": {"split": "heldout"}}}))
    _manifest(path / "blocks", "blocks", 2.0, {"blocks": 10, "chars": 5000})
    _manifest(path / "capture" / "alpha", "capture", 4.0, {"tokens": 8000, "tokens_per_s": 2000.0}, 3 * 2**20)
    _manifest(path / "align" / "alpha", "align", 0.5, {"positions": 8000})
    _manifest(path / "fuse", "fuse", 1.0, {"teacher_share": {"positions": 8000}})
    for name, distill in (("clm", False), ("fused", True)):
        _manifest(path / "train" / name, "train", 20.0, {"steps": 40, "final_loss": 5.0})
        state = {"log_history": _log(40, 6.0, distill), "global_step": 40}
        (path / "train" / name / "trainer_state.json").write_text(json.dumps(state))
    _manifest(path / "eval" / "target", "eval", 3.0, {"bpb": MODELS["target"]["bpb"]})
    (path / "eval" / "target" / "bpb.json").write_text(json.dumps({"n_bytes": {"all": 6000}}))
    return path


def md_table(md: str, title: str) -> dict[str, list[str]]:
    """The Markdown table under the heading that starts with ``title``: {row label: cells}."""
    section = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {"__header__": header}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = " @ ".join(cells[:2]) if header[1] == "run" else cells[0]
        table[key] = cells
    return table


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, str, str]:
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    md, page = write_report([run], None)
    return run, md.read_text(), page.read_text()


def test_rows_follow_the_papers_order(single):
    _, md, _ = single
    table = md_table(md, "Bits per byte")
    assert [k for k in table if k != "__header__"] == [
        "alpha", "beta", "target", "target+clm", "target+fused", "target+pair:beta", "target+sft+wrpo",
        "merged-by-hand+x",
    ]
    assert table["__header__"] == ["model", "code", "prose", "all"]


def test_bold_marks_the_best_cell_of_each_column(single):
    _, md, page = single
    bpb = md_table(md, "Bits per byte")
    bold = {(row, col) for row, cells in bpb.items() if row != "__header__"
            for col, cell in zip(bpb["__header__"], cells, strict=True) if cell.startswith("**")}
    # lowest bpb per column: code alpha 2.5; prose beta 3.1; all target+fused 3.05
    assert bold == {("alpha", "code"), ("beta", "prose"), ("target+fused", "all")}
    acc = md_table(md, "Task accuracy")
    bold = {(row, col) for row, cells in acc.items() if row != "__header__"
            for col, cell in zip(acc["__header__"], cells, strict=True) if cell.startswith("**")}
    # highest accuracy: gsm target+fused 45; mbpp alpha 40; avg alpha (35) vs target+fused (37.5)
    assert bold == {("target+fused", "gsm"), ("alpha", "mbpp"), ("target+fused", "avg")}
    assert '<span class="best">2.5000</span>' in page
    assert '<span class="best">3.6000</span>' not in page  # alpha's prose is not a best


def test_deltas_are_computed_against_the_target_and_signed(single):
    _, md, page = single
    bpb = md_table(md, "Bits per byte")
    assert bpb["target+fused"][1:] == [f"2.8000 ({MINUS}0.2000)", "3.6500 (+0.1500)", f"**3.0500** ({MINUS}0.2000)"]
    assert bpb["target"][1:] == ["3.0000", "3.5000", "3.2500"]  # no delta against itself
    assert bpb["alpha"][2] == "3.6000 (+0.1000)"
    acc = md_table(md, "Task accuracy")
    assert acc["target+fused"][1:] == ["**45.00** (+20.00)", f"30.00 ({MINUS}5.00)", "**37.50** (+7.50)"]
    assert acc["target"][3] == "30.00"  # avg computed: (25 + 35) / 2
    # lower bpb is better: a negative delta is coloured good, a positive one bad
    assert f'<span class="delta good">{MINUS}0.2000</span>' in page
    assert '<span class="delta bad">+0.1500</span>' in page
    assert '<span class="delta good">+20.00</span>' in page  # higher accuracy is better
    assert "lower is better" in md.split("## Bits per byte", 1)[1].splitlines()[0]
    assert "higher is better" in md.split("## Task accuracy", 1)[1].splitlines()[0]


def test_missing_cells_render_as_a_dash(single):
    _, md, _ = single
    bpb = md_table(md, "Bits per byte")
    assert bpb["target+sft+wrpo"][1:] == ["3.1000 (+0.1000)", EN_DASH, EN_DASH]
    acc = md_table(md, "Task accuracy")
    assert acc["beta"][1:] == [f"20.00 ({MINUS}5.00)", EN_DASH, EN_DASH]  # no avg without every task
    assert "target+clm" not in acc  # a row with no accuracy at all is left out


def test_summary_compares_fused_with_target_clm_and_sources(single):
    _, md, _ = single
    line = next(x for x in md.splitlines() if x.startswith("- target+fused: bpb"))
    assert f"vs target {MINUS}0.2000 (better)" in line
    assert f"vs target+clm {MINUS}0.1000 (better)" in line
    assert f"vs best source alpha {MINUS}0.0500 (better)" in line
    assert "cost: capture + vocab + align + fuse 5.5 s; training the fused target 20.0 s" in md


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_figures_exist_and_are_embedded(single):
    from PIL import Image

    run, md, page = single
    names = sorted(p.name for p in (run / "report_files").iterdir())
    assert names == ["accuracy.png", "bpb.png", "stages.png", "training.png"]
    for name in names:
        assert f"](report_files/{name})" in md
    embedded = _pngs(page)
    assert len(embedded) == 4
    for data in embedded:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        assert image.width >= 900
        colours = image.getcolors(image.width * image.height)
        assert len(colours) > 50  # drew something, not a blank canvas
    assert (run / "report_files" / "training.png").read_bytes() in embedded
    # self-contained: no external stylesheet, script or image
    assert not re.search(r"<script|<link|src=\"(?!data:)", page)


def test_training_curves_need_a_trainer_log(tmp_path):
    run = make_run(tmp_path / "run")
    shutil.rmtree(run / "train")
    write_report([run], tmp_path / "out")
    assert not (tmp_path / "out" / "report_files" / "training.png").exists()
    assert load_run(run).curves == {}


def test_curves_fall_back_to_the_newest_checkpoint(tmp_path):
    run = make_run(tmp_path / "run")
    state = run / "train" / "fused" / "trainer_state.json"
    for step in (10, 30):
        (run / "train" / "fused" / f"checkpoint-{step}").mkdir()
        (run / "train" / "fused" / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"log_history": _log(step, 6.0, True)}))
    state.unlink()
    curves = load_run(run).curves
    assert curves["target+fused"][-1]["step"] == 30
    assert len(curves["target+clm"]) == 9


def test_timings_table_from_manifests(single):
    _, md, _ = single
    stages = md_table(md, "Pipeline stages")
    assert stages["__header__"] == ["stage", "time", "processed", "rate", "size"]
    order = [k for k in stages if k != "__header__"]
    assert order == ["blocks", "capture/alpha", "align/alpha", "fuse", "train/clm", "train/fused", "eval/target",
                     "total"]
    assert stages["capture/alpha"][1:4] == ["4.0 s", "8,000 tokens", "2,000 tokens/s"]
    assert stages["capture/alpha"][4] == "3.0 MiB"  # the 3 MiB payload plus a small manifest
    assert stages["blocks"][2:4] == ["10 blocks, 5,000 chars", "2,500 chars/s"]
    assert stages["align/alpha"][3] == "16,000 positions/s"
    assert stages["train/fused"][2:4] == ["40 steps", "2.00 steps/s, 12.5 samples/s"]
    assert stages["eval/target"][2:4] == ["6,000 bytes", "2,000 bytes/s"]
    assert stages["total"][1] == "50.5 s"


def test_two_runs_side_by_side(tmp_path):
    models_b = json.loads(json.dumps(MODELS))
    models_b["target+fused"]["bpb"]["code"] = 2.4000
    models_b["target"]["bpb"]["code"] = 3.1000
    a = make_run(tmp_path / "exp" / "run_a")
    b = make_run(tmp_path / "exp" / "run_b", models_b)
    (b / "train" / "clm").joinpath("manifest.json").unlink()  # a stage only run A has
    md_path, page_path = write_report([a, b], None)
    assert md_path == a / "compare" / "report.md"
    md = md_path.read_text()
    bpb = md_table(md, "Bits per byte")
    assert bpb["__header__"][:2] == ["model", "run"]
    keys = [k for k in bpb if k != "__header__"]
    assert keys[:2] == ["alpha @ run_a", "alpha @ run_b"]
    assert keys.index("target+fused @ run_a") + 1 == keys.index("target+fused @ run_b")
    # each run's delta is against its own target: A 2.8 - 3.0, B 2.4 - 3.1
    assert bpb["target+fused @ run_a"][2] == f"2.8000 ({MINUS}0.2000)"
    assert bpb["target+fused @ run_b"][2] == f"**2.4000** ({MINUS}0.7000)"  # best over both runs
    assert bpb["alpha @ run_a"][2] == f"2.5000 ({MINUS}0.5000)"  # no longer the best code figure
    assert bpb["alpha @ run_b"][2] == f"2.5000 ({MINUS}0.6000)"
    stages = md_table(md, "Pipeline stages")
    assert stages["__header__"][1:6] == ["time (run_a)", "processed (run_a)", "rate (run_a)", "size (run_a)",
                                         "time (run_b)"]
    assert stages["train/clm"][1] == "20.0 s" and stages["train/clm"][5] == EN_DASH
    page = page_path.read_text()
    assert "target+fused (run_b)" not in page  # legends live in the PNGs, labels in the tables
    assert len(_pngs(page)) == 4


def test_row_order_and_target_inference():
    names = ["zeta+x", "l2+sft+dpo", "l2+fused", "l2", "openchat", "l2+pair:mixtral", "l2+clm", "l2+pair:amber",
             "l2+sft", "l2+fusechat", "l2+sft+wrpo", "l2+custom"]
    results = {"models": dict.fromkeys(names, {})}
    assert target_name(results) == "l2"
    assert row_order(names, "l2") == [
        "openchat", "l2", "l2+clm", "l2+fused", "l2+pair:amber", "l2+pair:mixtral", "l2+fusechat", "l2+sft",
        "l2+sft+dpo", "l2+sft+wrpo", "l2+custom", "zeta+x",
    ]
    assert target_name({"models": {"a": {}}, "meta": {"target": "a"}}) == "a"
    assert target_name({"models": {"a": {}, "b": {}}}) is None


def test_metric_table_none_without_figures(tmp_path):
    run = make_run(tmp_path / "run", {"target": {"bpb": {"code": 3.0, "all": 3.0}}})
    assert metric_table([load_run(run)], "accuracy") is None
    table = metric_table([load_run(run)], "bpb")
    assert table.columns == ["code", "all"]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither results.json nor stage manifests"):
        write_report([tmp_path / "empty"])
    run = make_run(tmp_path / "run")
    (run / "results.json").write_text("{not json")
    with pytest.raises(DataError, match=r"results\.json: unreadable results file"):
        write_report([run])


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert str(tmp_path / "out" / "report.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on PATH (chromium, chromium-browser, "
                    "google-chrome); `make assets` installs Debian's chromium")
def test_report_renders_in_a_headless_browser(single, tmp_path):
    from PIL import Image

    run, _, _ = single
    shot = tmp_path / "shot.png"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_report.sh"), str(run / "report.html"), str(shot)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    image = Image.open(shot).convert("RGB")
    assert image.width == 1200 and image.height > 1500  # the whole page: tables, figures, stage table
    colours = dict((rgb, n) for n, rgb in image.getcolors(image.width * image.height))
    inked = sum(n for rgb, n in colours.items() if sum(rgb) < 600)
    assert inked > 0.01 * image.width * image.height
    # the figures drew: pixels of the palette's first colour (#0072B2, the first bars and line)
    assert sum(n for (r, g, b), n in colours.items() if abs(r - 0) < 12 and abs(g - 114) < 12 and abs(b - 178) < 12) > 500


def test_gap_closed_by_hand():
    from polyfuse.evaluate.results import gap_closed

    closed = gap_closed({"models": MODELS}, "target+fused")
    # code: clm 2.9, best source alpha 2.5, fused 2.8 -> 0.1 / 0.4; prose: clm 3.4, best beta 3.1, fused 3.65
    assert closed == pytest.approx({"code": 0.25, "prose": -0.25 / 0.3})
    assert "all" not in closed
    assert gap_closed({"models": {"target": MODELS["target"]}}, "target+fused") == {}


def test_transfer_section_shows_gap_closed_and_per_source_signal(tmp_path):
    run = make_run(tmp_path / "run")
    _manifest(run / "align" / "alpha", "align", 0.5, {"positions": 8000, "coverage": 0.75, "stored_mass": 0.98,
                                                      "mapped_mass": 0.9, "actual_ratio": 1.02})
    _manifest(run / "fuse", "fuse", 1.0, {"teacher_share": {"positions": 8000, "share": [0.4, 0.6]},
                                          "teacher_share_by_domain": {"code": [0.3, 0.7], "prose": [0.55, 0.45]},
                                          "teachers": ["target", "alpha"]})
    md, page = write_report([run], None)
    text = md.read_text()
    section = text.split("## Transfer", 1)[1].split("\n## ", 1)[0]
    gap = [line for line in section.split("### Gap closed", 1)[1].split("###", 1)[0].splitlines() if line.startswith("| target+fused")]
    assert gap and "+25.0%" in gap[0] and f"{MINUS}83.3%" in gap[0].replace("-", MINUS)
    signal = [line for line in section.split("### Teacher signal per source", 1)[1].splitlines() if line.startswith("| alpha")]
    assert signal and all(cell in signal[0] for cell in ("75.0%", "0.980", "0.900", "1.020", "60.0%",
                                                         "code 70% · prose 45%"))
    assert "Gap closed" in page.read_text()


def test_implicit_section_shows_the_share_of_the_best_source_and_learning_curves(tmp_path):
    from polyfuse.evaluate.results import best_source_share

    models = {"alpha": {"accuracy": {"first": 1.0, "last": 0.2, "all": 0.6}},
              "beta": {"accuracy": {"first": 0.1, "last": 0.8, "all": 0.45}},
              "target": {"accuracy": {"first": 0.1, "last": 0.1, "all": 0.1}},
              "target+sft": {"accuracy": {"first": 0.5, "last": 0.6, "all": 0.55}},
              "target+sft+dpo": {"accuracy": {"first": 0.9, "last": 0.8, "all": 0.85}}}
    # first: best source alpha 1.0; last: best source beta 0.8
    assert best_source_share({"models": models}, "target+sft") == pytest.approx({"first": 0.5, "last": 0.75})
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"models": models, "meta": {"target": "target"}}))
    for stage, steps, acc in (("sft", [0, 5, 10], [0.1, 0.3, 0.5]), ("dpo", [0, 4], [0.5, 0.9])):
        _manifest(run / stage, stage, 1.0, {"global_step": steps[-1]})
        points = [{"step": s, "accuracy": {"first": a, "last": a, "all": a}} for s, a in zip(steps, acc, strict=True)]
        (run / stage / "curve.json").write_text(json.dumps({"stage": stage, "points": points}))
    loaded = load_run(run)
    assert [s for s, _ in loaded.accuracy_curves["target+sft+dpo"]] == [10, 14]  # dpo continues sft's steps
    md, page = write_report([run], None)
    text = md.read_text()
    section = text.split("### Accuracy per task (share of the best source)", 1)[1].split("###", 1)[0]
    dpo = [line for line in section.splitlines() if line.startswith("| target+sft+dpo")]
    assert dpo and "0.90 (90%)" in dpo[0] and "0.80 (100%)" in dpo[0]
    assert (run / "report_files" / "learning.png").is_file() and "learning.png" in text
