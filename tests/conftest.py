"""Shared fixtures: tiny random models written to disk and loaded back through the real loaders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pva.model import PVAModel
from pva.tiny import TinyAssets, tiny_pva_config, write_tiny_assets

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FACES = SHARED / "data" / "faces"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    """A tiny SD2-inpainting folder and a tiny ArcFace .pth, written once per session."""
    return write_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def make_model(tiny_assets):
    """Factory: a fresh PVAModel loaded from the tiny assets (through the real loaders)."""

    def make(**overrides) -> PVAModel:
        return PVAModel.from_paths(
            tiny_assets.backbone, tiny_assets.face_model, tiny_pva_config(**overrides)
        )

    return make


def count_calls(calls: dict[str, int], key: str, obj: object, name: str) -> None:
    """Wrap ``obj.<name>`` so that every call adds 1 to ``calls[key]`` (to count encoder runs)."""
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)

    setattr(obj, name, wrapped)


def make_batch(batch_size: int = 2, num_refs: int = 3, size: int = 64, seed: int = 0) -> dict:
    """A deterministic random training batch, as pva.objective.DenoisingObjective takes it."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch_size, 1, size, size)
    masks[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return {
        "image": torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
        "mask": masks,
        "references": torch.rand(batch_size, num_refs, 3, size, size, generator=g) * 2 - 1,
        "prompt": ["photo of a <new1> person"] * batch_size,
    }


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``pva demo --quick`` run once (tests of the demo and of the probes read it)."""
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    cmd = [sys.executable, "-m", "pva.cli", "demo", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def rehearsal(tmp_path_factory):
    """``pva rehearse --size tiny`` run once (tests of the rehearsal and the memory bench)."""
    out = tmp_path_factory.mktemp("rehearse") / "out"
    cmd = [sys.executable, "-m", "pva.cli", "rehearse", "--size", "tiny", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout
