"""Text generation from chat prompts, shared by sampling (the ``sample`` stage) and evaluation (held-out accuracy).

A backend generates ``params.n`` responses for each of a batch of chat prompts: ``hf`` (default), batched
``generate`` with left padding and ``num_return_sequences=n``; ``vllm`` (optional, GPU), a small adapter over
``vllm.LLM.chat`` (tested here only against a stand-in of vLLM's API). Each model renders prompts with its
own chat template: the tokenizer's, else the one given in :class:`SourceSpec`, else
:data:`polyfuse.corpus.chat.DEFAULT_CHAT_TEMPLATE` (the template the ``sft`` stage trains with, so a trained
target generates in its own format). Every batch is seeded from ``(seed, source, batch index)``
(:func:`batch_seed`), so the same prompts, batch size and seed give the same responses on CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from polyfuse.errors import DataError, PolyfuseError

__all__ = ["BACKENDS", "Backend", "HFBackend", "SamplingParams", "SourceSpec", "VLLMBackend", "as_messages",
           "batch_seed", "continue_texts", "make_backend"]

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class SamplingParams:
    """How one source samples. ``temperature == 0`` is greedy decoding (then ``n`` must be 1)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.n < 1:
            raise PolyfuseError(f"sample.n={self.n}: need at least one response per prompt")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise PolyfuseError(f"sampling parameters {asdict(self)}: need temperature >= 0, 0 < top_p <= 1 and "
                                "repetition_penalty > 0")
        if self.temperature == 0 and self.n > 1:
            raise PolyfuseError(f"temperature 0 (greedy) with n={self.n} gives the same response {self.n} times; "
                                "set a temperature above 0 or n=1")
        if self.max_new_tokens < 1:
            raise PolyfuseError(f"max_new_tokens={self.max_new_tokens}: need at least 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class SourceSpec:
    """A model to sample from: its record name, a loadable location (directory or hub id) and its settings."""

    name: str
    model: str
    params: SamplingParams = field(default_factory=SamplingParams)
    chat_template: str | None = None
    """Jinja text or a ``.jinja`` file, used only when the tokenizer has no template of its own."""
    revision: str | None = None


class Backend(Protocol):
    """Generates ``params.n`` responses for each of a batch of chat prompts."""

    def generate(self, prompts: Sequence[list[dict[str, str]]], params: SamplingParams, seed: int
                 ) -> list[list[str]]: ...


def as_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn; a list must hold ``{role, content}`` strings."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt)):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages")


def batch_seed(seed: int, source: str, batch_index: int) -> int:
    """The seed of one batch: depends on nothing but the run seed, the source name and the batch index."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source}:{batch_index}".encode()).digest()[:4], "little")


# --------------------------------------------------------------------------------------------------
# backends


def _tokenizer_with_template(location: str, revision: str | None, template: str | None) -> Any:
    from polyfuse.corpus.chat import ensure_chat_template
    from polyfuse.models import load_tokenizer, resolve_model_ref

    resolved = resolve_model_ref(location, revision=revision, kind="tokenizer")
    tokenizer = load_tokenizer(resolved)
    ensure_chat_template(tokenizer, None if getattr(tokenizer, "chat_template", None) else template)
    return tokenizer


class HFBackend:
    """Batched Hugging Face ``generate`` with left padding; decodes only the new tokens."""

    def __init__(self, spec: SourceSpec, *, device: str = "auto", dtype: str = "auto"):
        from polyfuse.models import load_model, resolve_model_ref

        self.tokenizer = _tokenizer_with_template(spec.model, spec.revision, spec.chat_template)
        self.tokenizer.padding_side = "left"
        self.model = load_model(resolve_model_ref(spec.model, revision=spec.revision), device=device, dtype=dtype)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any) -> HFBackend:
        """A backend over a model already in memory (e.g. one being trained); ``tokenizer`` is copied, so the
        caller's padding side is left alone."""
        import copy

        backend = cls.__new__(cls)
        backend.tokenizer = copy.deepcopy(tokenizer)
        backend.tokenizer.padding_side = "left"
        backend.model = model
        return backend

    def encode(self, prompt: list[dict[str, str]]) -> list[int]:
        """Token ids of the prompt rendered by the chat template with the generation prompt (as in training)."""
        return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"])

    def generate(self, prompts: Sequence[list[dict[str, str]]], params: SamplingParams, seed: int
                 ) -> list[list[str]]:
        """``params.n`` responses per prompt, in prompt order."""
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        batch = tok.pad({"input_ids": [self.encode(p) for p in prompts]}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}  # input_ids, attention_mask: [B, T]
        greedy = params.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy, num_return_sequences=params.n, max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            **({} if greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}))
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**batch, generation_config=config)  # [B * n, T + new]
        texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [[t.strip() for t in texts[i * params.n:(i + 1) * params.n]] for i in range(len(prompts))]


def continue_texts(model: Any, tokenizer: Any, prompts: Sequence[str], params: SamplingParams, *, seed: int,
                   batch_size: int = 16) -> list[str]:
    """One sampled continuation of each plain-text prompt (no chat template), in prompt order.

    Batched ``generate`` with left padding; batch ``i`` is seeded with ``batch_seed(seed, "continue", i)``, so
    the same model, prompts, batch size and seed give the same texts on CPU. Generation stops at the end token.
    """
    import copy

    import torch
    from transformers import GenerationConfig

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    greedy = params.temperature == 0
    config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **({} if greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}))
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        batch = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        torch.manual_seed(batch_seed(seed, "continue", i // batch_size))
        with torch.no_grad():
            ids = model.generate(**batch, generation_config=config)
        out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


class VLLMBackend:
    """``vllm.LLM.chat`` with per-request seeds (optional extra, needs a GPU; tested here only against a
    stand-in of vLLM's API, see tests/test_implicit_sample.py)."""

    def __init__(self, spec: SourceSpec, *, device: str = "auto", dtype: str = "auto"):
        try:
            from vllm import LLM
        except ImportError:
            raise PolyfuseError("sample.backend=vllm needs the vllm package (pip install vllm, on a CUDA "
                                "machine); or use sample.backend=hf") from None
        from polyfuse.models import resolve_model_ref

        self.tokenizer = _tokenizer_with_template(spec.model, spec.revision, spec.chat_template)
        resolved = resolve_model_ref(spec.model, revision=spec.revision)
        self.llm = LLM(model=resolved.location, revision=resolved.revision, dtype=dtype)

    def generate(self, prompts: Sequence[list[dict[str, str]]], params: SamplingParams, seed: int
                 ) -> list[list[str]]:
        from vllm import SamplingParams as VParams

        vparams = VParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                          repetition_penalty=params.repetition_penalty, max_tokens=params.max_new_tokens, seed=seed)
        outputs = self.llm.chat(list(prompts), vparams, chat_template=self.tokenizer.chat_template, use_tqdm=False)
        return [[c.text.strip() for c in o.outputs] for o in outputs]


def make_backend(name: str, spec: SourceSpec, *, device: str = "auto", dtype: str = "auto") -> Backend:
    """The backend ``name`` (``hf`` or ``vllm``) loaded for one source."""
    if name == "hf":
        return HFBackend(spec, device=device, dtype=dtype)
    if name == "vllm":
        return VLLMBackend(spec, device=device, dtype=dtype)
    raise PolyfuseError(f"sample.backend={name!r}: choose hf (default) or vllm")
