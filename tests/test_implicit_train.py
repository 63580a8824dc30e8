"""run_sft / run_dpo / run_wrpo on the tiny world's target, and the default chat template."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from polyfuse.corpus.chat import DEFAULT_CHAT_TEMPLATE, ensure_chat_template
from polyfuse.errors import DataError, PolyfuseError
from polyfuse.implicit.train import (
    DPOTrainConfig,
    SFTTrainConfig,
    WRPOTrainConfig,
    read_jsonl_rows,
    run_dpo,
    run_sft,
    run_wrpo,
)

FAST = {"learning_rate": 3e-3, "logging_steps": 1, "save_steps": 100, "per_device_train_batch_size": 4,
        "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "extra": {"disable_tqdm": True}}
QUESTIONS = [(f"What is {a}+{b}?", f"{a + b}", f"{a + b + 1}") for a, b in [(2, 3), (4, 4), (1, 7), (6, 2)]]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def target(tiny_world: Path) -> Path:
    return tiny_world / "models" / "target"


def answer_logp(model_dir: Path, prompt: str, answer: str) -> float:
    """Summed log-prob of ``answer`` (and its eos) after ``prompt`` under the saved model and its template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    head = tok.apply_chat_template(user(prompt), add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]
    full = tok.apply_chat_template(user(prompt) + assistant(answer), tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(head) - 1:].sum().item()


# --------------------------------------------------------------------------------------------------
# chat template


def test_default_chat_template_is_set_once_and_keeps_the_prompt_a_prefix(tiny_world: Path) -> None:
    from transformers import AutoTokenizer

    for name in ("target", "prose", "code", "math"):
        tok = AutoTokenizer.from_pretrained(tiny_world / "models" / name)
        assert not tok.chat_template
        assert ensure_chat_template(tok) is True and tok.chat_template == DEFAULT_CHAT_TEMPLATE
        assert ensure_chat_template(tok) is False  # an existing template is kept
        msgs = [{"role": "system", "content": "Be brief."}, *user("What is 2+3?")]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        full = tok.apply_chat_template([*msgs, *assistant(" Five")], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        assert full["input_ids"][:len(prompt)] == prompt, name
        # exactly the answer and its eos are assistant tokens
        assert sum(full["assistant_masks"]) == len(full["input_ids"]) - len(prompt), name
        assert full["input_ids"][-1] == tok.eos_token_id
    text = tok.apply_chat_template([*msgs, *assistant("5")], tokenize=False)
    assert text == f"### System:\nBe brief.\n\n### User:\nWhat is 2+3?\n\n### Assistant:\n5{tok.eos_token}"


def test_explicit_template_wins(tiny_world: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world / "models" / "target")
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert ensure_chat_template(tok, str(path)) and tok.apply_chat_template(user("hi"), tokenize=False) == "hi"
    with pytest.raises(PolyfuseError, match="does not exist"):
        ensure_chat_template(tok, str(tmp_path / "missing.jinja"))


# --------------------------------------------------------------------------------------------------
# the runs


def test_sft_learns_the_answers_and_saves(target: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": user(q) + assistant(a), "prompt_id": q}
                                                for q, a, _ in QUESTIONS])
    before = answer_logp(target, *QUESTIONS[0][:2])
    out = tmp_path / "sft"
    res = run_sft(str(target), data, out, SFTTrainConfig(max_steps=6, **FAST))
    assert res["global_step"] == 6 and len(res["losses"]) == 6 and res["resumed_from"] is None
    assert all(math.isfinite(x) for x in res["losses"])
    assert res["config"]["assistant_only_loss"] is None  # auto: the default template marks the answer
    assert answer_logp(out, *QUESTIONS[0][:2]) > before + 1.0
    assert json.loads((out / "train_result.json").read_text())["global_step"] == 6
    assert not list(out.glob("checkpoint-*"))
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or \
        (out / "chat_template.jinja").is_file()


@pytest.mark.parametrize("loss", ["sigmoid", "sigmoid_norm"])
def test_dpo_widens_the_margin(loss: str, target: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": user(q), "chosen": assistant(a), "rejected": assistant(b)}
                                                for q, a, b in QUESTIONS])
    q, good, bad = QUESTIONS[1]
    margin_before = answer_logp(target, q, good) - answer_logp(target, q, bad)
    out = tmp_path / loss
    beta = 0.5 if loss == "sigmoid" else 5.0
    res = run_dpo(str(target), data, out, DPOTrainConfig(loss=loss, beta=beta, max_steps=4, **FAST))
    assert res["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert res["losses"][-1] < res["losses"][0]
    assert answer_logp(out, q, good) - answer_logp(out, q, bad) > margin_before


def test_dpo_with_an_nll_term_raises_the_chosen_answers(target: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": user(q), "chosen": assistant(a), "rejected": assistant(b)}
                                                for q, a, b in QUESTIONS])
    out = tmp_path / "rpo"
    res = run_dpo(str(target), data, out, DPOTrainConfig(beta=0.5, sft_weight=1.0, max_steps=4, **FAST))
    assert res["losses"][0] > math.log(2) + 0.5  # DPO's log 2 at step 1 plus the chosen tokens' NLL
    for q, good, _ in QUESTIONS:
        assert answer_logp(out, q, good) > answer_logp(target, q, good)


def test_wrpo_run(target: Path, tmp_path: Path) -> None:
    rows = [{"prompt": user(q), "chosen": assistant(f"The sum is {a}.") + assistant(a), "rejected": assistant(b)}
            for q, a, b in QUESTIONS]
    data = write_jsonl(tmp_path / "wrpo.jsonl", rows)
    res = run_wrpo(str(target), data, tmp_path / "wrpo",
                   WRPOTrainConfig(beta=0.5, alpha_max=0.5, max_steps=4, **FAST))
    assert res["global_step"] == 4 and res["losses"][-1] < res["losses"][0]
    assert (tmp_path / "wrpo" / "model.safetensors").is_file()


def test_a_rerun_resumes_from_the_last_checkpoint(target: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": user(q) + assistant(a)} for q, a, _ in QUESTIONS])
    out = tmp_path / "sft"
    fast = {**FAST, "save_steps": 1}
    first = run_sft(str(target), data, out, SFTTrainConfig(max_steps=2, keep_checkpoints=True, **fast))
    assert first["resumed_from"] is None and (out / "checkpoint-2").is_dir()
    second = run_sft(str(target), data, out, SFTTrainConfig(max_steps=4, **fast))
    assert second["resumed_from"] is not None and second["resumed_from"].endswith("checkpoint-2")
    assert second["global_step"] == 4 and len(second["losses"]) == 4  # the history continues from step 2
    assert second["losses"][:2] == pytest.approx(first["losses"])


# --------------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_raise_clear_errors(target: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file; run the build stage"):
        read_jsonl_rows(tmp_path / "none.jsonl", ["messages"], "sft")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no rows; the build stage kept nothing for dpo"):
        read_jsonl_rows(empty, ["prompt"], "dpo")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": user("q"), "chosen": assistant("a")}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: dpo rows need prompt, chosen, rejected; missing rejected"):
        run_dpo(str(target), bad, tmp_path / "out")
    with pytest.raises(PolyfuseError, match="dpo.loss='ipo'"):
        run_dpo(str(target), bad, tmp_path / "out", DPOTrainConfig(loss="ipo"))  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": user("q") + assistant("a")}])
        with pytest.raises(PolyfuseError, match="bf16=true needs a CUDA device"):
            run_sft(str(target), data, tmp_path / "out", SFTTrainConfig(bf16=True))


@pytest.mark.skipif(importlib.util.find_spec("peft") is not None, reason="peft is installed")
def test_lora_without_peft_says_how_to_install_it(target: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": user("q") + assistant("a")}])
    with pytest.raises(PolyfuseError, match="pip install peft"):
        run_sft(str(target), data, tmp_path / "out", SFTTrainConfig(lora_r=8, max_steps=1))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_lora_dpo_run(target: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": user(q), "chosen": assistant(a), "rejected": assistant(b)}
                                                for q, a, b in QUESTIONS])
    res = run_dpo(str(target), data, tmp_path / "lora", DPOTrainConfig(beta=0.5, lora_r=4, max_steps=3, **FAST))
    assert res["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    from transformers import AutoModelForCausalLM

    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # a full model, the next stage's input
    base = AutoModelForCausalLM.from_pretrained(target)
    q_proj = [m.model.layers[0].self_attn.q_proj.weight for m in (merged, base)]
    assert not torch.equal(*q_proj)
