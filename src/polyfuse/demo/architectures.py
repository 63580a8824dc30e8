"""Tiny model configurations, described as data: one row of keyword arguments per architecture."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


def _round_up(x: float, multiple: int = 32) -> int:
    return int(-(-x // multiple) * multiple)


def tiny_config(arch: str, *, vocab_size: int, hidden: int, layers: int, heads: int, context: int,
                bos_token_id: int, eos_token_id: int, pad_token_id: int) -> PretrainedConfig:
    """A small ``transformers`` config of model type ``arch`` (gpt2, gpt_neox, mpt, qwen2, mistral, llama)."""
    swiglu = _round_up(8 * hidden / 3)
    table: dict[str, dict] = {
        "gpt2": dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, max_position_embeddings=context,
                         tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0),
        "mpt": dict(d_model=hidden, n_layers=layers, n_heads=heads, max_seq_len=context, expansion_ratio=4),
        "qwen2": dict(hidden_size=hidden, intermediate_size=swiglu, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=context, tie_word_embeddings=True),
        "mistral": dict(hidden_size=hidden, intermediate_size=swiglu, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                        max_position_embeddings=context, tie_word_embeddings=True, sliding_window=None),
        "llama": dict(hidden_size=hidden, intermediate_size=swiglu, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=context, tie_word_embeddings=True),
    }
    if arch not in table:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(table)}")
    return AutoConfig.for_model(arch, vocab_size=vocab_size, bos_token_id=bos_token_id,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, **table[arch])
