"""``pva bench data``: training-sample throughput of the shard stream vs a naive layout.

Ours: one record per person (S x S training crops + 112 x 112 aligned faces, JPEG), references
drawn at load time. Naive: every training sample stores its target and 5 references as the
original full-size photos and decodes + resizes all six each time. Both run in ONE process (what
one DataLoader worker does), on the same photos, in the same run.
"""

from __future__ import annotations

import io
import math
import random
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pva.checks import IMAGE_SIDE, POSITIVE, POSITIVE_INT, check_ranges
from pva.data.reader import PersonStream
from pva.data.schema import IMAGE_EXTS, read_index
from pva.data.writer import build_shards


def _people_folders(photos: Path, min_photos: int) -> list[Path]:
    folders = []
    for source in sorted(p for p in photos.iterdir() if p.is_dir()):
        for person in sorted(p for p in source.iterdir() if p.is_dir()):
            n = sum(1 for f in person.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if n >= min_photos:
                folders.append(person)
    return folders


def _naive_tar(folders: list[Path], path: Path, samples: int, refs: int, seed: int) -> int:
    """Write ``samples`` records of (target + refs) original photo bytes; returns photo count."""
    rng = random.Random(seed)
    files = {f: sorted(x for x in f.iterdir() if x.suffix.lower() in IMAGE_EXTS) for f in folders}
    with tarfile.open(path, "w") as tar:
        for s in range(samples):
            person = rng.choice(folders)
            chosen = rng.sample(files[person], refs + 1)
            for j, f in enumerate(chosen):
                data = f.read_bytes()
                info = tarfile.TarInfo(f"{s:06d}.{j}{f.suffix.lower()}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return samples * (refs + 1)


def _naive_decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


RANGES = {
    "image_size": IMAGE_SIDE,
    "refs": POSITIVE_INT,
    "samples": POSITIVE_INT,
    "build_workers": POSITIVE_INT,
    "gpu_rates": POSITIVE,
}


def bench_data(
    photos: str | Path,
    image_size: int = 512,
    refs: int = 5,
    samples: int = 60,
    build_workers: int = 2,
    gpu_rates: Sequence[float] = (10.0, 30.0),
) -> dict:
    """Training samples/s per worker: our shards vs full-size photos per sample.

    Builds shards from PHOTOS/<source>/<person>/ (persons with refs+1 or more photos), then
    times one process (one torch thread, a DataLoader worker's view) producing training samples
    from them and from a naive layout that stores each sample's full-size target and reference
    photos, in one run.

    Args:
        photos: Folder of sources of person folders (e.g. ``../shared/data/faces``).
        image_size: Training resolution.
        refs: References per sample.
        samples: Training samples timed per layout.
        build_workers: Processes for building the shards (not timed as throughput).
        gpu_rates: GPU consumption rates (samples/s) to size the worker count for.
    """
    check_ranges("--", locals(), RANGES)
    torch.set_num_threads(1)  # one DataLoader worker's view
    photos = Path(photos)
    if not photos.is_dir():
        raise FileNotFoundError(f"--photos '{photos}' does not exist")
    folders = _people_folders(photos, refs + 1)
    if not folders:
        raise ValueError(f"no person folder under '{photos}' has {refs + 1} or more photos")
    with tempfile.TemporaryDirectory() as tmp:
        people = Path(tmp) / "people"
        people.mkdir()
        for f in folders:
            (people / f"{f.parent.name}-{f.name}").symlink_to(f.resolve())
        t0 = time.time()
        index = build_shards(
            people,
            Path(tmp) / "shards",
            image_size=image_size,
            workers=build_workers,
            val_fraction=0,
            test_fraction=0,
            min_images=refs + 1,
            progress=False,
        )
        build_s = time.time() - t0
        shard_dir = Path(tmp) / "shards"
        ours_bytes = sum(p.stat().st_size for p in shard_dir.glob("*.tar"))
        ours_images = index["splits"]["train"]["images"]
        urls = [str(shard_dir / n) for n in read_index(shard_dir)["splits"]["train"]["shards"]]
        stream = PersonStream(
            urls,
            train=True,
            batch_size=1,
            max_refs=refs,
            min_refs=refs,
            batches_per_epoch=samples + 5,
        )
        it = iter(stream)
        for _ in range(5):  # warm-up
            next(it)
        t0 = time.perf_counter()
        for _ in range(samples):
            next(it)
        ours_rate = samples / (time.perf_counter() - t0)

        naive_path = Path(tmp) / "naive.tar"
        naive_images = _naive_tar(folders, naive_path, samples, refs, seed=0)
        naive_bytes = naive_path.stat().st_size
        t0 = time.perf_counter()
        with tarfile.open(naive_path) as tar:
            members = tar.getmembers()
            for i in range(0, len(members), refs + 1):
                group = members[i : i + refs + 1]
                _naive_decode(tar.extractfile(group[0]).read(), image_size)
                for m in group[1:]:
                    _naive_decode(tar.extractfile(m).read(), 112)
        naive_rate = samples / (time.perf_counter() - t0)

    result = {
        "persons": len(folders),
        "images": ours_images,
        "build_seconds": build_s,
        "ours_samples_per_s": ours_rate,
        "naive_samples_per_s": naive_rate,
        "ours_bytes_per_image": ours_bytes / max(1, ours_images),
        "naive_bytes_per_training_image": naive_bytes / max(1, naive_images // (refs + 1)),
    }
    print(
        f"{len(folders)} persons, {ours_images} photos from {photos}; {image_size} px, "
        f"{refs} references per sample; one process (= one DataLoader worker)"
    )
    print(
        f"shard build: {build_s:.1f} s with {build_workers} processes "
        f"({ours_images / build_s:.1f} photos/s)"
    )
    print(f"\n  {'layout':<44}{'samples/s':>10}{'KB per training image':>24}")
    print(
        f"  {'ours: per-person records, crops + aligned faces':<44}{ours_rate:10.1f}"
        f"{result['ours_bytes_per_image'] / 1024:24.1f}"
    )
    print(
        f"  {'naive: full-size target + refs per sample':<44}{naive_rate:10.2f}"
        f"{result['naive_bytes_per_training_image'] / 1024:24.1f}"
    )
    print(
        f"  {'ratio (ours / naive)':<44}{ours_rate / naive_rate:10.1f}"
        f"{result['ours_bytes_per_image'] / result['naive_bytes_per_training_image']:24.3f}"
    )
    print("\nDataLoader workers one GPU needs (ours | naive):")
    for rate in gpu_rates:
        print(
            f"  at {rate:>4.0f} samples/s: {math.ceil(rate / ours_rate):>3d} | "
            f"{math.ceil(rate / naive_rate):>4d}"
        )
    return result
