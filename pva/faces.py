"""Face tooling: robust photo loading, dlib landmarks, region boxes, crops and alignment.

Uses the real pretrained dlib models that ``face-recognition-models`` installs (HOG face detector,
68-point landmark predictor), so it works offline. Region boxes follow METHOD section 8 and the
authors' ``bbox_from_points`` (``script/create_id_inpaint_dataset.py``) to the pixel: the bounding
box of a landmark group, scaled 1.2x about its centre, with a minimum side of 0.2 x the image
size, clipped to the image, with the same integer truncation.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# dlib's 68-point indices (0-based)
JAW, RBROW, LBROW = range(0, 17), range(17, 22), range(22, 27)
NOSE, REYE, LEYE, MOUTH = range(27, 36), range(36, 42), range(42, 48), range(48, 68)
REGIONS: dict[str, list[int]] = {
    "lowerface": list(JAW)[1:16],
    "eyebrow": [*RBROW, *LBROW, *REYE, *LEYE],
    "wholeface": list(range(68)),
    "eye": [*REYE, *LEYE],
    "leye": list(REYE),
    "reye": list(LEYE)[1:],
    "mouth": list(MOUTH),
    "nose": list(NOSE),
}
"""Landmark groups of the region boxes, as the authors' ``create_bbox`` takes them
(``script/create_id_inpaint_dataset.py``, ``lib/dataset.py:97``): ``lowerface`` is jaw points
1..15 (``lm[1:16]``), not 0..16; ``leye`` is points 36..41 (the eye on the image's left) and
``reye`` points 43..47 (``lm[43:48]``, which leaves out 42), so boxes computed here match the
ones in the authors' ``region_bbox.pth`` name for name."""
MASK_REGIONS = ("lowerface", "eyebrow", "wholeface")
"""Regions united with free-form strokes in training masks (METHOD section 6)."""
DETECT_MAX_SIDE = 1024
"""Photos are downscaled to this longest side for detection and landmarks."""
MAX_PIXELS = 120_000_000
"""Larger photos are refused (decompression-bomb guard); 36-MP phone photos load."""


class BadImageError(ValueError):
    """A photo cannot be used; the message is the reason recorded in the shard index."""


@contextmanager
def pixel_limit() -> Iterator[None]:
    """Make :data:`MAX_PIXELS` the decompression-bomb limit of the images opened inside.

    PIL's own guard (``Image.MAX_IMAGE_PIXELS``, 89.5 MP) would otherwise refuse photos below
    the project's limit; inside, any image over :data:`MAX_PIXELS` raises :class:`BadImageError`.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"too large: over the {MAX_PIXELS:,}-pixel limit ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def load_rgb(path: str | Path) -> np.ndarray:
    """Read any common photo as (H, W, 3) uint8 RGB.

    EXIF orientation is applied; grayscale, palette, RGBA (composited on white), CMYK and 16-bit
    images are converted. Truncated, unreadable or too large (over :data:`MAX_PIXELS`) files
    raise :class:`BadImageError`.
    """
    path = Path(path)
    try:
        with pixel_limit(), Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadImageError(
                    f"too large: {img.width}x{img.height} is over the {MAX_PIXELS:,}-pixel limit"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"unreadable image ({type(err).__name__}: {err})") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        gray = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.stack([gray] * 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-8) * 255.0
        return np.stack([arr.astype(np.uint8)] * 3, axis=-1)
    return np.asarray(img.convert("RGB"))


@cache
def _dlib_models():
    """Load dlib's HOG detector and 68-point predictor once per process."""
    import dlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # face_recognition_models imports pkg_resources
        import face_recognition_models as frm

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(
        frm.pose_predictor_model_location()
    )


def detect_landmarks(image: np.ndarray) -> tuple[np.ndarray, int] | None:
    """68 landmarks (68, 2) float32 (x, y) of the largest face, and the number of faces.

    Detection runs on a copy downscaled to ``DETECT_MAX_SIDE`` (upsampled once when small).
    When that finds no face, it runs once more with one more upsampling step, which finds faces
    down to about 40 px of the downscaled copy: an 80 px face in a 2000 px photo. Coordinates
    are returned in the input image's pixels. ``None`` when no face is found.
    """
    detector, predictor = _dlib_models()
    h, w = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = image
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    upsample = 1 if max(small.shape[:2]) < 400 else 0
    rects = list(detector(small, upsample))
    if not rects and upsample == 0:  # small faces in a large photo
        rects = list(detector(small, 1))
    if not rects:
        return None
    rect = max(rects, key=lambda r: r.width() * r.height())
    shape = predictor(small, rect)
    pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32) / scale
    return pts, len(rects)


def region_box(
    landmarks: np.ndarray, region: str, image_size: tuple[int, int], scale: float = 1.2
) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` box of a landmark group, scaled about its centre, min side 0.2*S.

    The arithmetic is the authors' ``bbox_from_points``: side ``int(max(scale * extent,
    0.2 * S))``, corners ``int(centre -/+ side / 2)`` clipped to the image.

    Args:
        landmarks: (68, 2) (x, y) in image pixels.
        region: A key of :data:`REGIONS`.
        image_size: ``(width, height)``; S is the shorter side.
        scale: Box scale (1.2 in the reference protocol).
    """
    pts = np.asarray(landmarks, dtype=np.float64)[REGIONS[region]]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    min_side = 0.2 * min(image_size)
    side_x = int(max(scale * (x1 - x0), min_side))
    side_y = int(max(scale * (y1 - y0), min_side))
    w, h = image_size
    return (
        max(int(cx - side_x / 2), 0),
        max(int(cy - side_y / 2), 0),
        min(int(cx + side_x / 2), w),
        min(int(cy + side_y / 2), h),
    )


def region_boxes(landmarks: np.ndarray, image_size: tuple[int, int]) -> dict[str, list[int]]:
    """All :data:`REGIONS` boxes as ``{name: [x0, y0, x1, y1]}``."""
    return {name: list(region_box(landmarks, name, image_size)) for name in REGIONS}


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) eye centres (image-left first), nose tip, mouth corners: ArcFace's order."""
    return np.stack(
        [
            landmarks[list(REYE)].mean(0),
            landmarks[list(LEYE)].mean(0),
            landmarks[30],
            landmarks[48],
            landmarks[54],
        ]
    ).astype(np.float32)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The recognizer's input: InsightFace's 5-point similarity alignment, (size, size, 3)."""
    from insightface.utils.face_align import norm_crop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # insightface calls a deprecated skimage API
        return norm_crop(np.ascontiguousarray(image), five_points(landmarks), image_size=size)


@dataclass
class FaceCrop:
    """A square crop: the image, its landmarks in the crop's pixels, and where it came from.

    ``box`` is ``(left, top, side)`` in the source photo's pixels (may extend past its edges).
    """

    image: np.ndarray
    landmarks: np.ndarray
    box: tuple[int, int, int] = (0, 0, 0)


def face_square(landmarks: np.ndarray, context: float = 2.2) -> tuple[int, int, int]:
    """The face-centred square ``(left, top, side)`` in the photo's pixels (may pass its edges).

    The side is ``context`` x the landmark box's larger side (2.2 frames the face roughly as
    CelebA-HQ does), centred slightly above the landmark centre to include the forehead.
    """
    (x0, y0), (x1, y1) = landmarks.min(0), landmarks.max(0)
    side = context * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - 0.1 * (y1 - y0)
    return int(round(cx - side / 2)), int(round(cy - side / 2)), max(1, int(round(side)))


def crop_square(
    image: np.ndarray, landmarks: np.ndarray, box: tuple[int, int, int], size: int
) -> FaceCrop:
    """Cut ``box`` = ``(left, top, side)`` out of ``image`` and resize it to ``size``.

    Beyond the photo's edges the crop is edge-padded; the landmarks follow into its pixels.
    """
    left, top, side = box
    h, w = image.shape[:2]
    pad = max(0, -left, -top, left + side - w, top + side - h)
    src = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else image
    crop = src[top + pad : top + pad + side, left + pad : left + pad + side]
    out = np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))
    pts = (landmarks - np.array([left, top], dtype=np.float32)) * (size / side)
    return FaceCrop(out, pts.astype(np.float32), (left, top, side))


def face_centred_crop(
    image: np.ndarray, landmarks: np.ndarray, size: int, context: float = 2.2
) -> FaceCrop:
    """Square crop around the face (:func:`face_square`), resized to ``size``."""
    return crop_square(image, landmarks, face_square(landmarks, context), size)


def resize_square(image: np.ndarray, landmarks: np.ndarray, size: int) -> FaceCrop:
    """Resize an already face-aligned photo (CelebA-HQ) to ``size`` x ``size``."""
    h, w = image.shape[:2]
    out = np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))
    pts = landmarks * np.array([size / w, size / h], dtype=np.float32)
    return FaceCrop(out, pts.astype(np.float32), (0, 0, max(h, w)))
