"""Identity scorers (pva.recognizers): dlib, InsightFace ONNX, arcface_torch, the paper's crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FACES
from PIL import Image

from pva.faces import detect_landmarks, load_rgb
from pva.recognizers import DlibRecognizer, build_recognizer
from pva.tiny import build_tiny_face_model


def _embed_all(scorer, files):
    out = []
    for f in files:
        img = load_rgb(f)
        if max(img.shape[:2]) > 800:
            im = Image.fromarray(img)
            im.thumbnail((800, 800))
            img = np.asarray(im)
        lm, _ = detect_landmarks(img)
        out.append(scorer.embed(img[None], lm[None])[0])
    return torch.stack(out)


def test_dlib_recognizer_separates_real_people():
    people = [
        "deepface/id01_img1",
        "deepface/id02_img3",
        "deepface/id03_img8",
        "photomaker/yangmi_woman",
    ]
    files = {p: sorted((FACES / p).iterdir())[:3] for p in people}
    emb = {p: _embed_all(DlibRecognizer(), f) for p, f in files.items()}
    same, diff = [], []
    for i, p in enumerate(people):
        s = emb[p] @ emb[p].T
        same += [float(s[a, b]) for a in range(3) for b in range(a + 1, 3)]
        for q in people[i + 1 :]:
            diff += (emb[p] @ emb[q].T).flatten().tolist()
    assert np.mean(same) > np.mean(diff) + 0.05, (np.mean(same), np.mean(diff))
    img = load_rgb(files[people[0]][0])
    t = torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    lm, _ = detect_landmarks(img)
    assert float(DlibRecognizer().similarity(t, t, lm[None])[0]) > 0.999


def test_insightface_onnx_and_iresnet_backends(tmp_path):
    model = build_tiny_face_model()
    axes = {"input": {0: "n"}, "embedding": {0: "n"}}
    torch.onnx.export(
        model,
        torch.randn(1, 3, 112, 112),
        tmp_path / "rec.onnx",
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes=axes,
        dynamo=False,
    )
    img = load_rgb(sorted((FACES / "photomaker/yangmi_woman").iterdir())[0])
    lm, _ = detect_landmarks(img)
    onnx = build_recognizer(str(tmp_path))
    e = onnx.embed(img[None], lm[None])
    assert onnx.name.startswith("insightface") and e.shape == (1, 64)
    torch.save(model.state_dict(), tmp_path / "r.pth")
    pth = build_recognizer(str(tmp_path / "r.pth"))
    # the same network through ONNX (BGR, InsightFace's convention) and through torch (RGB)
    assert pth.embed(img[None], lm[None]).shape == (1, 64)
    with pytest.raises(FileNotFoundError, match="InsightFace"):
        build_recognizer(str(tmp_path / "empty_dir_that_is_missing.onnx"))


def test_paper_identity_scorer_is_the_authors_fixed_crop(tmp_path):
    from pva.identity import save_iresnet
    from pva.recognizers import PaperIdentityScorer

    model = build_tiny_face_model(seed=3)
    path = save_iresnet(model, tmp_path / "glint360k_cosface_r100.pth")
    scorer = PaperIdentityScorer(path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    # figure/calc_identity_similarity.py: PIL bilinear to 256, [35:223, 35:223], pool to 112
    small = np.stack(
        [np.asarray(Image.fromarray(i).resize((256, 256), Image.BILINEAR)) for i in images]
    )
    x = torch.from_numpy(small).float().permute(0, 3, 1, 2) / 127.5 - 1
    x = torch.nn.functional.adaptive_avg_pool2d(x[:, :, 35:223, 35:223], 112)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(x), dim=-1)
    assert torch.allclose(scorer.embed(images, None), expected, atol=1e-6)
    outside = images.copy()
    outside[:, :30] = 0  # rows the crop never sees: no alignment, no detection
    assert torch.equal(scorer.embed(outside, None), scorer.embed(images, None))
    assert scorer.name == "paper:iresnet:glint360k_cosface_r100.pth"
