"""``pva bench attention``: fused vs reference PVA attention vs stock cross-attention.

Times one cross-attention layer at SD2's shapes (the largest: 4096 queries at 320 channels; a mid
layer: 1024 queries at 640 channels; 77 text + 10 identity tokens, batch 2), all three on the same
inputs in one run, and prints ratios. Also prints the trainable parameter count of the full
SD2-inpainting configuration (built on the ``meta`` device: no weights, no memory) and the FLOP
overhead of PVA over the base UNet for one 512x512 denoising step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.utils.flop_counter import FlopCounterMode

from pva.attention import PVAAttnProcessor, install_pva, set_attention_impl
from pva.backbone import SD2_INPAINT_UNET_CONFIG
from pva.checks import NONNEGATIVE_INT, POSITIVE_INT, check_ranges
from pva.identity import IdentityProjection, iresnet


@dataclass
class LayerShape:
    """One cross-attention layer's benchmark shape."""

    name: str
    queries: int
    channels: int
    heads: int
    batch: int = 2
    context_dim: int = 1024
    text_tokens: int = 77
    identity_tokens: int = 10


SD2_SHAPES = (
    LayerShape("largest (64x64 latent, 320 ch)", 4096, 320, 5),
    LayerShape("mid (32x32 latent, 640 ch)", 1024, 640, 10),
)
SMALL_SHAPES = (LayerShape("small", 64, 32, 2, context_dim=16, text_tokens=7, identity_tokens=3),)


def interleaved_median_ms(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median milliseconds per function, timed round-robin so machine drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_layer(shape: LayerShape, repeats: int, backward: bool) -> dict[str, float]:
    """Median milliseconds of stock / reference / fused / fused-with-row-mask on one layer."""
    torch.manual_seed(0)
    attn = Attention(
        shape.channels,
        cross_attention_dim=shape.context_dim,
        heads=shape.heads,
        dim_head=shape.channels // shape.heads,
    ).eval()
    attn.requires_grad_(False)
    proc = PVAAttnProcessor(attn, shape.text_tokens)
    x = torch.randn(shape.batch, shape.queries, shape.channels, requires_grad=backward)
    text = torch.randn(shape.batch, shape.text_tokens, shape.context_dim)
    ctx = torch.cat([text, torch.randn(shape.batch, shape.identity_tokens, shape.context_dim)], 1)
    row_mask = torch.arange(shape.batch) >= shape.batch // 2  # half the rows: no identity (CFG)
    stock = AttnProcessor2_0()

    def run(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            if backward:
                call().sum().backward()
            else:
                with torch.no_grad():
                    call()

        return step

    def with_impl(impl: str, mask: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            proc.impl = impl
            return proc(attn, x, ctx, identity_mask=mask)

        return call

    return interleaved_median_ms(
        {
            "stock (text only)": run(lambda: stock(attn, x, text)),
            "PVA reference": run(with_impl("reference")),
            "PVA fused": run(with_impl("fused")),
            "PVA fused, CFG row mask": run(with_impl("fused", row_mask)),
        },
        repeats,
    )


def sd2_counts() -> dict[str, float]:
    """Parameter and FLOP counts of the full SD2-inpainting configuration, on ``meta``."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_INPAINT_UNET_CONFIG)
        unet.requires_grad_(False)
        base_params = sum(p.numel() for p in unet.parameters())
        x = torch.empty(1, 9, 64, 64)
        text = torch.empty(1, 77, 1024)
        ctx = torch.empty(1, 87, 1024)

        def flops(context: torch.Tensor) -> int:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                unet(x, 10, encoder_hidden_states=context)
            return counter.get_total_flops()

        base_flops = flops(text)
        procs = install_pva(unet, 77)
        pva_params = sum(p.numel() for proc in procs.values() for p in proc.parameters())
        fused_flops = flops(ctx)
        set_attention_impl(unet, "reference")
        reference_flops = flops(ctx)
        projection = IdentityProjection(512, 1024)
        face = iresnet("r50")
    return {
        "attn2 layers": len(procs),
        "base UNet params": base_params,
        "PVA visual Q/K/V params": pva_params,
        "identity projection params": sum(p.numel() for p in projection.parameters()),
        "token params": 1024,
        "ArcFace R50 params (stage 2)": sum(p.numel() for p in face.parameters()),
        "base UNet GFLOP": base_flops / 1e9,
        "PVA reference GFLOP": reference_flops / 1e9,
        "PVA fused GFLOP": fused_flops / 1e9,
    }


RANGES = {"repeats": POSITIVE_INT, "threads": NONNEGATIVE_INT}


def bench_attention(
    repeats: int = 10, threads: int = 0, small: bool = False, forward_only: bool = False
) -> None:
    """Fused vs reference PVA attention vs stock cross-attention at SD2 shapes.

    Times one cross-attention layer at SD2's largest and a mid shape (batch 2, 77 text + 10
    identity tokens), prints ratios from one run, the trainable parameter count of the full
    SD2-inpainting config (meta device) and PVA's FLOP overhead per step.

    Args:
        repeats: Timed runs per figure (median reported).
        threads: Torch CPU threads (default: 0, torch's own).
        small: Tiny shapes: a smoke run, no figures.
        forward_only: Skip the forward+backward (training) timing.
    """
    check_ranges("--", locals(), RANGES)
    if threads:
        torch.set_num_threads(threads)
    backward = not forward_only
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    modes = [False, True] if backward else [False]
    for shape in SMALL_SHAPES if small else SD2_SHAPES:
        for bwd in modes:
            label = "forward+backward" if bwd else "forward"
            print(
                f"\n{shape.name}: batch {shape.batch}, {shape.queries} queries, "
                f"{shape.channels} ch, {shape.heads} heads, {shape.text_tokens}+"
                f"{shape.identity_tokens} tokens, {label}"
            )
            times = time_layer(shape, repeats, bwd)
            ref = times["PVA reference"]
            stock = times["stock (text only)"]
            print(f"  {'implementation':<26}{'ms':>9}{'vs stock':>10}{'vs reference':>14}")
            for name, ms in times.items():
                print(f"  {name:<26}{ms:9.3f}{ms / stock:10.2f}{ms / ref:14.2f}")
    counts = sd2_counts()
    trainable = (
        counts["PVA visual Q/K/V params"]
        + counts["identity projection params"]
        + counts["token params"]
    )
    print("\nSD2-inpainting configuration (meta device, no weights):")
    for name, value in counts.items():
        if "params" in name:
            print(f"  {name:<34}{value:15,d}")
        elif name.endswith("GFLOP"):
            print(f"  {name:<34}{value:15.1f}")
        else:
            print(f"  {name:<34}{value:15d}")
    stage2 = trainable + counts["ArcFace R50 params (stage 2)"]
    print(f"  {'trainable params, stage 1':<34}{trainable:15,d}")
    print(f"  {'trainable params, stage 2':<34}{stage2:15,d}")
    base = counts["base UNet GFLOP"]
    for key in ("PVA reference GFLOP", "PVA fused GFLOP"):
        overhead = 100 * (counts[key] / base - 1)
        label = f"FLOP overhead, {key.removesuffix(' GFLOP')}"
        print(f"  {label:<34}{overhead:13.2f} %  (one 512x512 UNet step, batch 1)")
