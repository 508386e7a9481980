"""``pva personalize`` and ``pva inpaint`` (:mod:`pva.cli` makes their flags from them)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from pva.adapter import read_adapter_header, save_adapter
from pva.checks import ETA, GUIDANCE, POSITIVE_INT, SEED, Range, check_ranges
from pva.data.schema import IMAGE_EXTS
from pva.faces import BadImageError, detect_landmarks, face_centred_crop, load_rgb, region_box
from pva.fileio import atomic_path, check_output_file
from pva.personalize import personalized, trainable_for
from pva.pipeline import PVAInpaintPipeline, _to_tensor


def _photo_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)


def resolve_paths(adapter: str, backbone: str | None, face_model: str | None) -> tuple[str, str]:
    """``--backbone`` / ``--face-model``, defaulting to the paths recorded in the adapter."""
    header = read_adapter_header(adapter)
    recorded = header.get("paths", {})
    backbone = backbone or recorded.get("backbone")
    face_model = face_model or recorded.get("face_model")
    if not backbone:
        raise ValueError(f"--backbone is required (adapter '{adapter}' records no backbone path)")
    if not face_model:
        raise ValueError(f"--face-model is required (adapter '{adapter}' records none)")
    return backbone, face_model


def load_pipeline(adapter: str, backbone: str | None, face_model: str | None):
    """The pipeline with the adapter loaded."""
    backbone, face_model = resolve_paths(adapter, backbone, face_model)
    pipe = PVAInpaintPipeline.from_pretrained(backbone)
    return pipe.load_pva(adapter, face_model)


def person_tensors(pipe: PVAInpaintPipeline, files: list[Path], skip_bad: bool) -> dict:
    """Detect, crop (model resolution) and box one person's photos for personalization."""
    assert pipe.pva is not None
    size, images, refs, boxes, used = pipe.resolution, [], [], [], []
    for f in files:
        try:
            rgb = load_rgb(f)
            found = detect_landmarks(rgb)
            if found is None:
                raise ValueError(f"no face detected in reference '{f}'")
        except (BadImageError, ValueError) as err:
            if not skip_bad:
                raise ValueError(f"reference '{f}': {err}") from None
            warnings.warn(f"{err}; skipping it", stacklevel=2)
            continue
        crop = face_centred_crop(rgb, found[0], size)
        images.append(_to_tensor(crop.image))
        refs.append(pipe.reference_tensor(rgb, found[0]))
        boxes.append(region_box(crop.landmarks, "wholeface", (size, size)))
        used.append(f.name)
    if len(images) < 2:
        raise ValueError(f"need at least 2 usable photos of the person, found {len(images)}")
    return {
        "images": torch.stack(images),
        "references": torch.stack(refs),
        "boxes": boxes,
        "files": used,
    }


PERSONALIZE_RANGES = {"steps": POSITIVE_INT, "seed": SEED}
"""The allowed range of each number of :func:`personalize_cli` (``pva personalize``)."""


def personalize_cli(
    adapter: str,
    refs: str,
    out: str,
    steps: int = 40,
    variant: Literal["pva", "crossqkv"] = "pva",
    seed: int = 0,
    backbone: str | None = None,
    face_model: str | None = None,
    overwrite: bool = False,
    skip_bad_refs: bool = False,
) -> list[Path]:
    """Fine-tune an adapter to one person (or each person of a folder) in 40 steps.

    METHOD section 7: each reference in turn is the target with its wholeface box mask; the
    others, each flipped with p=0.5, plus a flipped copy of the last are the references; 2
    stratified timesteps per step; AdamW lr 1e-5 per timestep draw, 2e-5 per step (token 1e-3).
    ``refs`` is a folder of one person's photos (``out`` is then a file), or a folder of person
    folders (``out`` is then a folder receiving ``<person>.safetensors``). Every person starts
    from the same, bit-identical weights.

    Args:
        adapter: Adapter ``.safetensors`` (training output).
        refs: Folder of one person's photos, or of person folders.
        out: Output ``.safetensors`` (a folder for a folder of persons).
        steps: Optimizer steps.
        variant: ``pva``: visual Q/K/V + token (PVA-FT); ``crossqkv``: every cross-attention
            weight too (Q/K/V and output projection, CrossQKV-FT).
        seed: Random seed.
        backbone: SD2-inpainting folder (default: recorded in the adapter).
        face_model: Conditioning face encoder: an arcface_torch ``.pth``, an InsightFace
            ``.onnx`` or ``dlib`` (default: recorded in the adapter).
        overwrite: Replace existing ``out`` files.
        skip_bad_refs: Skip reference photos without a detectable face (default: fail, naming
            it).
    """
    check_ranges("--", locals(), PERSONALIZE_RANGES)
    refs_dir, out_path = Path(refs), Path(out)
    if not refs_dir.is_dir():
        raise FileNotFoundError(f"--refs '{refs_dir}' is not a folder")
    photos = _photo_files(refs_dir)
    if photos:
        persons = {refs_dir.name: (photos, out_path)}
    else:
        folders = sorted(p for p in refs_dir.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"--refs '{refs_dir}' holds no photos and no person folders")
        persons = {p.name: (_photo_files(p), out_path / f"{p.name}.safetensors") for p in folders}
        if out_path.exists() and not out_path.is_dir():
            raise NotADirectoryError(
                f"--out '{out_path}' is a file; --refs holds person folders, "
                f"so --out must be a folder"
            )
    for _, target in persons.values():
        check_output_file(target, "--out", overwrite)
    backbone, face_model = resolve_paths(adapter, backbone, face_model)
    pipe = load_pipeline(adapter, backbone, face_model)
    model = pipe.pva
    assert model is not None
    paths = {"backbone": backbone, "face_model": face_model}
    extra = []
    if variant == "crossqkv":
        extra = [
            k
            for k, _ in trainable_for(model, "crossqkv")["attention"]
            if not model.is_adapter_key(k)
        ]
    written = []
    for person, (files, target) in persons.items():
        data = person_tensors(pipe, files, skip_bad_refs)
        t0 = time.perf_counter()
        with personalized(
            model,
            data["images"],
            data["references"],
            data["boxes"],
            steps=steps,
            variant=variant,
            seed=seed,
            progress=True,
        ) as result:
            save_adapter(model, target, overwrite=True, extra_keys=extra, paths=paths)
        print(
            f"{person}: {len(data['files'])} photos, {steps} steps, "
            f"{time.perf_counter() - t0:.1f} s (final loss {result.losses[-1]:.4f}) -> {target}"
        )
        written.append(target)
    return written


INPAINT_RANGES = {
    "guidance": GUIDANCE,
    "steps": POSITIVE_INT,
    "eta": ETA,
    "seed": SEED,
    "num_images": Range(1, 64, integer=True),
}
"""The allowed range of each number of :func:`inpaint_cli` (``pva inpaint``)."""


def inpaint_cli(
    adapter: str,
    image: str,
    refs: str,
    out: str,
    prompt: str | None = None,
    mask: str | None = None,
    mask_region: Literal["lowerface", "eyebrow", "wholeface", "random"] | None = None,
    mode: Literal["inpaint", "edit"] = "inpaint",
    guidance: float = 6.0,
    steps: int = 100,
    eta: float = 1.0,
    seed: int = 0,
    num_images: int = 1,
    paste_back: bool = True,
    blend: bool = True,
    backbone: str | None = None,
    face_model: str | None = None,
    overwrite: bool = False,
    skip_bad_refs: bool = False,
) -> list[Path]:
    """Inpaint or edit a photo of the person.

    Finds the face, inpaints a face-centred square at the model resolution (grown to hold the
    mask) with DDIM and one batched classifier-free-guidance UNet call per step, and composites
    the result back into the photo; writes ``out`` (``out_0.png``, ``out_1.png``... for several
    images). Give exactly one of ``mask`` and ``mask_region``.

    Args:
        adapter: Adapter ``.safetensors`` (training or ``pva personalize`` output).
        image: Photo to fill (any size).
        refs: Folder of reference photos of the person.
        out: Output ``.png``.
        prompt: Prompt (default: photo of a <new1> person, with the adapter's modifier token).
        mask: Mask image, white = fill, the size of ``image``.
        mask_region: A mask from dlib landmarks on ``image``.
        mode: ``inpaint``: identity only in the conditional branch; ``edit``: in both (METHOD 8).
        guidance: Classifier-free guidance scale (edit: 15-30).
        steps: DDIM steps.
        eta: DDIM eta.
        seed: Random seed.
        num_images: Outputs.
        paste_back: Keep every pixel outside the mask equal to the input.
        blend: Hide the seam: match the fill's colour to the photo just outside the mask and
            feather it in over the first pixels inside the border (pixels outside the mask stay
            the input's; with ``paste_back`` only).
        backbone: SD2-inpainting folder (default: recorded in the adapter).
        face_model: Conditioning face encoder: an arcface_torch ``.pth``, an InsightFace
            ``.onnx`` or ``dlib`` (default: recorded in the adapter).
        overwrite: Replace existing ``out`` files.
        skip_bad_refs: Skip reference photos without a detectable face (default: fail, naming
            it).
    """
    check_ranges("--", locals(), INPAINT_RANGES)
    if (mask is None) == (mask_region is None):
        raise ValueError("give exactly one of --mask and --mask-region")
    out_path = Path(out)
    targets = (
        [out_path]
        if num_images == 1
        else [
            out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}") for i in range(num_images)
        ]
    )
    for target in targets:
        check_output_file(target, "--out", overwrite)
    if not Path(image).is_file():
        raise FileNotFoundError(f"--image '{image}' not found")
    if mask is not None and not Path(mask).is_file():
        raise FileNotFoundError(f"--mask '{mask}' not found")
    refs_dir = Path(refs)
    if not refs_dir.is_dir():
        raise FileNotFoundError(f"--refs '{refs_dir}' is not a folder")
    ref_files = _photo_files(refs_dir)
    if not ref_files:
        raise ValueError(f"--refs '{refs_dir}' holds no photos")
    pipe = load_pipeline(adapter, backbone, face_model)
    gen = torch.Generator().manual_seed(seed)
    result = pipe(
        image,
        mask_image=mask,
        reference_images=ref_files,
        prompt=prompt,
        mask_region=mask_region,
        mode=mode,
        guidance_scale=guidance,
        num_inference_steps=steps,
        eta=eta,
        generator=gen,
        num_images_per_prompt=num_images,
        paste_back=paste_back,
        skip_bad_references=skip_bad_refs,
        progress=True,
        blend=blend,
    )
    for img, target in zip(result.images, targets):
        fmt = Image.registered_extensions().get(target.suffix.lower(), "PNG")
        with atomic_path(target) as tmp:
            img.save(tmp, format=fmt)
        print(f"wrote {target}")
    return targets
