"""Evaluation: real recognizer wiring, metrics, and a tiny resumable, sharded end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FACES
from data_fixtures import _shrink
from PIL import Image

import pva.evaluate
from pva.adapter import save_adapter
from pva.data.schema import read_index
from pva.data.writer import build_shards
from pva.evaluate import FineTuning, Sampling, Scoring, Selection
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
from pva.prompts import EDIT_SUFFIXES
from pva.recognizers import DlibRecognizer, build_recognizer
from pva.tiny import build_tiny_face_model, tiny_pva_config


def evaluate(data: str, out: str, **options) -> dict:
    """pva.evaluate.evaluate with its settings given flat, as the flags name them."""
    groups = {}
    for name, cls in (
        ("selection", Selection),
        ("sampling", Sampling),
        ("fine_tuning", FineTuning),
        ("scoring", Scoring),
    ):
        fields = {f.name for f in dataclasses.fields(cls)}
        picked = {k: options.pop(k) for k in list(options) if k in fields}
        groups[name] = cls(**picked)
    return pva.evaluate.evaluate(data, out, **groups, **options)


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


@pytest.fixture(scope="module")
def eval_setup(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for src in ("deepface/id01_img1", "deepface/id03_img8", "photomaker/yangmi_woman"):
        folder = root / "people" / Path(src).name
        folder.mkdir(parents=True)
        for photo in sorted((FACES / src).iterdir())[:4]:
            _shrink(photo, folder / photo.name, 400)
    build_shards(
        root / "people",
        root / "shards",
        image_size=64,
        val_fraction=0,
        test_fraction=1.0,
        progress=False,
    )
    model = PVAModel.from_paths(
        tiny_assets.backbone, tiny_assets.face_model, tiny_pva_config(face_crop="none")
    )
    adapter = save_adapter(model, root / "adapter.safetensors")
    return {"root": root, "shards": root / "shards", "adapter": adapter}


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png") if "grid_" not in p.name}


def test_tiny_evaluation_is_complete_resumable_and_shardable(eval_setup, tmp_path):
    feature = lambda x: x.mean(dim=(2, 3))  # noqa: E731 - an injected 3-d "feature extractor"
    kw = dict(
        methods=("sd-inpaint", "pva"),
        adapter=str(eval_setup["adapter"]),
        steps=2,
        num_refs=2,
        feature_fn=feature,
        batch_size=8,
    )
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

    ids = [
        r.meta["person"]
        for r in ShardDataModule(str(eval_setup["shards"]), num_workers=0).records("test")
    ]
    kw = dict(
        methods=("sd-inpaint",), steps=1, num_refs=2, edit=False, adapter=str(eval_setup["adapter"])
    )
    evaluate(
        str(eval_setup["shards"]),
        str(tmp_path / "one"),
        persons=[ids[2], ids[0]],
        max_persons=1,
        **kw,
    )
    assert {p.name for p in (tmp_path / "one" / "_gt").iterdir()} == {ids[2]}
    with pytest.raises(ValueError, match="--persons: nobody not in the test split"):
        evaluate(str(eval_setup["shards"]), str(tmp_path / "none"), persons=["nobody"], **kw)


def test_personalized_methods_run_and_unknown_methods_fail(eval_setup, tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        evaluate(str(eval_setup["shards"]), str(tmp_path), methods=("dreambooth",))
    results = evaluate(
        str(eval_setup["shards"]),
        str(tmp_path / "ft"),
        methods=("pva-ft40", "custom-diffusion"),
        adapter=str(eval_setup["adapter"]),
        steps=2,
        ft_steps=2,
        cd_steps=3,
        cd_eval_steps=(1, 2),
        num_refs=2,
        max_persons=1,
        edit=False,
        ft_lr=1e-3,
    )
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
        for a, b in zip(early, late)
    )  # the weights moved between step 1 and step 3


def test_a_people_folder_and_prior_preservation(eval_setup, tmp_path):
    results = evaluate(
        str(eval_setup["root"] / "people"),
        str(tmp_path / "ev"),
        methods=("custom-diffusion",),
        adapter=str(eval_setup["adapter"]),
        steps=2,
        cd_steps=3,
        num_refs=2,
        max_persons=1,
        edit=False,
        prior_data=str(eval_setup["shards"]),
        prior_split="test",
    )
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
        with personalized(
            model, batch["image"], refs, boxes, steps=2, variant="custom-diffusion", prior=p
        ) as result:
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
    count_calls(calls, "identity", model.identity_encoder.backbone, "forward")
    runs = {}
    for reuse in (False, True):
        calls.update(vae=0, identity=0)
        with personalized(
            model,
            batch["image"],
            batch["image"],
            boxes,
            steps=8,
            batch_size=1,
            variant=variant,
            lr=1e-3,
            reuse_encodings=reuse,
        ) as result:
            runs[reuse] = (result.losses, result.state, dict(calls))
    (loss_a, state_a, calls_a), (loss_b, state_b, calls_b) = runs[False], runs[True]
    assert loss_b == loss_a  # bit for bit: same encodings, same random draws
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_b[k], state_a[k]) for k in state_a)
    assert calls_a["vae"] == 2 * 8  # image and masked image, every step
    assert calls_b["vae"] <= 2 * 3 * 2  # once per photo and flip
    if variant == "custom-diffusion":
        assert calls_a["identity"] == calls_b["identity"] == 0
    else:  # 3 references a step (2 others + a flipped copy); reused: once per photo and flip
        assert calls_a["identity"] == 8 * 3 and calls_b["identity"] <= 3 * 2
    # the frozen projection gets no gradient (restoring leaves it untouched)
    assert all(p.grad is None for p in model.identity_encoder.projection.parameters())


# ----------------------------------------------------------- the paper's scoring protocol
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


def test_the_paper_protocol_end_to_end(eval_setup, tmp_path):
    from pva.identity import save_iresnet
    from pva.metrics import FIDInception

    face = save_iresnet(build_tiny_face_model(seed=3), tmp_path / "glint360k_cosface_r100.pth")
    inception = tmp_path / "inception.pth"
    torch.save(FIDInception().state_dict(), inception)
    kw = dict(
        methods=("sd-inpaint",),
        adapter=str(eval_setup["adapter"]),
        steps=1,
        num_refs=2,
        max_persons=1,
        protocol="paper",
    )
    with pytest.raises(ValueError, match="--recognizer"):  # dlib is not the paper's scorer
        evaluate(str(eval_setup["shards"]), str(tmp_path / "x"), **kw)
    with pytest.raises(ValueError, match="paste-back"):
        evaluate(
            str(eval_setup["shards"]),
            str(tmp_path / "x"),
            recognizer=str(face),
            paste_back=True,
            **kw,
        )
    out = tmp_path / "paper"
    results = evaluate(
        str(eval_setup["shards"]),
        str(out),
        recognizer=str(face),
        inception_weights=str(inception),
        **kw,
    )
    assert results["protocol"] == "paper" and results["kid_scale"] == 1000.0
    assert results["recognizer"] == "paper:iresnet:glint360k_cosface_r100.pth"
    entry = results["methods"]["sd-inpaint"]
    n_targets = len(list((out / "_gt").glob("*/*.json"))) // 4
    assert n_targets >= 2 and entry["edit"]["n"] == n_targets * len(EDIT_SUFFIXES)  # every target
    assert np.isfinite(entry["wholeface"]["fid"]) and np.isfinite(entry["wholeface"]["kid"][0])
    assert entry["wholeface"]["outside_error"][0] > 0  # no paste-back
    text = (out / "results.md").read_text()
    assert "paper protocol" in text and "KID x1000" in text


def test_results_always_belong_to_the_data_given(eval_setup, tiny_assets, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    from pva.evaluate import _shards_for_folder

    folders = {}
    for name, persons in (("A", ["id01_img1", "id03_img8"]), ("B", ["yangmi_woman"])):
        folders[name] = tmp_path / name
        for p in persons:
            shutil.copytree(eval_setup["root"] / "people" / p, folders[name] / p)
    kw = dict(
        methods=("sd-inpaint",),
        adapter=str(eval_setup["adapter"]),
        steps=2,
        num_refs=2,
        edit=False,
        masks=("wholeface",),
    )
    out = tmp_path / "ev"
    first = evaluate(str(folders["A"]), str(out), **kw)
    assert {p.name for p in (out / "_gt").iterdir()} == {"id01_img1", "id03_img8"}
    assert first["generated_this_run"] > 0
    # the user's second run, on other data into the same --out: refused, nothing touched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    cli = [
        sys.executable,
        "-m",
        "pva.cli",
        "evaluate",
        "--data",
        str(folders["B"]),
        "--out",
        str(out),
        "--methods",
        "sd-inpaint",
        "--adapter",
        str(eval_setup["adapter"]),
        "--steps",
        "2",
        "--num-refs",
        "2",
        "--no-edit",
        "--masks",
        "wholeface",
    ]
    res = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, timeout=300)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith(
        f"pva evaluate: error: --out '{out}' was made from other inputs (data: '"
    )
    assert str(folders["A"]) in last and str(folders["B"]) in last and "--overwrite" in last
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(FileExistsError, match=r"steps: 2 before, 3 now"):
        evaluate(str(folders["A"]), str(out), **{**kw, "steps": 3})
    second = evaluate(str(folders["B"]), str(out), overwrite=True, **kw)
    assert {p.name for p in (out / "_gt").iterdir()} == {"yangmi_woman"}
    assert second["generated_this_run"] > 0 and second["methods"]["sd-inpaint"]["wholeface"]["n"]
    # the same folder, edited in place: its stamp changes, so the cache is not reused
    (folders["B"] / "yangmi_woman" / sorted(os.listdir(folders["B"] / "yangmi_woman"))[0]).unlink()
    with pytest.raises(FileExistsError, match=r"data: "):
        evaluate(str(folders["B"]), str(out), **kw)
    # the shards cache itself is rebuilt when its folder's content differs
    model = PVAModel.from_paths(tiny_assets.backbone, tiny_assets.face_model)
    shards = tmp_path / "cache"
    _shards_for_folder(str(folders["A"]), shards, "test", model)
    assert read_index(shards)["splits"]["test"]["persons"] == 2
    _shards_for_folder(str(folders["B"]), shards, "test", model)
    assert read_index(shards)["splits"]["test"]["persons"] == 1


def test_a_method_and_a_metric_are_one_registry_entry_each(eval_setup, tmp_path):
    from pva.evaluate import METRICS, Metric, register_metric
    from pva.methods import METHODS, Method, register_method

    register_method(Method("pva-ft2", "PVA-FT for --ft-steps (a test entry)", variant="pva"))
    register_metric(
        Metric(
            "brightness",
            "mean brightness of the fill",
            "{:.3f}",
            lambda o, gt, m, lm, scorer: float(o[m.expand_as(o) > 0].mean()),
        )
    )
    try:
        results = evaluate(
            str(eval_setup["shards"]),
            str(tmp_path / "ev"),
            methods=("pva-ft2",),
            adapter=str(eval_setup["adapter"]),
            steps=2,
            ft_steps=2,
            num_refs=2,
            max_persons=1,
            edit=False,
            masks=("wholeface",),
        )
    finally:
        del METHODS["pva-ft2"], METRICS["brightness"]
    entry = results["methods"]["pva-ft2"]["wholeface"]
    assert -1 <= entry["brightness"][0] <= 1 and entry["identity_sim"][0] > -1
    assert results["methods"]["pva-ft2"]["seconds"]["adapt_s_per_person"][0] > 0  # fine-tuned
    text = (tmp_path / "ev" / "results.md").read_text()
    assert "## Inpainting: mean brightness of the fill" in text and "| pva-ft2 |" in text
