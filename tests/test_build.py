"""The FuseChat-3.0 build rules on small hand-made candidate sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from polyfuse.errors import DataError
from polyfuse.implicit.build import (
    STAT_ROWS,
    BuildConfig,
    build_datasets,
    format_stats,
    read_scored,
    split_prompts,
    write_build,
)

PREF_ONLY = {"split": (0, 1)}  # every prompt goes to the preference stage
SFT_ONLY = {"split": (1, 0)}


def rec(pid: str, source: str, idx: int, reward: float, correct: bool | None = None,
        category: str = "other", prompt: str | None = None) -> dict:
    return {"prompt_id": pid, "prompt": prompt or f"question {pid}", "source": source, "sample_index": idx,
            "response": f"{source}#{idx}", "params": {"temperature": 0.8}, "reward": reward,
            "correct": correct, "category": category}


def answers(row: dict) -> tuple[str, str]:
    return row["chosen"][0]["content"], row["rejected"][0]["content"]


# --------------------------------------------------------------------------------------------------
# same-source pairing


def test_pairs_come_from_one_source_not_the_global_best_and_worst() -> None:
    # Across sources the best (B#0, 0.60) and worst (B#1, 0.20) are 0.4 apart: outside the window.
    # Inside source A the gap is 0.05: that is the pair.
    rows = [rec("p", "A", 0, 0.50), rec("p", "A", 1, 0.45), rec("p", "B", 0, 0.60), rec("p", "B", 1, 0.20)]
    res = build_datasets(rows, BuildConfig(**PREF_ONLY))
    assert [answers(r) for r in res.dpo] == [("A#0", "A#1")]
    assert res.dpo[0]["source"] == "A"
    assert res.dpo[0]["score_chosen"] == 0.50 and res.dpo[0]["score_rejected"] == 0.45
    assert res.stats["other"]["pair_gap_above"] == 1


def test_best_pair_per_prompt_or_all_pairs() -> None:
    rows = [rec("p", "A", 0, 0.70), rec("p", "A", 1, 0.66), rec("p", "A", 2, 0.68),
            rec("p", "B", 0, 0.90), rec("p", "B", 1, 0.85)]
    best = build_datasets(rows, BuildConfig(**PREF_ONLY))
    assert [answers(r) for r in best.dpo] == [("B#0", "B#1")]  # the source with the highest chosen reward
    every = build_datasets(rows, BuildConfig(pairs_per_prompt="all", **PREF_ONLY))
    assert sorted(answers(r) for r in every.dpo) == [("A#0", "A#1"), ("B#0", "B#1")]
    assert every.stats["other"]["dpo_pairs"] == 2 and every.stats["other"]["dpo_kept"] == 1


def test_source_with_one_response_has_no_pair() -> None:
    rows = [rec("p", "A", 0, 0.5), rec("p", "B", 0, 0.6), rec("p", "B", 1, 0.58)]
    res = build_datasets(rows, BuildConfig(**PREF_ONLY))
    assert [answers(r) for r in res.dpo] == [("B#0", "B#1")]
    assert res.stats["other"]["pair_single_response"] == 1


# --------------------------------------------------------------------------------------------------
# the reward-gap window


@pytest.mark.parametrize(("high", "low", "kept", "reason"), [
    (0.21, 0.20, True, None),            # gap 0.01 (0.00999...98 in floats): the low bound is inclusive
    (0.30, 0.20, True, None),            # gap 0.1 (0.09999...98): the high bound is inclusive
    (0.60, 0.50, True, None),            # gap 0.1 (0.10000...09)
    (0.5099, 0.50, False, "gap_below"),  # 0.0099
    (0.5, 0.5, False, "gap_below"),      # equal rewards
    (0.6001, 0.50, False, "gap_above"),  # 0.1001
    (0.55, 0.50, True, None),
])
def test_reward_gap_window_bounds(high: float, low: float, kept: bool, reason: str | None) -> None:
    rows = [rec("p", "A", 0, high), rec("p", "A", 1, low)]
    res = build_datasets(rows, BuildConfig(**PREF_ONLY))
    assert (len(res.dpo) == 1) is kept
    if reason:
        assert res.stats["other"][f"pair_{reason}"] == 1
        assert res.stats["other"]["dpo_dropped"] == 1


def test_reward_window_is_configurable_and_can_be_switched_off() -> None:
    rows = [rec("p", "A", 0, 0.9), rec("p", "A", 1, 0.4)]
    assert build_datasets(rows, BuildConfig(**PREF_ONLY)).dpo == []
    wide = BuildConfig(reward_windows={"other": (0.0, 1.0)}, **PREF_ONLY)
    assert len(build_datasets(rows, wide).dpo) == 1
    off = BuildConfig(reward_windows={"other": None}, **PREF_ONLY)
    assert len(build_datasets(rows, off).dpo) == 1
    with pytest.raises(DataError, match="reward_windows.other"):
        BuildConfig(reward_windows={"other": (0.2, 0.1)})


# --------------------------------------------------------------------------------------------------
# maths and code: correct chosen, incorrect rejected


def test_math_pairs_correct_best_with_incorrect_worst_inside_the_window() -> None:
    rows = [rec("m", "A", 0, 0.95, False, "math"),   # highest reward, but wrong: never chosen
            rec("m", "A", 1, 0.60, True, "math"),    # best correct
            rec("m", "A", 2, 0.58, True, "math"),
            rec("m", "A", 3, 0.55, False, "math"),   # worst incorrect
            rec("m", "A", 4, 0.10, None, "math")]    # no verdict: neither chosen nor rejected
    res = build_datasets(rows, BuildConfig(**PREF_ONLY))
    assert [answers(r) for r in res.dpo] == [("A#1", "A#3")]
    # maths keeps the 0.01-0.1 window: a correct/incorrect pair 0.5 apart is dropped
    far = [rec("m", "A", 0, 0.9, True, "math"), rec("m", "A", 1, 0.4, False, "math")]
    res = build_datasets(far, BuildConfig(**PREF_ONLY))
    assert res.dpo == [] and res.stats["math"]["pair_gap_above"] == 1


def test_code_pairs_passing_with_failing_without_a_window() -> None:
    rows = [rec("c", "A", 0, 0.9, True, "code"), rec("c", "A", 1, 0.95, False, "code"),
            rec("c", "A", 2, 0.2, False, "code")]
    res = build_datasets(rows, BuildConfig(**PREF_ONLY))
    assert [answers(r) for r in res.dpo] == [("A#0", "A#2")]  # gap 0.7 kept: no window for code
    windowed = BuildConfig(reward_windows={"code": (0.01, 0.1)}, **PREF_ONLY)
    assert build_datasets(rows, windowed).dpo == []


def test_verified_source_needs_both_a_correct_and_an_incorrect_response() -> None:
    rows = [rec("c", "A", 0, 0.9, True, "code"), rec("c", "A", 1, 0.8, True, "code"),
            rec("c", "B", 0, 0.7, False, "code"), rec("c", "B", 1, 0.6, False, "code")]
    res = build_datasets(rows, BuildConfig(**PREF_ONLY))
    assert res.dpo == []
    st = res.stats["code"]
    assert (st["pair_no_incorrect"], st["pair_no_correct"], st["dpo_dropped"]) == (1, 1, 1)


def test_sft_takes_the_best_correct_response_in_math_and_the_best_overall_elsewhere() -> None:
    rows = [rec("m", "A", 0, 0.99, False, "math"), rec("m", "B", 0, 0.70, True, "math"),
            rec("m", "A", 1, 0.60, True, "math"),
            rec("o", "A", 0, 0.30, False), rec("o", "B", 0, 0.80, None)]
    res = build_datasets(rows, BuildConfig(**SFT_ONLY))
    by_id = {r["prompt_id"]: r for r in res.sft}
    assert by_id["m"]["messages"][-1] == {"role": "assistant", "content": "B#0"}
    assert by_id["o"]["messages"][-1]["content"] == "B#0"
    assert by_id["m"]["messages"][0] == {"role": "user", "content": "question m"}


# --------------------------------------------------------------------------------------------------
# all-fail prompts


def test_prompts_where_every_response_fails_are_dropped() -> None:
    fail = [rec("m", s, i, 0.5 + i / 100, False, "math") for s in "AB" for i in range(3)]
    ok = [rec("k", "A", 0, 0.6, True, "math"), rec("k", "A", 1, 0.55, False, "math")]
    other = [rec("o", "A", 0, 0.6, False), rec("o", "A", 1, 0.55, False)]  # no verifier for 'other'
    for split in ((1, 0), (0, 1)):
        res = build_datasets(fail + ok + other, BuildConfig(split=split))
        used = {r["prompt_id"] for r in res.sft + res.dpo}
        assert "m" not in used and {"k", "o"} <= used
        assert res.stats["math"]["dropped_all_fail"] == 1 and res.stats["other"]["dropped_all_fail"] == 0
        assert res.stats["math"]["sft_prompts"] + res.stats["math"]["pref_prompts"] == 1


def test_target_successes_do_not_rescue_an_all_fail_prompt() -> None:
    rows = [rec("m", "A", 0, 0.5, False, "math"), rec("m", "tgt", 0, 0.6, True, "math")]
    res = build_datasets(rows, BuildConfig(target="tgt"))
    assert res.stats["math"]["dropped_all_fail"] == 1 and not (res.sft or res.dpo or res.wrpo)


# --------------------------------------------------------------------------------------------------
# the 4:6 split


@pytest.mark.parametrize(("n", "n_sft"), [(10, 4), (25, 10), (7, 3), (5, 2), (1, 0), (2, 1), (0, 0)])
def test_split_exact_counts(n: int, n_sft: int) -> None:
    stage = split_prompts([f"q{i}" for i in range(n)], (4, 6), seed=0)
    assert sum(v == "sft" for v in stage.values()) == n_sft
    assert sum(v == "pref" for v in stage.values()) == n - n_sft


def test_split_is_deterministic_and_seeded() -> None:
    ids = [f"q{i}" for i in range(40)]
    first = split_prompts(ids, seed=3)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert split_prompts(shuffled, seed=3) == first
    assert split_prompts(ids, seed=4) != first
    assert sum(v == "sft" for v in split_prompts(ids, seed=4).values()) == 16


def test_split_counts_per_category_in_the_built_data() -> None:
    rows = [r for i in range(10) for r in (rec(f"o{i}", "A", 0, 0.6), rec(f"o{i}", "A", 1, 0.55))]
    rows += [r for i in range(5) for r in (rec(f"m{i}", "A", 0, 0.6, True, "math"),
                                            rec(f"m{i}", "A", 1, 0.55, False, "math"))]
    res = build_datasets(rows, BuildConfig(seed=7))
    assert (res.stats["other"]["sft_prompts"], res.stats["other"]["pref_prompts"]) == (4, 6)
    assert (res.stats["math"]["sft_prompts"], res.stats["math"]["pref_prompts"]) == (2, 3)
    assert len(res.sft) == 6 and len(res.dpo) == 9
    assert not {r["prompt_id"] for r in res.sft} & {r["prompt_id"] for r in res.dpo}
    again = build_datasets(list(reversed(rows)), BuildConfig(seed=7))
    assert sorted(r["prompt_id"] for r in again.sft) == sorted(r["prompt_id"] for r in res.sft)


# --------------------------------------------------------------------------------------------------
# WRPO records


def test_wrpo_record_composition() -> None:
    rows = [rec("p", "A", 0, 0.70), rec("p", "A", 1, 0.65), rec("p", "B", 0, 0.80), rec("p", "B", 1, 0.10),
            rec("p", "tgt", 0, 0.95), rec("p", "tgt", 1, 0.40), rec("p", "tgt", 2, 0.30)]
    res = build_datasets(rows, BuildConfig(target="tgt", **PREF_ONLY))
    [w] = res.wrpo
    # chosen = [best source response over all sources, target's best]; rejected = [target's worst]
    assert w["chosen"] == [{"role": "assistant", "content": "B#0"}, {"role": "assistant", "content": "tgt#0"}]
    assert w["rejected"] == [{"role": "assistant", "content": "tgt#2"}]
    assert w["chosen_sources"] == ["B", "tgt"]
    assert w["score_chosen"] == [0.80, 0.95] and w["score_rejected"] == [0.30]
    assert w["prompt"] == [{"role": "user", "content": "question p"}]
    # the target's samples take no part in DPO pairs
    assert [answers(r) for r in res.dpo] == [("A#0", "A#1")]
    assert res.stats["other"]["wrpo_kept"] == 1


def test_target_samples_are_not_sft_data() -> None:
    rows = [rec("p", "A", 0, 0.5), rec("p", "tgt", 0, 0.99)]
    res = build_datasets(rows, BuildConfig(target="tgt", **SFT_ONLY))
    assert [r["messages"][-1]["content"] for r in res.sft] == ["A#0"]
    assert res.wrpo == []  # WRPO uses preference-stage prompts only


def test_wrpo_in_math_needs_correct_chosen_and_incorrect_rejected() -> None:
    src = [rec("m", "A", 0, 0.9, False, "math"), rec("m", "A", 1, 0.6, True, "math")]
    good = src + [rec("m", "tgt", 0, 0.99, False, "math"), rec("m", "tgt", 1, 0.5, True, "math"),
                  rec("m", "tgt", 2, 0.3, False, "math"), rec("m", "tgt", 3, 0.2, True, "math")]
    [w] = build_datasets(good, BuildConfig(target="tgt", **PREF_ONLY)).wrpo
    assert [m["content"] for m in w["chosen"]] == ["A#1", "tgt#1"] and w["rejected"][0]["content"] == "tgt#2"
    all_right = src + [rec("m", "tgt", 0, 0.7, True, "math"), rec("m", "tgt", 1, 0.2, True, "math")]
    res = build_datasets(all_right, BuildConfig(target="tgt", **PREF_ONLY))
    assert res.wrpo == [] and res.stats["math"]["wrpo_no_incorrect_target"] == 1
    all_wrong = src + [rec("m", "tgt", 0, 0.7, False, "math")]
    res = build_datasets(all_wrong, BuildConfig(target="tgt", **PREF_ONLY))
    assert res.stats["math"]["wrpo_no_correct_target"] == 1


def test_wrpo_drops_without_target_samples_or_target_gap() -> None:
    rows = [rec("a", "A", 0, 0.6), rec("a", "A", 1, 0.55),
            rec("b", "A", 0, 0.6), rec("b", "A", 1, 0.55), rec("b", "tgt", 0, 0.4)]
    res = build_datasets(rows, BuildConfig(target="tgt", **PREF_ONLY))
    assert res.wrpo == []
    assert res.stats["other"]["wrpo_no_target"] == 1 and res.stats["other"]["wrpo_no_target_gap"] == 1


# --------------------------------------------------------------------------------------------------
# statistics, output files, errors


def test_statistics_counts_and_table() -> None:
    rows = []
    for i in range(10):  # 'other': 4 SFT, 6 preference; odd prompts have a gap outside the window
        gap = 0.05 if i % 2 == 0 else 0.3
        rows += [rec(f"o{i}", "A", 0, 0.6), rec(f"o{i}", "A", 1, 0.6 - gap),
                 rec(f"o{i}", "tgt", 0, 0.5), rec(f"o{i}", "tgt", 1, 0.4)]
    rows += [rec("m0", "A", 0, 0.6, False, "math")]  # all fail
    rows += [rec("m1", "A", 0, 0.6, True, "math"), rec("m1", "A", 1, 0.58, False, "math")]
    rows += [rec("m2", "A", 0, 0.6, True, "math"), rec("m2", "A", 1, 0.58, False, "math")]
    rows += [rec("c0", "tgt", 0, 0.6, True, "code")]  # only the target answered
    res = build_datasets(rows, BuildConfig(target="tgt", seed=0))
    o, m, c, t = (res.stats[k] for k in ("other", "math", "code", "total"))
    assert (o["prompts"], o["sft_prompts"], o["sft_kept"], o["pref_prompts"]) == (10, 4, 4, 6)
    pref_ids = sorted({r["prompt_id"] for r in res.wrpo})
    odd = sum(int(p[1:]) % 2 for p in pref_ids)
    assert o["dpo_kept"] == 6 - odd and o["dpo_dropped"] == odd and o["pair_gap_above"] == odd
    assert o["dpo_pairs"] == len([r for r in res.dpo if r["category"] == "other"])
    assert o["wrpo_kept"] == 6 and o["wrpo_no_target"] == 0
    assert (m["prompts"], m["dropped_all_fail"], m["sft_prompts"] + m["pref_prompts"]) == (3, 1, 2)
    assert (m["sft_prompts"], m["pref_prompts"]) == (1, 1)  # round(2 * 0.4) = 1
    assert (c["prompts"], c["dropped_no_source"]) == (1, 1)
    assert t["prompts"] == 14 and t["sft_kept"] == len(res.sft) and t["dpo_pairs"] == len(res.dpo)
    assert t["wrpo_kept"] == len(res.wrpo) and t["wrpo_no_target"] == 1  # the math preference prompt
    text = format_stats(res.stats)
    assert len(text.splitlines()) == len(STAT_ROWS) + 1
    assert text.splitlines()[1].split() == ["prompts", "3", "1", "10", "14"]


def test_write_build_round_trip_and_trl_shapes(tmp_path: Path) -> None:
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    rows = [r for i in range(5) for r in (rec(f"o{i}", "A", 0, 0.6), rec(f"o{i}", "A", 1, 0.55),
                                           rec(f"o{i}", "tgt", 0, 0.5), rec(f"o{i}", "tgt", 1, 0.2))]
    src = tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = build_datasets(read_scored(src), BuildConfig(target="tgt"))
    paths = write_build(res, tmp_path / "built")
    assert json.loads(paths["stats"].read_text()) == res.stats
    for name in ("sft", "dpo", "wrpo"):
        lines = paths[name].read_text().splitlines()
        assert [json.loads(x) for x in lines] == getattr(res, name)
    sft = load_dataset("json", data_files=str(paths["sft"]), split="train")
    dpo = load_dataset("json", data_files=str(paths["dpo"]), split="train")
    assert len(sft) == 2 and len(dpo) == 3
    assert is_conversational(sft[0]) and is_conversational(dpo[0])
    assert set(dpo.column_names) >= {"prompt", "chosen", "rejected"}
    assert not list(tmp_path.glob("built/.*"))  # no temp files left behind


def test_bad_rows_raise_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="category 'math' here but 'other'"):
        build_datasets([rec("p", "A", 0, 0.5), rec("p", "B", 0, 0.5, category="math")])
    with pytest.raises(DataError, match="'reward' must be a number"):
        build_datasets([{**rec("p", "A", 0, 0.5), "reward": "high"}])
    with pytest.raises(DataError, match="category 'chat' is not one of"):
        build_datasets([rec("p", "A", 0, 0.5, category="chat")])
    bad = tmp_path / "scored.jsonl"
    bad.write_text(json.dumps(rec("p", "A", 0, 0.5)) + "\n{oops\n")
    with pytest.raises(DataError, match=r"scored.jsonl:2: not valid JSON"):
        read_scored(bad)
    bad.write_text(json.dumps({**rec("p", "A", 0, 0.5), "correct": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"scored.jsonl:1: 'correct' must be"):
        build_datasets(read_scored(bad))
