"""``pva bench sample``: sampling cost vs diffusers, and personalization cost vs Custom Diffusion.

1. Seconds per DDIM step, classifier-free guidance on: PVA (ONE batched UNet call for both
   branches, identity tokens in the conditional rows) vs diffusers'
   ``StableDiffusionInpaintPipeline`` on the same backbone weights. Per-step cost is the slope
   between a short and a long run, so fixed costs (encoders, VAE) cancel.
2. Seconds for 40 PVA-FT steps (METHOD 7) vs ``cd_steps`` steps of the Custom-Diffusion-style
   fine-tune (every cross-attention weight + the token, no identity pathway), both through
   :func:`pva.personalize.personalized` and measured in full, each with the frozen encoders'
   outputs reused (the default) and recomputed every step.
"""

from __future__ import annotations

import time

import torch
from PIL import Image

from pva.backbone import build_tiny_backbone
from pva.checks import GUIDANCE, POSITIVE_INT, check_ranges
from pva.model import PVAModel
from pva.personalize import personalized
from pva.prompts import TEMPLATE
from pva.sampling import ddim_inpaint
from pva.tiny import build_tiny_face_model, tiny_pva_config


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


RANGES = {
    "short": POSITIVE_INT,
    "long": POSITIVE_INT,
    "cd_steps": POSITIVE_INT,
    "guidance": GUIDANCE,
}


def bench_sample(short: int = 5, long: int = 25, cd_steps: int = 1000, guidance: float = 6.0):
    """Ms per DDIM step vs diffusers' inpainting pipeline; 40-step PVA-FT vs 1000-step CD.

    Both tables on the tiny backbone (CPU).

    Args:
        short: Steps of the short DDIM run; per-step time is the slope between the runs.
        long: Steps of the long DDIM run.
        cd_steps: Custom-Diffusion-style fine-tuning steps to time.
        guidance: Classifier-free guidance scale.
    """
    check_ranges("--", locals(), RANGES)
    steps = (short, long)
    torch.manual_seed(0)
    size = 64
    pva = PVAModel(build_tiny_backbone(), build_tiny_face_model(), tiny_pva_config()).eval()
    plain = build_tiny_backbone()  # the same weights (same seed), stock processors
    sd = plain.stock_pipeline()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., 16:48, 16:48] = 1
    refs = torch.rand(1, 5, 3, 112, 112, generator=g) * 2 - 1
    pil = Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy())
    pil_mask = Image.fromarray((mask[0, 0] * 255).byte().numpy())

    def run_pva(n: int) -> float:
        return _seconds(
            lambda: ddim_inpaint(
                pva,
                image,
                mask,
                refs,
                [TEMPLATE.format("<new1>")],
                guidance_scale=guidance,
                num_steps=n,
            )
        )

    def run_sd(n: int) -> float:
        return _seconds(
            lambda: sd(
                prompt="photo of a person",
                image=pil,
                mask_image=pil_mask,
                height=size,
                width=size,
                num_inference_steps=n,
                guidance_scale=guidance,
            )
        )

    with torch.no_grad():
        run_pva(2), run_sd(2)  # warm-up
        short, long = steps
        per = {}
        for name, fn in (
            ("PVA, batched CFG (1 UNet call/step)", run_pva),
            ("diffusers StableDiffusionInpaintPipeline", run_sd),
        ):
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
    runs: dict[tuple[str, bool], float] = {}
    losses: list[float] = []
    for variant, n in (("pva", 40), ("custom-diffusion", cd_steps)):
        for reuse in (True, False):
            t0 = time.perf_counter()
            with personalized(
                pva, images, references, boxes, steps=n, variant=variant, reuse_encodings=reuse
            ) as result:
                runs[variant, reuse] = time.perf_counter() - t0
            if variant == "pva" and reuse:
                losses = result.losses
    base = runs["pva", True]
    print(
        f"\n  {'personalization':<44}{'encoders':>10}{'steps':>7}{'seconds':>9}"
        f"{'ms/step':>9}{'ratio':>8}"
    )
    names = {
        "pva": "PVA-FT (METHOD 7)",
        "custom-diffusion": "Custom-Diffusion-style (all attn2 + token)",
    }
    for (variant, reuse), sec in runs.items():
        n = 40 if variant == "pva" else cd_steps
        print(
            f"  {names[variant]:<44}{'reused' if reuse else 'per step':>10}{n:7d}{sec:9.1f}"
            f"{sec / n * 1e3:9.1f}{sec / base:8.2f}"
        )
    return {
        "ms_per_step": {k: v * 1e3 for k, v in per.items()},
        "pva_ft_s": base,
        "cd_s": runs["custom-diffusion", True],
        "pva_ft_losses": losses,
        "personalization_s": {
            f"{v}/{'reused' if r else 'per step'}": sec for (v, r), sec in runs.items()
        },
    }
