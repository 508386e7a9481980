"""Evaluation metrics of METHOD section 8 (identity similarity lives in :mod:`pva.recognizers`).

* FID and KID from features: :func:`fid_from_features` (Frechet distance of Gaussians) and
  :func:`kid_from_features` (unbiased polynomial-kernel MMD, averaged over subsets). The feature
  extractor is injectable; the default :class:`InceptionFeatures` is the TF-ported FID Inception
  of torch-fidelity, loaded from a LOCAL weights file (no download).
* :class:`ClipScorer`: CLIP score ``100 * max(cos(image, text), 0)`` with open-clip ViT-B/32 from
  a local checkpoint.
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
    "open_clip_pytorch_model.bin of laion/CLIP-ViT-B-32-laion2B-s34B-b79K); pass --clip-weights."
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


class InceptionFeatures:
    """The FID Inception (torch-fidelity's ``inception-v3-compat``), 2048-d pool features.

    Args:
        weights: Local path of ``weights-inception-2015-12-05-6726825d.pth``.
    """

    def __init__(self, weights: str | Path) -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights '{path}' not found. " + INCEPTION_HINT)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        ).eval()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 2048)."""
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.model(uint8)[0]


class ClipScorer:
    """CLIP score with open-clip ViT-B/32 loaded from a local checkpoint.

    Args:
        weights: Local open-clip checkpoint of ViT-B-32.
        model_name: open-clip architecture name.
    """

    def __init__(self, weights: str | Path, model_name: str = "ViT-B-32") -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights '{path}' not found. " + CLIP_HINT)
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path)
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(N, 3, H, W) in [-1, 1] and N prompts -> (N,) CLIP scores."""
        from PIL import Image

        arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in arr])
        img = torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts)), dim=-1)
        return 100 * (img * txt).sum(-1).clamp(min=0)


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
