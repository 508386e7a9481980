"""The training objective's sampling pieces, kept apart from the network (METHOD section 6)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def stratified_timesteps(
    num_images: int,
    draws: int,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Stratified timestep sampling: ``draws`` timesteps per image, one per equal interval.

    Draw ``j`` of every image is uniform on ``[j*T/draws, (j+1)*T/draws)``.

    Args:
        num_images: Images in the batch.
        draws: Timesteps per image (4 in the paper's training, 2 in personalization).
        num_train_timesteps: T (1000).
        generator: Optional random generator (on ``device``).
        device: Output device.

    Returns:
        (num_images * draws,) long, image-major (``[i0 d0, i0 d1, ..., i1 d0, ...]``, matching
        ``x.repeat_interleave(draws, 0)``).
    """
    if draws < 1 or draws > num_train_timesteps:
        raise ValueError(f"draws must be in 1..{num_train_timesteps}, got {draws}")
    edges = torch.linspace(0, num_train_timesteps, draws + 1, device=device)  # (draws+1,)
    lo, hi = edges[:-1].floor().long(), edges[1:].floor().long()  # (draws,) each
    u = torch.rand(num_images, draws, generator=generator, device=device)  # (B, draws)
    t = lo + (u * (hi - lo)).floor().long()  # (B, draws), t in [lo, hi)
    return t.clamp_(max=num_train_timesteps - 1).flatten()


def keep_mask(
    batch_size: int,
    drop_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Per-condition dropout: (B,) bool, ``False`` where the condition is dropped.

    Returns ``None`` when ``drop_prob`` is 0 (nothing dropped, no mask needed).
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {drop_prob}")
    if drop_prob == 0.0:
        return None
    return torch.rand(batch_size, generator=generator, device=device) >= drop_prob


def fused_adam_ok(params: Iterable[Tensor | dict]) -> bool:
    """Whether PyTorch's fused Adam/AdamW kernel can take these parameters (or param groups).

    True when every parameter is a floating tensor on the CPU or a CUDA device. The fused
    kernel computes the same update as the default per-tensor loop in one pass over all
    tensors, which matters for small models dominated by per-tensor overhead (BENCHMARKS.md,
    "Measurements behind the code").
    """
    tensors: list[Tensor] = []
    for p in params:
        tensors.extend(p["params"] if isinstance(p, dict) else [p])
    return bool(tensors) and all(
        t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors
    )
