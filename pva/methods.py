"""The evaluation methods of ``pva evaluate``, as a registry (METHOD section 8).

Adding a method is one :func:`register_method` call: :func:`pva.evaluate.evaluate` reads how it
conditions and fine-tunes from its :class:`Method`, and ``pva evaluate --help`` lists it. No
torch here, so the CLI can list the methods without loading models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    """An evaluation method: how it conditions and whether it fine-tunes per person.

    Args:
        name: ``--methods`` name and output folder.
        help: One line for ``pva evaluate --help``.
        identity: Sample with the references' identity tokens.
        token: Prompts carry the modifier token (``photo of a <new1> person``); otherwise
            ``photo of a person``.
        variant: Personalization variant (:func:`pva.personalize.trainable_for`) fine-tuned per
            person before sampling; ``None``: no fine-tuning.
        schedule: ``ft``: ``--ft-steps`` at ``--ft-lr``; ``cd``: Custom Diffusion's
            ``--cd-steps`` at ``--cd-lr`` with ``--prior-data``, ``--cd-eval-steps`` and the
            variant ``--cd-params`` selects.
    """

    name: str
    help: str
    identity: bool = True
    token: bool = True
    variant: str | None = None
    schedule: Literal["ft", "cd"] = "ft"


METHODS: dict[str, Method] = {}
"""Every evaluation method, by name; :func:`register_method` adds one."""


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (so ``pva evaluate --methods`` takes it)."""
    METHODS[method.name] = method
    return method


for _method in (
    Method("sd-inpaint", "the frozen backbone, no references", identity=False, token=False),
    Method("pva", "zero-shot PVA"),
    Method("pva-ft40", "PVA-FT: visual Q/K/V + token, --ft-steps", variant="pva"),
    Method("crossqkv-ft40", "CrossQKV-FT: + every cross-attention weight", variant="crossqkv"),
    Method(
        "custom-diffusion",
        "the baseline: cross-attention + token, no identity tokens",
        identity=False,
        variant="custom-diffusion",
        schedule="cd",
    ),
):
    register_method(_method)
