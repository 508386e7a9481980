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


EDIT_SUFFIXES = (
    "laughing",
    "serious",
    "smiling",
    "looking sad",
    "angry",
    "surprised",
    "has beard",
    "with heavy makeup",
    "wearing lipstick",
    "making a funny face",
    "putting the tongue out",
    "singing with a microphone",
    "smoking, has a cigarette",
    "wearing eyeglasses",
    "wearing sunglasses",
)
"""The 15 editing prompts of METHOD section 8 (``lib/dataset.py:11-27``):
``photo of a <new1> person, <suffix>`` (:func:`edit_prompt`)."""


def edit_prompt(suffix: str, token: str | None = MODIFIER_TOKEN) -> str:
    """An editing prompt: ``photo of a <token> person, <suffix>``.

    Without a token, ``photo of a person, <suffix>``: for methods without one, and the text the
    CLIP score compares an edit with.
    """
    return f"{conditional_prompt(token) if token else UNCOND_PROMPT}, {suffix}"
