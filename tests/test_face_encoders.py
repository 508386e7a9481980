"""Conditioning face encoders (pva.face_encoders): arcface_torch, InsightFace ONNX, dlib."""

from __future__ import annotations

import pytest
import torch
from conftest import FACES

from pva.face_encoders import (
    DlibFaceEncoder,
    OnnxFaceEncoder,
    encoder_kind_of,
    face_encoder_kind,
    load_face_encoder,
)
from pva.faces import align_face, detect_landmarks, load_rgb
from pva.identity import IResNet
from pva.tiny import build_tiny_face_model


def _aligned_faces(n: int = 3) -> torch.Tensor:
    """(n, 3, 112, 112) in [-1, 1]: ArcFace-aligned faces of two real people."""
    files = [
        *sorted((FACES / "photomaker/yangmi_woman").iterdir())[:2],
        sorted((FACES / "deepface/id01_img1").iterdir())[0],
    ][:n]
    faces = []
    for f in files:
        img = load_rgb(f)
        face = align_face(img, detect_landmarks(img)[0])  # (112, 112, 3) uint8
        faces.append(torch.from_numpy(face).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(faces)


def test_the_kind_follows_the_face_model(tmp_path):
    assert face_encoder_kind("dlib") == "dlib"
    assert face_encoder_kind("x/w600k_r50.onnx") == "onnx"
    assert face_encoder_kind("ms1mv3_arcface_r50.pth") == "arcface"
    assert encoder_kind_of(build_tiny_face_model()) == "arcface"
    with pytest.raises(FileNotFoundError, match="InsightFace-format ArcFace"):
        load_face_encoder(tmp_path / "missing.onnx")


def test_an_onnx_encoder_computes_what_the_network_computes(tmp_path):
    model = build_tiny_face_model().eval()
    torch.onnx.export(
        model,
        torch.randn(1, 3, 112, 112),
        tmp_path / "rec.onnx",
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "n"}, "embedding": {0: "n"}},
        dynamo=False,
    )
    encoder = load_face_encoder(tmp_path / "rec.onnx")
    assert isinstance(encoder, OnnxFaceEncoder) and encoder.num_features == 64
    faces = _aligned_faces()
    with torch.no_grad():
        expected = model(faces)
    got = encoder(faces)  # through uint8 and InsightFace's BGR convention
    assert got.shape == expected.shape and got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cos.min() > 0.999, cos


def test_dlibs_encoder_tells_people_apart_and_has_no_parameters():
    encoder = load_face_encoder("dlib")
    assert isinstance(encoder, DlibFaceEncoder) and not isinstance(encoder, IResNet)
    assert encoder.num_features == 128 and not list(encoder.parameters())
    e = encoder(_aligned_faces())  # (3, 128): the same woman twice, then another person
    dist = torch.cdist(e, e)
    assert dist[0, 1] < 0.75 * min(dist[0, 2], dist[1, 2]), dist
    assert encoder(torch.zeros(0, 3, 112, 112)).shape == (0, 128)
