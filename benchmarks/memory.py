"""``python -m benchmarks memory``: what each memory option saves on an SD2-size step (CPU).

One stage-1 training step (the denoising loss, backward, AdamW step) at 512 px, batch 1 x 1
timestep, 5 references, per option, each in a fresh process so that its peak resident memory
(``ru_maxrss``) is its own. Options are those of :class:`pva.module.PVAModule`:

* ``fp32``: everything in fp32 (the plain path);
* ``bf16-autocast``: fp32 weights, the step under ``torch.autocast(bfloat16)`` (what Lightning's
  ``precision: bf16-mixed`` does);
* ``checkpointing``: fp32 with gradient checkpointing of the frozen UNet;
* ``bf16-frozen``: frozen weights held in bf16 (``frozen_dtype: bfloat16``), trainable fp32;
* ``bf16-frozen+checkpointing``: both;
* ``channels-last``: fp32, the UNet in channels-last.

CPU resident memory is not GPU memory (no caching allocator, no cuDNN workspaces, the weights are
memory-mapped until touched), so the GPU figures come from ``python -m benchmarks gpu``; the table
samples the resident memory every 20 ms to split a step's peak into what the weights take as held
(after any conversion) and what the step adds, which is what grows with the batch; the
process's own high-water mark (loading and conversions included) is shown beside it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from pva.checks import IMAGE_SIDE, check_ranges
from pva.objective import denoising_loss

REPO = Path(__file__).resolve().parents[1]
"""The repository root, where ``python -m benchmarks.memory`` runs each option."""
Option = Literal[
    "fp32",
    "bf16-autocast",
    "checkpointing",
    "bf16-frozen",
    "bf16-frozen+checkpointing",
    "channels-last",
]
OPTIONS: tuple[str, ...] = typing.get_args(Option)


def _rss_gb() -> float:
    """This process's peak resident memory so far (a high-water mark), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _current_rss_gb() -> float:
    """This process's resident memory now, GiB (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class _RssSampler(threading.Thread):
    """Samples the resident memory every 20 ms: the peak of an interval, not of the process."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = _current_rss_gb(), threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self._done.wait(0.02):
            self.peak = max(self.peak, _current_rss_gb())

    def stop(self) -> float:
        """Stop sampling; the peak seen."""
        self._done.set()
        self.join()
        return max(self.peak, _current_rss_gb())


def measure(option: str, backbone: str, face_model: str, size: int, steps: int = 2) -> dict:
    """One option's figures, in this process (run it in a fresh one for a clean peak)."""
    from contextlib import nullcontext

    from pva.model import PVAConfig, PVAModel

    if option not in OPTIONS:
        raise ValueError(f"option must be one of {', '.join(OPTIONS)}, got {option!r}")
    torch.manual_seed(0)  # the adapter's fresh weights and the projection's dropout masks
    model = PVAModel.from_paths(backbone, face_model, PVAConfig())
    if "bf16-frozen" in option:
        model.hold_frozen_in(torch.bfloat16)
    if "checkpointing" in option:
        model.enable_gradient_checkpointing()
    if option == "channels-last":
        model.unet.to(memory_format=torch.channels_last)
    model.train()
    params = [p for group in model.parameter_groups().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : size * 3 // 4, size // 4 : size * 3 // 4] = 1.0
    batch = {
        "image": torch.rand(1, 3, size, size, generator=g) * 2 - 1,
        "mask": mask,
        "references": torch.rand(1, 5, 3, size // 2, size // 2, generator=g) * 2 - 1,
        "prompt": ["photo of a <new1> person"],
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if option == "bf16-autocast" else None
    with torch.no_grad():  # page every weight in (safetensors are memory-mapped until read)
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    seconds = []
    resident = _current_rss_gb()  # the weights as held, after any conversion
    sampler = _RssSampler()
    sampler.start()
    for _ in range(steps):
        t0 = time.perf_counter()
        with autocast or nullcontext():
            loss = denoising_loss(model, batch, 1, generator=g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    step_peak = sampler.stop()
    return {
        "option": option,
        "loss": round(loss.item(), 5),
        "resident_gb": round(resident, 2),
        "step_peak_gb": round(step_peak, 2),
        "process_peak_gb": round(_rss_gb(), 2),
        "step_s": round(seconds[-1], 1),
        "trainable_m": round(sum(p.numel() for p in params) / 1e6, 1),
    }


RANGES = {"image_size": IMAGE_SIDE}


def bench_memory(
    models: str = "rehearse_out/models",
    options: Sequence[Option] = OPTIONS,
    image_size: int = 512,
) -> list[dict]:
    """Peak memory and time of one SD2-size training step per memory option (CPU).

    One training step (batch 1 x 1 timestep, 512 px, AdamW) per option, each in its own
    process: fp32, bf16 autocast, gradient checkpointing, frozen weights in bf16, both,
    channels-last. Needs the SD2-size models that ``pva rehearse`` writes.

    Args:
        models: A folder with ``backbone/`` and ``ms1mv3_arcface_r50.pth`` (``pva rehearse``
            writes ``OUT/models``).
        options: Which of the options to measure.
        image_size: Image side (512 for SD2).
    """
    check_ranges("--", locals(), RANGES)
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"--options: unknown {unknown}; choose from {', '.join(OPTIONS)}")
    size = image_size
    folder = Path(models)
    backbone, face = folder / "backbone", folder / "ms1mv3_arcface_r50.pth"
    for needed in (backbone / "unet", face):
        if not needed.exists():
            raise FileNotFoundError(
                f"--models: '{needed}' is missing; run `pva rehearse` first (it writes OUT/models)"
            )
    rows = []
    for option in options:
        cmd = [sys.executable, "-m", "benchmarks.memory", option, str(backbone), str(face)]
        res = subprocess.run([*cmd, str(size)], capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            raise RuntimeError(f"{option} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{option}: step peak {r['step_peak_gb']} GB, {r['step_s']} s", file=sys.stderr)
    base = rows[0]
    print(
        f"\none training step (batch 1 x 1 timestep, {size} px, 5 references, AdamW), CPU, "
        f"{torch.get_num_threads()} threads, each option in its own process"
    )
    print(
        f"{'option':<28}{'resident GB':>12}{'step peak GB':>14}{'step growth GB':>16}"
        f"{'peak vs fp32':>14}{'process peak GB':>17}{'s / step':>10}{'loss':>9}"
    )
    for r in rows:
        growth = r["step_peak_gb"] - r["resident_gb"]
        print(
            f"{r['option']:<28}{r['resident_gb']:12.2f}{r['step_peak_gb']:14.2f}{growth:16.2f}"
            f"{r['step_peak_gb'] / base['step_peak_gb']:14.2f}{r['process_peak_gb']:17.2f}"
            f"{r['step_s']:10.1f}{r['loss']:9.4f}"
        )
    return rows


if __name__ == "__main__":
    option, backbone, face, size = sys.argv[1:5]
    torch.set_num_threads(min(os.cpu_count() or 1, torch.get_num_threads()))
    print(json.dumps(measure(option, backbone, face, int(size))))
