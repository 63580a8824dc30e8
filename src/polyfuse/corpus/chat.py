"""Chat templates: the one polyfuse gives a tokenizer that has none, and how it is set.

Training (SFT / DPO / WRPO), sampling and the rendering of chat documents all use these, so every stage
renders a conversation the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.errors import PolyfuseError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ensure_chat_template"]

#: The chat template polyfuse sets on a tokenizer that has none. Plain text, no new tokens (so no
#: embedding resize), the tokenizer's own ``eos_token`` after each answer so the model learns to stop, and
#: ``{% generation %}`` markers so TRL can train on the assistant tokens only::
#:
#:     ### System:\n{system}\n\n### User:\n{question}\n\n### Assistant:\n{answer}<eos>
#:
#: With ``add_generation_prompt`` the prompt ends in ``"### Assistant:\n"``; the answer follows the newline,
#: which byte-level and metaspace tokenizers keep as a token boundary.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\n\n' }}{% endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\n### Assistant:\n' }}{%- endif -%}"
)


def ensure_chat_template(tokenizer: Any, template: str | None = None) -> bool:
    """Give ``tokenizer`` a chat template: ``template`` if given (Jinja text or a ``.jinja`` file path), else
    :data:`DEFAULT_CHAT_TEMPLATE` when it has none. Also sets ``pad_token`` to ``eos_token`` if unset.

    Returns whether the template was changed.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if template is not None:
        path = Path(template)
        if template.endswith((".jinja", ".j2")):
            if not path.is_file():
                raise PolyfuseError(f"chat template file {template!r} does not exist; give a .jinja path or the "
                                    "template text")
            template = path.read_text(encoding="utf-8")
        tokenizer.chat_template = template
        return True
    if getattr(tokenizer, "chat_template", None):
        return False
    if tokenizer.eos_token is None:
        raise PolyfuseError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template and no "
                            "eos_token; set chat_template (Jinja text or a .jinja file) in the training config")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True
