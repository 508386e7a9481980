"""``pva rehearse``: the real-scale path, end to end on a CPU, with SD2-size random weights.

Every stage runs a real entry point in its own process, timed, with the peak resident memory of
its largest process (``os.wait4``) recorded:

1. ``models``: the exact SD2-inpainting architecture (UNet, VAE, OpenCLIP ViT-H text encoder, the
   CLIP tokenizer from open_clip's vocabulary) and an arcface_torch IResNet-50, random weights,
   written in the real formats (a diffusers folder of safetensors, an arcface_torch ``.pth``).
2. ``data``: procedural persons (:mod:`pva.demo.generator`) as a CelebAHQ-IDI tree in the
   authors' format (1024 px photos, nested ``landmarks.json``, ``region_bbox.pth``), then
   ``pva shards build`` at 512 px; photos of one person for personalization (the embedded
   astronaut crops, or ``--photos``).
3. ``train``: ``python train.py fit --config configs/stage1.yaml --config OUT/rehearsal.yaml``;
   the overlay holds only what this machine needs (CPU, 1 image x 1 timestep per step, a few
   steps, a checkpoint every step, small end-of-run validation, the rehearsal's paths). The
   first run SIGKILLs itself after a checkpoint (``callbacks.SimulatedCrash``), the second
   resumes with ``--ckpt_path last.ckpt``.
4. ``personalize``: ``pva personalize`` for a few steps.
5. ``inpaint``: ``pva inpaint`` for a few DDIM steps.
6. ``bench``: seconds per DDIM step of the PVA pipeline beside diffusers'
   ``StableDiffusionInpaintPipeline`` on the same weights, and seconds per fine-tuning step of
   PVA-FT beside Custom Diffusion.
7. ``evaluate``: ``pva evaluate`` on 2 test persons.

``OUT/rehearsal.json`` records each finished stage (a rerun resumes), ``OUT/report.md`` the
figures. ``--size tiny`` runs the same code path on the tiny random models in a minute or two
(what CI runs); its figures are not evidence.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from pva.fileio import atomic_path, content_stamp, refuse_file_as_folder, remove_path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("models", "data", "train", "personalize", "inpaint", "bench", "evaluate")


@dataclass(frozen=True)
class RehearsalSize:
    """How big a rehearsal is (:data:`SIZES`)."""

    name: str
    image_size: int
    """Model resolution: stored photos and training images (SD2: 512)."""
    source_size: int
    """Side of the generated CelebA-HQ-like photos (CelebA-HQ: 1024)."""
    kill_after: int
    """The first training run is killed once this step's checkpoint is written."""
    train_steps: int
    """Optimizer steps of the resumed run (in all)."""
    ft_steps: int
    """``pva personalize`` steps."""
    ddim_steps: int
    """``pva inpaint`` DDIM steps."""
    bench_ddim_steps: int
    """DDIM steps of each sampling run of the bench stage; a step is timed from one UNet call
    to the next, so the first step's encoders are left out."""
    bench_rounds: int
    """Interleaved rounds of one run per sampler (the median step is reported)."""
    bench_ft_steps: int
    """Fine-tuning steps timed per method (the first is left out of the per-step figure)."""
    eval_steps: int
    """``pva evaluate`` DDIM steps."""


SIZES = {
    "sd2": RehearsalSize("sd2", 512, 1024, 2, 4, 2, 3, 4, 2, 3, 2),
    "tiny": RehearsalSize("tiny", 64, 128, 2, 4, 2, 2, 4, 2, 3, 1),
}
PERSONS = 6
"""Generated persons: 3 train, 1 val, 2 test."""


# ------------------------------------------------------------------------------- processes
def run_stage_command(cmd: list[str], log: Path, expect_sigkill: bool = False) -> dict:
    """Run one command from the repository root to its end.

    With ``expect_sigkill`` the command is expected to end by SIGKILL (a simulated crash,
    :class:`callbacks.SimulatedCrash`), which then counts as ``killed``, not as a failure.

    Returns:
        ``command``, ``seconds``, ``peak_rss_gb`` (the largest process of the command's tree),
        ``killed``.

    Raises:
        RuntimeError: The command failed (not by the expected SIGKILL); the message holds its
            last lines.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the tree's peak memory, too
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    killed = expect_sigkill and proc.returncode == -signal.SIGKILL
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 and not killed:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"stage command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return {
        "command": shlex.join(cmd),
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "killed": killed,
    }


def _pva(*args: str) -> list[str]:
    return [sys.executable, "-m", "pva.cli", *args]


def _internal(stage: str, out: Path, size: RehearsalSize) -> list[str]:
    return [sys.executable, "-m", "pva.rehearse", stage, str(out), size.name]


# -------------------------------------------------------------------- in-process stages
def write_models(out: Path, size: RehearsalSize) -> None:
    """The backbone folder and the conditioning face model, random weights, real formats."""
    from pva.backbone import build_sd2_backbone, build_tiny_backbone
    from pva.identity import iresnet, save_iresnet
    from pva.tiny import build_tiny_face_model

    models = out / "models"
    if size.name == "sd2":
        backbone, face = build_sd2_backbone(), iresnet("r50").eval()
    else:
        backbone, face = build_tiny_backbone(), build_tiny_face_model()
    backbone.save_pretrained(models / "backbone", overwrite=True)
    save_iresnet(face, models / "ms1mv3_arcface_r50.pth")
    n = sum(
        p.numel()
        for m in (backbone.unet, backbone.vae, backbone.text_encoder)
        for p in m.parameters()
    )
    print(f"backbone: {n / 1e6:.0f} M parameters; face model: {face.num_features}-d")


def write_data(out: Path, size: RehearsalSize, photos: str | None) -> None:
    """The authors'-format CelebAHQ-IDI tree and one person's photos."""
    import numpy as np
    from PIL import Image

    from datamodules.photos import load_photos
    from pva.demo.generator import write_idi_tree
    from pva.faces import detect_landmarks

    write_idi_tree(
        out / "data" / "celebahq",
        num_persons=PERSONS,
        size=size.source_size,
        val_fraction=1 / PERSONS,
        test_fraction=2 / PERSONS,
        overwrite=True,
        progress=False,
    )
    folder = out / "photos"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "refs").mkdir(parents=True)
    usable = []
    for i, t in enumerate(load_photos(photos, 512)):
        arr = ((t.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        if detect_landmarks(arr) is not None:
            usable.append((i, arr))
    if len(usable) < 3:
        raise ValueError(f"--photos: need 3 photos with a detectable face, found {len(usable)}")
    Image.fromarray(usable[0][1]).save(folder / "target.png")
    for i, arr in usable[1:]:
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / "refs" / f"photo{i}.png")
    print(f"photos: {folder / 'target.png'} and {len(usable) - 1} references")


def _timed_steps(fn: Callable[[Callable[[int], None]], None]) -> list[float]:
    """Seconds of each step of ``fn(callback)``, from the callback's timestamps."""
    marks = [time.perf_counter()]
    fn(lambda _step: marks.append(time.perf_counter()))
    return [b - a for a, b in zip(marks, marks[1:])]


def bench(out: Path, size: RehearsalSize) -> dict:
    """DDIM step beside diffusers' pipeline; PVA-FT beside Custom Diffusion, per step."""
    from PIL import Image

    from pva.apps import load_pipeline, person_tensors
    from pva.backbone import load_backbone
    from pva.personalize import personalized
    from pva.prompts import UNCOND_PROMPT, conditional_prompt
    from pva.sampling import ddim_inpaint

    adapter = out / "runs" / "stage1" / "adapter.safetensors"
    pipe = load_pipeline(str(adapter), None, None)
    model = pipe.pva
    assert model is not None
    refs = sorted((out / "photos" / "refs").iterdir())
    person = person_tensors(pipe, refs, skip_bad=False)
    image = person["images"][:1]  # (1, 3, S, S)
    s = image.shape[-1]
    mask = torch.zeros(1, 1, s, s)
    mask[..., s // 2 : s * 7 // 8, s // 4 : s * 3 // 4] = 1.0
    references = person["references"][None]  # (1, K, 3, R, R)
    stock = load_backbone(out / "models" / "backbone")  # a second copy, stock processors
    sd = stock.stock_pipeline()
    pil = Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    pil_mask = Image.fromarray((mask[0, 0] * 255).byte().numpy())
    guidance = 6.0

    def pva_run(n: int) -> None:
        ddim_inpaint(
            model,
            image,
            mask,
            references,
            [conditional_prompt()],
            negative_prompt=UNCOND_PROMPT,
            guidance_scale=guidance,
            num_steps=n,
        )

    def sd_run(n: int) -> None:
        sd(
            prompt=UNCOND_PROMPT,
            image=pil,
            mask_image=pil_mask,
            height=s,
            width=s,
            num_inference_steps=n,
            guidance_scale=guidance,
        )

    def step_seconds(unet: torch.nn.Module, run: Callable[[int], None]) -> list[float]:
        """Seconds between consecutive UNet calls of a run: one DDIM step each, everything in."""
        starts: list[float] = []
        hook = unet.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        try:
            run(size.bench_ddim_steps)
        finally:
            hook.remove()
        return [b - a for a, b in zip(starts, starts[1:])]

    samplers = {"pva": (model.unet, pva_run), "diffusers": (sd.unet, sd_run)}
    steps: dict[str, list[float]] = {name: [] for name in samplers}
    with torch.no_grad():
        for _, run in samplers.values():
            run(1)  # warm-up
        for _ in range(size.bench_rounds):  # interleaved, so drift hits both alike
            for name, (unet, run) in samplers.items():
                steps[name] += step_seconds(unet, run)
    per_step = {name: statistics.median(v) for name, v in steps.items()}
    ft: dict[str, float] = {}
    for variant in ("pva", "custom-diffusion"):

        def fine_tune(callback: Callable[[int], None], variant: str = variant) -> None:
            with personalized(
                model,
                person["images"],
                person["references"],
                person["boxes"],
                steps=size.bench_ft_steps,
                variant=variant,
                callback=callback,
            ):
                pass

        seconds = _timed_steps(fine_tune)
        ft[variant] = statistics.median(seconds[1:])  # the first also runs the frozen encoders
    return {
        "ddim_s_per_step": {k: round(v, 3) for k, v in per_step.items()},
        "ddim_steps_timed": {k: [round(x, 3) for x in v] for k, v in steps.items()},
        "ddim_ratio": round(per_step["pva"] / per_step["diffusers"], 3),
        "ft_s_per_step": {k: round(v, 3) for k, v in ft.items()},
        "ft_ratio": round(ft["pva"] / ft["custom-diffusion"], 3),
        "guidance": guidance,
        "image_size": s,
        "references": int(references.shape[1]),
    }


# ----------------------------------------------------------------------------- the train stage
def overlay(out: Path, size: RehearsalSize) -> dict:
    """``OUT/rehearsal.yaml``: only what this machine needs, on top of ``configs/stage1.yaml``."""
    stage1 = yaml.safe_load((REPO / "configs" / "stage1.yaml").read_text())
    runs = out / "runs" / "stage1"
    callbacks = []
    for cb in stage1["trainer"]["callbacks"]:
        cb = json.loads(json.dumps(cb))
        name, args = cb["class_path"].rsplit(".", 1)[-1], cb.setdefault("init_args", {})
        if name == "ModelCheckpoint":
            args.update(dirpath=str(runs / "checkpoints"), every_n_train_steps=1)
        elif name == "IdentityValidation":  # once, at the end: 1 sample, 2 DDIM steps
            args.update(num_persons=1, max_samples=1, batch_size=1, ddim_steps=2)
        elif name == "AdapterExport":
            args.update(dirpath=str(runs))
        callbacks.append(cb)
    return {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": size.train_steps,
            "log_every_n_steps": 1,
            "default_root_dir": str(runs),
            "callbacks": callbacks,
        },
        "model": {
            "backbone": str(out / "models" / "backbone"),
            "face_model": str(out / "models" / "ms1mv3_arcface_r50.pth"),
            "timestep_draws": 1,
        },
        "data": {
            "class_path": stage1["data"]["class_path"],
            "init_args": {
                "shards": str(out / "shards"),
                "batch_size": 1,
                "num_workers": 1,
                "samples_per_epoch": 100,
            },
        },
    }


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _train_step_seconds(runs: Path) -> list[list[float]]:
    """Seconds of each logged training step (``train/samples_per_s``, batch 1), per run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    per_run = []
    for events in sorted(runs.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/samples_per_s" in acc.Tags()["scalars"]:
            per_run.append([1.0 / e.value for e in acc.Scalars("train/samples_per_s")])
    return per_run


def train(out: Path, size: RehearsalSize) -> dict:
    """Stage 1 as configured, killed after a checkpoint and resumed from ``last.ckpt``."""
    config = out / "rehearsal.yaml"
    with atomic_path(config) as tmp:
        tmp.write_text(
            "# pva rehearse: only what this machine needs, over configs/stage1.yaml\n"
            + yaml.safe_dump(overlay(out, size), sort_keys=False)
        )
    runs = out / "runs" / "stage1"
    shutil.rmtree(runs, ignore_errors=True)
    ckpts = runs / "checkpoints"
    base = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        str(REPO / "configs" / "stage1.yaml"),
        "--config",
        str(config),
    ]

    # the first run SIGKILLs itself as step kill_after + 1 begins (callbacks.SimulatedCrash):
    # the step-kill_after checkpoints are on disk, at any step speed
    crash = [
        "--trainer.callbacks+=callbacks.SimulatedCrash",
        f"--trainer.callbacks.at_step={size.kill_after}",
    ]
    first = run_stage_command([*base, *crash], out / "logs" / "train-1.log", expect_sigkill=True)
    if not first["killed"]:
        raise RuntimeError("the first training run ended without the simulated crash")
    resumed_from = _checkpoint_step(ckpts / "last.ckpt")
    second = run_stage_command(
        [*base, "--ckpt_path", str(ckpts / "last.ckpt")], out / "logs" / "train-2.log"
    )
    final = _checkpoint_step(ckpts / "last.ckpt")
    if final != size.train_steps:
        raise RuntimeError(f"the resumed run ended at step {final}, not {size.train_steps}")
    if not (runs / "adapter.safetensors").is_file():
        raise RuntimeError(f"training wrote no {runs / 'adapter.safetensors'}")
    per_run = _train_step_seconds(runs)
    warm = [x for steps in per_run for x in steps[1:]]  # each run's first step warms up
    return {
        "runs": [first, second],
        "resumed_from_step": resumed_from,
        "final_step": final,
        "step_seconds": [[round(x, 2) for x in steps] for steps in per_run],
        "s_per_step": round(statistics.median(warm or [x for r in per_run for x in r]), 2),
    }


# ------------------------------------------------------------------------------- the driver
class _State:
    """``OUT/rehearsal.json``: settings and finished stages, written atomically."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.path = out / "rehearsal.json"
        settings = json.loads(json.dumps(settings))  # tuples as JSON lists, as read back
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if self.data and self.data.get("settings") != settings:
            raise FileExistsError(
                f"{out} holds a rehearsal with other settings "
                f"({self.data.get('settings')}); pass --overwrite"
            )
        self.data.update(settings=settings)
        self.data.setdefault("stages", {})

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def finish(self, stage: str, result: dict) -> None:
        self.data["stages"][stage] = result
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1))


def rehearse(
    out: str | Path = "rehearse_out",
    size: Literal["sd2", "tiny"] = "sd2",
    photos: str | None = None,
    overwrite: bool = False,
) -> Path:
    """The real-scale path on a CPU: SD2-size random weights through every entry point.

    Builds the exact SD2-inpainting architecture and an IResNet-50 with random weights, writes
    them in the real formats, generates a small CelebAHQ-IDI tree in the authors' format and runs
    the real entry points at 512 px: train.py fit with configs/stage1.yaml (plus an overlay with
    only what a CPU needs; killed after a checkpoint and resumed), pva personalize, pva inpaint,
    a DDIM step beside diffusers' pipeline and PVA-FT beside Custom Diffusion per step, and pva
    evaluate on 2 persons; time and peak memory per stage. Writes OUT/report.md and
    OUT/rehearsal.json (returns the report's path); a rerun resumes. About 20 minutes and 17 GB
    of memory on 2 cores, 10 GB of disk.

    Args:
        out: Output folder (about 10 GB for ``sd2``: 5 GB of models, 4.3 GB of checkpoints).
        size: ``sd2`` (the real architecture, about 20 minutes on 2 cores) or ``tiny``.
        photos: A folder of one person's photos for ``pva personalize`` / ``pva inpaint``
            (3 or more with a face); default: the embedded astronaut crops.
        overwrite: Delete ``out`` first.
    """
    if size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    for needed in (REPO / "train.py", REPO / "configs" / "stage1.yaml"):
        if not needed.is_file():
            raise FileNotFoundError(
                f"pva rehearse runs train.py and configs/stage1.yaml from a "
                f"source checkout; '{needed}' is missing"
            )
    out = Path(out).resolve()
    refuse_file_as_folder(out, "--out", overwrite)
    if overwrite and (out.exists() or out.is_symlink()):
        remove_path(out)
    if out.exists() and any(out.iterdir()) and not (out / "rehearsal.json").is_file():
        raise FileExistsError(f"{out} exists and is not a rehearsal folder; pass --overwrite")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    if photos is not None and not Path(photos).is_dir():
        raise FileNotFoundError(f"--photos '{photos}' is not a folder")
    stamp = None if photos is None else content_stamp(photos)  # an edited folder is not resumed
    state = _State(out, {"size": asdict(spec), "photos": stamp})
    person = out / "photos"
    adapter = out / "runs" / "stage1" / "adapter.safetensors"

    def commands(stage: str) -> list[dict]:
        log = out / "logs"
        if stage == "models":
            return [run_stage_command(_internal("models", out, spec), log / "models.log")]
        if stage == "data":
            cmd = _internal("data", out, spec) + ([str(Path(photos).resolve())] if photos else [])
            return [
                run_stage_command(cmd, log / "data-generate.log"),
                run_stage_command(
                    _pva(
                        "shards",
                        "build",
                        str(out / "data" / "celebahq"),
                        "--out",
                        str(out / "shards"),
                        "--image-size",
                        str(spec.image_size),
                        "--overwrite",
                    ),
                    log / "data-shards.log",
                ),
            ]
        if stage == "personalize":
            return [
                run_stage_command(
                    _pva(
                        "personalize",
                        "--adapter",
                        str(adapter),
                        "--refs",
                        str(person / "refs"),
                        "--out",
                        str(out / "personalized.safetensors"),
                        "--steps",
                        str(spec.ft_steps),
                        "--overwrite",
                    ),
                    log / "personalize.log",
                )
            ]
        if stage == "inpaint":
            return [
                run_stage_command(
                    _pva(
                        "inpaint",
                        "--adapter",
                        str(out / "personalized.safetensors"),
                        "--image",
                        str(person / "target.png"),
                        "--mask-region",
                        "lowerface",
                        "--refs",
                        str(person / "refs"),
                        "--steps",
                        str(spec.ddim_steps),
                        "--out",
                        str(out / "inpainted.png"),
                        "--overwrite",
                    ),
                    log / "inpaint.log",
                )
            ]
        if stage == "evaluate":
            shutil.rmtree(out / "eval", ignore_errors=True)
            return [
                run_stage_command(
                    _pva(
                        "evaluate",
                        "--data",
                        str(out / "shards"),
                        "--out",
                        str(out / "eval"),
                        "--methods",
                        "sd-inpaint,pva",
                        "--adapter",
                        str(adapter),
                        "--max-persons",
                        "2",
                        "--steps",
                        str(spec.eval_steps),
                        "--masks",
                        "wholeface",
                        "--no-edit",
                    ),
                    log / "evaluate.log",
                )
            ]
        raise AssertionError(stage)

    for stage in STAGES:
        if state.done(stage):
            continue
        print(f"== {stage}", flush=True)
        if stage == "train":
            result = train(out, spec)
        elif stage == "bench":
            run = run_stage_command(_internal("bench", out, spec), out / "logs" / "bench.log")
            result = {"runs": [run], **json.loads((out / "bench.json").read_text())}
        else:
            result = {"runs": commands(stage)}
        state.finish(stage, result)
        took = sum(r["seconds"] for r in result["runs"])
        print(
            f"   {took:.0f} s, peak {max(r['peak_rss_gb'] for r in result['runs'])} GB", flush=True
        )
    report = write_report(out, state.data)
    print(f"report: {report}")
    return report


def _personalize_seconds(out: Path) -> float | None:
    """Seconds of the fine-tune from ``pva personalize``'s summary line."""
    import re

    text = (out / "logs" / "personalize.log").read_text(errors="replace")
    found = re.findall(r"(\d+) steps, ([\d.]+) s", text)
    return float(found[-1][1]) / int(found[-1][0]) if found else None


def write_report(out: Path, data: dict) -> Path:
    """``OUT/report.md``: every command with its time and peak memory, and the derived figures."""
    stages, spec = data["stages"], data["settings"]["size"]
    lines = [
        f"# pva rehearse ({spec['name']}, {spec['image_size']} px, CPU, "
        f"{torch.get_num_threads()} threads)",
        "",
        "| stage | command | seconds | peak RSS (GB) |",
        "|---|---|---|---|",
    ]
    for stage in STAGES:
        for run in stages.get(stage, {}).get("runs", []):
            note = " (killed)" if run["killed"] else ""
            command = run["command"].replace(sys.executable, "python").replace(str(out), "OUT")
            command = command.replace(f"{REPO}/", "")
            lines.append(
                f"| {stage} | `{command}`{note} | {run['seconds']:.0f} | {run['peak_rss_gb']:.1f} |"
            )
    lines.append("")
    if "train" in stages:
        t = stages["train"]
        lines.append(
            f"- Training: {t['s_per_step']:.1f} s per optimizer step (1 image x 1 "
            f"timestep, bf16-mixed); killed after the step-{t['resumed_from_step']} "
            f"checkpoint, resumed from it to step {t['final_step']}."
        )
    per_ft = _personalize_seconds(out) if "personalize" in stages else None
    if per_ft is not None:
        lines.append(
            f"- `pva personalize`: {per_ft:.1f} s per step (2 timesteps, fp32, the "
            f"first step's encoders included): 40 steps about {40 * per_ft / 60:.1f} "
            f"min."
        )
    if "bench" in stages:
        b = stages["bench"]
        ddim, ft = b["ddim_s_per_step"], b["ft_s_per_step"]
        speedup = 1000 * ft["custom-diffusion"] / (40 * ft["pva"])
        lines += [
            f"- DDIM step (guidance {b['guidance']:g}, one batched CFG call, {b['references']} "
            f"references): PVA {ddim['pva']:.2f} s, diffusers' StableDiffusionInpaintPipeline "
            f"{ddim['diffusers']:.2f} s, ratio {b['ddim_ratio']:.3f}; 100 steps about "
            f"{100 * ddim['pva'] / 60:.1f} min.",
            f"- Fine-tuning step: PVA-FT {ft['pva']:.1f} s, Custom Diffusion "
            f"{ft['custom-diffusion']:.1f} s, ratio {b['ft_ratio']:.2f}; 40 PVA-FT steps "
            f"vs 1000 Custom Diffusion steps: {speedup:.1f}x less time.",
        ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _main(argv: list[str]) -> None:
    """``python -m pva.rehearse STAGE OUT SIZE [PHOTOS]``: one in-process stage."""
    stage, out, size = argv[0], Path(argv[1]), SIZES[argv[2]]
    torch.set_num_threads(min(os.cpu_count() or 1, torch.get_num_threads()))
    if stage == "models":
        write_models(out, size)
    elif stage == "data":
        write_data(out, size, argv[3] if len(argv) > 3 else None)
    elif stage == "bench":
        result = bench(out, size)
        with atomic_path(out / "bench.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    else:
        raise SystemExit(f"unknown stage {stage!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
