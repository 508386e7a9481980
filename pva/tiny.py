"""Tiny random stand-ins for the real weights, written to disk in the real formats.

Tests, the quick start and benchmarks use these to exercise the real loading code
(:func:`pva.backbone.load_backbone`, :func:`pva.identity.load_iresnet`) with no download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pva.backbone import build_tiny_backbone
from pva.checks import SEED, check_ranges
from pva.identity import IResNet, save_iresnet
from pva.model import PVAConfig


def build_tiny_face_model(seed: int = 0, num_features: int = 64) -> IResNet:
    """An IResNet with one block per stage and small widths (arcface_torch key layout)."""
    torch.manual_seed(seed)
    return IResNet(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), num_features=num_features).eval()


def tiny_pva_config(**overrides) -> PVAConfig:
    """A :class:`PVAConfig` sized for the tiny backbone (width 32)."""
    kw = {"projection_layers": 2, "projection_heads": 4, "projection_ffn": 64}
    kw.update(overrides)
    return PVAConfig(**kw)


@dataclass
class TinyAssets:
    """Paths of a tiny backbone folder and a tiny face-recognizer checkpoint."""

    backbone: Path
    face_model: Path


TINY_RANGES = {"seed": SEED}
"""The allowed range of each number of :func:`write_tiny_assets` (``pva tiny-assets``)."""


def write_tiny_assets(folder: str | os.PathLike = "runs/tiny_assets", seed: int = 0) -> TinyAssets:
    """Write a tiny random SD2-inpainting folder and ArcFace ``.pth`` (for configs/tiny.yaml).

    ``folder/backbone`` has the diffusers SD2-inpainting layout; ``folder/face_r_tiny.pth`` is
    an arcface_torch IResNet. Existing assets in ``folder`` are reused as they are.

    Args:
        folder: Output folder.
        seed: Seed of the random weights.
    """
    check_ranges("--", locals(), TINY_RANGES)
    folder = Path(folder)
    assets = TinyAssets(folder / "backbone", folder / "face_r_tiny.pth")
    if not (assets.backbone / "model_index.json").is_file():
        build_tiny_backbone(seed).save_pretrained(assets.backbone, overwrite=True)
    if not assets.face_model.is_file():
        save_iresnet(build_tiny_face_model(seed), assets.face_model)
    return assets
