"""The model card (README.md) written next to a merged model: inputs, method, parameters, config."""

from __future__ import annotations

from collections.abc import Sequence

import yaml

__all__ = ["model_card"]


def model_card(*, name: str, method: str, pretty_name: str, reference: str, base: str | None,
               inputs: Sequence[tuple[str, dict]], seed: int, config_yaml: str, notes: Sequence[str] = ()) -> str:
    """Markdown model card with a Hugging Face metadata header.

    Args:
        inputs: (model reference, its resolved parameters for a typical tensor) per merged input.
        notes: extra lines for the method section (e.g. the SCE variant).
    """
    header = {"library_name": "transformers", "tags": ["merge", "polyfuse", method],
              "base_model": [ref for ref in ([base] if base else []) + [r for r, _ in inputs]]}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"This model was merged with `polyfuse merge` using **{pretty_name}** ({reference}).", ""]
    lines += ["## Inputs", "", "| role | model | parameters |", "| --- | --- | --- |"]
    if base:
        lines.append(f"| base | `{base}` | |")
    for ref, params in inputs:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"| merged | `{ref}` | {shown} |")
    lines += ["", "## Method", "", f"- method: `{method}`", f"- seed: {seed}", *[f"- {n}" for n in notes], ""]
    lines += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
