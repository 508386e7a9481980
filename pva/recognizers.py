"""Face recognizers that SCORE identity similarity (never the one that conditions the model).

METHOD section 8: identity similarity is the cosine between the output and the ground-truth image
under a recognizer different from the conditioning one. Backends:

* ``dlib`` (default, offline): dlib's 128-d ResNet from ``face-recognition-models``.
* a path to an arcface_torch IResNet ``.pth`` (the paper: Glint360K CosFace R100), run on
  5-point-aligned 112x112 crops;
* an InsightFace ArcFace ONNX model (a ``.onnx`` file or a model folder such as buffalo_l).

Faces are located with the ground-truth landmarks of the image being scored (the output and its
ground truth share the geometry outside the mask), so a failed detection on a poor output never
silently drops a sample. :class:`PaperIdentityScorer` is the paper's protocol instead: no
alignment, a fixed crop of the CelebA-HQ-aligned photo (``figure/calc_identity_similarity.py``).
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pva.faces import align_face


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return arr.permute(0, 2, 3, 1).cpu().numpy()


class Recognizer:
    """Embeds faces given their 68 landmarks; ``similarity`` is the cosine of embeddings."""

    name = "recognizer"

    def embed(self, images: np.ndarray, landmarks: np.ndarray) -> Tensor:
        """(N, H, W, 3) uint8 and (N, 68, 2) landmarks -> (N, D) unit vectors."""
        raise NotImplementedError

    def similarity(self, a: Tensor, b: Tensor, landmarks: np.ndarray) -> Tensor:
        """Cosine similarity per pair of (N, 3, H, W) images in [-1, 1] -> (N,)."""
        ea = self.embed(to_uint8(a), landmarks)
        eb = self.embed(to_uint8(b), landmarks)
        return (ea * eb).sum(-1)


@cache
def dlib_face_model():
    """Dlib's face-recognition ResNet (128-d; installed offline by face-recognition-models)."""
    import dlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # face_recognition_models imports pkg_resources
        import face_recognition_models as frm

    return dlib.face_recognition_model_v1(frm.face_recognition_model_location())


class DlibRecognizer(Recognizer):
    """dlib's 128-d face-recognition ResNet (real pretrained weights, installed offline)."""

    name = "dlib"

    def embed(self, images: np.ndarray, landmarks: np.ndarray) -> Tensor:  # noqa: D102
        import dlib

        from pva.faces import _dlib_models

        _, predictor = _dlib_models()
        model = dlib_face_model()
        out = []
        for img, lm in zip(images, landmarks):
            (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
            rect = dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
            shape = predictor(np.ascontiguousarray(img), rect)
            out.append(np.array(model.compute_face_descriptor(np.ascontiguousarray(img), shape)))
        return F.normalize(torch.tensor(np.stack(out), dtype=torch.float32), dim=-1)


class IResNetRecognizer(Recognizer):
    """An arcface_torch IResNet ``.pth`` (e.g. ``glint360k_cosface_r100.pth``) on aligned faces."""

    def __init__(self, path: str | Path) -> None:
        from pva.identity import load_iresnet

        self.model = load_iresnet(path)
        self.name = f"iresnet:{Path(path).name}"

    @torch.no_grad()
    def embed(self, images: np.ndarray, landmarks: np.ndarray) -> Tensor:  # noqa: D102
        crops = np.stack([align_face(img, lm) for img, lm in zip(images, landmarks)])
        x = torch.from_numpy(crops).float().permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, 112, 112)
        return F.normalize(self.model(x), dim=-1)


class PaperIdentityScorer(Recognizer):
    """The paper's identity scorer: an arcface_torch IResNet on a fixed crop, no alignment.

    Each image is resized to 256 x 256 with PIL's bilinear filter, cropped to rows and columns
    35:223 and average-pooled to 112 x 112 (``figure/calc_identity_similarity.py:93, 158-165``,
    ``lib/face_net.py:256-264``); the paper used Glint360K CosFace R100. Landmarks are ignored:
    the crop assumes CelebA-HQ's alignment.

    Args:
        path: arcface_torch ``.pth`` (``glint360k_cosface_r100.pth``).
    """

    def __init__(self, path: str | Path) -> None:
        from pva.identity import load_iresnet

        self.model = load_iresnet(path)
        self.name = f"paper:iresnet:{Path(path).name}"

    @staticmethod
    def preprocess(images: np.ndarray) -> Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, 112, 112) in [-1, 1], the paper's crop."""
        from PIL import Image

        resized = np.stack(
            [np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR)) for img in images]
        )  # (N, 256, 256, 3)
        x = torch.from_numpy(resized).float().permute(0, 3, 1, 2) / 127.5 - 1.0
        return F.adaptive_avg_pool2d(x[:, :, 35:223, 35:223], (112, 112))

    @torch.no_grad()
    def embed(self, images: np.ndarray, landmarks: np.ndarray | None = None) -> Tensor:  # noqa: D102
        return F.normalize(self.model(self.preprocess(images)), dim=-1)


class InsightFaceRecognizer(Recognizer):
    """An InsightFace ArcFace ONNX model (a ``.onnx`` file, or a model dir such as buffalo_l).

    Args:
        path: The recognition ``.onnx``, or a folder holding one (``w600k_r50.onnx`` in
            ``~/.insightface/models/buffalo_l``); nothing is downloaded.
    """

    def __init__(self, path: str | Path) -> None:
        import insightface

        path = Path(path).expanduser()
        candidates = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
        if not candidates or not all(c.is_file() for c in candidates):
            raise FileNotFoundError(
                f"no InsightFace ONNX model at '{path}'. Download buffalo_l from InsightFace's "
                f"model zoo (github.com/deepinsight/insightface, python-package) and pass the "
                f"folder or its w600k_r50.onnx."
            )
        for onnx in candidates:
            model = insightface.model_zoo.get_model(str(onnx), providers=["CPUExecutionProvider"])
            if getattr(model, "taskname", None) == "recognition":
                self.model = model
                self.name = f"insightface:{onnx.name}"
                return
        raise ValueError(f"'{path}' holds no InsightFace recognition model")

    def embed(self, images: np.ndarray, landmarks: np.ndarray) -> Tensor:  # noqa: D102
        crops = [align_face(img, lm)[..., ::-1].copy() for img, lm in zip(images, landmarks)]
        feats = torch.from_numpy(np.asarray(self.model.get_feat(crops), dtype=np.float32))
        return F.normalize(feats, dim=-1)  # (BGR crops: InsightFace's convention)


def build_recognizer(spec: str = "dlib") -> Recognizer:
    """``"dlib"``, an arcface_torch ``.pth``, or an InsightFace ``.onnx`` / model folder."""
    if spec == "dlib":
        return DlibRecognizer()
    path = Path(spec).expanduser()
    if path.is_dir() or path.suffix == ".onnx":
        return InsightFaceRecognizer(path)
    return IResNetRecognizer(spec)
