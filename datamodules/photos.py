"""A folder of photos of ONE person as PVA training batches (the quick start's data).

The full CelebAHQ-IDI / many-person WebDataset pipeline is a separate module; this one serves
small runs on a single person's photos.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pva.checks import NONNEGATIVE_INT, POSITIVE_INT, SEED, Range, check_ranges
from pva.faces import pixel_limit
from pva.prompts import MODIFIER_TOKEN, conditional_prompt

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _to_tensor(img: Image.Image, size: int) -> Tensor:
    """PIL image -> centre square crop -> (3, size, size) in [-1, 1]."""
    img = ImageOps.exif_transpose(img).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return arr.permute(2, 0, 1).contiguous()


def load_photos(folder: str | Path | None, size: int) -> list[Tensor]:
    """Photos of one person as (3, size, size) tensors; the embedded default without a folder.

    The default is scikit-image's astronaut portrait, with six crops around the face standing in
    for several photos of one person.
    """
    if folder is None:
        from skimage import data

        full = Image.fromarray(data.astronaut())
        boxes = [
            (150, 10, 350, 210),
            (140, 0, 360, 220),
            (160, 20, 340, 200),
            (145, 15, 345, 215),
            (155, 5, 355, 205),
            (135, 10, 365, 240),
        ]
        return [_to_tensor(full.crop(b), size) for b in boxes]
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--photos: folder '{folder}' does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    photos = []
    for path in files:
        try:
            with pixel_limit(), Image.open(path) as img:
                photos.append(_to_tensor(img, size))
        except (OSError, SyntaxError, ValueError) as err:  # BadImageError is a ValueError
            print(f"skipping unreadable photo {path}: {err}")
    if len(photos) < 2:
        raise ValueError(f"--photos: '{folder}' needs at least 2 readable photos of one person")
    return photos


def centre_mask(size: int) -> Tensor:
    """(1, size, size) mask over the lower-middle of a face-centred crop (1 = fill)."""
    mask = torch.zeros(1, size, size)
    mask[:, size // 2 : size * 7 // 8, size // 4 : size * 3 // 4] = 1.0
    return mask


class OnePersonDataset(Dataset):
    """Training samples from one person's photos: a target, its mask, K other photos.

    Args:
        photos: (3, S, S) tensors in [-1, 1].
        num_refs: References per sample (the others, with replacement when too few).
        length: Samples per epoch.
        seed: Sampling seed.
        modifier_token: The model's learned token in the prompt.
    """

    def __init__(
        self,
        photos: list[Tensor],
        num_refs: int = 3,
        length: int = 64,
        seed: int = 0,
        modifier_token: str = MODIFIER_TOKEN,
    ):
        self.photos, self.num_refs, self.length, self.seed = photos, num_refs, length, seed
        self.modifier_token = modifier_token

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(self.seed * 100003 + i)
        t = rng.randrange(len(self.photos))
        others = [j for j in range(len(self.photos)) if j != t]
        refs = [self.photos[rng.choice(others)] for _ in range(self.num_refs)]
        image = self.photos[t]
        if rng.random() < 0.5:
            image = image.flip(-1)
        return {
            "image": image,
            "mask": centre_mask(image.shape[-1]),
            "references": torch.stack(refs),  # (K, 3, S, S)
            "prompt": conditional_prompt(self.modifier_token),
        }


PHOTOS_RANGES = {
    "image_size": Range(16, integer=True, multiple_of=16),
    "num_refs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "samples_per_epoch": POSITIVE_INT,
    "num_workers": NONNEGATIVE_INT,
    "seed": SEED,
}
"""The allowed range of each numeric :class:`PersonPhotosDataModule` argument."""


class PersonPhotosDataModule(L.LightningDataModule):
    """Training batches from one person's photos (``image``, ``mask``, ``references``, ``prompt``).

    Args:
        photos: Folder of photos of one person; ``None``: the embedded astronaut portrait.
        image_size: Square training resolution.
        num_refs: References per sample.
        batch_size: Samples per batch.
        samples_per_epoch: Samples per epoch.
        num_workers: DataLoader worker processes.
        seed: Sampling seed.
        modifier_token: The model's learned token in the prompt (``train.py`` links it to
            ``model.pva.modifier_token``).
    """

    def __init__(
        self,
        photos: str | None = None,
        image_size: int = 64,
        num_refs: int = 3,
        batch_size: int = 4,
        samples_per_epoch: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        modifier_token: str = MODIFIER_TOKEN,
    ) -> None:
        super().__init__()
        check_ranges("data.", locals(), PHOTOS_RANGES)
        self.save_hyperparameters()
        self.dataset: OnePersonDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and crop the photos."""
        hp = self.hparams
        if self.dataset is None:
            self.dataset = OnePersonDataset(
                load_photos(hp.photos, hp.image_size),
                hp.num_refs,
                hp.samples_per_epoch,
                hp.seed,
                hp.modifier_token,
            )

    def train_dataloader(self) -> DataLoader:
        """Batches of ``batch_size`` samples."""
        self.setup()
        return DataLoader(
            self.dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers
        )
