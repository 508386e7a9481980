"""``pva shards build``: CelebAHQ-IDI or per-person photo folders -> shards.

The format is :mod:`pva.data.schema`.

Shards and the index are written under temporary names and renamed when complete; an existing
output is replaced only with ``overwrite`` and only after the new one is complete.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tarfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from torch import Tensor

from pva.checks import (
    IMAGE_SIDE,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    Range,
    RangeError,
    check_ranges,
)
from pva.data.schema import IMAGE_EXTS, SCHEMA_VERSION, SPLITS
from pva.faces import (
    REGIONS,
    BadImageError,
    align_face,
    detect_landmarks,
    face_centred_crop,
    load_rgb,
    region_boxes,
    resize_square,
)
from pva.fileio import atomic_path, check_output_folder, remove_path

SourceFormat = Literal["auto", "celebahq-idi", "people"]


@dataclass
class PhotoJob:
    """One photo to process."""

    person: str
    split: str
    path: Path
    role: str = "any"
    caption: str | None = None
    landmarks: list | None = None  # given landmarks (source pixels), else dlib runs
    crop: str = "face"  # "face": face-centred crop; "full": resize the whole (aligned) photo
    boxes: dict[str, list[int]] | None = None  # given region boxes [x0, y0, x1, y1] (source px)


@dataclass
class PersonRecord:
    """A person's usable photos after processing."""

    person: str
    split: str
    images: list[dict] = field(default_factory=list)
    blobs: list[tuple[bytes, bytes]] = field(default_factory=list)  # (img jpg, face jpg)


def _safe_key(text: str) -> str:
    """A tar-key-safe version of a person id (no dots, slashes or spaces)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)


def encode_jpeg(array: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as the JPEG bytes a shard stores (quality 95)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def full_photo_boxes(
    landmarks: np.ndarray,
    source_size: tuple[int, int],
    image_size: int,
    given: dict[str, list[int]] | None = None,
) -> dict[str, list[int]]:
    """Region boxes of a whole (CelebA-HQ-aligned) photo stored at ``image_size``, as the authors.

    Boxes are made at the source resolution (or taken from ``given``, the authors'
    ``region_bbox.pth``) and scaled by ``image_size / source width`` with truncation, the
    authors' ``(bbox * scale).long()`` (``lib/dataset.py:422-423``).

    Args:
        landmarks: (68, 2) (x, y) in source pixels.
        source_size: ``(width, height)`` of the source photo.
        image_size: Side S of the stored photo.
        given: Boxes ``{region: [x0, y0, x1, y1]}`` in source pixels that replace the computed ones.
    """
    scale = image_size / source_size[0]
    boxes = {**region_boxes(landmarks, source_size), **(given or {})}
    return {name: [int(v * scale) for v in box] for name, box in boxes.items()}


def process_photo(job: PhotoJob, image_size: int) -> dict:
    """Load, find the face, crop, align: the record entry and its bytes, or a skip reason."""
    try:
        image = load_rgb(job.path)
        if job.landmarks is not None:
            landmarks = np.asarray(job.landmarks, dtype=np.float32)
            if landmarks.shape != (68, 2) or not np.isfinite(landmarks).all():
                return {"job": job, "skip": f"landmarks of shape {landmarks.shape}, not 68 x 2"}
            faces = 1
        else:
            found = detect_landmarks(image)
            if found is None:
                return {"job": job, "skip": "no face detected"}
            landmarks, faces = found
        aligned = align_face(image, landmarks)
        if job.crop == "full":
            crop = resize_square(image, landmarks, image_size)
            height, width = image.shape[:2]
            boxes = full_photo_boxes(landmarks, (width, height), image_size, job.boxes)
        else:
            crop = face_centred_crop(image, landmarks, image_size)
            boxes = region_boxes(crop.landmarks, (image_size, image_size))
    except BadImageError as err:
        return {"job": job, "skip": str(err)}
    except Exception as err:  # noqa: BLE001 - a bad photo must never stop a long build
        return {"job": job, "skip": f"processing failed ({type(err).__name__}: {err})"}
    entry = {
        "file": job.path.name,
        "role": job.role,
        "caption": job.caption,
        "landmarks": np.round(crop.landmarks, 2).tolist(),
        "boxes": boxes,
    }
    if faces > 1:
        entry["faces_detected"] = faces
    return {
        "job": job,
        "entry": entry,
        "img": encode_jpeg(crop.image),
        "face": encode_jpeg(aligned),
    }


def _process(args: tuple[PhotoJob, int]) -> dict:
    return process_photo(*args)


# ---------------------------------------------------------------------------- sources
def detect_format(root: Path) -> str:
    """``celebahq-idi`` when ``root`` has ``annotation/idi-*.json``, else ``people``."""
    if list((root / "annotation").glob("idi-*.json")):
        return "celebahq-idi"
    return "people"


def image_index(name: str) -> int | None:
    """The authors' image index of a file name (``123.jpg`` or ``123_4.jpg`` -> 123)."""
    head = Path(name).stem.split("_")[0]
    return int(head) if head.isdigit() else None


def read_landmarks_json(path: Path) -> dict[str, list]:
    """``annotation/landmarks.json`` -> ``{file: [[x, y] x 68]}`` in source pixels.

    Accepts the authors' layout, ``{"123.jpg": {"image": {"face_landmarks": [[x, y] x 68]}}}``
    (``script/create_id_inpaint_dataset.py:48``), and the flat ``{"123.jpg": [[x, y] x 68]}``.

    Raises:
        ValueError: An entry of neither layout (naming the file and the entry).
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"'{path}' is not readable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"'{path}' must map file names to landmarks, not a {type(raw).__name__}")
    out = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            image = value.get("image")
            value = image.get("face_landmarks") if isinstance(image, dict) else None
        if not isinstance(value, list) or len(value) != 68:
            raise ValueError(
                f"'{path}': entry '{name}' is neither [[x, y] x 68] nor "
                f'{{"image": {{"face_landmarks": [[x, y] x 68]}}}}'
            )
        out[name] = value
    return out


def read_region_bbox(path: Path) -> tuple[dict[str, Tensor], Tensor | None]:
    """The authors' ``annotation/region_bbox.pth``: boxes per region and landmarks per image.

    The file is ``{"landmarks": (N, 68, 2) as (row, col), "bboxes": {region: (N, 4)}}`` with
    boxes ``[row0, col0, row1, col1]`` at the source resolution, indexed by image number
    (``script/create_id_inpaint_dataset.py``, ``create_bbox``); it is loaded with
    ``weights_only=True`` (tensors and plain containers only, no pickled code).

    Returns:
        ``({region: (N, 4) long [x0, y0, x1, y1]}, (N, 68, 2) float (x, y) or None)``.

    Raises:
        ValueError: The file is not of that form (naming it).
    """
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle refusals and corrupt files alike
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        message = f"'{path}' could not be loaded with weights_only=True ({reason})"
        raise ValueError(message) from None
    bboxes = data.get("bboxes") if isinstance(data, dict) else None
    if not isinstance(bboxes, dict) or not all(
        isinstance(b, torch.Tensor) and b.dim() == 2 and b.shape[1] == 4 for b in bboxes.values()
    ):
        form = '{"bboxes": {region: (N, 4) tensor}}'
        raise ValueError(f"'{path}' is not the authors' region_bbox.pth ({form})")
    boxes = {name: b.long()[:, [1, 0, 3, 2]] for name, b in bboxes.items()}  # (N, 4) x0 y0 x1 y1
    lms = data.get("landmarks")
    landmarks = None
    if isinstance(lms, torch.Tensor) and lms.dim() == 3 and lms.shape[1:] == (68, 2):
        landmarks = lms.float().flip(-1)  # (N, 68, 2) (row, col) -> (x, y)
    return boxes, landmarks


def celebahq_idi_jobs(root: Path, num_refs: int = 5) -> tuple[list[PhotoJob], dict]:
    """Jobs for a CelebAHQ-IDI tree (METHOD section 9) and a description of the source.

    Reads ``annotation/idi-{num_refs}.json``, optional ``annotation/dialog/captions_hq.json``
    (or ``annotation/captions_hq.json``), optional ``annotation/landmarks.json`` (see
    :func:`read_landmarks_json`) and optional ``annotation/region_bbox.pth`` (see
    :func:`read_region_bbox`): the benchmark's own region boxes, used instead of computed ones.
    Landmarks come from ``landmarks.json``, else from ``region_bbox.pth``, else dlib runs.
    """
    ann_path = root / "annotation" / f"idi-{num_refs}.json"
    if not ann_path.is_file():
        raise FileNotFoundError(f"CelebAHQ-IDI annotation '{ann_path}' not found")
    ann = json.loads(ann_path.read_text())
    for key in ("id2image",) + tuple(f"{s}_ids" for s in SPLITS):
        if key not in ann:
            raise ValueError(f"'{ann_path}' has no '{key}' key; is it a CelebAHQ-IDI annotation?")
    captions: dict = {}
    for cand in (
        root / "annotation" / "dialog" / "captions_hq.json",
        root / "annotation" / "captions_hq.json",
    ):
        if cand.is_file():
            captions = json.loads(cand.read_text())
            break
    lm_path = root / "annotation" / "landmarks.json"
    landmarks = read_landmarks_json(lm_path) if lm_path.is_file() else {}
    bbox_path = root / "annotation" / "region_bbox.pth"
    bboxes, bbox_landmarks = read_region_bbox(bbox_path) if bbox_path.is_file() else ({}, None)

    def boxes_of(index: int | None) -> dict[str, list[int]] | None:
        if index is None:
            return None
        found = {
            name: b[index].tolist()
            for name, b in bboxes.items()
            if index < len(b) and bool((b[index] != 0).any())
        }
        return found or None  # all-zero rows: the authors found no face there

    def landmarks_of(name: str, index: int | None) -> list | None:
        if name in landmarks:
            return landmarks[name]
        if bbox_landmarks is not None and index is not None and index < len(bbox_landmarks):
            if bool((bbox_landmarks[index] != 0).any()):
                return bbox_landmarks[index].tolist()
        return None

    jobs = []
    for split in SPLITS:
        for pid in ann[f"{split}_ids"]:
            roles = ann["id2image"].get(str(pid), {})
            for role in ("infer", "ref"):
                for name in roles.get(role, []):
                    cap = captions.get(name, {})
                    index = image_index(name)
                    jobs.append(
                        PhotoJob(
                            person=str(pid),
                            split=split,
                            path=root / "image" / name,
                            role=role,
                            caption=(cap.get("overall_caption") or None)
                            if isinstance(cap, dict)
                            else None,
                            landmarks=landmarks_of(name, index),
                            crop="full",
                            boxes=boxes_of(index),
                        )
                    )
    source = {
        "format": "celebahq-idi",
        "root": str(root),
        "annotation": ann_path.name,
        "captions": bool(captions),
        "landmarks": bool(landmarks),
        "region_bbox": bool(bboxes),
    }
    return jobs, source


def write_region_bbox(
    landmarks: dict[str, list], num_images: int, resolution: int, path: Path
) -> None:
    """Write an authors'-format ``region_bbox.pth`` from ``{file: [[x, y] x 68]}``.

    What ``create_bbox`` of ``script/create_id_inpaint_dataset.py`` writes: ``landmarks``
    (N, 68, 2) long as (row, col) and ``bboxes`` ``{region: (N, 4) long [row0, col0, row1,
    col1]}`` at ``resolution``, rows indexed by image number (zeros where a file is missing).
    Used by ``pva demo`` and the tests to produce the authors' tree.
    """
    import torch

    data = {
        "landmarks": torch.zeros(num_images, 68, 2, dtype=torch.long),
        "bboxes": {r: torch.zeros(num_images, 4, dtype=torch.long) for r in REGIONS},
    }
    for name, points in landmarks.items():
        index = image_index(name)
        if index is None or index >= num_images:
            raise ValueError(f"'{name}' is not an image number below {num_images}")
        lm = np.asarray(points, dtype=np.float64)
        data["landmarks"][index] = torch.from_numpy(lm).long().flip(1)
        for region, (x0, y0, x1, y1) in region_boxes(lm, (resolution, resolution)).items():
            data["bboxes"][region][index] = torch.tensor([y0, x0, y1, x1])
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def people_jobs(
    root: Path, val_fraction: float = 0.1, test_fraction: float = 0.3, seed: int = 0
) -> tuple[list[PhotoJob], dict]:
    """Jobs for ``root/<person>/*.jpg``, split by person with a seeded shuffle.

    ``round(test_fraction * n)`` persons go to test, ``round(val_fraction * n)`` to val, the rest
    to train (METHOD section 9 uses 30% / 10% / 60%).
    """
    persons = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not persons:
        raise ValueError(f"'{root}' has no person folders (expected {root}/<person>/*.jpg)")
    order = list(range(len(persons)))
    random.Random(seed).shuffle(order)
    n_test = round(test_fraction * len(persons))
    n_val = round(val_fraction * len(persons))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    jobs = []
    for i, folder in enumerate(persons):
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        for f in files:
            if f.suffix.lower() in IMAGE_EXTS:
                jobs.append(PhotoJob(person=folder.name, split=split_of[i], path=f))
    source = {
        "format": "people",
        "root": str(root),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }
    return jobs, source


# ---------------------------------------------------------------------------- writing
def _write_shard(path: Path, records: Iterable[PersonRecord], image_size: int) -> None:
    """Write one tar of person records under a temporary name, then rename."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for rec in records:
            key = f"{rec.split}_{_safe_key(rec.person)}"
            meta = {
                "schema": SCHEMA_VERSION,
                "person": rec.person,
                "split": rec.split,
                "image_size": image_size,
                "face_size": 112,
                "images": rec.images,
            }
            members = [("meta.json", json.dumps(meta).encode())]
            for i, (img, face) in enumerate(rec.blobs):
                members += [(f"img.{i:03d}.jpg", img), (f"face.{i:03d}.jpg", face)]
            for name, data in members:
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


BUILD_RANGES = {
    "image_size": IMAGE_SIDE,
    "num_refs": POSITIVE_INT,
    "persons_per_shard": POSITIVE_INT,
    "min_images": Range(2, integer=True),
    "workers": POSITIVE_INT,
    "val_fraction": PROBABILITY,
    "test_fraction": PROBABILITY,
    "seed": SEED,
}
"""The allowed range of each numeric argument of :func:`build_shards` (``pva shards build``)."""


def build_shards(
    input_dir: str | Path,
    /,
    out: str | Path,
    source_format: SourceFormat = "auto",
    image_size: int = 512,
    num_refs: int = 5,
    persons_per_shard: int = 64,
    min_images: int = 2,
    workers: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """CelebAHQ-IDI tree or people/<person>/*.jpg -> WebDataset shards + index.json.

    Detects the face (dlib, largest face), its 68 landmarks and region boxes in every photo,
    stores a face-centred training crop and a 112x112 aligned face, one record per person, and
    writes index.json with counts and every skipped photo's reason; returns the index.

    Args:
        input_dir: A CelebAHQ-IDI root (``image/``, ``annotation/``) or a folder of person folders.
        out: Output folder (refused when non-empty, unless ``overwrite``).
        source_format: Source layout: a CelebAHQ-IDI tree, a folder of person folders, or
            ``auto`` (detected).
        image_size: Side S of the stored training images (512 for SD2).
        num_refs: Which ``idi-N.json`` to read (CelebAHQ-IDI only).
        persons_per_shard: Person records per shard.
        min_images: Persons with fewer usable photos are dropped (a target needs references).
        workers: Processes for face detection and cropping.
        val_fraction: Person folders: fraction of persons for validation.
        test_fraction: Person folders: fraction of persons for test.
        seed: Person folders: split seed.
        overwrite: Replace a non-empty output folder (only once the new build is complete).
        progress: Show a progress bar.
    """
    input_dir, out = Path(input_dir), Path(out)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder '{input_dir}' does not exist")
    check_output_folder(out, "--out", overwrite)
    check_ranges("--", locals(), BUILD_RANGES)
    if val_fraction + test_fraction > 1:
        raise RangeError(
            f"--val-fraction + --test-fraction must be at most 1, got "
            f"{val_fraction} + {test_fraction}"
        )
    fmt = detect_format(input_dir) if source_format == "auto" else source_format
    if fmt == "celebahq-idi":
        jobs, source = celebahq_idi_jobs(input_dir, num_refs)
    elif fmt == "people":
        jobs, source = people_jobs(input_dir, val_fraction, test_fraction, seed)
    else:
        raise ValueError(f"unknown source format {source_format!r}")

    t0 = time.time()
    results: list[dict] = []
    args = [(job, image_size) for job in jobs]
    bar = tqdm(total=len(jobs), desc="photos", unit="img", disable=not progress)
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            for res in pool.imap(_process, args, chunksize=4):
                results.append(res)
                bar.update()
    else:
        for a in args:
            results.append(_process(a))
            bar.update()
    bar.close()

    persons: dict[tuple[str, str], PersonRecord] = {}
    skipped = []
    for res in results:  # results keep job order: deterministic records
        job = res["job"]
        rec = persons.setdefault((job.split, job.person), PersonRecord(job.person, job.split))
        if "skip" in res:
            skipped.append({"file": str(job.path), "person": job.person, "reason": res["skip"]})
            continue
        rec.images.append(res["entry"])
        rec.blobs.append((res["img"], res["face"]))
    dropped, kept = [], defaultdict(list)
    for (split, person), rec in sorted(persons.items()):
        if len(rec.images) < min_images:
            dropped.append(
                {
                    "person": person,
                    "split": split,
                    "usable_images": len(rec.images),
                    "reason": f"fewer than {min_images} usable images",
                }
            )
        else:
            kept[split].append(rec)

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    splits = {}
    try:
        for split in SPLITS:
            recs = kept.get(split, [])
            names = []
            for s in range(0, len(recs), persons_per_shard):
                name = f"{split}-{s // persons_per_shard:05d}.tar"
                _write_shard(partial / name, recs[s : s + persons_per_shard], image_size)
                names.append(name)
            splits[split] = {
                "persons": len(recs),
                "images": sum(len(r.images) for r in recs),
                "shards": names,
            }
        index = {
            "schema": SCHEMA_VERSION,
            "source": source,
            "image_size": image_size,
            "face_size": 112,
            "splits": splits,
            "photos_seen": len(jobs),
            "skipped_images": skipped,
            "dropped_persons": dropped,
            "seconds": round(time.time() - t0, 1),
        }
        with atomic_path(partial / "index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=1))
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            partial.rename(out)
            remove_path(old)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return index
