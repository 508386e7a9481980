"""``pva bench sample``: sampling cost vs diffusers, and personalization cost vs Custom Diffusion.

1. Seconds per DDIM step, classifier-free guidance on: PVA (ONE batched UNet call for both
   branches, identity tokens in the conditional rows) vs diffusers'
   ``StableDiffusionInpaintPipeline`` on the same backbone weights. Per-step cost is the slope
   between a short and a long run, so fixed costs (encoders, VAE) cancel.
2. Seconds for 40 PVA-FT steps (METHOD 7) vs ``cd_steps`` steps of a Custom-Diffusion-style
   fine-tune (cross-attention K/V + the token, no identity pathway), both measured in full.
"""

from __future__ import annotations

import time

import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from pva.backbone import build_tiny_backbone
from pva.model import TEMPLATE, PVAModel
from pva.personalize import personalized
from pva.sampling import ddim_inpaint
from pva.tiny import build_tiny_face_model, tiny_pva_config


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def custom_diffusion_steps(model: PVAModel, images: torch.Tensor, boxes, steps: int) -> float:
    """Seconds for ``steps`` Custom-Diffusion-style steps (attn2 K/V + token, no identity)."""
    named = dict(model.named_parameters())
    kv = [p for k, p in named.items() if ".attn2.to_k." in k or ".attn2.to_v." in k]
    saved = [(p, p.detach().clone()) for p in kv]
    for p in kv:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": kv, "lr": 1e-5},
                             {"params": [model.modifier_token.embedding], "lr": 1e-3}])  # fmt: skip
    n, size = images.shape[0], images.shape[-1]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        t = step % n
        x0, y0, x1, y1 = boxes[t]
        mask = torch.zeros(1, 1, size, size)
        mask[..., y0:y1, x0:x1] = 1
        with torch.no_grad():
            lat = model.encode_latents(images[t : t + 1], g)
            mask_lat, masked_lat = model.inpaint_conditioning(images[t : t + 1], mask, g)
        text = model.encode_prompt([TEMPLATE.format("<new1>")])
        ts = torch.randint(0, 1000, (1,), generator=g)
        noise = torch.randn(lat.shape, generator=g)
        pred = model.predict_noise(model.scheduler.add_noise(lat, noise, ts), ts, mask_lat,
                                   masked_lat, text)  # fmt: skip
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for p, value in saved:
            p.copy_(value)
            p.requires_grad_(False)
            p.grad = None
    return seconds


def bench_sample(steps: tuple[int, int] = (5, 25), cd_steps: int = 1000, guidance: float = 6.0):
    """Print both tables on the tiny backbone (CPU).

    Args:
        steps: Short and long DDIM runs; per-step time is their slope.
        cd_steps: Custom-Diffusion-style fine-tuning steps to time.
        guidance: Classifier-free guidance scale.
    """
    torch.manual_seed(0)
    size = 64
    pva = PVAModel(build_tiny_backbone(), build_tiny_face_model(), tiny_pva_config()).eval()
    plain = build_tiny_backbone()  # the same weights (same seed), stock processors
    sd = StableDiffusionInpaintPipeline(
        vae=plain.vae, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
        unet=plain.unet, scheduler=plain.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    sd.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., 16:48, 16:48] = 1
    refs = torch.rand(1, 5, 3, 112, 112, generator=g) * 2 - 1
    pil = Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy())
    pil_mask = Image.fromarray((mask[0, 0] * 255).byte().numpy())

    def run_pva(n: int) -> float:
        return _seconds(lambda: ddim_inpaint(pva, image, mask, refs, [TEMPLATE.format("<new1>")],
                                             guidance_scale=guidance, num_steps=n))  # fmt: skip

    def run_sd(n: int) -> float:
        return _seconds(lambda: sd(prompt="photo of a person", image=pil, mask_image=pil_mask,
                                   height=size, width=size, num_inference_steps=n,
                                   guidance_scale=guidance))  # fmt: skip

    with torch.no_grad():
        run_pva(2), run_sd(2)  # warm-up
        short, long = steps
        per = {}
        for name, fn in (("PVA, batched CFG (1 UNet call/step)", run_pva),
                         ("diffusers StableDiffusionInpaintPipeline", run_sd)):  # fmt: skip
            a, b = fn(short), fn(long)
            per[name] = (b - a) / (long - short)
    print(f"tiny backbone, {size} px, guidance {guidance}, CPU {torch.get_num_threads()} threads")
    print(f"\n  {'sampler':<44}{'ms / DDIM step':>16}{'ratio':>8}")
    base = per["diffusers StableDiffusionInpaintPipeline"]
    for name, sec in per.items():
        print(f"  {name:<44}{sec * 1e3:16.1f}{sec / base:8.2f}")

    images = torch.rand(5, 3, size, size, generator=g) * 2 - 1
    boxes = [(16, 16, 48, 48)] * 5
    references = torch.rand(5, 3, 112, 112, generator=g) * 2 - 1
    t0 = time.perf_counter()
    with personalized(pva, images, references, boxes, steps=40) as result:
        pva_seconds = time.perf_counter() - t0
    cd_seconds = custom_diffusion_steps(pva, images, boxes, cd_steps)
    print(f"\n  {'personalization':<44}{'steps':>8}{'seconds':>10}{'ratio':>8}")
    print(f"  {'PVA-FT (METHOD 7)':<44}{40:8d}{pva_seconds:10.1f}{1.0:8.2f}")
    print(f"  {'Custom-Diffusion-style (attn2 K/V + token)':<44}{cd_steps:8d}{cd_seconds:10.1f}"
          f"{cd_seconds / pva_seconds:8.2f}")  # fmt: skip
    return {"ms_per_step": {k: v * 1e3 for k, v in per.items()}, "pva_ft_s": pva_seconds,
            "cd_s": cd_seconds, "pva_ft_losses": result.losses}  # fmt: skip
