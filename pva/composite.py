"""Putting a fill back into the photo: exact paste-back, or a blend that hides the seam.

A fill comes out of the VAE a little off in colour, so a hard paste-back leaves a visible edge
along the mask border. :func:`composite` with ``blend`` fixes both causes without touching a
pixel outside the mask: it shifts the fill's colour by the difference between the photo and the
fill on a ring just outside the mask (where both show the same content), and it feathers the
fill into the photo over the first pixels inside the mask border. Pixels outside the mask are
always the photo's, exactly.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def border_ring(mask: np.ndarray, width: int, inside: bool = True) -> np.ndarray:
    """(H, W) bool: the pixels within ``width`` of the mask border, inside or outside it.

    Args:
        mask: (H, W) bool, True = the filled region.
        width: Ring width in pixels (>= 1).
        inside: The ring inside the mask (else the one just outside it).
    """
    region = mask if inside else ~mask
    depth = ndimage.distance_transform_edt(region)  # (H, W): distance to the other side
    return region & (depth <= width)


def composite(
    photo: np.ndarray,
    fill: np.ndarray,
    mask: np.ndarray,
    blend: bool = False,
    feather: int = 8,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """The photo with ``fill`` inside ``mask``.

    Args:
        photo: (H, W, 3) uint8, the input.
        fill: (H, W, 3) uint8, the model's output placed on the photo's canvas.
        mask: (H, W) bool, True = take the fill.
        blend: Match the fill's colour to the photo on a ``feather``-wide ring just outside the
            mask, and feather it in over ``feather`` pixels inside the border. Off: the fill
            replaces the masked pixels as it is.
        feather: Ring and feather width in pixels (>= 1).
        valid: (H, W) bool, where ``fill`` holds model output (the inpainted square); only
            there does the outside ring measure the colour shift. ``None``: everywhere.

    Returns:
        (H, W, 3) uint8; every pixel outside ``mask`` equals ``photo``.
    """
    if not blend or not mask.any():
        return np.where(mask[..., None], fill, photo)
    feather = max(1, int(feather))
    out = fill.astype(np.float32)  # (H, W, 3)
    ring = border_ring(mask, feather, inside=False)
    if valid is not None:
        ring &= valid
    if ring.any():  # the colour shift between fill and photo where both show the same scene
        shift = photo[ring].astype(np.float32).mean(0) - out[ring].mean(0)  # (3,)
        out += shift
    depth = ndimage.distance_transform_edt(mask)  # (H, W): 1 at the border pixel, grows inward
    alpha = np.clip(depth / feather, 0.0, 1.0)[..., None]  # (H, W, 1), 0 outside the mask
    mixed = alpha * out + (1.0 - alpha) * photo.astype(np.float32)
    mixed = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], mixed, photo)
