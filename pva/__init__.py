"""Parallel Visual Attention (PVA): identity-preserving face inpainting with latent diffusion.

Public API::

    from pva import PVAModel, PVAConfig, load_backbone, load_iresnet, save_adapter, load_adapter
    from pva import PVAInpaintPipeline
    from pva import load_pva_into  # into diffusers' StableDiffusionInpaintPipeline

The names load on first use, so importing one layer (say ``pva.model``, the method core) never
imports a higher one (``pva.pipeline``, an application; see ``tests/test_layers.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterMismatchError": "pva.adapter",
    "load_adapter": "pva.adapter",
    "read_adapter": "pva.adapter",
    "save_adapter": "pva.adapter",
    "DecoupledAttnProcessor": "pva.attention",
    "PVAAttnProcessor": "pva.attention",
    "install_pva": "pva.attention",
    "set_attention_impl": "pva.attention",
    "Backbone": "pva.backbone",
    "BackboneNotFoundError": "pva.backbone",
    "build_tiny_backbone": "pva.backbone",
    "load_backbone": "pva.backbone",
    "IdentityEncoder": "pva.identity",
    "IdentityProjection": "pva.identity",
    "IResNet": "pva.identity",
    "iresnet": "pva.identity",
    "load_iresnet": "pva.identity",
    "PVAConfig": "pva.model",
    "PVAModel": "pva.model",
    "PVAInpaintPipeline": "pva.pipeline",
    "TEMPLATE": "pva.prompts",
    "UNCOND_PROMPT": "pva.prompts",
    "ddim_inpaint": "pva.sampling",
    "load_pva_into": "pva.stock",
    "ModifierToken": "pva.token",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pva' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
