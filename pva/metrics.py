"""Evaluation metrics of METHOD section 8 (identity similarity lives in :mod:`pva.recognizers`).

* FID and KID from features: :func:`fid_from_features` (Frechet distance of Gaussians) and
  :func:`kid_from_features` (unbiased polynomial-kernel MMD, averaged over subsets). The feature
  extractor is injectable; the default :class:`InceptionFeatures` is the FID Inception (the TF
  2015-12-05 graph as torch-fidelity ports it), loaded from a LOCAL weights file (no download),
  fed either torch-fidelity's TF1-style bilinear resize (``tf1-bilinear``, ours) or clean-fid's
  ``clean`` resize (PIL bicubic on float pixels, the paper's ``figure/calc_fid_kid.py``).
* :class:`ClipScorer`: CLIP score of an edit and its prompt from a local open-clip checkpoint:
  ``100 * max(cos, 0)`` (ours) or, in the paper's protocol, the raw cosine with OpenAI's
  ViT-B/32 (``figure/calc_clip_score.py``).
* :func:`masked_psnr`, :func:`masked_ssim` (inside the mask) and :func:`outside_mask_error`
  (mean absolute difference outside the mask: 0 with paste-back).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FeatureFn = Callable[[Tensor], Tensor]
"""(N, 3, H, W) images in [-1, 1] -> (N, D) features."""
INCEPTION_HINT = (
    "FID/KID need the FID Inception weights as a local file: "
    "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release assets on GitHub, "
    "toshas/torch-fidelity); pass its path with --inception-weights."
)
CLIP_HINT = (
    "CLIP score needs open-clip ViT-B/32 weights as a local file (for instance "
    "open_clip_pytorch_model.bin of laion/CLIP-ViT-B-32-laion2B-s34B-b79K; the paper protocol "
    "uses OpenAI's, open_clip_model.safetensors of timm/vit_base_patch32_clip_224.openai); "
    "pass --clip-weights."
)


def fid_from_features(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    from scipy import linalg

    a64, b64 = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu1, mu2 = a64.mean(0), b64.mean(0)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as clean-fid does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kid_from_features(
    a: Tensor, b: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over subsets of the unbiased MMD^2.

    Kernel ``k(x, y) = (x.y / D + 1) ** 3``; ``subset_size`` is capped by the smaller set.
    """
    x, y = a.double(), b.double()
    n = min(subset_size, len(x), len(y))
    if n < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        xs = x[torch.randperm(len(x), generator=g)[:n]]
        ys = y[torch.randperm(len(y), generator=g)[:n]]
        kxx, kyy = (xs @ xs.T / d + 1) ** 3, (ys @ ys.T / d + 1) ** 3
        kxy = (xs @ ys.T / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diag().sum()) + (kyy.sum() - kyy.diag().sum())) / (n * (n - 1))
        values.append(float(mmd - 2 * kxy.mean()))
    arr = np.array(values)
    return float(arr.mean()), float(arr.std())


def clean_resize(images: np.ndarray, size: int = 299) -> Tensor:
    """clean-fid's ``clean`` resize: (N, H, W, 3) uint8 -> (N, 3, size, size) float in [0, 255].

    Each channel is resized as a float32 PIL image with bicubic filtering and clipped to
    [0, 255], with no quantisation afterwards (clean-fid's ``make_resizer("PIL", False,
    "bicubic", (size, size))``).
    """
    from PIL import Image

    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for n, image in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
            resized = channel.resize((size, size), resample=Image.BICUBIC)
            out[n, c] = np.asarray(resized).clip(0, 255)
    return torch.from_numpy(out)


INCEPTION_LAYERS = (
    *("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1"),
    *("Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2"),
    *("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d"),
    *("Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"),
)
"""The FID Inception's layers up to the 2048-d pool, in order (torch-fidelity's names)."""


class FIDInception(torch.nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 weights) with torch-fidelity's layer layout.

    Built from torch-fidelity's blocks, so its ``weights-inception-2015-12-05-6726825d.pth``
    loads strictly, but loaded here with ``torch.load(weights_only=True)`` (torch-fidelity's own
    constructor unpickles the file without that guard).

    Args:
        weights: Local path of the state dict, or ``None`` for random weights (tests, shapes).
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import (
            BasicConv2d,
            InceptionA,
            InceptionB,
            InceptionC,
            InceptionD,
            InceptionE_1,
            InceptionE_2,
        )

        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = torch.nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = torch.nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.fc = torch.nn.Linear(2048, 1008)  # the logits head: in the file, unused here
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Inception weights '{path}' not found. " + INCEPTION_HINT)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.load_state_dict(state)
            except Exception as err:  # noqa: BLE001 - pickle refusals, corrupt or other files
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                message = f"'{path}' is not the FID Inception state dict ({reason})"
                raise ValueError(message) from None
        self.requires_grad_(False).eval()

    def forward(self, pixels: Tensor) -> Tensor:
        """(N, 3, 299, 299) float pixels in [0, 255] -> (N, 2048) pool features."""
        x = (pixels - 128) / 128  # the graph's own input scaling
        for name in INCEPTION_LAYERS:
            x = getattr(self, name)(x)
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (N, 2048)


class InceptionFeatures:
    """FID Inception pool features of images, with one of two resize conventions.

    Args:
        weights: Local path of ``weights-inception-2015-12-05-6726825d.pth`` (``None``: random
            weights, for tests).
        resize: ``tf1-bilinear`` (torch-fidelity's, ours) or ``clean`` (clean-fid's ``clean``
            mode, the paper's FID/KID).
    """

    def __init__(self, weights: str | Path | None, resize: str = "tf1-bilinear") -> None:
        if resize not in ("tf1-bilinear", "clean"):
            raise ValueError(f"resize must be 'tf1-bilinear' or 'clean', got {resize!r}")
        self.model, self.resize = FIDInception(weights), resize

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 2048)."""
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 3, H, W)
        if self.resize == "clean":
            pixels = clean_resize(uint8.permute(0, 2, 3, 1).cpu().numpy())  # (N, 3, 299, 299)
        else:
            from torch_fidelity.interpolate_compat_tensorflow import (
                interpolate_bilinear_2d_like_tensorflow1x,
            )

            pixels = interpolate_bilinear_2d_like_tensorflow1x(
                uint8.float(), size=(299, 299), align_corners=False
            )
        return self.model(pixels)


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIP score of images and prompts with a CLIP model loaded from a local checkpoint.

    Args:
        weights: Local open-clip checkpoint (``.safetensors``, ``.bin`` or ``.pth``; loaded
            with ``weights_only=True``).
        model_name: open-clip architecture name (``ViT-B-32``; the paper's OpenAI weights need
            ``ViT-B-32-quickgelu``).
        protocol: ``ours``: ``100 * max(cos, 0)`` with open-clip's PIL preprocessing.
            ``paper``: the raw cosine, with the reference's tensor preprocessing (bicubic resize
            of the shorter side to 224 without antialiasing, as torchvision did on tensors
            before 0.17, centre crop, OpenAI normalisation; ``figure/calc_clip_score.py``).
    """

    def __init__(
        self, weights: str | Path, model_name: str = "ViT-B-32", protocol: str = "ours"
    ) -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights '{path}' not found. " + CLIP_HINT)
        if protocol not in ("ours", "paper"):
            raise ValueError(f"protocol must be 'ours' or 'paper', got {protocol!r}")
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path)
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.protocol = protocol

    def _pixels(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> the model's (N, 3, R, R) input."""
        if self.protocol == "paper":
            from torchvision.transforms import functional as TF

            size = self.model.visual.image_size
            size = size[0] if isinstance(size, tuple | list) else int(size)
            x = ((images.clamp(-1, 1) + 1) * 127.5).round() / 255.0  # the PNG's pixels in [0, 1]
            x = TF.resize(x, size, TF.InterpolationMode.BICUBIC, antialias=False)
            x = TF.center_crop(x, [size, size])
            return TF.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        from PIL import Image

        arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([self.preprocess(Image.fromarray(a)) for a in arr])

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(N, 3, H, W) in [-1, 1] and N prompts -> (N,) CLIP scores."""
        img = torch.nn.functional.normalize(self.model.encode_image(self._pixels(images)), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts)), dim=-1)
        cosine = (img * txt).sum(-1)
        return cosine if self.protocol == "paper" else 100 * cosine.clamp(min=0)


def _mask_bool(mask: Tensor) -> Tensor:
    return mask[:, 0] > 0.5 if mask.dim() == 4 else mask > 0.5  # (N, H, W)


def masked_psnr(output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """PSNR (dB, images in [-1, 1] mapped to [0, 1]) inside the mask, per image: (N,)."""
    m = _mask_bool(mask).unsqueeze(1).expand_as(output)  # (N, 3, H, W)
    diff = ((output - target) / 2) ** 2
    mse = (diff * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def masked_ssim(output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """SSIM over the bounding box of the mask, per image: (N,)."""
    from skimage.metrics import structural_similarity

    values = []
    for o, t, m in zip(output, target, _mask_bool(mask)):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys) == 0:
            values.append(float("nan"))
            continue
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        a = ((o[:, y0:y1, x0:x1] + 1) / 2).permute(1, 2, 0).cpu().numpy()
        b = ((t[:, y0:y1, x0:x1] + 1) / 2).permute(1, 2, 0).cpu().numpy()
        win = min(7, a.shape[0], a.shape[1])
        win -= 1 - win % 2  # SSIM windows are odd
        if win < 3:
            values.append(float("nan"))
            continue
        values.append(structural_similarity(a, b, channel_axis=2, data_range=1.0, win_size=win))
    return torch.tensor(values)


def outside_mask_error(output: Tensor, source: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute difference outside the mask ([0, 1] units), per image: (N,)."""
    outside = (~_mask_bool(mask)).unsqueeze(1).expand_as(output)
    diff = ((output - source).abs() / 2) * outside
    return diff.flatten(1).sum(1) / outside.flatten(1).sum(1).clamp(min=1)


def masked_error(output: Tensor, source: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute difference inside the mask ([0, 1] units), per image: (N,)."""
    inside = _mask_bool(mask).unsqueeze(1).expand_as(output)
    diff = ((output - source).abs() / 2) * inside
    return diff.flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
