"""On-policy fusion (mode online): the target writes the text, the sources score it, in rounds."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from polyfuse.cli import main
from polyfuse.stages.online import on_policy, prompt_of, round_blocks


def test_prompt_is_cut_back_to_a_space() -> None:
    assert prompt_of("the quick brown fox", 12) == "the quick"
    assert prompt_of("short", 12) == "short"
    assert prompt_of("abcdefghijklmnop", 5) == "abcde"  # no space to cut at


def test_online_mode_runs_rounds_on_the_targets_own_text(tmp_path: Path, tiny_world: Path) -> None:
    data = {"workdir": str(tmp_path / "run"), "world": str(tiny_world), "mode": "online",
            "target": {"model": "world:target"},
            "sources": [{"name": "prose", "model": "world:prose"}, {"name": "math", "model": "world:math"}],
            "corpus": {"max_bytes_per_domain": 2000}, "blocks": {"max_tokens": 96},
            "train": {"max_steps": 4, "batch_size": 2}, "online": {"rounds": 2, "prompt_chars": 40,
                                                                  "max_new_tokens": 24, "batch_size": 8,
                                                                  "on_policy_share": 0.5},
            "eval": {"batch_size": 4, "max_length": 128, "max_bytes_per_domain": 1500}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())["models"]
    assert "target+online" in results and "target+fused" not in results
    blocks = [json.loads(line) for line in (run / "blocks" / "blocks.jsonl").read_text().splitlines()]
    for r in (1, 2):
        docs = [json.loads(line) for f in sorted((run / "online" / f"round-{r}" / "corpus" / "train").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
        share = round_blocks(blocks, r, 2)                                      # every other block
        assert len(docs) == len(share) and abs(len(share) - len(blocks) / 2) <= 0.5
        continued = on_policy(len(share), 0.5)                                   # half continued, half corpus text
        assert sum(continued) == len(share) // 2 > 0
        texts = {d["id"]: d["text"] for d in docs}
        for block, c in zip(share, continued, strict=True):
            if c:
                assert f"{block['block_id']}-r{r}" in texts
            else:
                assert texts[f"{block['block_id']}-corpus"] == block["text"]
        docs = [d for d in docs if not d["id"].endswith("-corpus")]
        starts = {prompt_of(b["text"], 40) for b in share}
        assert all(any(d["text"].startswith(s) and len(d["text"]) > len(s) for s in starts) for d in docs)
        train = json.loads((run / "online" / f"round-{r}" / "train" / "fused" / "manifest.json").read_text())
        assert train["config"]["train"]["max_steps"] == 2                        # 4 steps over 2 rounds
        fuse = json.loads((run / "online" / f"round-{r}" / "fuse" / "manifest.json").read_text())
        assert fuse["config"]["sources"] == ["prose", "math"]
    # round 2's target is round 1's trained model, which also wrote round 2's text
    def inputs(*parts: str) -> dict:
        return json.loads((run / "online" / Path(*parts) / "manifest.json").read_text())["inputs"]

    assert inputs("round-2", "corpus")["student"] == inputs("round-2", "train", "fused")["target"]
    assert inputs("round-2", "train", "fused")["target"] != inputs("round-1", "train", "fused")["target"]
    assert inputs("round-1", "corpus")["student"] == inputs("round-1", "train", "fused")["target"]
    round1 = (run / "online" / "round-1" / "corpus" / "train")
    round2 = (run / "online" / "round-2" / "corpus" / "train")
    assert sorted(p.read_text() for p in round1.glob("*.jsonl")) != sorted(p.read_text() for p in round2.glob("*.jsonl"))
    # a rerun is up to date: nothing is sampled or trained again
    before = (run / "online" / "round-2" / "train" / "fused" / "manifest.json").read_text()
    assert main(["run", str(path)]) == 0
    assert (run / "online" / "round-2" / "train" / "fused" / "manifest.json").read_text() == before


def test_on_policy_spreads_the_share_evenly() -> None:
    assert on_policy(4, 1.0) == [True] * 4 and on_policy(4, 0.0) == [False] * 4
    assert on_policy(4, 0.5) == [False, True, False, True]
    assert sum(on_policy(10, 0.3)) == 3 and sum(on_policy(7, 0.5)) == 3
