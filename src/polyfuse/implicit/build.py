"""Build SFT, DPO and WRPO data from scored samples by the FuseChat-3.0 rules (the ``build`` stage).

Input: scored records, one per sampled response (the ``score`` stage's output)::

    {"prompt_id": str, "prompt": [messages] | str, "source": str, "sample_index": int,
     "response": str, "params": {...}, "reward": float, "correct": bool | None,
     "category": "math" | "code" | "other"}

The rules, as published in the FuseChat-3.0 README (its "Data Construction" section; the reference
group released no code for this step):

* **Split.** "We then divided the annotated data into SFT and DPO datasets using a 4:6 ratio." The
  prompts of each category are ordered by ``sha256(f"{seed}:{prompt_id}")`` and the first
  ``round(n * 4 / 10)`` (half up) go to SFT, the rest to the preference stage: exact counts, and the same
  split for the same prompt ids and seed whatever the input order.
* **SFT.** "For the SFT phase, we selected the responses with the highest RM scores"; for maths "responses
  that were correct and had the highest RM scores"; for code "responses that not only passed all test
  cases but also achieved the highest RM scores". One record per SFT prompt, from any source.
* **DPO, instruction following** (``other``): "we paired responses from the same source model,
  designating those with the highest RM scores as positive samples and those with the lowest RM scores as
  negative samples. We ensured that the RM score difference between the positive and negative samples in
  each pair ranged from 0.01 to 0.1."
* **DPO, maths**: "we constructed paired samples from the same source model. The positive samples consisted
  of correct answers with the highest RM scores, while the negative samples were incorrect answers with the
  lowest RM scores. [...] we maintained an RM score differential between positive and negative pairs within
  the range of 0.01 to 0.1." So maths keeps the reward window *and* the correctness rule.
* **DPO, code**: "we contrasted positive samples—high-scoring responses that passed the tests—with negative
  samples—low-scoring responses that failed the tests." No window is stated for code, so the default
  ``reward_windows`` has none for ``code`` (set one to apply it).
* **All-fail prompts**: "We excluded any instances where all model responses failed to meet the testing
  criteria." Applied to maths and code prompts before the split.

Choices the README leaves open, made here and configurable: a pair is one prompt's *best* same-source pair
(the source whose chosen response scores highest; ``pairs_per_prompt="all"`` keeps one pair per source) --
the published counts have exactly one DPO pair per preference prompt (UltraFeedback: 30,659 = 0.6 x
51,098); the target's own samples (``source == target``) take part only in WRPO records; in maths and code a
response whose ``correct`` is ``None`` (no verdict) is neither chosen nor rejected; window bounds are
inclusive, with a 1e-9 tolerance for float round-off.

**WRPO** (Yang et al., 2024; SLIT-AI/WRPO data layout): on the preference prompts, chosen = [the best
source response over all sources, the target's best response], rejected = [the target's worst response].
For maths and code polyfuse also requires both chosen responses to be correct and the rejected one to be
incorrect (WRPO itself used no verifier); otherwise the target's best must out-score its worst.

Outputs (TRL / alignment-handbook conversational shapes; the extra keys are metadata that TRL ignores)::

    sft.jsonl   {"messages": prompt + [{"role": "assistant", "content": y}],
                 "prompt_id", "category", "source", "score"}
    dpo.jsonl   {"prompt": [messages], "chosen": [{"role": "assistant", "content": y_w}],
                 "rejected": [{"role": "assistant", "content": y_l}],
                 "prompt_id", "category", "source", "score_chosen", "score_rejected"}
    wrpo.jsonl  {"prompt": [messages],
                 "chosen": [{"role": "assistant", "content": y_ws}, {"role": "assistant", "content": y_wt}],
                 "rejected": [{"role": "assistant", "content": y_l}],
                 "prompt_id", "category", "chosen_sources": [source, target],
                 "score_chosen": [r_ws, r_wt], "score_rejected": [r_l]}
    stats.json  {category: {statistic: count}} plus "total" (see :data:`STAT_ROWS`)

In ``wrpo.jsonl`` ``chosen`` is a list of two alternative answers (source first, then target), not a
two-turn conversation, exactly as in the WRPO release.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from polyfuse.errors import DataError
from polyfuse.workspace import atomic_write_json, atomic_write_text, read_jsonl

__all__ = [
    "CATEGORIES",
    "STAT_ROWS",
    "VERIFIED_CATEGORIES",
    "BuildConfig",
    "BuildResult",
    "Candidate",
    "PromptGroup",
    "build_datasets",
    "format_stats",
    "group_by_prompt",
    "read_scored",
    "all_fail",
    "select_pair",
    "select_pairs",
    "select_sft",
    "select_wrpo",
    "split_prompts",
    "write_build",
]

CATEGORIES = ("math", "code", "other")
VERIFIED_CATEGORIES = frozenset({"math", "code"})
TOLERANCE = 1e-9
ROW_FIX = ("each line must be one scored record {prompt_id, prompt, source, sample_index, response, "
           "reward, correct, category}")

#: Rows of the statistics table, in print order, with what each counts (per category).
STAT_ROWS: dict[str, str] = {
    "prompts": "distinct prompt ids read",
    "dropped_all_fail": "maths/code prompts where no source response is correct (dropped before the split)",
    "dropped_no_source": "prompts with no response from a source (only the target's)",
    "sft_prompts": "prompts assigned to the SFT stage",
    "sft_kept": "SFT records written",
    "pref_prompts": "prompts assigned to the preference stage",
    "dpo_kept": "preference prompts with at least one DPO pair",
    "dpo_pairs": "DPO pairs written",
    "dpo_dropped": "preference prompts with no valid same-source pair",
    "pair_single_response": "  source candidates: fewer than two scored responses",
    "pair_no_correct": "  source candidates: no correct response (maths/code)",
    "pair_no_incorrect": "  source candidates: no incorrect response (maths/code)",
    "pair_gap_below": "  source candidates: reward gap below the window",
    "pair_gap_above": "  source candidates: reward gap above the window",
    "wrpo_kept": "WRPO records written",
    "wrpo_no_target": "  WRPO drops: no response from the target",
    "wrpo_no_correct_target": "  WRPO drops: no correct target response (maths/code)",
    "wrpo_no_incorrect_target": "  WRPO drops: no incorrect target response (maths/code)",
    "wrpo_no_target_gap": "  WRPO drops: target's best does not out-score its worst",
}

PairReason = Literal["single_response", "no_correct", "no_incorrect", "gap_below", "gap_above"]
WrpoReason = Literal["no_target", "no_correct_target", "no_incorrect_target", "no_target_gap"]


def _default_windows() -> dict[str, tuple[float, float] | None]:
    return {"other": (0.01, 0.1), "math": (0.01, 0.1), "code": None}


@dataclass(frozen=True)
class BuildConfig:
    """How to build the datasets (defaults: the FuseChat-3.0 README).

    split: SFT : preference ratio of prompts, per category (4:6).
    seed: seeds the prompt split.
    reward_windows: per category, the inclusive ``(low, high)`` window of chosen-minus-rejected reward a DPO
        pair must fall in, or ``None`` for no window (code).
    pairs_per_prompt: ``best`` keeps one pair per preference prompt (the source whose chosen response
        scores highest; ties: larger gap, then source name); ``all`` keeps every source's valid pair.
    target: the target model's ``source`` name; its samples feed only WRPO records (``None``: no WRPO).
    """

    split: tuple[int, int] = (4, 6)
    seed: int = 0
    reward_windows: Mapping[str, tuple[float, float] | None] = field(default_factory=_default_windows)
    pairs_per_prompt: Literal["best", "all"] = "best"
    target: str | None = None

    def __post_init__(self) -> None:
        sft, pref = self.split
        if sft < 0 or pref < 0 or sft + pref == 0:
            raise DataError(f"build.split={self.split}: need two non-negative parts with a positive sum, e.g. (4, 6)")
        for cat, window in self.reward_windows.items():
            if window is not None and not (len(window) == 2 and window[0] <= window[1]):
                raise DataError(f"build.reward_windows.{cat}={window}: need (low, high) with low <= high, "
                                "or null for no window")
        if self.pairs_per_prompt not in ("best", "all"):
            raise DataError(f"build.pairs_per_prompt={self.pairs_per_prompt!r}: choose 'best' or 'all'")

    def window(self, category: str) -> tuple[float, float] | None:
        """The reward window of a category (``other``'s for a category not listed)."""
        return self.reward_windows.get(category, self.reward_windows.get("other"))


@dataclass(frozen=True)
class Candidate:
    """One scored response."""

    prompt_id: str
    source: str
    sample_index: int
    response: str
    reward: float
    correct: bool | None
    category: str


@dataclass
class PromptGroup:
    """Every scored response to one prompt; ``prompt`` is a list of chat messages."""

    prompt_id: str
    prompt: list[dict[str, str]]
    category: str
    candidates: list[Candidate]


@dataclass
class BuildResult:
    """The three datasets (lists of JSON-ready rows) and the per-category statistics."""

    sft: list[dict[str, Any]]
    dpo: list[dict[str, Any]]
    wrpo: list[dict[str, Any]]
    stats: dict[str, dict[str, int]]


# --------------------------------------------------------------------------------------------------
# reading and grouping


def read_scored(path: str | Path) -> list[dict[str, Any]]:
    """Read scored records from a JSONL file; a malformed line raises :class:`DataError` naming file:line."""
    rows = read_jsonl(path, missing="no such file; run the score stage first (it writes scored JSONL)", fix=ROW_FIX)
    for where, row in rows:
        row["_where"] = where
    return [row for _, row in rows]


def _as_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if (isinstance(prompt, list) and prompt
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt)):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages")


def _candidate(row: Mapping[str, Any], where: str) -> Candidate:
    missing = [k for k in ("prompt_id", "prompt", "source", "response", "reward", "category") if k not in row]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}; {ROW_FIX}")
    category = row["category"]
    if category not in CATEGORIES:
        raise DataError(f"{where}: category {category!r} is not one of {', '.join(CATEGORIES)}")
    reward, correct = row["reward"], row.get("correct")
    if isinstance(reward, bool) or not isinstance(reward, int | float) or reward != reward:
        raise DataError(f"{where}: 'reward' must be a number (got {reward!r}); score the row again")
    if correct is not None and not isinstance(correct, bool):
        raise DataError(f"{where}: 'correct' must be true, false or null (got {correct!r})")
    if not isinstance(row["response"], str):
        raise DataError(f"{where}: 'response' must be a string")
    return Candidate(prompt_id=str(row["prompt_id"]), source=str(row["source"]),
                     sample_index=int(row.get("sample_index", 0)), response=row["response"],
                     reward=float(reward), correct=correct, category=category)


def group_by_prompt(records: Iterable[Mapping[str, Any]]) -> list[PromptGroup]:
    """Group scored records by ``prompt_id`` (first-seen order); prompt and category must agree per id."""
    groups: dict[str, PromptGroup] = {}
    for i, row in enumerate(records):
        where = str(row.get("_where", f"record {i}"))
        cand = _candidate(row, where)
        prompt = _as_messages(row["prompt"], where)
        group = groups.get(cand.prompt_id)
        if group is None:
            groups[cand.prompt_id] = PromptGroup(cand.prompt_id, prompt, cand.category, [cand])
            continue
        if group.category != cand.category:
            raise DataError(f"{where}: prompt_id {cand.prompt_id!r} has category {cand.category!r} here but "
                            f"{group.category!r} elsewhere; one prompt has one category")
        if group.prompt != prompt:
            raise DataError(f"{where}: prompt_id {cand.prompt_id!r} has a different prompt than its other "
                            "records; prompt ids must be unique per prompt")
        group.candidates.append(cand)
    return list(groups.values())


# --------------------------------------------------------------------------------------------------
# the rules


def split_prompts(prompt_ids: Sequence[str], split: tuple[int, int] = (4, 6), seed: int = 0) -> dict[str, str]:
    """Assign prompt ids to ``"sft"`` or ``"pref"``: exactly ``round(n * a / (a + b))`` (half up) to SFT.

    The order is ``sha256(f"{seed}:{prompt_id}")``, so the split depends only on the seed and the set of ids.
    """
    a, b = split
    ids = sorted(set(prompt_ids), key=lambda p: (hashlib.sha256(f"{seed}:{p}".encode()).hexdigest(), p))
    n_sft = (2 * len(ids) * a + (a + b)) // (2 * (a + b))
    return {pid: ("sft" if i < n_sft else "pref") for i, pid in enumerate(ids)}


def _order(c: Candidate) -> tuple:
    """Sort key: higher reward first; ties broken by source name and sample index."""
    return (-c.reward, c.source, c.sample_index)


def _best(cands: Iterable[Candidate]) -> Candidate | None:
    return min(cands, key=_order, default=None)


def _worst(cands: Iterable[Candidate]) -> Candidate | None:
    return max(cands, key=_order, default=None)


def _verified(category: str) -> bool:
    return category in VERIFIED_CATEGORIES


def _sources(group: PromptGroup, target: str | None) -> list[Candidate]:
    return [c for c in group.candidates if c.source != target]


def all_fail(group: PromptGroup, target: str | None = None) -> bool:
    """A maths or code prompt where no source response is correct."""
    return _verified(group.category) and not any(c.correct is True for c in _sources(group, target))


def select_sft(group: PromptGroup, target: str | None = None) -> Candidate | None:
    """The highest-reward source response; in maths and code the highest-reward *correct* one."""
    cands = _sources(group, target)
    if _verified(group.category):
        cands = [c for c in cands if c.correct is True]
    return _best(cands)


def select_pair(cands: Sequence[Candidate], category: str, window: tuple[float, float] | None
                ) -> tuple[tuple[Candidate, Candidate] | None, PairReason | None]:
    """One source's DPO pair (chosen, rejected), or ``(None, reason)``.

    ``other``: highest vs lowest reward. ``math``/``code``: highest-reward correct vs lowest-reward incorrect.
    The pair is kept only when ``low <= chosen.reward - rejected.reward <= high`` (if a window is given).
    """
    if _verified(category):
        chosen = _best(c for c in cands if c.correct is True)
        rejected = _worst(c for c in cands if c.correct is False)
        if chosen is None:
            return None, "no_correct"
        if rejected is None:
            return None, "no_incorrect"
    else:
        if len(cands) < 2:
            return None, "single_response"
        chosen, rejected = _best(cands), _worst(cands)
    if window is not None:
        gap = chosen.reward - rejected.reward
        if gap < window[0] - TOLERANCE:
            return None, "gap_below"
        if gap > window[1] + TOLERANCE:
            return None, "gap_above"
    return (chosen, rejected), None


def select_pairs(group: PromptGroup, config: BuildConfig
                 ) -> tuple[list[tuple[Candidate, Candidate]], Counter[str]]:
    """The prompt's same-source DPO pairs (one or all, per ``pairs_per_prompt``) and why others failed."""
    by_source: dict[str, list[Candidate]] = defaultdict(list)
    for c in _sources(group, config.target):
        by_source[c.source].append(c)
    pairs, reasons = [], Counter()
    for source in sorted(by_source):
        pair, reason = select_pair(by_source[source], group.category, config.window(group.category))
        if pair is None:
            reasons[reason] += 1
        else:
            pairs.append(pair)
    pairs.sort(key=lambda p: (-p[0].reward, -(p[0].reward - p[1].reward), p[0].source))
    if config.pairs_per_prompt == "best":
        pairs = pairs[:1]
    return pairs, reasons


def select_wrpo(group: PromptGroup, target: str
                ) -> tuple[tuple[Candidate, Candidate, Candidate] | None, WrpoReason | None]:
    """WRPO triple (best source, best target, worst target), or ``(None, reason)``.

    In maths and code the two chosen responses must be correct and the rejected one incorrect; elsewhere
    the target's best must score strictly higher than its worst.
    """
    own = [c for c in group.candidates if c.source == target]
    if not own:
        return None, "no_target"
    if _verified(group.category):
        best_source = select_sft(group, target)
        best_target = _best(c for c in own if c.correct is True)
        worst_target = _worst(c for c in own if c.correct is False)
        if best_target is None:
            return None, "no_correct_target"
        if worst_target is None:
            return None, "no_incorrect_target"
    else:
        best_source = select_sft(group, target)
        best_target, worst_target = _best(own), _worst(own)
        if not best_target.reward > worst_target.reward:
            return None, "no_target_gap"
    assert best_source is not None  # prompts without a usable source response are dropped before this
    return (best_source, best_target, worst_target), None


# --------------------------------------------------------------------------------------------------
# records


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def sft_record(group: PromptGroup, best: Candidate) -> dict[str, Any]:
    """``{"messages": prompt + [assistant], ...metadata}``."""
    return {"messages": [*group.prompt, _assistant(best.response)], "prompt_id": group.prompt_id,
            "category": group.category, "source": best.source, "score": best.reward}


def dpo_record(group: PromptGroup, chosen: Candidate, rejected: Candidate) -> dict[str, Any]:
    """Conversational preference row ``{"prompt", "chosen", "rejected", ...metadata}``."""
    return {"prompt": group.prompt, "chosen": [_assistant(chosen.response)],
            "rejected": [_assistant(rejected.response)], "prompt_id": group.prompt_id,
            "category": group.category, "source": chosen.source, "score_chosen": chosen.reward,
            "score_rejected": rejected.reward}


def wrpo_record(group: PromptGroup, source: Candidate, best: Candidate, worst: Candidate) -> dict[str, Any]:
    """WRPO row: ``chosen`` = [source answer, target answer], ``rejected`` = [target's worst answer]."""
    return {"prompt": group.prompt, "chosen": [_assistant(source.response), _assistant(best.response)],
            "rejected": [_assistant(worst.response)], "prompt_id": group.prompt_id, "category": group.category,
            "chosen_sources": [source.source, best.source], "score_chosen": [source.reward, best.reward],
            "score_rejected": [worst.reward]}


# --------------------------------------------------------------------------------------------------
# the stage


def build_datasets(records: Iterable[Mapping[str, Any]], config: BuildConfig | None = None) -> BuildResult:
    """Apply the rules to scored records; returns the datasets and the statistics (see the module doc)."""
    config = config or BuildConfig()
    groups = group_by_prompt(records)
    stats: dict[str, Counter[str]] = {cat: Counter({k: 0 for k in STAT_ROWS}) for cat in CATEGORIES}
    eligible: dict[str, list[PromptGroup]] = defaultdict(list)
    for group in groups:
        st = stats[group.category]
        st["prompts"] += 1
        if not _sources(group, config.target):
            st["dropped_no_source"] += 1
        elif all_fail(group, config.target):
            st["dropped_all_fail"] += 1
        else:
            eligible[group.category].append(group)

    sft, dpo, wrpo = [], [], []
    for category in CATEGORIES:
        st, cat_groups = stats[category], eligible[category]
        stage = split_prompts([g.prompt_id for g in cat_groups], config.split, config.seed)
        for group in cat_groups:
            if stage[group.prompt_id] == "sft":
                st["sft_prompts"] += 1
                best = select_sft(group, config.target)
                if best is not None:
                    sft.append(sft_record(group, best))
                    st["sft_kept"] += 1
                continue
            st["pref_prompts"] += 1
            pairs, reasons = select_pairs(group, config)
            for reason, n in reasons.items():
                st[f"pair_{reason}"] += n
            if pairs:
                st["dpo_kept"] += 1
                st["dpo_pairs"] += len(pairs)
                dpo.extend(dpo_record(group, c, r) for c, r in pairs)
            else:
                st["dpo_dropped"] += 1
            if config.target is not None:
                triple, why = select_wrpo(group, config.target)
                if triple is None:
                    st[f"wrpo_{why}"] += 1
                else:
                    wrpo.append(wrpo_record(group, *triple))
                    st["wrpo_kept"] += 1

    table = {cat: dict(stats[cat]) for cat in CATEGORIES}
    table["total"] = {k: sum(table[cat][k] for cat in CATEGORIES) for k in STAT_ROWS}
    return BuildResult(sft=sft, dpo=dpo, wrpo=wrpo, stats=table)


def format_stats(stats: Mapping[str, Mapping[str, int]]) -> str:
    """The statistics as a plain-text table: one row per statistic, one column per category and the total."""
    cols = [c for c in (*CATEGORIES, "total") if c in stats]
    width = max(len(k) for k in STAT_ROWS)
    lines = ["  ".join([f"{'':<{width}}", *(f"{c:>8}" for c in cols)])]
    for key in STAT_ROWS:
        lines.append("  ".join([f"{key:<{width}}", *(f"{stats[c].get(key, 0):>8}" for c in cols)]))
    return "\n".join(lines)


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_build(result: BuildResult, out_dir: str | Path) -> dict[str, Path]:
    """Atomically write ``sft.jsonl``, ``dpo.jsonl``, ``wrpo.jsonl`` and ``stats.json`` into ``out_dir``.

    Each file is written whole or not at all (a file may be empty: no WRPO rows without a target).
    """
    out = Path(out_dir)
    paths = {name: atomic_write_text(out / f"{name}.jsonl", _jsonl(rows))
             for name, rows in (("sft", result.sft), ("dpo", result.dpo), ("wrpo", result.wrpo))}
    paths["stats"] = atomic_write_json(out / "stats.json", result.stats)
    return paths
