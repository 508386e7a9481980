"""``PVAModel``: the frozen SD2-inpainting backbone with the PVA pathway (a plain ``nn.Module``).

Trainable parts (all else is frozen, in eval mode, and never in an optimizer):

* ``unet.*.attn2.processor.to_{q,k,v}_pva`` (or ``to_{k,v}_ip``): the parallel projections;
* ``identity_encoder.projection``: the identity-token transformer;
* ``modifier_token.embedding``: the ``<new1>`` vector;
* ``identity_encoder.backbone`` in stage 2 only (``train_face_backbone``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from pva.attention import (
    AttentionImpl,
    Variant,
    identity_processors,
    install_pva,
    set_attention_impl,
)
from pva.backbone import Backbone, load_backbone
from pva.checks import NONNEGATIVE, POSITIVE, POSITIVE_INT, Range, check_ranges
from pva.face_encoders import encoder_kind_of, face_model_source, load_face_encoder
from pva.identity import FaceCrop, IdentityEncoder, IdentityProjection, IResNet
from pva.prompts import MODIFIER_TOKEN
from pva.token import ModifierToken

CONFIG_RANGES = {
    "decoupled_scale": NONNEGATIVE,
    "num_identity_tokens": POSITIVE_INT,
    "projection_layers": POSITIVE_INT,
    "projection_heads": POSITIVE_INT,
    "projection_ffn": POSITIVE_INT,
    "projection_dropout": Range(0, 1),
    "projection_query_std": POSITIVE,
}
"""The allowed range of each numeric :class:`PVAConfig` field (``model.pva.*`` in configs)."""


@dataclass
class PVAConfig:
    """Architecture of the PVA pathway (METHOD sections 3-5)."""

    variant: Variant = "pva"
    """``pva``: joint softmax with its own query (the paper). ``decoupled``: IP-Adapter-style
    ablation (shared query, separate softmax, ``decoupled_scale``)."""
    attention_impl: AttentionImpl = "fused"
    """``fused``: one scaled_dot_product_attention call. ``reference``: the equation written out.
    Same parameters and results."""
    decoupled_scale: float = 1.0
    """Identity-attention weight of the ``decoupled`` variant."""
    num_identity_tokens: int = 10
    """Identity tokens per sample, in total (not per reference)."""
    projection_layers: int = 4
    """Transformer layers of the identity projection."""
    projection_heads: int = 8
    """Attention heads of the identity projection (must divide the cross-attention width)."""
    projection_ffn: int = 2048
    """Feed-forward width of the identity projection."""
    projection_dropout: float = 0.1
    """Dropout inside the identity projection."""
    projection_query_std: float = 1.0
    """Standard deviation of the projection's learnable queries at initialisation [ours: METHOD is
    silent; 1 is ``torch.randn``]. Queries as large as the face embeddings make the fresh tokens
    mostly person-independent, a bias the pathway must first unlearn; ``configs/demo.yaml`` uses
    0.125 (the measurements: BENCHMARKS.md, "Why the zero-shot claim was fragile")."""
    face_crop: FaceCrop = "celebahq"
    """Recognizer preprocessing: ``celebahq`` (resize 256, crop [35:223, 32:220], pool to 112:
    for FFHQ/CelebA-HQ-aligned photos) or ``none`` (inputs are already aligned face crops)."""
    modifier_token: str = MODIFIER_TOKEN
    """The learned prompt token."""
    initializer_token: str = "person"
    """Single-token word whose embedding initialises the modifier token [ours: METHOD is silent;
    "person" makes the initial prompt "photo of a person person", a neutral start]."""
    train_face_backbone: bool = False
    """Fine-tune the face recognizer's weights (stage 2); it stays in eval mode."""

    def __post_init__(self) -> None:
        check_ranges("model.pva.", vars(self), CONFIG_RANGES)


class PVAModel(nn.Module):
    """SD2-inpainting with Parallel Visual Attention.

    Args:
        backbone: The frozen backbone (PVA processors are installed into its UNet in place).
        face_backbone: The face recognizer of the identity encoder.
        config: Architecture options.
    """

    def __init__(
        self, backbone: Backbone, face_backbone: nn.Module, config: PVAConfig | None = None
    ):
        super().__init__()
        self.config = config = config or PVAConfig()
        if config.train_face_backbone and not isinstance(face_backbone, IResNet):
            raise ValueError(
                "model.pva.train_face_backbone (stage 2) trains an arcface_torch IResNet; the "
                f"'{encoder_kind_of(face_backbone)}' face encoder is frozen: use a .pth face_model"
            )
        self.source_paths: dict[str, str] | None = None  # set by from_paths
        self.vae = backbone.vae
        self.text_encoder = backbone.text_encoder
        self.unet = backbone.unet
        self.tokenizer = backbone.tokenizer
        self.scheduler = backbone.scheduler
        self.scaling_factor = backbone.scaling_factor
        for module in (self.vae, self.text_encoder, self.unet):
            module.eval().requires_grad_(False)
        self.num_text_tokens = int(self.tokenizer.model_max_length)
        width = int(self.unet.config.cross_attention_dim)
        self.modifier_token = ModifierToken(width, config.modifier_token)
        self.modifier_token.attach(self.tokenizer, self.text_encoder, config.initializer_token)
        self.text_encoder.requires_grad_(False)
        install_pva(
            self.unet,
            self.num_text_tokens,
            variant=config.variant,
            impl=config.attention_impl,
            decoupled_scale=config.decoupled_scale,
        )
        projection = IdentityProjection(
            embed_dim=face_backbone.num_features,
            token_dim=width,
            num_tokens=config.num_identity_tokens,
            num_layers=config.projection_layers,
            num_heads=config.projection_heads,
            ffn_dim=config.projection_ffn,
            dropout=config.projection_dropout,
            query_std=config.projection_query_std,
        )
        self.identity_encoder = IdentityEncoder(
            face_backbone, projection, config.face_crop, config.train_face_backbone
        )
        self.frozen_dtype: torch.dtype | None = None  # set by hold_frozen_in

    @classmethod
    def from_paths(
        cls,
        backbone: str | os.PathLike,
        face_model: str | os.PathLike,
        config: PVAConfig | None = None,
        torch_dtype: torch.dtype = torch.float32,
    ) -> PVAModel:
        """Load the backbone folder and the conditioning face model and build the model.

        Args:
            backbone: SD2-inpainting diffusers folder (or cached hub id).
            face_model: The conditioning face encoder (:mod:`pva.face_encoders`): an
                arcface_torch IResNet ``.pth`` (e.g. ``ms1mv3_arcface_r50.pth``), an
                InsightFace-format ArcFace ``.onnx``, or ``dlib``.
            config: Architecture options.
            torch_dtype: Dtype of the frozen backbone weights.
        """
        model = cls(load_backbone(backbone, torch_dtype), load_face_encoder(face_model), config)
        local = Path(backbone).expanduser()
        model.source_paths = {
            "backbone": str(local.resolve()) if local.exists() else str(backbone),
            "face_model": face_model_source(face_model),
        }
        return model

    # ----------------------------------------------------------------- trainable parameters
    def train(self, mode: bool = True) -> PVAModel:
        """Train mode for the trainable parts only; the frozen backbone stays in eval mode."""
        super().train(mode)
        for module in (self.vae, self.text_encoder, self.unet):
            module.eval()
        self.identity_encoder.train(mode)
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimizer group.

        Groups: ``pva``, ``projection``, ``token``, and ``face_backbone`` when
        ``train_face_backbone``.
        """
        groups = {
            "pva": [p for _, proc in identity_processors(self.unet) for p in proc.parameters()],
            "projection": list(self.identity_encoder.projection.parameters()),
            "token": [self.modifier_token.embedding],
        }
        if self.config.train_face_backbone:
            groups["face_backbone"] = [
                p for p in self.identity_encoder.backbone.parameters() if p.requires_grad
            ]
        return groups

    def is_adapter_key(self, key: str) -> bool:
        """Whether a ``state_dict`` key belongs to the adapter (trainable weights)."""
        if key.startswith("unet.") and ".processor." in key:
            return True
        if key.startswith(("identity_encoder.projection.", "modifier_token.")):
            return True
        return self.config.train_face_backbone and key.startswith("identity_encoder.backbone.")

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights (plus face-backbone buffers in stage 2), detached."""
        return {k: v.detach() for k, v in self.state_dict().items() if self.is_adapter_key(k)}

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Switch the PVA attention between ``fused`` and ``reference``."""
        set_attention_impl(self.unet, impl)

    # ------------------------------------------------------------------ memory and speed
    def hold_frozen_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen VAE, text encoder and UNet weights in ``dtype`` (bf16 or fp16).

        The trainable parts (the PVA projections inside the UNet, the identity transformer,
        the token, a stage-2 face backbone) stay as they are, in fp32, and so does their
        optimizer state. The frozen networks then run under ``torch.autocast`` to ``dtype``
        (inside this model's own methods, so every caller gets it), while latents, noise, the
        loss and everything handed between the networks stay fp32.
        """
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"frozen weights can be held in bfloat16 or float16, not {dtype}")
        self.frozen_dtype = dtype
        frozen = ("vae.", "text_encoder.", "unet.")
        for name, tensor in chain(self.named_parameters(), self.named_buffers()):
            if name.startswith(frozen) and not self.is_adapter_key(name):
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(dtype)

    def _frozen_autocast(self) -> AbstractContextManager:
        """Autocast to :attr:`frozen_dtype` around a frozen network (a no-op when unset)."""
        device = self.device.type
        if self.frozen_dtype is None or torch.is_autocast_enabled(device):
            return nullcontext()
        return torch.autocast(device, dtype=self.frozen_dtype)

    def _out(self, x: Tensor) -> Tensor:
        """Hand a frozen network's output on in fp32 when its weights are held in half."""
        return x if self.frozen_dtype is None else x.float()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the frozen UNet's activations in the backward pass instead of storing them.

        diffusers' own checkpointing of every resnet and transformer block (non-reentrant), so
        the PVA projections inside them still get their gradients; same values, less memory,
        about one more UNet forward per step.
        """
        self.unet.enable_gradient_checkpointing()

    # ----------------------------------------------------------------------------- encoders
    @property
    def device(self) -> torch.device:
        """Device of the UNet.

        Read from its first parameter: diffusers' ``ModelMixin.device`` walks every submodule,
        and training asks for the device several times a step.
        """
        return next(self.unet.parameters()).device

    @property
    def vae_dtype(self) -> torch.dtype:
        """Dtype of the VAE weights (cheap, like :attr:`device`)."""
        return next(self.vae.parameters()).dtype

    @property
    def vae_downsample(self) -> int:
        """Spatial factor between image and latent (8 for SD2)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_dtype(self) -> torch.dtype:
        """Dtype of latents and noise: fp32 when frozen weights are held in half, else the VAE's."""
        return torch.float32 if self.frozen_dtype is not None else self.vae_dtype

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> (B, 77) token ids, padded and truncated to the text context length."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.num_text_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> (B, 77, D) text tokens (gradients reach only the modifier token)."""
        with self._frozen_autocast():
            return self._out(self.text_encoder(self.tokenize(prompts))[0])

    def encode_identity(self, references: Tensor, reference_mask: Tensor | None = None) -> Tensor:
        """(B, K, 3, H, W) reference photos in [-1, 1] -> (B, n_id, D) identity tokens."""
        dtype = next(self.identity_encoder.projection.parameters()).dtype
        return self.identity_encoder(references.to(self.device, dtype), reference_mask)

    def encode_moments(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 8, H/f, W/f) VAE posterior moments (mean, log-variance).

        Deterministic; :meth:`sample_latents` draws the latents from them. Fine-tuning encodes a
        photo's moments once and samples every step (:func:`pva.personalize.personalized`).
        """
        with self._frozen_autocast():
            posterior = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist
        return self._out(posterior.parameters)

    def sample_latents(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 8, h, w) posterior moments -> (B, 4, h, w) scaled latents, one draw."""
        return DiagonalGaussianDistribution(moments).sample(generator) * self.scaling_factor

    def encode_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/f, W/f) scaled VAE latents (sampled)."""
        return self.sample_latents(self.encode_moments(images), generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, H, W) images in [-1, 1]."""
        with self._frozen_autocast():
            images = self.vae.decode(latents / self.scaling_factor).sample
        return self._out(images).clamp(-1, 1)

    def inpaint_conditioning(
        self,
        images: Tensor,
        masks: Tensor,
        generator: torch.Generator | None = None,
        masked_moments: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mask and masked-image latent, the UNet's extra 5 input channels.

        Args:
            images: (B, 3, H, W) in [-1, 1].
            masks: (B, 1, H, W), 1 = region to fill.
            generator: Randomness of the VAE sample.
            masked_moments: (B, 8, h, w) :meth:`encode_moments` of the masked images, when the
                caller already has them (the VAE encoder is then not run).

        Returns:
            ``(mask_latent (B, 1, h, w), masked_latent (B, 4, h, w))``.
        """
        masks = masks.to(self.device, images.dtype)
        if masked_moments is None:
            masked = images.to(self.device) * (masks < 0.5)  # (B, 3, H, W), hole = 0 (grey)
            masked_moments = self.encode_moments(masked)  # (B, 8, h, w)
        masked_latent = self.sample_latents(masked_moments, generator)  # (B, 4, h, w)
        mask_latent = F.interpolate(masks, size=masked_latent.shape[-2:])  # (B, 1, h, w) nearest
        return mask_latent.to(masked_latent.dtype), masked_latent

    # ------------------------------------------------------------------------------- UNet
    def predict_noise(
        self,
        noisy_latents: Tensor,
        timesteps: Tensor,
        mask_latent: Tensor,
        masked_latent: Tensor,
        text_tokens: Tensor,
        identity_tokens: Tensor | None = None,
        identity_mask: Tensor | None = None,
    ) -> Tensor:
        """Epsilon prediction of the 9-channel inpainting UNet with PVA.

        Args:
            noisy_latents: (B, 4, h, w).
            timesteps: (B,) or scalar.
            mask_latent: (B, 1, h, w).
            masked_latent: (B, 4, h, w).
            text_tokens: (B, 77, D).
            identity_tokens: (B, n_id, D), or ``None`` for the plain backbone.
            identity_mask: (B,) bool; ``False`` rows ignore their identity tokens.

        Returns:
            (B, 4, h, w) predicted noise.
        """
        dtype = noisy_latents.dtype
        x = torch.cat([noisy_latents, mask_latent.to(dtype), masked_latent.to(dtype)], dim=1)
        ctx = text_tokens  # (B, 77, D); with identity tokens (B, 77 + n_id, D)
        if identity_tokens is not None:
            ctx = torch.cat([text_tokens, identity_tokens.to(text_tokens.dtype)], dim=1)
        kwargs = None if identity_mask is None else {"identity_mask": identity_mask}
        with self._frozen_autocast():
            eps = self.unet(x, timesteps, encoder_hidden_states=ctx, cross_attention_kwargs=kwargs)
        return self._out(eps[0])  # (B, 4, h, w)
