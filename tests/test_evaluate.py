"""pva evaluate (pva.evaluate): a tiny resumable, sharded run, the paper protocol, registries."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import xml.etree.ElementTree as ET
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
from pva.model import PVAModel
from pva.prompts import EDIT_SUFFIXES
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
    # the plots: identity per mask, and identity against steps (CD at 1, 2, 3; PVA-FT at 2)
    assert results["plots"] == ["identity_by_mask.svg", "identity_vs_steps.svg"]
    svg = {n: ET.parse(tmp_path / "ft" / n).getroot() for n in results["plots"]}
    circles = [e for e in svg["identity_vs_steps.svg"].iter() if e.tag.endswith("circle")]
    bars = [e for e in svg["identity_by_mask.svg"].iter() if e.tag.endswith("rect")]
    assert len(circles) == 4 and len(bars) == 1 + 4 * 4  # background + 4 methods x 4 masks
    assert "![identity_vs_steps](identity_vs_steps.svg)" in (tmp_path / "ft/results.md").read_text()


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


# ----------------------------------------------------------- the paper's scoring protocol
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
