"""``pva quickstart``: the whole PVA path end to end on the tiny random backbone, on a CPU.

It writes a tiny SD2-inpainting folder and a tiny ArcFace ``.pth``, loads them back through the
real loaders, trains the PVA pathway with Lightning (TensorBoard logs, adapter-only checkpoints),
exports the adapter, reloads it into a fresh model, and inpaints a photo with DDIM and batched
classifier-free guidance. The backbone is random, so the picture shows plumbing, not quality;
``pva demo`` (the miniature paper experiment) is where learning becomes visible.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch import Tensor

from callbacks.adapter_export import AdapterExport
from datamodules.photos import PersonPhotosDataModule, centre_mask
from pva.adapter import load_adapter
from pva.checks import GUIDANCE, POSITIVE_INT, SEED, Range, check_ranges
from pva.fileio import check_output_folder, remove_path
from pva.model import PVAModel
from pva.module import PVAModule
from pva.prompts import conditional_prompt
from pva.sampling import ddim_inpaint
from pva.tiny import tiny_pva_config, write_tiny_assets


class _LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _grid(rows: list[list[Tensor]]) -> Image.Image:
    """Rows of (3, S, S) images in [-1, 1] -> one PIL grid."""
    width = max(len(r) for r in rows)
    blank = torch.ones_like(rows[0][0])
    cells = [torch.cat(r + [blank] * (width - len(r)), dim=2) for r in rows]  # (3, S, W*S)
    arr = ((torch.cat(cells, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


QUICKSTART_RANGES = {
    "steps": POSITIVE_INT,
    "image_size": Range(16, integer=True, multiple_of=16),
    "sample_steps": POSITIVE_INT,
    "guidance": GUIDANCE,
    "seed": SEED,
}
"""The allowed range of each number of :func:`quickstart` (``pva quickstart``)."""


def quickstart(
    out: str | Path = "quickstart_out",
    steps: int = 40,
    photos: str | Path | None = None,
    image_size: int = 64,
    sample_steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Train, save, reload and sample PVA end to end on a tiny random backbone (CPU).

    Writes a tiny random SD2-inpainting backbone and ArcFace checkpoint, trains the PVA pathway
    with Lightning, exports and reloads the adapter, and inpaints a photo:
    ``out/{adapter.safetensors,inpainted.png,logs/}``. No downloads; about a minute on 2 CPU
    cores.

    Args:
        out: Output folder (refused if it exists and is not empty, unless ``overwrite``).
        steps: Training steps.
        photos: Folder of photos of one person; default: an embedded portrait.
        image_size: Training/inpainting resolution, a multiple of 16 (the tiny VAE downsamples
            by 4).
        sample_steps: DDIM steps for the final inpainting.
        guidance: Classifier-free guidance scale.
        seed: Global seed.
        overwrite: Replace an existing output folder.

    Returns:
        A summary: first and last training loss, paths written, seconds taken.
    """
    check_ranges("--", locals(), QUICKSTART_RANGES)
    t0 = time.time()
    out = Path(out)
    check_output_folder(out, "--out", overwrite)
    if out.exists() or out.is_symlink():
        remove_path(out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    print(f"[1/4] writing the tiny backbone and face model to {out / 'models'}")
    assets = write_tiny_assets(out / "models", seed=seed)
    data = PersonPhotosDataModule(photos, image_size, batch_size=4, samples_per_epoch=4 * steps)
    data.setup()
    print(f"[2/4] training the PVA pathway for {steps} steps (logs: {out / 'logs'})")
    module = PVAModule(
        str(assets.backbone),
        str(assets.face_model),
        pva=tiny_pva_config(),
        batch_size=4,
        lr_pva=1.25e-4,  # x 4 images x 2 draws = 1e-3: the tiny model, not the paper's SD2 rates
        lr_projection=1e-3,
        lr_token=1e-3,
        timestep_draws=2,
    )
    history = _LossHistory()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.TensorBoardLogger(out / "logs", name="quickstart"),
        callbacks=[history, export := AdapterExport(str(out))],
        default_root_dir=out,
        log_every_n_steps=5,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    adapter_path = export.path

    print("[3/4] reloading the adapter into a fresh model through the real loaders")
    model = PVAModel.from_paths(assets.backbone, assets.face_model, tiny_pva_config()).eval()
    load_adapter(model, adapter_path)
    trained = module.model.adapter_state_dict()
    exact = all(torch.equal(v, trained[k]) for k, v in model.adapter_state_dict().items())

    print(f"[4/4] inpainting with {sample_steps} DDIM steps, guidance {guidance}")
    photos_ = data.dataset.photos
    target, refs = photos_[0], torch.stack(photos_[1:4])
    mask = centre_mask(image_size)
    g = torch.Generator().manual_seed(seed)
    prompt = conditional_prompt(model.config.modifier_token)
    result = ddim_inpaint(
        model,
        target[None],
        mask[None],
        refs[None],
        [prompt],
        guidance_scale=guidance,
        num_steps=sample_steps,
        generator=g,
        paste_back=True,
    )[0]
    masked = target * (mask < 0.5)
    grid_path = out / "inpainted.png"
    _grid([[masked, result, target], list(refs)]).save(grid_path)
    summary = {
        "first_loss": history.losses[0],
        "last_loss": history.losses[-1],
        "mean_first_5": sum(history.losses[:5]) / min(5, len(history.losses)),
        "mean_last_5": sum(history.losses[-5:]) / min(5, len(history.losses)),
        "adapter": str(adapter_path),
        "adapter_reload_bit_exact": exact,
        "grid": str(grid_path),
        "seconds": time.time() - t0,
    }
    print(
        f"\nloss (mean of first/last 5 steps): {summary['mean_first_5']:.4f} -> "
        f"{summary['mean_last_5']:.4f}\nadapter: {adapter_path} (reloaded bit-exact: {exact})\n"
        f"grid (masked input | output | ground truth / references): {grid_path}\n"
        f"TensorBoard: tensorboard --logdir {out / 'logs'}\n"
        f"done in {summary['seconds']:.0f} s"
    )
    return summary
