"""Build small CelebAHQ-IDI-format trees and person folders from the real shared photos."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from conftest import FACES
from PIL import Image

# (person id, source folder) - real photos of 6 people, several each
PERSONS = {
    "0001": "deepface/id01_img1",
    "0002": "deepface/id02_img3",
    "0003": "deepface/id03_img8",
    "0004": "deepface/id05_img16",
    "0005": "photomaker/yangmi_woman",
    "0006": "deepface/id06_img26",
}
SPLIT = {
    "0001": "train",
    "0002": "train",
    "0003": "train",
    "0004": "val",
    "0005": "test",
    "0006": "test",
}


def _photos(folder: str, limit: int = 6) -> list[Path]:
    return sorted((FACES / folder).iterdir())[:limit]


def _shrink(src: Path, dst: Path, max_side: int = 640) -> None:
    """Copy a photo, downscaled (keeps the fixture build fast; the loader handles big ones)."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        im.save(dst, quality=92)


def add_bad_photos(folder: Path, face_src: Path) -> dict[str, str]:
    """Write bad or awkward photos into ``folder``; returns {file name: expected outcome}."""
    (folder / "not_an_image.jpg").write_text("this is text, not a JPEG")
    data = face_src.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(folder / "no_face.jpg")
    with Image.open(face_src) as im:
        im = im.convert("RGB")
        im.thumbnail((640, 640))
        im.convert("CMYK").save(folder / "cmyk.jpg")
        gray16 = (np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(gray16).save(folder / "sixteen_bit.png")
        rotated = im.rotate(90, expand=True)  # stored sideways, EXIF says rotate back
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation 6: display = stored image rotated 90 degrees clockwise
        rotated.save(folder / "exif_rotated.jpg", exif=exif)
        rgba = im.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(folder / "rgba.png")
    return {
        "not_an_image.jpg": "unreadable",
        "truncated.jpg": "unreadable",
        "no_face.jpg": "no face",
        "cmyk.jpg": "ok",
        "sixteen_bit.png": "ok",
        "exif_rotated.jpg": "ok",
        "rgba.png": "ok",
    }


def make_celebahq_idi(root: Path, captions_path: Path) -> dict:
    """A CelebAHQ-IDI tree: ``image/N.jpg``, ``annotation/idi-5.json``, captions.

    Person "0006" gets one real photo plus a no-face image, so it ends with too few usable images.
    Returns facts the tests check against.
    """
    (root / "image").mkdir(parents=True)
    (root / "annotation" / "dialog").mkdir(parents=True)
    samples = json.loads(captions_path.read_text())["overall_caption_samples"]
    id2image, image2id, captions, n = {}, {}, {}, 0
    for pid, folder in PERSONS.items():
        photos = _photos(folder, 1 if pid == "0006" else 6)
        names = []
        for src in photos:
            name = f"{n}.jpg"
            _shrink(src, root / "image" / name)
            names.append(name)
            image2id[name] = pid
            if n % 2 == 0:
                captions[name] = {
                    "overall_caption": samples[n % len(samples)],
                    "attribute_wise_captions": {},
                }
            n += 1
        if pid == "0006":
            Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(root / "image" / f"{n}.jpg")
            names.append(f"{n}.jpg")
            n += 1
        id2image[pid] = {"infer": names[:2], "ref": names[2:]}
    ann = {
        "train_ids": [p for p in PERSONS if SPLIT[p] == "train"],
        "val_ids": [p for p in PERSONS if SPLIT[p] == "val"],
        "test_ids": [p for p in PERSONS if SPLIT[p] == "test"],
        "id2image": id2image,
        "image2id": image2id,
        "duplicate_images": [],
        "discard_ids": [],
        "meta": {"note": "test fixture built from ../shared/data/faces"},
    }
    (root / "annotation" / "idi-5.json").write_text(json.dumps(ann))
    (root / "annotation" / "dialog" / "captions_hq.json").write_text(json.dumps(captions))
    return {"id2image": id2image, "captions": captions}


def make_people(root: Path) -> dict[str, str]:
    """``root/<person>/*.jpg`` with 4 real people plus one folder of bad photos."""
    root.mkdir(parents=True)
    for pid, folder in list(PERSONS.items())[:4]:
        (root / f"person_{pid}").mkdir()
        for src in _photos(folder, 4):
            _shrink(src, root / f"person_{pid}" / src.name)
    bad = root / "person_mixed"
    bad.mkdir()
    expected = add_bad_photos(bad, _photos(PERSONS["0003"], 1)[0])
    for src in _photos(PERSONS["0003"], 3)[1:]:
        shutil.copy(src, bad / src.name)  # full size: the loader downsizes for detection
        expected[src.name] = "ok"
    return expected


def authors_bbox(points: np.ndarray, size: int) -> list[int]:
    """``bbox_from_points`` of the authors' script/create_id_inpaint_dataset.py, transcribed.

    Returns ``[row0, col0, row1, col1]``.
    """
    x_min, y_min = points.min(0)
    x_max, y_max = points.max(0)
    c_x, c_y = (x_min + x_max) / 2, (y_min + y_max) / 2
    h, w = x_max - x_min, y_max - y_min
    w = int(max(1.2 * w, 0.2 * size))
    h = int(max(1.2 * h, 0.2 * size))
    return [
        max(int(c_y - w / 2), 0),
        max(int(c_x - h / 2), 0),
        min(int(c_y + w / 2), size),
        min(int(c_x + h / 2), size),
    ]


AUTHORS_REGIONS = {  # create_bbox's point sets (lowerface = lm[1:16], lib/dataset.py:97)
    "leye": slice(36, 42),
    "reye": slice(43, 48),
    "eye": slice(36, 48),
    "eyebrow": np.r_[17:27, 36:48],
    "lowerface": slice(1, 16),
    "wholeface": slice(0, 68),
    "mouth": slice(48, 68),
    "nose": slice(27, 36),
}


def to_authors_annotation(root: Path) -> dict[str, dict[str, list[int]]]:
    """Add the authors' ``landmarks.json`` and ``region_bbox.pth`` to a CelebAHQ-IDI tree.

    Landmarks come from dlib (as the authors' ``dlib_landmarks``), nested as
    ``{file: {"image": {"face_landmarks": [[x, y] x 68]}}}``; boxes are the authors'
    ``bbox_from_points`` at each photo's width, except image 0's lowerface box, which is moved
    so that a test can tell the file's boxes from recomputed ones. Returns the boxes written,
    ``{file: {region: [x0, y0, x1, y1]}}`` in source pixels.
    """
    from pva.faces import detect_landmarks, load_rgb

    files = sorted((root / "image").iterdir(), key=lambda p: int(p.stem))
    n = int(files[-1].stem) + 1
    data = {
        "landmarks": torch.zeros(n, 68, 2, dtype=torch.long),
        "bboxes": {r: torch.zeros(n, 4, dtype=torch.long) for r in AUTHORS_REGIONS},
    }
    landmarks, boxes = {}, {}
    for path in files:
        image = load_rgb(path)
        found = detect_landmarks(image)
        if found is None:
            continue  # the authors' script leaves such images out
        lm = found[0].round()
        landmarks[path.name] = {"image": {"face_landmarks": lm.astype(int).tolist()}}
        idx, size = int(path.stem), image.shape[1]
        data["landmarks"][idx] = torch.from_numpy(lm).long().flip(1)
        boxes[path.name] = {}
        for region, sel in AUTHORS_REGIONS.items():
            row0, col0, row1, col1 = authors_bbox(lm[sel], size)
            if idx == 0 and region == "lowerface":
                row0, col0, row1, col1 = 10, 20, 60, 90
            data["bboxes"][region][idx] = torch.tensor([row0, col0, row1, col1])
            boxes[path.name][region] = [col0, row0, col1, row1]
    (root / "annotation" / "landmarks.json").write_text(json.dumps(landmarks))
    torch.save(data, root / "annotation" / "region_bbox.pth")
    return boxes


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar of ``members`` (name -> bytes), in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def first_record(shard: Path):
    """The first person record of a shard, parsed."""
    from pva.data.schema import parse_record

    with tarfile.open(shard) as tar:
        groups: dict = {}
        for m in tar.getmembers():
            key, field = m.name.split(".", 1)
            groups.setdefault(key, {"__key__": key})[field] = tar.extractfile(m).read()
    return parse_record(next(iter(groups.values())))


def record_members(good, key: str, person: str) -> dict[str, bytes]:
    """The tar members of ``good`` (a parsed record) under another key and person id."""
    raw = {f"{key}.meta.json": json.dumps({**good.meta, "person": person}).encode()}
    for i, (img, face) in enumerate(zip(good.img, good.face)):
        raw[f"{key}.img.{i:03d}.jpg"], raw[f"{key}.face.{i:03d}.jpg"] = img, face
    return raw


def unreadable_split(src: Path, dst: Path, split: str) -> list[str]:
    """Copy shards ``src`` to ``dst`` with every ``split`` shard unreadable; their names.

    One shard is torn inside a member; the other holds a record with a member outside the
    schema (a pickle, never read).
    """
    from pva.data.schema import read_index

    dst.mkdir()
    index = read_index(src)
    for info in index["splits"].values():
        for name in info["shards"]:
            (dst / name).write_bytes((src / name).read_bytes())
    first = src / index["splits"][split]["shards"][0]
    (dst / f"{split}-torn.tar").write_bytes(first.read_bytes()[:3000])
    evil = record_members(first_record(first), "evil", "evil")
    evil["evil.extra.pyd"] = pickle.dumps({"not": "read"})
    write_tar(dst / f"{split}-evil.tar", evil)
    index["splits"][split]["shards"] = [f"{split}-torn.tar", f"{split}-evil.tar"]
    (dst / "index.json").write_text(json.dumps(index))
    return index["splits"][split]["shards"]
