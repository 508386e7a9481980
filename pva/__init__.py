"""Parallel Visual Attention (PVA): identity-preserving face inpainting with latent diffusion.

Public API::

    from pva import PVAModel, PVAConfig, load_backbone, load_iresnet, save_adapter, load_adapter
"""

from pva.adapter import AdapterMismatchError, load_adapter, read_adapter, save_adapter
from pva.attention import (
    DecoupledAttnProcessor,
    PVAAttnProcessor,
    install_pva,
    set_attention_impl,
)
from pva.backbone import Backbone, BackboneNotFoundError, build_tiny_backbone, load_backbone
from pva.identity import IdentityEncoder, IdentityProjection, IResNet, iresnet, load_iresnet
from pva.model import TEMPLATE, UNCOND_PROMPT, PVAConfig, PVAModel
from pva.pipeline import PVAInpaintPipeline
from pva.sampling import ddim_inpaint
from pva.token import ModifierToken

__version__ = "0.1.0"
__all__ = [
    "AdapterMismatchError",
    "Backbone",
    "BackboneNotFoundError",
    "DecoupledAttnProcessor",
    "IResNet",
    "IdentityEncoder",
    "IdentityProjection",
    "ModifierToken",
    "PVAAttnProcessor",
    "PVAConfig",
    "PVAInpaintPipeline",
    "PVAModel",
    "TEMPLATE",
    "UNCOND_PROMPT",
    "build_tiny_backbone",
    "ddim_inpaint",
    "install_pva",
    "iresnet",
    "load_adapter",
    "load_backbone",
    "load_iresnet",
    "read_adapter",
    "save_adapter",
    "set_attention_impl",
]
