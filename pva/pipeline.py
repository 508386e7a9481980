"""``PVAInpaintPipeline``: a diffusers pipeline for personalized face inpainting and editing.

::

    pipe = PVAInpaintPipeline.from_pretrained("./sd2-inpainting")
    pipe.load_pva("pva.safetensors", face_model="./ms1mv3_arcface_r50.pth")
    out = pipe(image, mask_region="lowerface", reference_images=refs,
               prompt="photo of a <new1> person, smiling").images[0]

Photos of any size work: the face is found with dlib, a face-centred square around it (grown to
hold the whole mask when the mask reaches past it) is inpainted at the model resolution, and the
result is composited back. With ``paste_back`` (default) every
pixel outside the mask equals the input exactly.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import BaseOutput
from PIL import Image

from pva.adapter import config_from_adapter, load_adapter, read_adapter, save_adapter
from pva.backbone import Backbone, load_backbone, model_resolution
from pva.checks import ETA, GUIDANCE, POSITIVE_INT, check_ranges
from pva.composite import composite
from pva.face_encoders import face_model_present, load_face_encoder
from pva.faces import (
    BadImageError,
    _to_rgb,
    align_face,
    crop_square,
    detect_landmarks,
    face_centred_crop,
    face_square,
    load_rgb,
    pixel_limit,
    region_box,
)
from pva.identity import IResNet, save_iresnet
from pva.model import PVAModel
from pva.prompts import UNCOND_PROMPT, conditional_prompt
from pva.sampling import ddim_inpaint

ImageInput = str | os.PathLike | Image.Image | np.ndarray
MaskRegion = Literal["lowerface", "eyebrow", "wholeface", "random"]
CALL_RANGES = {
    "guidance_scale": GUIDANCE,
    "num_inference_steps": POSITIVE_INT,
    "eta": ETA,
    "num_images_per_prompt": POSITIVE_INT,
}
"""The allowed range of each numeric argument of :meth:`PVAInpaintPipeline.__call__`."""


@dataclass
class PVAInpaintOutput(BaseOutput):
    """Pipeline output: ``images`` (PIL, the input's size)."""

    images: list[Image.Image]


def as_rgb(image: ImageInput, name: str = "image") -> np.ndarray:
    """A path, PIL image or array -> (H, W, 3) uint8 RGB (EXIF orientation applied)."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{name} '{path}' not found")
        try:
            return load_rgb(path)
        except BadImageError as err:
            raise ValueError(f"{name} '{path}': {err}") from None
    if isinstance(image, Image.Image):
        from PIL import ImageOps

        return _to_rgb(ImageOps.exif_transpose(image))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{name}: expected (H, W, 3) or (H, W, 4), got {arr.shape}")
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _warn(message: str) -> None:
    """Warn, attributed to the caller's line: the first frame outside this module and torch."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (
        frame.f_code.co_filename == __file__ or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _place(canvas_hw: tuple[int, int], crop: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """Resize a (S, S[, C]) crop to the box side and place it on a zero canvas of the photo size."""
    h, w = canvas_hw
    left, top, side = box
    resized = np.asarray(Image.fromarray(crop).resize((side, side), Image.BICUBIC))
    canvas = np.zeros((h, w, *crop.shape[2:]), dtype=crop.dtype)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = resized[y0 - top : y1 - top, x0 - left : x1 - left]
    return canvas


def _square_covering(box: tuple[int, int, int], mask: np.ndarray) -> tuple[int, int, int]:
    """The smallest square holding the square ``box`` and every set pixel of the (H, W) mask."""
    ys, xs = np.nonzero(mask)
    left, top, side = box
    x0, y0 = min(left, int(xs.min())), min(top, int(ys.min()))
    x1, y1 = max(left + side, int(xs.max()) + 1), max(top + side, int(ys.max()) + 1)
    new = max(x1 - x0, y1 - y0)
    return x0 - (new - (x1 - x0)) // 2, y0 - (new - (y1 - y0)) // 2, new


def _crop_mask(mask: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """Cut the face square out of a full-size bool mask (zeros beyond the photo) -> (S, S)."""
    left, top, side = box
    h, w = mask.shape
    pad = max(0, -left, -top, left + side - w, top + side - h)
    src = np.pad(mask, pad) if pad else mask
    cut = src[top + pad : top + pad + side, left + pad : left + pad + side]
    img = Image.fromarray(cut.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return np.asarray(img) > 127


def _full_mask(mask_image: ImageInput, hw: tuple[int, int]) -> np.ndarray:
    """The photo-size (H, W) bool mask from a path, PIL image or array (white = fill)."""
    h, w = hw
    if isinstance(mask_image, str | os.PathLike):
        if not Path(mask_image).is_file():
            raise FileNotFoundError(f"mask '{mask_image}' not found")
        try:
            with pixel_limit(), Image.open(mask_image) as im:
                mask = np.asarray(im.convert("L"))
        except BadImageError as err:
            raise ValueError(f"mask '{mask_image}': {err}") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"mask '{mask_image}': unreadable image ({err})") from None
    elif isinstance(mask_image, Image.Image):
        mask = np.asarray(mask_image.convert("L"))
    else:
        mask = np.asarray(mask_image)
        mask = mask if mask.ndim == 2 else mask[..., 0]
        mask = (mask > 0.5).astype(np.uint8) * 255 if mask.max() <= 1 else mask
    if mask.shape != (h, w):
        mh, mw = mask.shape
        if abs(mw / mh - w / h) > 0.01:
            raise ValueError(
                f"mask size {mw}x{mh} does not match image size {w}x{h} (different aspect ratio)"
            )
        _warn(f"mask size {mw}x{mh} differs from image size {w}x{h}; resizing it")
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))
    return mask > 127


def _region_mask(
    region: str, landmarks: np.ndarray, size: int, generator: torch.Generator | None
) -> np.ndarray:
    """The (S, S) bool mask of a named region on the face square (``random``: seeded)."""
    from pva.data.masks import box_mask, training_mask

    if region == "random":
        seed = 0 if generator is None else int(generator.initial_seed())
        boxes = {
            r: region_box(landmarks, r, (size, size)) for r in ("lowerface", "eyebrow", "wholeface")
        }
        return training_mask(size, boxes, random.Random(seed))[0]
    if region not in ("lowerface", "eyebrow", "wholeface"):
        raise ValueError(
            f"mask_region must be lowerface, eyebrow, wholeface or random, got {region!r}"
        )
    return box_mask(size, region_box(landmarks, region, (size, size)))


@dataclass
class FaceJob:
    """A photo's face square at the model resolution, its mask, and where it goes back.

    Attributes:
        photo: The whole photo, (H, W, 3) uint8.
        image: The face square at the model resolution (PIL, S x S): the pipeline's input.
        mask: Its mask (PIL ``L``, white = fill).
        full_mask: (H, W) bool mask on the whole photo.
        box: ``(left, top, side)`` of the square in the photo (may pass its edges).
    """

    photo: np.ndarray
    image: Image.Image
    mask: Image.Image
    full_mask: np.ndarray
    box: tuple[int, int, int]

    @property
    def empty(self) -> bool:
        """Nothing to fill (on the photo or at the model resolution)."""
        return not self.full_mask.any() or not np.asarray(self.mask).any()


def prepare_face(
    image: ImageInput,
    size: int,
    mask_image: ImageInput | None = None,
    mask_region: MaskRegion | None = None,
    generator: torch.Generator | None = None,
) -> FaceJob:
    """Find the face and cut its square (grown to hold the whole mask) at ``size`` px.

    Args:
        image: The photo (path, PIL or array; any size, mode, EXIF orientation).
        size: The model resolution.
        mask_image: White = fill, the photo's size (same aspect ratio: resized with a
            warning). Or give ``mask_region``.
        mask_region: ``lowerface``, ``eyebrow``, ``wholeface`` (landmark boxes x1.2) or
            ``random`` (strokes + one box), found with dlib.
        generator: Randomness of the ``random`` mask.
    """
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    found = detect_landmarks(rgb)
    if found is None:
        name = f"'{image}'" if isinstance(image, str | os.PathLike) else "(array/PIL input)"
        raise ValueError(f"no face detected in the input image {name}")
    box = face_square(found[0])
    if mask_image is not None:
        full_mask = _full_mask(mask_image, (h, w))
        if full_mask.any():
            grown = _square_covering(box, full_mask)
            if grown != box:
                _warn(
                    f"the mask reaches past the {box[2]}-px face square: inpainting a "
                    f"{grown[2]}-px square that holds face and mask (at {size} px the face "
                    f"gets {round(size * box[2] / grown[2])} px of it)"
                )
            box = grown
        crop = crop_square(rgb, found[0], box, size)
        crop_mask = _crop_mask(full_mask, box, size)
    elif mask_region is not None:
        crop = crop_square(rgb, found[0], box, size)
        crop_mask = _region_mask(mask_region, crop.landmarks, size, generator)
        full_mask = _place((h, w), crop_mask.astype(np.uint8) * 255, crop.box) > 127
    else:
        raise ValueError("give mask_image or mask_region")
    mask = Image.fromarray(crop_mask.astype(np.uint8) * 255, "L")
    return FaceJob(rgb, Image.fromarray(crop.image), mask, full_mask, crop.box)


def paste_fills(
    job: FaceJob, fills: Sequence[np.ndarray], paste_back: bool = True, blend: bool = False
) -> list[Image.Image]:
    """Put (S, S, 3) uint8 fills of the face square back into the photo.

    Args:
        job: What :func:`prepare_face` cut out.
        fills: The model's outputs for the square.
        paste_back: Keep every pixel outside the mask equal to the photo; otherwise the whole
            square is the model's.
        blend: Hide the seam (:func:`pva.composite.composite`); needs ``paste_back``.
    """
    h, w = job.photo.shape[:2]
    size = job.image.size[0]
    inside = _place((h, w), np.full((size, size), 255, np.uint8), job.box) > 127
    feather = max(1, round(job.box[2] / 64))
    results = []
    for fill in fills:
        placed = _place((h, w), fill, job.box)  # (H, W, 3): the square, zeros elsewhere
        region = job.full_mask if paste_back else inside
        merged = composite(job.photo, placed, region, blend and paste_back, feather, inside)
        results.append(Image.fromarray(merged))
    return results


def reference_tensor(rgb: np.ndarray, landmarks: np.ndarray, face_crop: str) -> torch.Tensor:
    """A photo as the identity encoder sees it (per ``face_crop``): (3, R, R) in [-1, 1]."""
    if face_crop == "none":
        return _to_tensor(align_face(rgb, landmarks))  # (3, 112, 112)
    return _to_tensor(face_centred_crop(rgb, landmarks, 256).image)  # (3, 256, 256)


def reference_tensors(
    images: Sequence[ImageInput], face_crop: str, skip_bad: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """Detect and crop references as the identity encoder expects.

    Args:
        images: Photos of the person.
        face_crop: The adapter's ``face_crop`` (``none``: 112-px aligned faces).
        skip_bad: Skip photos without a face (warning) instead of failing.

    Returns:
        ``(K, 3, R, R)`` in [-1, 1], and the indices of the photos used.
    """
    crops, used = [], []
    for i, ref in enumerate(images):
        label = str(ref) if isinstance(ref, str | os.PathLike) else f"#{i}"
        try:
            is_path = isinstance(ref, str | os.PathLike)  # as_rgb names a path itself
            rgb = as_rgb(ref, "reference" if is_path else f"reference {label}")
            found = detect_landmarks(rgb)
            if found is None:
                raise ValueError(f"no face detected in reference {label}")
        except (ValueError, FileNotFoundError) as err:
            if not skip_bad:
                raise
            _warn(f"{err}; skipping it")
            continue
        crops.append(reference_tensor(rgb, found[0], face_crop))
        used.append(i)
    if not crops:
        raise ValueError("no usable reference photo (each needs a detectable face)")
    return torch.stack(crops), used


def adapter_face_model(
    adapter: str | os.PathLike, header: dict, face_model: str | os.PathLike | None
) -> str | os.PathLike:
    """``face_model``, else the one the adapter's header records (it must exist).

    Raises:
        FileNotFoundError: Neither is there.
    """
    if face_model is not None:
        return face_model
    recorded = header.get("paths", {}).get("face_model")
    if not recorded or not face_model_present(recorded):
        raise FileNotFoundError(
            f"adapter '{adapter}' needs its face model: pass face_model= (--face-model),"
            f" an arcface_torch .pth, an InsightFace .onnx or dlib"
        )
    return recorded


class PVAInpaintPipeline(DiffusionPipeline):
    """Stable Diffusion 2 inpainting with Parallel Visual Attention (see the module docstring).

    Args:
        vae: SD2 VAE.
        text_encoder: CLIP text encoder.
        tokenizer: CLIP tokenizer.
        unet: 9-channel inpainting UNet.
        scheduler: DDIM scheduler.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.pva: PVAModel | None = None
        self._pristine: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load the backbone folder (our offline loader); load ``pva/`` inside it if present.

        Args:
            pretrained_model_name_or_path: SD2-inpainting folder (or cached hub id), possibly
                written by :meth:`save_pretrained` (then it holds ``pva/adapter.safetensors``
                and, for an arcface_torch face encoder, ``pva/face.pth``).
            **kwargs: ``torch_dtype`` only.
        """
        dtype = kwargs.pop("torch_dtype", torch.float32)
        if kwargs:
            raise TypeError(f"unsupported arguments: {sorted(kwargs)}")
        b = load_backbone(pretrained_model_name_or_path, dtype)
        pipe = cls(b.vae, b.text_encoder, b.tokenizer, b.unet, b.scheduler)
        pva_dir = Path(pretrained_model_name_or_path) / "pva"
        if (pva_dir / "adapter.safetensors").is_file():
            face = pva_dir / "face.pth"  # an arcface_torch encoder travels with the folder;
            # dlib's or an ONNX one is the face model the adapter records (None: read it there)
            pipe.load_pva(pva_dir / "adapter.safetensors", face if face.is_file() else None)
        return pipe

    def load_pva(self, adapter: str | os.PathLike, face_model: str | os.PathLike | None = None):
        """Install the PVA pathway and load an adapter file (replacing any earlier one).

        Args:
            adapter: Adapter ``.safetensors`` (``pva personalize`` or training output).
            face_model: The conditioning face encoder (:mod:`pva.face_encoders`: an
                arcface_torch ``.pth``, an InsightFace ``.onnx`` or ``dlib``); default: the one
                recorded in the adapter, if it exists.

        Returns:
            The pipeline.
        """
        tensors, header = read = read_adapter(adapter)  # the file is read once
        face_model = adapter_face_model(adapter, header, face_model)
        if self.pva is None:
            backbone = Backbone(
                self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler
            )
            encoder = load_face_encoder(face_model)
            self.pva = PVAModel(backbone, encoder, config_from_adapter(header))
        else:  # a fresh start for every adapter: undo CrossQKV-FT weights of an earlier one
            state = self.pva.state_dict()
            with torch.no_grad():
                for key, value in self._pristine.items():
                    state[key].copy_(value)
            face = self.pva.identity_encoder.backbone
            if isinstance(face, IResNet):  # stage-2 adapters change its weights: reload them
                face.load_state_dict(load_face_encoder(face_model).state_dict())
        state = self.pva.state_dict()
        for key in tensors:
            if not self.pva.is_adapter_key(key) and key not in self._pristine and key in state:
                self._pristine[key] = state[key].detach().clone()
        load_adapter(self.pva, adapter, read)
        self.pva.eval()
        self._paths = {"adapter": str(adapter), "face_model": str(face_model)}
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False, **_):
        """Write the backbone folder plus ``pva/adapter.safetensors`` (and ``pva/face.pth``).

        The backbone is written as a stock SD2-inpainting folder (the UNet without the PVA
        processors), so :meth:`from_pretrained` and diffusers alike can read it.
        """
        path = Path(save_directory)
        procs = self.unet.attn_processors
        self.unet.set_attn_processor(AttnProcessor2_0())
        try:
            Backbone(
                self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler
            ).save_pretrained(path, overwrite=overwrite)
        finally:
            self.unet.set_attn_processor(procs)
        if self.pva is not None:
            save_adapter(self.pva, path / "pva" / "adapter.safetensors", overwrite=True)
            face = self.pva.identity_encoder.backbone
            if isinstance(face, IResNet):  # dlib's or an ONNX encoder: the adapter names it
                save_iresnet(face, path / "pva" / "face.pth")
        return path

    # --------------------------------------------------------------------------- photos
    @property
    def resolution(self) -> int:
        """Model resolution (512 for SD2)."""
        return model_resolution(self.unet, self.vae)

    def reference_tensor(self, rgb: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
        """A photo as the identity encoder sees it (per ``face_crop``): (3, R, R) in [-1, 1]."""
        assert self.pva is not None
        return reference_tensor(rgb, landmarks, self.pva.config.face_crop)

    def _reference_tensors(
        self, images: Sequence[ImageInput], skip_bad: bool
    ) -> tuple[torch.Tensor, list[int]]:
        """Detect and crop references as the identity encoder expects: (K, 3, R, R)."""
        assert self.pva is not None
        return reference_tensors(images, self.pva.config.face_crop, skip_bad)

    # ----------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | FaceJob,
        mask_image: ImageInput | None = None,
        reference_images: Sequence[ImageInput] = (),
        prompt: str | None = None,
        negative_prompt: str = UNCOND_PROMPT,
        mask_region: MaskRegion | None = None,
        mode: Literal["inpaint", "edit"] = "inpaint",
        guidance_scale: float = 6.0,
        num_inference_steps: int = 100,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        paste_back: bool = True,
        skip_bad_references: bool = False,
        progress: bool = False,
        blend: bool = False,
    ) -> PVAInpaintOutput:
        """Fill the mask of ``image`` keeping the references' identity.

        Args:
            image: The photo (path, PIL or array; any size, mode, EXIF orientation), or
                the :func:`prepare_face` of one (then its mask is used: give no other).
            mask_image: White = fill; same size as ``image`` (a different size with the same
                aspect ratio is resized with a warning). Or give ``mask_region``.
            reference_images: Photos of the same person (5 in the paper).
            prompt: Conditional prompt (``photo of a <new1> person[, ...]``); ``None``: ``photo
                of a <token> person`` with the adapter's modifier token.
            negative_prompt: Unconditional prompt (``photo of a person``).
            mask_region: ``lowerface``, ``eyebrow``, ``wholeface`` (landmark boxes x1.2) or
                ``random`` (strokes + one box), found with dlib on ``image``.
            mode: ``inpaint`` (identity only in the conditional branch) or ``edit`` (both).
            guidance_scale: Classifier-free guidance (paper: 1 or 6 inpainting, 15-30 editing).
            num_inference_steps: DDIM steps (paper: 100).
            eta: DDIM eta (paper: 1.0).
            generator: Randomness.
            num_images_per_prompt: Outputs to draw.
            paste_back: Keep every pixel outside the mask equal to the input.
            skip_bad_references: Skip references without a face (warning) instead of failing.
            progress: Show a progress bar over the DDIM steps.
            blend: Hide the seam (:func:`pva.composite.composite`): match the fill's colour to
                a ring of the photo just outside the mask and feather it in over the first
                pixels inside the border (1/64 of the inpainted square's side). Pixels outside
                the mask stay the input's. Needs ``paste_back``.
        """
        if self.pva is None:
            raise RuntimeError("no PVA adapter loaded: call load_pva(adapter, face_model) first")
        check_ranges("", locals(), CALL_RANGES)
        token = self.pva.config.modifier_token
        prompt = conditional_prompt(token) if prompt is None else prompt
        if mode == "edit" and token not in prompt:
            _warn(f"edit mode with a prompt without {token}: the identity token is unused")
        if isinstance(image, FaceJob):  # prepared by the caller: the face is found once
            if mask_image is not None or mask_region is not None:
                raise ValueError("a prepared FaceJob carries its mask: give no mask_image/region")
            job = image
        else:
            job = prepare_face(image, self.resolution, mask_image, mask_region, generator)
        if job.empty:
            _warn("the mask is empty (at the model resolution): returning the input unchanged")
            return PVAInpaintOutput(
                [Image.fromarray(job.photo) for _ in range(num_images_per_prompt)]
            )
        refs, _ = self._reference_tensors(reference_images, skip_bad_references)
        model, n = self.pva, num_images_per_prompt
        tokens = model.encode_identity(refs[None])  # (1, 10, D): once per call
        x = _to_tensor(np.asarray(job.image))[None].repeat(n, 1, 1, 1)  # (n, 3, S, S)
        crop_mask = torch.from_numpy(np.asarray(job.mask) > 127).float()  # (S, S)
        m = crop_mask[None, None].repeat(n, 1, 1, 1)  # (n, 1, S, S)
        out = ddim_inpaint(
            model,
            x,
            m,
            None,
            [prompt] * n,
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            num_steps=num_inference_steps,
            eta=eta,
            mode=mode,
            generator=generator,
            identity_tokens=tokens.repeat(n, 1, 1),
            progress=progress,
        )
        fills = [
            ((o.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            for o in out
        ]
        return PVAInpaintOutput(paste_fills(job, fills, paste_back, blend))
