"""``pva bench step``: PVA training-step cost vs the frozen base UNet, same batch, one run.

Rows, per configuration (timed round-robin, medians):

* base UNet forward + backward: the pretrained 9-channel UNet on text tokens only, backward to
  its input (what any method that trains through a frozen UNet pays);
* PVA UNet forward + backward: the same with 10 identity tokens, gradients into the PVA weights;
* full PVA training step: VAE and text encoding, the identity encoder, the UNet, AdamW.
"""

from __future__ import annotations

import torch

from benchmarks.attention import interleaved_median_ms
from pva.backbone import build_tiny_backbone
from pva.checks import NONNEGATIVE_INT, POSITIVE_INT, check_ranges
from pva.model import PVAModel
from pva.objective import denoising_loss
from pva.tiny import build_tiny_face_model, tiny_pva_config

CONFIGS = {
    "tiny": {"backbone": {}, "image": 64, "heads": 4},
    "mid": {
        "backbone": {
            "block_out_channels": (64, 128, 256),
            "cross_attention_dim": 256,
            "vae_channels": (32, 64, 64),
        },
        "image": 128,
        "heads": 8,
    },
}


def _time_config(name: str, batch_size: int, refs: int, repeats: int) -> dict[str, float]:
    spec = CONFIGS[name]
    torch.manual_seed(0)
    backbone = build_tiny_backbone(**spec["backbone"])
    model = PVAModel(
        backbone, build_tiny_face_model(), tiny_pva_config(projection_heads=spec["heads"])
    )
    model.train()
    s, b = spec["image"], batch_size
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, 1, s, s)
    mask[..., s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
    batch = {
        "image": torch.rand(b, 3, s, s, generator=g) * 2 - 1,
        "mask": mask,
        "references": torch.rand(b, refs, 3, 112, 112, generator=g) * 2 - 1,
        "prompt": ["photo of a <new1> person"] * b,
    }
    with torch.no_grad():
        text = model.encode_prompt(batch["prompt"])
        ident = model.encode_identity(batch["references"])
        mask_lat, masked_lat = model.inpaint_conditioning(batch["image"], batch["mask"])
    latents = torch.randn(masked_lat.shape, generator=g)
    t = torch.full((b,), 500)
    opt = torch.optim.AdamW([p for ps in model.parameter_groups().values() for p in ps], lr=1e-5)

    def base() -> None:
        x = latents.clone().requires_grad_(True)
        model.predict_noise(x, t, mask_lat, masked_lat, text).sum().backward()

    def pva_unet() -> None:
        model.predict_noise(latents, t, mask_lat, masked_lat, text, ident).sum().backward()
        opt.zero_grad(set_to_none=True)

    def full_step() -> None:
        loss = denoising_loss(model, batch, timestep_draws=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return interleaved_median_ms(
        {"base UNet fwd+bwd": base, "PVA UNet fwd+bwd": pva_unet, "full PVA step": full_step},
        repeats,
    )


RANGES = {
    "batch_size": POSITIVE_INT,
    "refs": POSITIVE_INT,
    "repeats": POSITIVE_INT,
    "threads": NONNEGATIVE_INT,
}


def bench_step(batch_size: int = 2, refs: int = 5, repeats: int = 5, threads: int = 0) -> dict:
    """PVA training step vs the frozen base UNet's forward+backward (tiny, mid; CPU).

    Args:
        batch_size: Images per step.
        refs: References per image.
        repeats: Timed runs per row (median reported).
        threads: Torch CPU threads (default: 0, torch's own).
    """
    check_ranges("--", locals(), RANGES)
    if threads:
        torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu, fp32; batch "
        f"{batch_size}, {refs} references, 1 timestep draw per image"
    )
    results = {}
    for name in CONFIGS:
        times = _time_config(name, batch_size, refs, repeats)
        results[name] = times
        base = times["base UNet fwd+bwd"]
        spec = CONFIGS[name]
        print(
            f"\n{name}: image {spec['image']} px, UNet widths "
            f"{spec['backbone'].get('block_out_channels', (32, 64))}"
        )
        print(f"  {'row':<22}{'ms':>10}{'vs base':>10}")
        for row, ms in times.items():
            print(f"  {row:<22}{ms:10.1f}{ms / base:10.2f}")
    return results
