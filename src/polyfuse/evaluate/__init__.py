"""Evaluation: tokenizer-neutral bits per byte by domain (more metrics and reports live beside it)."""

from polyfuse.evaluate.bpb import (
    BpbResult,
    Window,
    bits_per_byte,
    evaluate_bpb,
    format_bpb_table,
    load_domain_texts,
    plan_windows,
    score_token_windows,
)

__all__ = [
    "BpbResult",
    "Window",
    "bits_per_byte",
    "evaluate_bpb",
    "format_bpb_table",
    "load_domain_texts",
    "plan_windows",
    "score_token_windows",
]
