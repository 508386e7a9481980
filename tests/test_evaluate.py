"""Evaluation: real recognizer wiring, metrics, and a tiny resumable, sharded end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FACES
from data_fixtures import _shrink
from PIL import Image

from pva.adapter import save_adapter
from pva.evaluate import EDIT_SUFFIXES, evaluate
from pva.faces import detect_landmarks, load_rgb
from pva.metrics import (
    ClipScorer,
    InceptionFeatures,
    fid_from_features,
    kid_from_features,
    masked_error,
    masked_psnr,
    outside_mask_error,
)
from pva.model import PVAModel
from pva.recognizers import DlibRecognizer, build_recognizer
from pva.shards import build_shards
from pva.tiny import build_tiny_face_model, tiny_pva_config


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
    people = ["deepface/id01_img1", "deepface/id02_img3", "deepface/id03_img8",
              "photomaker/yangmi_woman"]  # fmt: skip
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
    torch.onnx.export(model, torch.randn(1, 3, 112, 112), tmp_path / "rec.onnx",
                      input_names=["input"], output_names=["embedding"], dynamic_axes=axes,
                      dynamo=False)  # fmt: skip
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
    assert torch.allclose(masked_error(y, x, mask), (x.abs() * mask).flatten(1).sum(1) /
                          (mask.expand_as(x).flatten(1).sum(1)))  # |-x - x| / 2 = |x|  # fmt: skip


@pytest.fixture(scope="module")
def eval_setup(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for src in ("deepface/id01_img1", "deepface/id03_img8", "photomaker/yangmi_woman"):
        folder = root / "people" / Path(src).name
        folder.mkdir(parents=True)
        for photo in sorted((FACES / src).iterdir())[:4]:
            _shrink(photo, folder / photo.name, 400)
    build_shards(root / "people", root / "shards", image_size=64, val_fraction=0,
                 test_fraction=1.0, progress=False)  # fmt: skip
    model = PVAModel.from_paths(tiny_assets.backbone, tiny_assets.face_model,
                                tiny_pva_config(face_crop="none"))  # fmt: skip
    adapter = save_adapter(model, root / "adapter.safetensors")
    return {"root": root, "shards": root / "shards", "adapter": adapter}


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png") if "grid_" not in p.name}


def test_tiny_evaluation_is_complete_resumable_and_shardable(eval_setup, tmp_path):
    feature = lambda x: x.mean(dim=(2, 3))  # noqa: E731 - an injected 3-d "feature extractor"
    kw = dict(methods=("sd-inpaint", "pva"), adapter=str(eval_setup["adapter"]), steps=2,
              num_refs=2, feature_fn=feature, batch_size=8)  # fmt: skip
    out = tmp_path / "ev"
    for shard in (0, 1):  # two "processes", then a full pass that must compute nothing new
        part = evaluate(str(eval_setup["shards"]), str(out), shard_index=shard, num_shards=2, **kw)
        assert part["generated_this_run"] > 0
    before = _mtimes(out)
    results = evaluate(str(eval_setup["shards"]), str(out), **kw)
    assert results["generated_this_run"] == 0 and _mtimes(out) == before

    on_disk = json.loads((out / "results.json").read_text())
    persons = {p.name for p in (out / "_gt").iterdir()}
    assert len(persons) == 3
    n_targets = len(list((out / "_gt").glob("*/*.json"))) // 4
    for method in ("sd-inpaint", "pva"):
        entry = on_disk["methods"][method]
        for mask in ("lowerface", "eyebrow", "wholeface", "random"):
            m = entry[mask]
            assert m["n"] == n_targets
            for key in ("identity_sim", "psnr", "ssim", "outside_error", "kid"):
                assert len(m[key]) == 2 and np.isfinite(m[key][0]), (method, mask, key)
            assert -1 <= m["identity_sim"][0] <= 1 and np.isfinite(m["fid"])
        assert entry["edit"]["n"] == 3 * len(EDIT_SUFFIXES)
        assert (out / f"grid_{method}.png").is_file()
    assert len(list((out / "pva").glob("*/*.png"))) == 4 * n_targets
    text = (out / "results.md").read_text()
    assert "| sd-inpaint |" in text and "| pva |" in text and "Editing" in text
    # paste-back off (the paper's protocol): outside-mask error is the VAE reconstruction's
    assert on_disk["methods"]["pva"]["wholeface"]["outside_error"][0] > 0


def test_persons_selects_and_orders_persons_and_names_unknown_ones(eval_setup, tmp_path):
    from datamodules.shards import ShardDataModule

    ids = [r.meta["person"] for r in ShardDataModule(str(eval_setup["shards"]),
                                                     num_workers=0).records("test")]  # fmt: skip
    kw = dict(methods=("sd-inpaint",), steps=1, num_refs=2, edit=False,
              adapter=str(eval_setup["adapter"]))  # fmt: skip
    evaluate(str(eval_setup["shards"]), str(tmp_path / "one"), persons=[ids[2], ids[0]],
             max_persons=1, **kw)  # fmt: skip
    assert {p.name for p in (tmp_path / "one" / "_gt").iterdir()} == {ids[2]}
    with pytest.raises(ValueError, match="--persons: nobody not in the test split"):
        evaluate(str(eval_setup["shards"]), str(tmp_path / "none"), persons=["nobody"], **kw)


def test_personalized_methods_run_and_unknown_methods_fail(eval_setup, tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        evaluate(str(eval_setup["shards"]), str(tmp_path), methods=("dreambooth",))
    results = evaluate(str(eval_setup["shards"]), str(tmp_path / "ft"),
                       methods=("pva-ft40", "custom-diffusion"),
                       adapter=str(eval_setup["adapter"]), steps=2, ft_steps=2, cd_steps=3,
                       cd_eval_steps=(1, 2), num_refs=2, max_persons=1, edit=False,
                       ft_lr=1e-3)  # fmt: skip
    for method in ("pva-ft40", "custom-diffusion"):
        secs = results["methods"][method]["seconds"]
        assert secs["adapt_s_per_person"][0] > 0 and secs["sample_s_per_image"][0] > 0
    # custom diffusion is also scored after 1 and 2 of its 3 steps, from the same run
    final = results["methods"]["custom-diffusion"]["wholeface"]
    for k in (1, 2):
        entry = results["methods"][f"custom-diffusion@{k}"]["wholeface"]
        assert entry["n"] == final["n"] > 0
        assert np.isfinite(entry["masked_error"][0]) and np.isfinite(entry["identity_sim"][0])
    early = sorted((tmp_path / "ft" / "custom-diffusion@1").rglob("*.png"))
    late = sorted((tmp_path / "ft" / "custom-diffusion").rglob("*.png"))
    assert len(early) == len(late) and any(
        not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        for a, b in zip(early, late))  # the weights moved between step 1 and step 3


def test_a_people_folder_and_prior_preservation(eval_setup, tmp_path):
    results = evaluate(str(eval_setup["root"] / "people"), str(tmp_path / "ev"),
                       methods=("custom-diffusion",), adapter=str(eval_setup["adapter"]),
                       steps=2, cd_steps=3, num_refs=2, max_persons=1, edit=False,
                       prior_data=str(eval_setup["shards"]), prior_split="test")  # fmt: skip
    assert (tmp_path / "ev" / "_shards" / "index.json").is_file()  # built from the folder
    assert results["methods"]["custom-diffusion"]["wholeface"]["n"] > 0


def test_prior_preservation_adds_its_loss(make_model):
    from conftest import make_batch

    from pva.personalize import personalized

    model = make_model()
    batch = make_batch(batch_size=3, num_refs=1)
    boxes = [(16, 16, 48, 48)] * 3
    refs = batch["image"]
    prior = make_batch(batch_size=1, num_refs=2, seed=5)
    prior["prompt"] = ["photo of a person"]
    runs = []
    for p in (None, lambda g: prior):
        with personalized(model, batch["image"], refs, boxes, steps=2, variant="custom-diffusion",
                          prior=p) as result:  # fmt: skip
            runs.append(result.losses)
    assert runs[0] != runs[1] and runs[1][0] > runs[0][0]


@pytest.mark.parametrize("variant", ["pva", "custom-diffusion"])
def test_reused_encodings_give_the_same_fine_tuning_with_fewer_encoder_runs(make_model, variant):
    from conftest import count_calls, make_batch

    from pva.personalize import personalized

    model = make_model()
    batch = make_batch(batch_size=3, num_refs=1)
    boxes = [(16, 16, 48, 48), (8, 12, 40, 56), (20, 4, 60, 44)]
    calls = {"vae": 0, "identity": 0}
    count_calls(calls, "vae", model.vae, "encode")
    count_calls(calls, "identity", model.identity_encoder, "forward")
    runs = {}
    for reuse in (False, True):
        calls.update(vae=0, identity=0)
        with personalized(model, batch["image"], batch["image"], boxes, steps=8, batch_size=1,
                          variant=variant, lr=1e-3, reuse_encodings=reuse) as result:  # fmt: skip
            runs[reuse] = (result.losses, result.state, dict(calls))
    (loss_a, state_a, calls_a), (loss_b, state_b, calls_b) = runs[False], runs[True]
    assert loss_b == loss_a  # bit for bit: same encodings, same random draws
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_b[k], state_a[k]) for k in state_a)
    assert calls_a["vae"] == 2 * 8  # image and masked image, every step
    assert calls_b["vae"] <= 2 * 3 * 2  # once per photo and flip
    expected_identity = (0, 0) if variant == "custom-diffusion" else (8, 3)
    assert (calls_a["identity"], calls_b["identity"]) == expected_identity
    # the frozen projection gets no gradient (restoring leaves it untouched)
    assert all(p.grad is None for p in model.identity_encoder.projection.parameters())
