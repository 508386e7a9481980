"""The GPU check: one script, SD2 size, random weights, nothing downloaded, a few minutes.

``python -m benchmarks gpu [--out gpu.json]`` prints, on a CUDA device:

1. the stage-1 training step (2 images x 4 timesteps, 5 references at 256 px, AdamW) in bf16:
   seconds and peak memory for ``precision: bf16-mixed`` as shipped, with the frozen weights
   held in bf16 (``frozen_dtype: bfloat16``), with gradient checkpointing on top, and with a
   channels-last UNet (``--compile``: and ``torch.compile``);
2. the same step with the fused and the reference PVA attention;
3. seconds per DDIM step (guidance 6, 512 px, bf16 weights) of the PVA sampler beside diffusers'
   ``StableDiffusionInpaintPipeline`` on the same weights;
4. seconds for a 40-step personalization (PVA-FT, 5 photos);
5. model-FLOP utilisation of the training step: FLOPs counted by ``torch.utils.flop_counter``
   over one step, divided by its time and the device's dense bf16 peak (``--peak-tflops``, or
   looked up from the device name).

``--tiny --device cpu`` runs the same code on the tiny random models (a smoke test: its figures
mean nothing).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pva.checks import POSITIVE, POSITIVE_INT, check_ranges
from pva.objective import denoising_loss

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets; H100 = SXM)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _build(tiny: bool, device: torch.device, dtype: torch.dtype = torch.float32):
    """A PVA model of SD2's (or the tiny) architecture with random weights, on ``device``."""
    from pva.backbone import build_sd2_backbone, build_tiny_backbone
    from pva.identity import iresnet
    from pva.model import PVAConfig, PVAModel
    from pva.tiny import build_tiny_face_model, tiny_pva_config

    with torch.device(device):
        backbone = build_tiny_backbone() if tiny else build_sd2_backbone()
        for module in (backbone.vae, backbone.text_encoder, backbone.unet):
            module.to(dtype)
        face = build_tiny_face_model() if tiny else iresnet("r50")
        config = tiny_pva_config() if tiny else PVAConfig()
        model = PVAModel(backbone, face.to(device).eval(), config)
    return model.to(device), backbone


def _stage1_batch(size: int, device: torch.device, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4 : size * 3 // 4, size // 4 : size * 3 // 4] = 1.0
    return {
        "image": (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
        "mask": mask.to(device),
        "references": (torch.rand(batch, 5, 3, size // 2, size // 2, generator=g) * 2 - 1).to(
            device
        ),
        "prompt": ["photo of a <new1> person"] * batch,
    }


def run(
    tiny: bool = False,
    device: str = "cuda",
    peak_tflops: float | None = None,
    repeats: int = 5,
    compile_unet: bool = False,
) -> dict:
    """Measure everything in the module docstring; returns the figures (also printed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pva.personalize import personalized
    from pva.prompts import TEMPLATE, UNCOND_PROMPT
    from pva.sampling import ddim_inpaint

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run on a GPU machine, or pass --tiny --device cpu")
    size = 64 if tiny else 512
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    out: dict = {"device": name, "tiny": tiny, "image_size": size, "train": {}}
    print(f"device: {name}; torch {torch.__version__}; {size} px; random weights", flush=True)

    # ------------------------------------------------------------------ 1-2. training step
    model, _ = _build(tiny, dev)
    model.train()
    batch = _stage1_batch(size, dev)
    params = [p for group in model.parameter_groups().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            loss = denoising_loss(model, batch, 4)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measure(label: str) -> None:
        _reset_peak(dev)
        seconds = _seconds(step, dev, repeats)
        out["train"][label] = {"s_per_step": round(seconds, 4), "peak_gb": _peak_gb(dev)}
        peak = out["train"][label]["peak_gb"]
        mem = f"{peak:.1f} GB" if peak is not None else "n/a (CPU)"
        print(f"train step [{label}]: {seconds:.3f} s, peak {mem}", flush=True)

    measure("bf16-mixed (configs/stage1.yaml)")
    model.hold_frozen_in(torch.bfloat16)
    measure("bf16-mixed + frozen bf16")
    model.set_attention_impl("reference")
    measure("bf16-mixed + frozen bf16, reference attention")
    model.set_attention_impl("fused")
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    model.enable_gradient_checkpointing()
    measure("bf16-mixed + frozen bf16 + checkpointing")
    model.unet.disable_gradient_checkpointing()
    model.unet.to(memory_format=torch.channels_last)
    measure("bf16-mixed + frozen bf16 + channels-last")
    if compile_unet:  # minutes of compilation before the first step
        model.unet.compile()
        measure("bf16-mixed + frozen bf16 + channels-last + torch.compile")
    train_s = out["train"]["bf16-mixed + frozen bf16"]["s_per_step"]
    out["flops_per_step"] = flops
    out["achieved_tflops"] = round(flops / train_s / 1e12, 2)
    if peak_tflops:
        out["mfu"] = round(flops / train_s / (peak_tflops * 1e12), 4)
    print(
        f"stage-1 step: {flops / 1e12:.2f} TFLOP, {out['achieved_tflops']} TFLOP/s"
        + (f", MFU {out['mfu']:.1%} of {peak_tflops:g}" if peak_tflops else ""),
        flush=True,
    )

    # ------------------------------------------------------------------ 4. personalization
    photos = _stage1_batch(size, dev, batch=5)
    boxes = [(size // 4, size // 4, size * 3 // 4, size * 3 // 4)] * 5
    references = photos["references"][:, 0]  # (5, 3, R, R)
    ft_steps = 4 if tiny else 40
    _sync(dev)
    t0 = time.perf_counter()
    with personalized(model, photos["image"], references, boxes, steps=ft_steps):
        _sync(dev)
        out["personalize_s"] = round(time.perf_counter() - t0, 2)
    print(
        f"{ft_steps}-step personalization (PVA-FT, frozen bf16): {out['personalize_s']} s",
        flush=True,
    )
    model = optimizer = None  # free the training model before the inference copies
    _reset_peak(dev)

    # ------------------------------------------------------------------ 3. DDIM vs diffusers
    dtype = torch.bfloat16
    pva, _ = _build(tiny, dev, dtype)
    pva.eval()
    _, stock = _build(tiny, dev, dtype)
    sd = stock.stock_pipeline()
    image, mask = batch["image"][:1], batch["mask"][:1]
    refs = batch["references"][:1]
    short, long = (2, 6) if tiny else (10, 30)

    def pva_run(n: int) -> Callable[[], object]:
        return lambda: ddim_inpaint(
            pva,
            image,
            mask,
            refs,
            [TEMPLATE.format("<new1>")],
            negative_prompt=UNCOND_PROMPT,
            guidance_scale=6.0,
            num_steps=n,
        )

    def sd_run(n: int) -> Callable[[], object]:
        return lambda: sd(
            prompt="photo of a person",
            image=image.float() * 0.5 + 0.5,
            mask_image=mask.float(),
            height=size,
            width=size,
            num_inference_steps=n,
            guidance_scale=6.0,
        )

    per_step = {}
    with torch.no_grad():
        for label, fn in (("pva", pva_run), ("diffusers", sd_run)):
            a = _seconds(fn(short), dev, 2)
            b = _seconds(fn(long), dev, 2)
            per_step[label] = (b - a) / (long - short)
    out["ddim_s_per_step"] = {k: round(v, 5) for k, v in per_step.items()}
    out["ddim_ratio"] = round(per_step["pva"] / per_step["diffusers"], 3)
    print(
        f"DDIM step (bf16, guidance 6): PVA {per_step['pva'] * 1e3:.1f} ms, diffusers "
        f"{per_step['diffusers'] * 1e3:.1f} ms, ratio {out['ddim_ratio']}",
        flush=True,
    )
    return out


RANGES = {"peak_tflops": POSITIVE, "repeats": POSITIVE_INT}


def gpu_check(
    device: str = "cuda",
    tiny: bool = False,
    peak_tflops: float | None = None,
    repeats: int = 5,
    compile: bool = False,
    out: str | None = None,
) -> dict:
    """The GPU check: SD2-size step time, memory, DDIM vs diffusers, personalization, MFU.

    Random weights, nothing downloaded, a few minutes on a CUDA device; prints the figures as
    JSON at the end.

    Args:
        device: Torch device.
        tiny: Tiny models: a smoke run (its figures mean nothing).
        peak_tflops: Dense bf16 peak for the MFU (default: looked up by device name).
        repeats: Timed steps per figure.
        compile: Also time the step with torch.compile (slow start).
        out: Also write the figures as JSON here.
    """
    check_ranges("--", locals(), RANGES)
    try:
        result = run(tiny, device, peak_tflops, repeats, compile)
    except RuntimeError as err:
        raise RuntimeError(str(err).splitlines()[0]) from None
    print(json.dumps(result, indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result
