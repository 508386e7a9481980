"""The conditioning face encoder, a configuration choice: arcface_torch, InsightFace ONNX, dlib.

Each encoder maps preprocessed faces, (N, 3, 112, 112) in [-1, 1] (:func:`pva.identity.
preprocess_faces`), to (N, E) embeddings; the identity projection's input width follows ``E``
(``num_features``), and adapter files record which encoder they were trained with
(``face_encoder`` in the header) so that another one is refused.

==============  ==========================================  =====  ===========================
``--face-model``  encoder                                  E      trains in stage 2
==============  ==========================================  =====  ===========================
``x.pth``       arcface_torch IResNet (the paper's)           512    yes
``x.onnx``      an InsightFace-format ArcFace ONNX model       512    no (frozen)
``dlib``        dlib's face-recognition ResNet (offline)       128    no (frozen)
==============  ==========================================  =====  ===========================

Licences are the weights', not ours: see the README ("Identity encoders and their licences").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

FaceEncoderKind = Literal["arcface", "onnx", "dlib"]
"""What a face model is: an arcface_torch ``.pth``, an InsightFace ONNX model, or dlib's."""


def _uint8(faces: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 RGB."""
    x = ((faces.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


class FrozenFaceEncoder(nn.Module):
    """A face encoder that runs outside torch (no gradient, no parameters).

    Attributes:
        kind: The :data:`FaceEncoderKind`.
        num_features: The embedding width ``E``.
        source: What it was loaded from (a path, or ``dlib``).
    """

    kind: FaceEncoderKind
    num_features: int
    source: str

    def _embed(self, faces: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, faces: Tensor) -> Tensor:
        """(N, 3, 112, 112) in [-1, 1] -> (N, E) float32 embeddings, on the faces' device."""
        if faces.shape[0] == 0:
            return faces.new_zeros(0, self.num_features, dtype=torch.float32)
        out = self._embed(_uint8(faces))  # (N, E)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(faces.device)


class DlibFaceEncoder(FrozenFaceEncoder):
    """dlib's 128-d face-recognition ResNet on each aligned face, centred in its 150 px chip.

    The weights install offline with ``face-recognition-models``; nothing is downloaded. The
    faces are ArcFace-aligned (5 points) at 112 px, which frames tighter than dlib's own chips
    (25% padding): each is placed unscaled in the middle of a 150 px chip, its border
    edge-extended, which separates people better than stretching it to 150 px (BENCHMARKS.md,
    "dlib as the conditioning encoder").
    """

    kind: FaceEncoderKind = "dlib"
    num_features = 128
    source = "dlib"

    def _embed(self, faces: np.ndarray) -> np.ndarray:
        from pva.recognizers import dlib_face_model

        model = dlib_face_model()
        out = []
        for face in faces:  # (112, 112, 3): ArcFace's aligned size
            if face.shape[0] != 112:
                face = np.asarray(Image.fromarray(face).resize((112, 112), Image.BICUBIC))
            chip = np.pad(face, ((19, 19), (19, 19), (0, 0)), mode="edge")  # (150, 150, 3)
            out.append(np.asarray(model.compute_face_descriptor(chip)))
        return np.stack(out)


class OnnxFaceEncoder(FrozenFaceEncoder):
    """An InsightFace-format ArcFace ONNX model (e.g. ``w600k_r50.onnx``, or AuraFace's).

    Args:
        path: The ``.onnx`` file; InsightFace's model zoo reads its input convention.
    """

    kind: FaceEncoderKind = "onnx"

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        import insightface

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"face model '{path}' not found: pass an InsightFace-format ArcFace .onnx "
                f"(e.g. w600k_r50.onnx of buffalo_l, from github.com/deepinsight/insightface)"
            )
        model = insightface.model_zoo.get_model(str(path), providers=["CPUExecutionProvider"])
        if getattr(model, "taskname", None) != "recognition":
            raise ValueError(f"face model '{path}' is not an InsightFace recognition model")
        self.model, self.source = model, str(path.resolve())
        probe = np.zeros((1, 112, 112, 3), np.uint8)
        self.num_features = int(np.asarray(model.get_feat(list(probe))).shape[-1])

    def _embed(self, faces: np.ndarray) -> np.ndarray:
        return self.model.get_feat([f[..., ::-1].copy() for f in faces])  # BGR, as InsightFace


def face_encoder_kind(spec: str | os.PathLike) -> FaceEncoderKind:
    """The kind of face model ``spec`` names: ``dlib``, a ``.onnx`` file, or a ``.pth``."""
    if str(spec) == "dlib":
        return "dlib"
    return "onnx" if Path(spec).suffix.lower() == ".onnx" else "arcface"


def face_model_source(spec: str | os.PathLike) -> str:
    """How a face model is recorded (adapter paths, evaluation records): ``dlib`` or its path."""
    if face_encoder_kind(spec) == "dlib":
        return "dlib"
    return str(Path(spec).expanduser().resolve())


def face_model_present(spec: str | os.PathLike) -> bool:
    """Whether ``spec``'s face model is there: ``dlib`` always is, a file when it exists."""
    return face_encoder_kind(spec) == "dlib" or Path(spec).expanduser().is_file()


def load_face_encoder(spec: str | os.PathLike) -> nn.Module:
    """The conditioning face encoder ``spec`` names (see the module docstring's table).

    Raises:
        FileNotFoundError: A missing file, with where to get one.
    """
    kind = face_encoder_kind(spec)
    if kind == "dlib":
        return DlibFaceEncoder()
    if kind == "onnx":
        return OnnxFaceEncoder(spec)
    from pva.identity import load_iresnet

    return load_iresnet(spec)


def encoder_kind_of(module: nn.Module) -> FaceEncoderKind:
    """The kind of a loaded face encoder (an IResNet is ``arcface``)."""
    return getattr(module, "kind", "arcface")
