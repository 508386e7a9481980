"""Putting fills back (pva.composite): exact paste-back, and the blend that hides the seam."""

from __future__ import annotations

import numpy as np

from pva.composite import border_ring, composite


def _scene(h: int = 96, w: int = 128):
    rng = np.random.default_rng(0)
    photo = rng.integers(40, 200, (h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), bool)
    mask[30:70, 40:100] = True
    return photo, mask


def test_without_blend_the_fill_replaces_the_mask_exactly():
    photo, mask = _scene()
    fill = np.full_like(photo, 7)
    out = composite(photo, fill, mask)
    assert np.array_equal(out[mask], fill[mask]) and np.array_equal(out[~mask], photo[~mask])


def test_blend_removes_a_colour_cast_and_never_touches_the_outside():
    photo, mask = _scene()
    cast = np.array([25, -15, 10])
    fill = np.clip(photo.astype(int) + cast, 0, 255).astype(np.uint8)  # the scene, colour-shifted
    hard = composite(photo, fill, mask)
    soft = composite(photo, fill, mask, blend=True, feather=4)
    assert np.array_equal(soft[~mask], photo[~mask])  # outside the mask: the input, exactly
    ring = border_ring(mask, 3)  # a few pixels inside the border: where a seam shows
    err_hard = np.abs(hard[ring].astype(int) - photo[ring]).mean()
    err_soft = np.abs(soft[ring].astype(int) - photo[ring]).mean()
    assert err_hard > 10 and err_soft < 1.0, (err_hard, err_soft)
    deep = ~border_ring(mask, 8) & mask  # deep inside: the (colour-matched) fill itself
    assert np.abs(soft[deep].astype(int) - photo[deep]).mean() < 1.0


def test_blend_feathers_only_inside_the_border():
    _, mask = _scene()
    photo = np.full((*mask.shape, 3), 100, np.uint8)
    fill = np.full_like(photo, 255)
    out = composite(photo, fill, mask, blend=True, feather=6, valid=np.zeros_like(mask))
    # with no valid ring there is no colour shift: the fill rises from the photo to 255
    row = out[50, 40:52, 0].astype(int)  # from the mask's left border inward
    assert row[0] > 100 and np.all(np.diff(row[:6]) > 0) and (row[5:] == 255).all(), row
    assert np.array_equal(out[~mask], photo[~mask])
    assert border_ring(mask, 2).sum() == mask.sum() - (40 - 4) * (60 - 4)
    assert not (border_ring(mask, 2, inside=False) & mask).any()
