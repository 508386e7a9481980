"""The shard format (schema version 1): what ``pva shards build`` writes and every reader accepts.

ONE tar record per person, holding all of that person's usable photos, so references are drawn
at load time without duplicating bytes. Record ``<split>_<person>``::

    meta.json        {"schema": 1, "person": str, "split": str, "image_size": S,
                      "face_size": 112,
                      "images": [{"file": source file name, "role": "infer" | "ref" | "any",
                                  "caption": str or null,
                                  "landmarks": [[x, y] x 68] in the S x S image's pixels,
                                  "boxes": {"lowerface"|"eyebrow"|"wholeface"|"eye"|"leye"|
                                            "reye"|"mouth"|"nose": [x0, y0, x1, y1]}}, ...]}
    img.000.jpg      image 0 at S x S (CelebA-HQ: the whole aligned photo; folders: a
                     face-centred crop), JPEG quality 95
    face.000.jpg     image 0's 112 x 112 ArcFace-aligned face (5-point similarity), JPEG 95
    img.001.jpg ...

Shards are ``<split>-NNNNN.tar``; ``index.json`` holds the schema version, counts per split,
shard names, and every skipped image and dropped person with the reason.

Decoding is whitelisted: :func:`parse_record` accepts only ``meta.json``, ``img.NNN.jpg`` and
``face.NNN.jpg`` members (JSON, and JPEG through PIL); a record with any other member (say a
pickle ``.pyd``) is refused before anything is decoded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
"""The version written in every record's ``meta.json`` and in ``index.json``."""
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
"""Photo file suffixes read from folders."""
SPLITS = ("train", "val", "test")
"""The splits of a shard folder."""
FIELD_RE = re.compile(r"^(img|face)\.(\d{3})\.jpg$")
"""Per-image field names of a record; with ``meta.json`` the only keys a reader accepts."""


class BadRecordError(ValueError):
    """A shard record that does not follow the schema."""


@dataclass
class Person:
    """One decoded person record (image bytes are decoded lazily, per use)."""

    key: str
    meta: dict
    img: list[bytes]
    face: list[bytes]


def parse_record(sample: dict) -> Person:
    """Check a raw WebDataset sample against the schema; nothing is unpickled or executed.

    Raises:
        BadRecordError: Unknown members, missing images, bad JSON or wrong schema version.
    """
    key = sample.get("__key__", "?")
    fields = {k: v for k, v in sample.items() if not k.startswith("__")}
    unknown = [k for k in fields if k != "meta.json" and not FIELD_RE.match(k)]
    if unknown:
        raise BadRecordError(f"record '{key}' has members outside the schema: {unknown}")
    try:
        meta = json.loads(fields["meta.json"])
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise BadRecordError(f"record '{key}': bad or missing meta.json ({err})") from None
    if meta.get("schema") != SCHEMA_VERSION:
        raise BadRecordError(f"record '{key}': schema {meta.get('schema')} != {SCHEMA_VERSION}")
    n = len(meta.get("images", []))
    try:
        img = [fields[f"img.{i:03d}.jpg"] for i in range(n)]
        face = [fields[f"face.{i:03d}.jpg"] for i in range(n)]
    except KeyError as err:
        raise BadRecordError(f"record '{key}': missing member {err}") from None
    return Person(key, meta, img, face)


def read_index(folder: str | Path) -> dict:
    """Read and check a shard folder's ``index.json``."""
    path = Path(folder) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found; build shards with `pva shards build`")
    index = json.loads(path.read_text())
    if index.get("schema") != SCHEMA_VERSION:
        raise ValueError(
            f"'{path}' has schema {index.get('schema')}; this code reads {SCHEMA_VERSION}"
        )
    return index
