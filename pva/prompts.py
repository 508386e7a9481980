"""The prompts of PVA and its modifier token, in one place (METHOD sections 5, 6, 8)."""

from __future__ import annotations

MODIFIER_TOKEN = "<new1>"
"""The learned prompt token's default spelling (``PVAConfig.modifier_token`` may change it)."""
TEMPLATE = "photo of a {} person"
"""Prompt template; ``TEMPLATE.format(MODIFIER_TOKEN)`` is the paper's conditional prompt."""
UNCOND_PROMPT = "photo of a person"
"""Prompt of the unconditional branch in inpainting mode (METHOD section 8)."""


def conditional_prompt(token: str = MODIFIER_TOKEN, caption: str | None = None) -> str:
    """``photo of a <token> person``, with ``. <caption>`` appended when one is given."""
    prompt = TEMPLATE.format(token)
    return f"{prompt}. {caption}" if caption else prompt
