"""Metrics (pva.metrics): FID/KID as clean-fid computes them, masked PSNR/SSIM, CLIP score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pva.metrics import (
    ClipScorer,
    InceptionFeatures,
    fid_from_features,
    kid_from_features,
    masked_error,
    masked_psnr,
    outside_mask_error,
)
from pva.prompts import EDIT_SUFFIXES


def test_fid_kid_with_an_injected_extractor_and_the_missing_weights_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g)
    b = torch.randn(400, 16, generator=g)  # same distribution
    shifted = torch.randn(400, 16, generator=g) + 1.0
    assert abs(fid_from_features(a, a)) < 1e-6
    assert fid_from_features(a, shifted) > 10 * max(fid_from_features(a, b), 1e-3)
    kid_same, _ = kid_from_features(a, b, subsets=20, subset_size=200)
    kid_diff, _ = kid_from_features(a, shifted, subsets=20, subset_size=200)
    assert abs(kid_same) < 0.05 < kid_diff
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        InceptionFeatures(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="ViT-B/32"):
        ClipScorer(tmp_path / "missing_clip.bin")


def test_masked_metrics():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    y = torch.where(mask > 0, -x, x)  # differs inside the mask only
    assert torch.all(outside_mask_error(y, x, mask) == 0)
    assert torch.all(masked_psnr(x, x, mask) > 90) and torch.all(masked_psnr(y, x, mask) < 20)
    assert torch.all(masked_error(x, x, mask) == 0)
    assert torch.allclose(
        masked_error(y, x, mask),
        (x.abs() * mask).flatten(1).sum(1) / (mask.expand_as(x).flatten(1).sum(1)),
    )  # |-x - x| / 2 = |x|


def test_fid_and_kid_follow_clean_fid():
    from cleanfid.fid import frechet_distance, kernel_distance
    from cleanfid.resize import make_resizer

    from pva.metrics import clean_resize

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 200, 160, 3), dtype=np.uint8)
    resize = make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid's "clean" mode
    theirs = np.stack([resize(i).transpose(2, 0, 1) for i in images])
    assert np.array_equal(clean_resize(images).numpy(), theirs)
    a, b = rng.normal(size=(250, 16)), rng.normal(0.3, 1.0, size=(250, 16))
    kid, _ = kid_from_features(torch.from_numpy(a), torch.from_numpy(b), subsets=3)
    # every subset holds all samples here, so the random subsets agree
    assert kid == pytest.approx(kernel_distance(a, b, num_subsets=3), rel=1e-9)
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    fid = fid_from_features(torch.from_numpy(a), torch.from_numpy(b))
    assert fid == pytest.approx(frechet_distance(*stats[0], *stats[1]), rel=1e-6)


def test_fid_inception_is_torch_fidelitys_network_loaded_safely(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from pva.metrics import FIDInception

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(FIDInception().state_dict(), path)
    images = torch.rand(2, 3, 64, 80) * 2 - 1
    ours = InceptionFeatures(path)(images)
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    theirs = reference(((images + 1) * 127.5).round().to(torch.uint8))[0]

    def relative(x, y):
        return float((x - y).norm() / y.norm())

    assert relative(ours, theirs) < 1e-5  # random weights: features are tiny, compare relative
    clean = InceptionFeatures(path, "clean")(images)
    assert clean.shape == (2, 2048) and relative(clean, ours) > 1e-3
    evil = tmp_path / "evil.pth"
    torch.save({"payload": Path("not a tensor")}, evil)  # a pickled object, not weights
    with pytest.raises(ValueError, match="not the FID Inception state dict"):
        InceptionFeatures(evil)


def test_clip_score_of_the_paper_is_the_raw_cosine(tmp_path):
    import open_clip
    from torchvision.transforms import functional as TF

    from pva.metrics import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    name = "pva-test-tiny-clip-quickgelu"
    config = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 64,
            "layers": 1,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 1,
        },
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    weights = tmp_path / "clip.pth"
    torch.save(model.state_dict(), weights)
    images = torch.rand(3, 3, 80, 96) * 2 - 1
    prompts = [f"photo of a person, {s}" for s in EDIT_SUFFIXES[:3]]
    paper = ClipScorer(weights, name, protocol="paper")(images, prompts)
    # figure/calc_clip_score.py: tensor resize (bicubic) + centre crop + normalise, raw cosine
    x = ((images + 1) * 127.5).round() / 255
    x = TF.center_crop(TF.resize(x, 64, TF.InterpolationMode.BICUBIC, antialias=False), [64, 64])
    x = TF.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = open_clip.get_tokenizer(name)(prompts)
        txt = torch.nn.functional.normalize(model.encode_text(txt), dim=-1)
    assert torch.allclose(paper, (img * txt).sum(-1), atol=1e-5)
    ours = ClipScorer(weights, name)(images, prompts)
    assert torch.all((ours >= 0) & (ours <= 100)) and not torch.allclose(ours, paper)
