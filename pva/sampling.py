"""DDIM inpainting with PVA and classifier-free guidance in one batched UNet call (METHOD 8)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from pva.model import PVAModel
from pva.prompts import UNCOND_PROMPT

Mode = Literal["inpaint", "edit"]


@torch.no_grad()
def ddim_inpaint(
    model: PVAModel,
    images: Tensor,
    masks: Tensor,
    references: Tensor | None,
    prompts: Sequence[str],
    negative_prompt: str = UNCOND_PROMPT,
    guidance_scale: float = 6.0,
    num_steps: int = 100,
    eta: float = 1.0,
    mode: Mode = "inpaint",
    generator: torch.Generator | None = None,
    reference_mask: Tensor | None = None,
    paste_back: bool = False,
    progress: bool = False,
    identity_tokens: Tensor | None = None,
) -> Tensor:
    """Fill ``masks`` in ``images`` with DDIM, conditioned on text and reference photos.

    With ``guidance_scale > 1`` the conditional and unconditional branches run as ONE UNet call
    of batch 2B: the unconditional rows carry the identity tokens too but, in ``inpaint`` mode,
    ignore them through the attention's per-row identity mask (METHOD section 8: the
    unconditional branch is plain SD2-inpainting with ``photo of a person``). In ``edit`` mode
    both branches use the identity tokens. Identity tokens are computed once, not per step.

    Args:
        model: The PVA model (eval mode).
        images: (B, 3, H, W) in [-1, 1].
        masks: (B, 1, H, W), 1 = region to fill.
        references: (B, K, 3, h, w) in [-1, 1], or ``None`` for the plain backbone.
        prompts: B prompts, e.g. ``photo of a <new1> person``.
        negative_prompt: Prompt of the unconditional branch.
        guidance_scale: CFG scale; 1 runs the conditional branch only.
        num_steps: DDIM steps (paper: 100).
        eta: DDIM eta (paper: 1.0).
        mode: ``inpaint`` or ``edit`` (see above).
        generator: Randomness (initial noise, VAE sample, DDIM noise).
        reference_mask: Optional (B, K) bool validity of references.
        paste_back: Copy the input's pixels outside the mask into the output.
        progress: Show a progress bar over steps.
        identity_tokens: (B, n_id, D) precomputed identity tokens (then ``references`` is
            ignored), e.g. one encoder pass reused for several outputs.

    Returns:
        (B, 3, H, W) in [-1, 1].
    """
    if mode not in ("inpaint", "edit"):
        raise ValueError(f"mode must be 'inpaint' or 'edit', got {mode!r}")
    device, b = model.device, images.shape[0]
    images, masks = images.to(device), masks.to(device)
    scheduler = model.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    # The random draws come in diffusers' order (the initial noise, then the masked photo's VAE
    # sample, then each DDIM step's noise), so a seed gives the same picture here and in its
    # StableDiffusionInpaintPipeline (pva.stock).
    f = model.vae_downsample
    shape = (b, model.unet.config.out_channels, images.shape[-2] // f, images.shape[-1] // f)
    latents = torch.randn(shape, generator=generator, device=device, dtype=model.latent_dtype)
    latents = latents * scheduler.init_noise_sigma  # (B, 4, h, w)
    mask_latent, masked_latent = model.inpaint_conditioning(images, masks, generator)
    text = model.encode_prompt(list(prompts))  # (B, 77, D)
    ident = identity_tokens
    if ident is None and references is not None:
        ident = model.encode_identity(references, reference_mask)  # once per run, not per step
    cfg = guidance_scale != 1.0
    identity_mask = None
    if cfg:
        text = torch.cat([model.encode_prompt([negative_prompt] * b), text])  # (2B, 77, D)
        mask_latent, masked_latent = (
            mask_latent.repeat(2, 1, 1, 1),
            masked_latent.repeat(2, 1, 1, 1),
        )
        if ident is not None:
            ident = ident.repeat(2, 1, 1)  # (2B, n_id, D)
            if mode == "inpaint":
                identity_mask = torch.arange(2 * b, device=device) >= b  # uncond rows: no identity

    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="DDIM", leave=False)
    for t in steps:
        x = torch.cat([latents, latents]) if cfg else latents
        eps = model.predict_noise(x, t, mask_latent, masked_latent, text, ident, identity_mask)
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    out = model.decode_latents(latents)  # (B, 3, H, W)
    if paste_back:
        out = torch.where(masks > 0.5, out, images)
    return out
