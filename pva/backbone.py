"""The frozen latent-diffusion backbone: Stable Diffusion 2 inpainting (METHOD section 2).

Everything here loads from a local diffusers folder (or a hub id that is already in the user's
Hugging Face cache); nothing is ever downloaded. :func:`build_tiny_backbone` builds the very same
classes with random weights and small widths, and :meth:`Backbone.save_pretrained` writes them in
the SD2-inpainting folder layout, so tests load them back through :func:`load_backbone`.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pva.fileio import atomic_dir

SD2_INPAINT_HUB_ID = "stabilityai/stable-diffusion-2-inpainting"
VAE_SCALING_FACTOR = 0.18215
"""Latent scaling of the SD2 VAE (METHOD section 2)."""

DOWNLOAD_HINT = (
    "Download Stable Diffusion 2 inpainting on a machine with internet access, e.g. "
    f"`huggingface-cli download {SD2_INPAINT_HUB_ID} --local-dir ./sd2-inpainting` "
    "(accept the model licence on its hub page first), copy the folder here and pass its path."
)

# The UNet of stabilityai/stable-diffusion-2-inpainting (unet/config.json). Used to build the real
# architecture on the `meta` device for parameter and FLOP counts, with no weights.
SD2_INPAINT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 9,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),  # diffusers' legacy name: these are head COUNTS
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": False,
}

# The VAE and text encoder of stabilityai/stable-diffusion-2-inpainting (vae/config.json,
# text_encoder/config.json: OpenCLIP ViT-H's text tower as transformers' CLIPTextModel, 23 layers
# as SD2 uses it, the penultimate layer of OpenCLIP's 24).
SD2_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD2_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
SD2_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# Required files per component: (subfolder, config file, accepted weight files).
_COMPONENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "unet",
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    ),
    (
        "vae",
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    ),
    ("text_encoder", "config.json", ("model.safetensors", "pytorch_model.bin")),
    ("scheduler", "scheduler_config.json", ()),
)


class BackboneNotFoundError(FileNotFoundError):
    """A backbone folder is missing or incomplete; the message says what and where to get it."""


@dataclass
class Backbone:
    """The frozen SD2-inpainting components PVA is built on.

    Attributes:
        vae: Image autoencoder; latents are ``scaling_factor * vae.encode(x).latent_dist``.
        text_encoder: CLIP text transformer (SD2: OpenCLIP ViT-H, 1024-d tokens).
        tokenizer: CLIP BPE tokenizer, ``model_max_length`` tokens (77).
        unet: 9-channel inpainting UNet (noisy latent 4 + mask 1 + masked-image latent 4).
        scheduler: DDIM scheduler holding the training noise schedule.
    """

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler

    @property
    def scaling_factor(self) -> float:
        """VAE latent scaling factor (0.18215 for SD2)."""
        return float(getattr(self.vae.config, "scaling_factor", VAE_SCALING_FACTOR))

    @property
    def vae_downsample(self) -> int:
        """Spatial factor between image and latent (8 for SD2)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def stock_pipeline(self) -> Any:
        """Diffusers' own ``StableDiffusionInpaintPipeline`` on these components.

        No safety checker, progress bar off: the baseline PVA's sampler is compared with.
        """
        from diffusers import StableDiffusionInpaintPipeline

        pipe = StableDiffusionInpaintPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the components as a diffusers SD2-inpainting folder, atomically.

        The folder is written under a temporary name beside ``path`` and renamed when complete,
        so a crash never leaves a half-written backbone behind.

        Args:
            path: Destination folder.
            overwrite: Replace an existing non-empty folder.

        Returns:
            The destination path.

        Raises:
            FileExistsError: ``path`` exists, is not empty, and ``overwrite`` is false.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
        with atomic_dir(path) as tmp:
            self.unet.save_pretrained(tmp / "unet")
            self.vae.save_pretrained(tmp / "vae")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.scheduler.save_pretrained(tmp / "scheduler")
            import diffusers

            index = {
                "_class_name": "StableDiffusionInpaintPipeline",
                "_diffusers_version": diffusers.__version__,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        return path


def model_resolution(unet: UNet2DConditionModel, vae: AutoencoderKL) -> int:
    """Image side the UNet was trained at: latent ``sample_size`` x the VAE factor (512, SD2)."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def _missing_files(folder: Path) -> list[str]:
    """List what a SD2-inpainting folder lacks (relative paths), empty when complete."""
    missing = []
    for sub, config, weights in _COMPONENTS:
        if not (folder / sub / config).is_file():
            missing.append(f"{sub}/{config}")
        if weights and not any((folder / sub / w).is_file() for w in weights):
            missing.append(f"{sub}/{weights[0]} (or {sub}/{weights[1]})")
    tok = folder / "tokenizer"
    has_fast = (tok / "tokenizer.json").is_file()
    has_bpe = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    if not (has_fast or has_bpe):
        missing.append("tokenizer/vocab.json + tokenizer/merges.txt (or tokenizer/tokenizer.json)")
    return missing


def resolve_backbone_path(path_or_id: str | os.PathLike) -> Path:
    """Turn a local folder or a cached hub id into a local folder, without any download.

    Args:
        path_or_id: A local diffusers folder, or a hub id (``org/name``) already downloaded into
            the Hugging Face cache.

    Returns:
        The local folder.

    Raises:
        BackboneNotFoundError: Neither a folder nor a cached hub id.
    """
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    text = str(path_or_id)
    if text.count("/") == 1 and not p.exists() and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - any cache miss becomes one clear message
            raise BackboneNotFoundError(
                f"backbone '{text}' is neither a local folder nor a hub id in the local Hugging "
                f"Face cache ({type(err).__name__}). Nothing is downloaded at run time. "
                + DOWNLOAD_HINT
            ) from None
    raise BackboneNotFoundError(f"backbone folder '{text}' does not exist. " + DOWNLOAD_HINT)


def load_backbone(
    path_or_id: str | os.PathLike, torch_dtype: torch.dtype = torch.float32
) -> Backbone:
    """Load VAE, text encoder, tokenizer, 9-channel UNet and DDIM scheduler from a local folder.

    Args:
        path_or_id: A diffusers folder in the SD2-inpainting layout (``unet/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``), or a hub id already in the local
            Hugging Face cache.
        torch_dtype: Dtype of the loaded weights.

    Returns:
        The backbone, in eval mode, with every parameter frozen (``requires_grad=False``).

    Raises:
        BackboneNotFoundError: The folder is missing or incomplete (the message lists each
            missing file and where to get the model).
        ValueError: The UNet is not an inpainting UNet, or widths do not match.
    """
    folder = resolve_backbone_path(path_or_id)
    missing = _missing_files(folder)
    if missing:
        raise BackboneNotFoundError(
            f"backbone folder '{folder}' is incomplete; missing: {', '.join(missing)}. "
            + DOWNLOAD_HINT
        )
    in_channels = json.loads((folder / "unet" / "config.json").read_text()).get("in_channels")
    if in_channels != 9:
        raise ValueError(
            f"'{folder}/unet' has in_channels={in_channels}; PVA needs an inpainting UNet with 9 "
            f"input channels (latent 4 + mask 1 + masked-image latent 4), e.g. {SD2_INPAINT_HUB_ID}"
        )
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", torch_dtype=torch_dtype, **kw
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch_dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", torch_dtype=torch_dtype, **kw
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(
            f"'{folder}': text encoder width {text_encoder.config.hidden_size} != UNet "
            f"cross_attention_dim {unet.config.cross_attention_dim}"
        )
    backbone = Backbone(vae, text_encoder, tokenizer, unet, scheduler)
    freeze_(backbone)
    return backbone


def freeze_(backbone: Backbone) -> None:
    """Put every backbone module in eval mode with gradients off (in place)."""
    for module in (backbone.vae, backbone.text_encoder, backbone.unet):
        module.eval()
        module.requires_grad_(False)


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Build the CLIP BPE tokenizer offline from the vocabulary that open_clip ships.

    The vocabulary and merges are those of OpenAI CLIP / OpenCLIP (49408 tokens), the same as
    SD2's tokenizer, including SD2's pad token ``!``.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=model_max_length,
        pad_token="!",
    )


def build_tiny_backbone(
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    vae_channels: tuple[int, ...] = (16, 32, 32),
    text_layers: int = 2,
) -> Backbone:
    """Build the SD2-inpainting classes with random weights and small widths.

    The UNet keeps SD2's structure in miniature (cross-attention down blocks, a plain last down
    block, a cross-attention mid block, 9 input channels, linear projections, 4 ``attn2`` layers
    with the defaults). With the default VAE a 64x64 image has a 16x16 latent.

    Args:
        seed: Seed for the random weights.
        block_out_channels: UNet widths per level; each level has ``c // 16`` heads of width 16.
        cross_attention_dim: Text/identity token width (SD2: 1024).
        vae_channels: VAE widths; the downsampling factor is ``2 ** (len - 1)``.
        text_layers: Text transformer depth.

    Returns:
        A frozen backbone in eval mode.
    """
    torch.manual_seed(seed)
    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        attention_head_dim=tuple(c // 16 for c in block_out_channels),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
    )
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(**SD2_SCHEDULER_CONFIG)
    backbone = Backbone(vae, text_encoder, tokenizer, unet, scheduler)
    freeze_(backbone)
    return backbone


def build_sd2_backbone(seed: int = 0) -> Backbone:
    """The exact SD2-inpainting architecture with random weights (about 1.3 B parameters).

    UNet, VAE and text encoder as ``stabilityai/stable-diffusion-2-inpainting`` configures them,
    the CLIP tokenizer from open_clip's vocabulary, SD2's noise schedule. For shape, memory and
    speed checks (``pva rehearse``, the GPU script); the images it makes are noise.
    """
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **SD2_TEXT_CONFIG,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    backbone = Backbone(
        AutoencoderKL(**SD2_VAE_CONFIG),
        text_encoder,
        tokenizer,
        UNet2DConditionModel(**SD2_INPAINT_UNET_CONFIG),
        DDIMScheduler(**SD2_SCHEDULER_CONFIG),
    )
    freeze_(backbone)
    return backbone
