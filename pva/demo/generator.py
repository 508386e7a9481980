"""Procedural faces for ``pva demo``: persons whose identity lives partly inside the masked regions.

A person is a set of discrete attributes drawn once from the person's seed. Some are *hidden*: they
are drawn only inside the regions the evaluation masks cover (iris colour and eye shape, eyebrow
colour, thickness and shape under the ``eyebrow`` box; lip colour, mouth width and a mole under the
``lowerface`` box). The others are *visible* context (skin tone, hair colour and style, face
width, nose width). All attributes are drawn independently, so a masked region's attributes cannot
be inferred from the rest of the photo, but they can from the person's other photos.

Every photo of a person varies by nuisance factors drawn from the photo's own seed: position,
scale and in-plane rotation, lighting (brightness and a directional gradient), background, clothing
colour, expression (smile, open mouth, eye openness) and pixel noise. The 68 landmarks follow
dlib's layout and are exact: the shapes are drawn from the same points.

:func:`write_idi_tree` writes a CelebAHQ-IDI tree (METHOD section 9) that ``pva shards build``
reads like the real dataset, plus ``annotation/attributes.json`` (the generator's ground truth).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pva.data.writer import write_region_bbox
from pva.fileio import atomic_dir

IRIS = {
    "brown": (105, 62, 30),
    "blue": (50, 110, 215),
    "green": (40, 160, 70),
    "grey": (150, 150, 160),
    "amber": (220, 150, 20),
    "violet": (150, 60, 200),
}
BROW = {
    "black": (25, 20, 20),
    "brown": (100, 60, 30),
    "blonde": (215, 180, 100),
    "red": (170, 60, 25),
}
LIPS = {
    "pale pink": (225, 150, 150),
    "red": (200, 30, 40),
    "dark red": (110, 20, 30),
    "brown": (130, 80, 55),
    "purple": (120, 50, 130),
}
SKIN = {
    "pale": (245, 220, 200),
    "light": (230, 190, 160),
    "tan": (200, 150, 110),
    "brown": (150, 100, 70),
    "dark": (95, 65, 45),
}
HAIR = {
    "black": (20, 18, 18),
    "brown": (95, 60, 35),
    "blonde": (225, 195, 120),
    "auburn": (150, 60, 30),
    "grey": (175, 175, 175),
}

HIDDEN = {  # attribute -> (choices, region whose evaluation mask covers it)
    "iris": (tuple(IRIS), "eyebrow"),
    "eye_shape": (("narrow", "almond", "round"), "eyebrow"),
    "brow_colour": (tuple(BROW), "eyebrow"),
    "brow_thickness": (("thin", "thick"), "eyebrow"),
    "brow_shape": (("flat", "arched", "angled"), "eyebrow"),
    "lips": (tuple(LIPS), "lowerface"),
    "mouth_width": (("narrow", "medium", "wide"), "lowerface"),
    "mole": (("none", "left cheek", "right cheek", "chin"), "lowerface"),
}
"""Attributes drawn only inside a masked region, with the region (:data:`pva.faces.REGIONS`)."""
VISIBLE = {
    "skin": tuple(SKIN),
    "hair": tuple(HAIR),
    "hair_style": ("short", "long", "bangs"),
    "face_width": ("slim", "medium", "broad"),
    "nose": ("small", "large"),
}
"""Attributes visible in the unmasked context."""
ATTRIBUTES = {**{k: v[0] for k, v in HIDDEN.items()}, **VISIBLE}
"""Every attribute and its choices."""


@dataclass(frozen=True)
class Person:
    """One identity: an index per attribute of :data:`ATTRIBUTES`."""

    iris: int
    eye_shape: int
    brow_colour: int
    brow_thickness: int
    brow_shape: int
    lips: int
    mouth_width: int
    mole: int
    skin: int
    hair: int
    hair_style: int
    face_width: int
    nose: int

    def names(self) -> dict[str, str]:
        """Attribute values as words."""
        return {k: ATTRIBUTES[k][v] for k, v in asdict(self).items()}

    def caption(self, smile: float, mouth_open: float) -> str:
        """A CelebA-Dialog-style caption describing the attributes and the expression."""
        n = self.names()
        mole = "" if n["mole"] == "none" else f", and a mole on the {n['mole']}"
        if mouth_open > 0.5:
            expression = "with the mouth open"
        elif smile > 0.5:
            expression = "smiling"
        else:
            expression = "with a neutral expression"
        return (
            f"This person has {n['hair_style']} {n['hair']} hair, {n['skin']} skin, "
            f"{n['iris']} {n['eye_shape']} eyes, {n['brow_thickness']} {n['brow_shape']} "
            f"{n['brow_colour']} eyebrows, {n['mouth_width']} {n['lips']} lips{mole}, "
            f"and is {expression}."
        )


def sample_person(seed: int, index: int) -> Person:
    """Person ``index`` of generator ``seed`` (independent of how many persons are drawn)."""
    rng = np.random.default_rng([seed, index, 0])
    return Person(**{k: int(rng.integers(len(v))) for k, v in ATTRIBUTES.items()})


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _canonical_shapes(p: Person, smile: float, mouth_open: float, eye_open: float) -> dict:
    """Face geometry in face units (origin at the face centre, y down, face half-height ~0.33)."""
    fw = (0.24, 0.265, 0.29)[p.face_width]
    face_cy, face_ry = 0.03, 0.33
    s = {}
    t = np.linspace(np.pi, 0, 17)  # jaw: image-left ear, chin (8), image-right ear
    jaw = np.stack([fw * np.cos(t), face_cy + face_ry * np.sin(t)], 1)
    s["face"] = _ellipse(0, face_cy, fw, face_ry)
    # eyes: 36-41 image-left eye, 42-47 image-right eye (outer corner first on the left one)
    eye_rx = 0.065
    eye_ry = (0.022, 0.03, 0.038)[p.eye_shape] * eye_open
    eyes = []
    for sign in (-1, 1):
        cx, cy = sign * 0.105, -0.05
        xs = np.array([-1, -0.45, 0.45, 1, 0.45, -0.45]) * eye_rx
        ys = np.array([0, -1, -1, 0, 1, 1]) * eye_ry
        pts = np.stack([cx + xs, cy + ys], 1)
        eyes.append(pts)
    s["eyes"] = eyes
    s["iris_r"] = min(0.032, eye_ry * 1.2)
    # brows: 17-21 image-left, 22-26 image-right
    brows = []
    for sign in (-1, 1):
        xs = np.linspace(-0.17, -0.045, 5) if sign < 0 else np.linspace(0.045, 0.17, 5)
        u = np.linspace(-1, 1, 5) * (-sign)  # -1 at the outer end, +1 at the inner end
        if p.brow_shape == 0:
            lift = np.zeros(5)
        elif p.brow_shape == 1:
            lift = 0.025 * (1 - u**2)
        else:
            lift = 0.012 * (u + 1)  # rises towards the inner end
        brows.append(np.stack([xs, -0.13 - lift], 1))
    s["brows"] = brows
    s["brow_w"] = (0.016, 0.034)[p.brow_thickness]
    # nose: 27-30 bridge, 31-35 base
    nw = (0.032, 0.05)[p.nose]
    bridge = np.stack([np.zeros(4), np.linspace(-0.07, 0.05, 4)], 1)
    base = np.stack([np.linspace(-nw, nw, 5), 0.075 + np.array([0, 0.008, 0.012, 0.008, 0])], 1)
    s["nose"] = np.concatenate([bridge, base])
    # mouth: 48-59 outer lip, 60-67 inner lip
    mw = (0.065, 0.085, 0.105)[p.mouth_width]
    my, lip = 0.18, 0.02
    gap = 0.03 * mouth_open
    curve = 0.03 * smile
    ox = np.array([-1, -0.6, -0.25, 0, 0.25, 0.6, 1, 0.6, 0.25, 0, -0.25, -0.6]) * mw
    corner = -curve  # corners rise when smiling
    oy = np.array(
        [
            corner,
            -lip * 0.9,
            -lip * 1.2,
            -lip * 0.9,
            -lip * 1.2,
            -lip * 0.9,
            corner,
            lip + gap,
            lip * 1.3 + gap,
            lip * 1.4 + gap,
            lip * 1.3 + gap,
            lip + gap,
        ]
    )
    oy = oy + np.where(np.abs(ox) < mw, curve * (1 - (ox / mw) ** 2), 0) * 0.3 + my
    ix = np.array([-0.8, -0.3, 0, 0.3, 0.8, 0.3, 0, -0.3]) * mw
    iy = np.array([corner * 0.8, -0.002, 0, -0.002, corner * 0.8, gap, gap * 1.1, gap]) + my
    iy = iy + curve * 0.3 * (1 - (ix / mw) ** 2)
    s["mouth_outer"], s["mouth_inner"] = np.stack([ox, oy], 1), np.stack([ix, iy], 1)
    s["gap"] = gap
    s["mole"] = [None, (-0.15, 0.12), (0.15, 0.12), (0.04, 0.27)][p.mole]
    s["landmarks"] = np.concatenate(
        [jaw, brows[0], brows[1], s["nose"], eyes[0], eyes[1], s["mouth_outer"], s["mouth_inner"]]
    )
    # hair: a cap behind the head, plus long sides or bangs
    s["hair_cap"] = _ellipse(0, -0.06, fw * 1.18, 0.36)
    s["hair_long"] = np.array(
        [[-fw * 1.2, -0.1], [fw * 1.2, -0.1], [fw * 1.25, 0.38], [-fw * 1.25, 0.38]]
    )
    s["bangs"] = np.array(
        [
            [-fw * 0.95, -0.30],
            [fw * 0.95, -0.30],
            [fw * 0.9, -0.19],
            [0.3 * fw, -0.215],
            [-0.3 * fw, -0.19],
            [-fw * 0.9, -0.215],
        ]
    )
    s["face_half_width"] = fw
    return s


@dataclass(frozen=True)
class Photo:
    """One rendered photo: ``image`` (S, S, 3) uint8, ``landmarks`` (68, 2) in pixels."""

    image: np.ndarray
    landmarks: np.ndarray
    caption: str
    nuisance: dict


def render(
    person: Person, seed: int, person_index: int, photo_index: int, size: int = 128
) -> Photo:
    """Render photo ``photo_index`` of a person, deterministically per ``seed``.

    Args:
        person: The identity.
        seed: Generator seed.
        person_index: The person's index (part of the photo's seed).
        photo_index: The photo's index.
        size: Output side in pixels (rendered at 2x, then downsampled).
    """
    rng = np.random.default_rng([seed, person_index, 1 + photo_index])
    nz = {
        "scale": float(rng.uniform(1.1, 1.3)),
        "angle": float(rng.uniform(-10, 10)),
        "dx": float(rng.uniform(-0.05, 0.05)),
        "dy": float(rng.uniform(-0.04, 0.05)),
        "smile": float(rng.uniform(-0.3, 1.0)),
        "mouth_open": float(rng.uniform(0, 1.0) if rng.random() < 0.35 else 0.0),
        "eye_open": float(rng.uniform(0.75, 1.05)),
        "brightness": float(rng.uniform(0.75, 1.15)),
        "light_angle": float(rng.uniform(0, 2 * np.pi)),
        "light_strength": float(rng.uniform(0.0, 0.3)),
        "background": [int(v) for v in rng.integers(30, 230, 3)],
        "background2": [int(v) for v in rng.integers(30, 230, 3)],
        "stripes": bool(rng.random() < 0.4),
        "shirt": [int(v) for v in rng.integers(20, 235, 3)],
    }
    shapes = _canonical_shapes(person, nz["smile"], nz["mouth_open"], nz["eye_open"])
    big = 2 * size
    a = math.radians(nz["angle"])
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    unit = big * nz["scale"]
    centre = np.array([big * (0.5 + nz["dx"]), big * (0.5 + nz["dy"])])

    def tf(pts) -> list[tuple[float, float]]:
        arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2) @ rot.T * unit + centre
        return [tuple(p) for p in arr]

    img = Image.new("RGB", (big, big), tuple(nz["background"]))
    draw = ImageDraw.Draw(img)
    if nz["stripes"]:
        step = big // 8
        for k in range(0, big, 2 * step):
            draw.rectangle([k, 0, k + step, big], fill=tuple(nz["background2"]))
    skin = SKIN[ATTRIBUTES["skin"][person.skin]]
    hair = HAIR[ATTRIBUTES["hair"][person.hair]]
    style = ATTRIBUTES["hair_style"][person.hair_style]
    draw.polygon(tf([[-0.11, 0.25], [0.11, 0.25], [0.13, 0.5], [-0.13, 0.5]]), fill=skin)  # neck
    draw.polygon(
        tf([[-0.45, 0.40], [0.45, 0.40], [0.6, 0.8], [-0.6, 0.8]]), fill=tuple(nz["shirt"])
    )
    draw.polygon(tf(shapes["hair_cap"]), fill=hair)
    if style == "long":
        draw.polygon(tf(shapes["hair_long"]), fill=hair)
    draw.polygon(tf(shapes["face"]), fill=skin)
    if style == "bangs":
        draw.polygon(tf(shapes["bangs"]), fill=hair)
    shade = tuple(int(c * 0.8) for c in skin)
    draw.line(tf(shapes["nose"][:4]), fill=shade, width=max(1, int(0.012 * unit)))
    draw.line(tf(shapes["nose"][4:]), fill=shade, width=max(1, int(0.012 * unit)))
    iris = IRIS[ATTRIBUTES["iris"][person.iris]]
    for eye in shapes["eyes"]:
        draw.polygon(tf(eye), fill=(245, 245, 240), outline=(40, 30, 30))
        c = eye[[0, 3]].mean(0)
        r = shapes["iris_r"] * unit
        ((x, y),) = tf(c)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=iris)
        draw.ellipse([x - r * 0.4, y - r * 0.4, x + r * 0.4, y + r * 0.4], fill=(10, 10, 10))
        draw.line(tf(eye[[0, 1, 2, 3]]), fill=(30, 20, 20), width=max(1, int(0.008 * unit)))
    brow = BROW[ATTRIBUTES["brow_colour"][person.brow_colour]]
    for b in shapes["brows"]:
        draw.line(tf(b), fill=brow, width=max(1, int(shapes["brow_w"] * unit)), joint="curve")
    lips = LIPS[ATTRIBUTES["lips"][person.lips]]
    draw.polygon(tf(shapes["mouth_outer"]), fill=lips)
    if shapes["gap"] > 0.004:
        draw.polygon(tf(shapes["mouth_inner"]), fill=(60, 15, 20))
    else:
        draw.line(
            tf(shapes["mouth_inner"][:5]),
            fill=tuple(int(c * 0.6) for c in lips),
            width=max(1, int(0.006 * unit)),
        )
    if shapes["mole"] is not None:
        ((x, y),) = tf(shapes["mole"])
        r = 0.028 * unit
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(55, 30, 20))
    img = img.filter(ImageFilter.GaussianBlur(0.6)).resize((size, size), Image.LANCZOS)
    # lighting: brightness times a directional gradient, then sensor noise
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    grad = xx * math.cos(nz["light_angle"]) + yy * math.sin(nz["light_angle"])
    light = nz["brightness"] * (1 + nz["light_strength"] * 2 * grad)
    arr = np.asarray(img, dtype=np.float32) * light[..., None]
    arr += rng.normal(0, 3.0, arr.shape)
    image = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    landmarks = (np.asarray(tf(shapes["landmarks"])) / 2).astype(np.float32)
    return Photo(image, landmarks, person.caption(nz["smile"], nz["mouth_open"]), nz)


def split_counts(num_persons: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Persons per split: test and val rounded, at least one each, the rest train."""
    test = max(1, round(num_persons * test_fraction))
    val = max(1, round(num_persons * val_fraction))
    if num_persons - test - val < 2:
        raise ValueError(f"{num_persons} persons leave fewer than 2 for training")
    return {"train": num_persons - test - val, "val": val, "test": test}


def write_idi_tree(
    root: str | os.PathLike,
    num_persons: int = 300,
    refs_per_person: int = 5,
    infer_per_person: int = 2,
    size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a CelebAHQ-IDI tree of procedural persons, atomically.

    Layout (what ``pva shards build`` reads): ``image/<k>.jpg``; ``annotation/idi-<refs>.json``
    (``train_ids`` / ``val_ids`` / ``test_ids``, ``id2image`` with ``infer`` and ``ref`` lists,
    ``image2id``); ``annotation/dialog/captions_hq.json`` (``overall_caption`` per image);
    ``annotation/landmarks.json`` (exact 68-point landmarks in pixels, in the authors' layout
    ``{file: {"image": {"face_landmarks": [[x, y] x 68]}}}``); ``annotation/region_bbox.pth`` (the
    authors' region boxes, :func:`pva.data.writer.write_region_bbox`); and the generator's ground
    truth ``annotation/attributes.json`` (per person: attribute words; hidden attributes and their
    regions; the seed).

    Args:
        root: Output folder; refused when it exists and is not empty, unless ``overwrite``.
        num_persons: Persons (distinct attribute combinations).
        refs_per_person: Reference photos per person (``idi-N``).
        infer_per_person: Inference (target) photos per person.
        size: Image side in pixels.
        seed: Generator seed; the same seed writes the same tree.
        val_fraction: Fraction of persons in the validation split.
        test_fraction: Fraction of persons in the test split.
        overwrite: Replace a non-empty ``root``.
        progress: Show a progress bar.

    Returns:
        The annotation dict written to ``idi-<refs>.json``.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} exists and is not empty; pass overwrite=True (--overwrite)")
    counts = split_counts(num_persons, val_fraction, test_fraction)
    persons: list[tuple[int, Person]] = []
    seen: set[Person] = set()
    index = 0
    while len(persons) < num_persons:  # distinct persons; a repeat is skipped, deterministically
        p = sample_person(seed, index)
        index += 1
        if p not in seen:
            seen.add(p)
            persons.append((index - 1, p))
    with atomic_dir(root) as tmp:
        (tmp / "image").mkdir()
        (tmp / "annotation" / "dialog").mkdir(parents=True)
        ann: dict = {
            "train_ids": [],
            "val_ids": [],
            "test_ids": [],
            "id2image": {},
            "image2id": {},
            "meta": {"generator": "pva.demo.generator", "seed": seed},
        }
        captions, landmarks, attributes = {}, {}, {}
        splits = ["test"] * counts["test"] + ["val"] * counts["val"] + ["train"] * counts["train"]
        per = refs_per_person + infer_per_person
        iterator = enumerate(persons)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(persons), desc="generate persons", unit="person")
        k = 0
        for i, (person_index, person) in iterator:
            pid = f"{i:04d}"
            ann[f"{splits[i]}_ids"].append(pid)
            names = []
            for j in range(per):
                photo = render(person, seed, person_index, j, size)
                name = f"{k}.jpg"
                k += 1
                Image.fromarray(photo.image).save(tmp / "image" / name, quality=95)
                captions[name] = {"overall_caption": photo.caption}
                points = np.round(photo.landmarks, 3).tolist()
                landmarks[name] = {"image": {"face_landmarks": points}}
                ann["image2id"][name] = pid
                names.append(name)
            ann["id2image"][pid] = {
                "infer": names[:infer_per_person],
                "ref": names[infer_per_person:],
            }
            attributes[pid] = {"index": person_index, "split": splits[i], **person.names()}
        ann["meta"].update(counts)
        ann_name = f"idi-{refs_per_person}.json"
        (tmp / "annotation" / ann_name).write_text(json.dumps(ann))
        (tmp / "annotation" / "dialog" / "captions_hq.json").write_text(json.dumps(captions))
        (tmp / "annotation" / "landmarks.json").write_text(json.dumps(landmarks))
        flat = {name: v["image"]["face_landmarks"] for name, v in landmarks.items()}
        write_region_bbox(flat, k, size, tmp / "annotation" / "region_bbox.pth")
        truth = {
            "seed": seed,
            "hidden": {k: v[1] for k, v in HIDDEN.items()},
            "choices": {k: list(v) for k, v in ATTRIBUTES.items()},
            "persons": attributes,
        }
        (tmp / "annotation" / "attributes.json").write_text(json.dumps(truth, indent=1))
    return ann
