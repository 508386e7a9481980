"""`pva demo`: the procedural persons, and the whole miniature experiment end to end (--quick)."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pva.data.writer import read_region_bbox
from pva.demo.generator import (
    HIDDEN,
    IRIS,
    LIPS,
    render,
    sample_person,
    write_idi_tree,
)
from pva.faces import region_boxes


def _digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generator_is_deterministic_per_seed(tmp_path):
    write_idi_tree(tmp_path / "a", num_persons=12, seed=3, progress=False)
    write_idi_tree(tmp_path / "b", num_persons=12, seed=3, progress=False)
    write_idi_tree(tmp_path / "c", num_persons=12, seed=4, progress=False)
    da, db, dc = (_digest(tmp_path / k) for k in "abc")
    assert da == db
    assert da.keys() == dc.keys() and da != dc
    # the CelebAHQ-IDI layout the shard builder reads
    ann = json.loads((tmp_path / "a" / "annotation" / "idi-5.json").read_text())
    persons = ann["train_ids"] + ann["val_ids"] + ann["test_ids"]
    assert len(persons) == 12 and len(set(persons)) == 12
    assert all(len(ann["id2image"][p]["ref"]) == 5 for p in persons)
    lms = json.loads((tmp_path / "a" / "annotation" / "landmarks.json").read_text())
    assert len(lms) == 12 * 7  # the authors' layout: {file: {"image": {"face_landmarks": ...}}}
    assert all(np.asarray(v["image"]["face_landmarks"]).shape == (68, 2) for v in lms.values())
    boxes, _ = read_region_bbox(tmp_path / "a" / "annotation" / "region_bbox.pth")
    assert boxes["lowerface"].shape == (12 * 7, 4) and bool((boxes["lowerface"] > 0).any())
    with pytest.raises(FileExistsError, match="overwrite"):
        write_idi_tree(tmp_path / "a", num_persons=12, seed=3, progress=False)


def _iris_colour(photo) -> np.ndarray:
    """Mean colour of the 3x3 pixels at each eye's centre (the iris), (3,)."""
    out = []
    for eye in (list(range(36, 42)), list(range(42, 48))):
        x, y = np.round(photo.landmarks[eye][[0, 3]].mean(0)).astype(int)
        out.append(photo.image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0))
    return np.mean(out, 0)


def test_attributes_are_constant_per_person_and_differ_between_persons():
    persons = [sample_person(0, i) for i in range(200)]
    assert len(set(persons)) > 195  # combinations collide rarely (write_idi_tree skips repeats)
    for i in (0, 1, 2):
        photos = [render(persons[i], 0, i, j, 128) for j in range(6)]
        attrs = {re.sub(r", and is .*$", "", p.caption) for p in photos}
        assert len(attrs) == 1  # the caption's attributes are the person's, whatever the photo
        # nuisance differs per photo: geometry and background
        assert len({tuple(np.round(p.landmarks[30])) for p in photos}) == 6
        # the iris seen in every photo is the person's colour (hue), under varying lighting
        target = np.array(IRIS[persons[i].names()["iris"]], dtype=float)
        for p in photos:
            seen = _iris_colour(p)
            cos = seen @ target / np.linalg.norm(seen) / np.linalg.norm(target)
            assert cos > 0.97, (i, persons[i].names()["iris"], seen)


def _features(image: np.ndarray) -> np.ndarray:
    """A simple probe's input: 8x8 mean colours plus an 8-bin histogram per channel."""
    small = image.reshape(8, 16, 8, 16, 3).mean((1, 3)).ravel() / 255.0
    hist = [
        np.histogram(image[..., c], bins=8, range=(0, 256))[0] / image[..., 0].size
        for c in range(3)
    ]
    return np.concatenate([small, *hist])


def _ridge_probe(x_train, y_train, x_test, y_test, classes: int, lam: float = 1.0) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    onehot = np.eye(classes)[y_train]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ onehot)
    return float(((b @ w).argmax(1) == y_test).mean())


@pytest.mark.parametrize("attribute", ["iris", "lips"])
def test_hidden_attributes_are_not_recoverable_from_the_context(attribute):
    """A probe on the unmasked context is at chance; the same probe on the region alone is not."""
    region = HIDDEN[attribute][1]
    classes = len(IRIS) if attribute == "iris" else len(LIPS)
    region_only, context, labels = [], [], []
    for i in range(480):
        person = sample_person(7, i)
        photo = render(person, 7, i, 0, 128)
        x0, y0, x1, y1 = region_boxes(photo.landmarks, (128, 128))[region]
        masked = photo.image.copy()
        masked[y0:y1, x0:x1] = 128
        inside = np.full_like(photo.image, 128)
        inside[y0:y1, x0:x1] = photo.image[y0:y1, x0:x1]
        region_only.append(_features(inside))
        context.append(_features(masked))
        labels.append(getattr(person, attribute))
    region_only, context, labels = np.array(region_only), np.array(context), np.array(labels)
    split = 360
    acc_region = _ridge_probe(
        region_only[:split], labels[:split], region_only[split:], labels[split:], classes
    )
    acc_ctx = _ridge_probe(
        context[:split], labels[:split], context[split:], labels[split:], classes
    )
    chance = 1.0 / classes
    assert acc_region > chance + 0.3, acc_region  # the probe can read the attribute there
    # 120 test photos: chance +/- 0.035 (1 sd); 0.15 above chance is > 4 sd
    assert acc_ctx < chance + 0.15, acc_ctx


def test_quick_demo_runs_every_stage_and_reports(quick_demo):
    from pva.demo.run import QUICK, _label, cd_rows, method_rows

    out, _ = quick_demo
    state = json.loads((out / "demo.json").read_text())
    assert set(state["done"]) == {"data", "stage0", "stage1", "evaluate"}
    # stage 0 wrote the stand-ins in the real formats; stage 1 went through train.py
    assert (out / "models" / "backbone" / "model_index.json").is_file()
    assert (out / "models" / "face_cond.pth").is_file()
    assert (out / "models" / "face_score.pth").is_file()
    assert (out / "adapter.safetensors").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "grid.png").is_file()
    report = (out / "report.md").read_text()
    for plot in ("identity_vs_steps.svg", "identity_by_mask.svg"):  # drawn and linked
        root = ET.parse(out / plot).getroot()
        assert root.tag.endswith("svg") and f"]({plot})" in report
    lines = report.splitlines()
    cd_start = next(i for i, x in enumerate(lines) if x.startswith("## Custom Diffusion against"))
    for method, part in [
        *((m, lines[:cd_start]) for m in method_rows(QUICK)),
        *((m, lines[cd_start:]) for m in cd_rows(QUICK)),
    ]:
        row = next(line for line in part if line.startswith(f"| {_label(method, QUICK)}"))
        assert re.search(r"\| \d\.\d{3} ± \d\.\d{3} \|", row), row  # a number in every row
    assert report.count("**holds**") + report.count("**does not hold**") == 4
    assert "python train.py fit --config" in report and "pva evaluate --data" in report
    persons = [p.name for p in sorted((out / "eval" / "seed0" / "_gt").iterdir())]
    assert len(persons) == QUICK.eval_persons  # the seed's own test persons, named in the report
    cd_persons = {p.name for p in (out / "eval" / "cd-seed0" / "_gt").iterdir()}
    assert len(cd_persons) == QUICK.cd_persons and cd_persons < set(persons)
    line = next(x for x in lines if x.startswith("Test persons:"))
    assert "seed 0: " in line and all(p in line for p in persons), line
    # the commands, read by the real CLI parser, ask for what the demo ran
    from pva.cli import build_parser
    from pva.demo.run import GUIDANCE, _eval_kwargs, seed_persons

    commands = [x for x in lines if x.startswith("pva evaluate --data")]
    assert len(commands) == 2  # the main table's and Custom Diffusion's
    ordered = seed_persons(out, QUICK, [0])[0]
    for command, track, who in zip(commands, ("wide", "cd"), (set(persons), cd_persons)):
        assert set(command.split("--persons ")[1].split()[0].split(",")) == who
        args = build_parser().parse_args(shlex.split(command.split(" --shard-index")[0])[1:])
        ran = _eval_kwargs(out, QUICK, 0, ordered, track)
        assert args.out == ran["out"] and args.guidance == ran["guidance"] == GUIDANCE
        assert (args.steps, args.ft_steps, args.seed) == (
            ran["steps"],
            ran["ft_steps"],
            ran["seed"],
        )
        assert args.ft_lr == pytest.approx(ran["ft_lr"])
        assert args.paste_back and args.edit is False and list(args.methods) == ran["methods"]
        assert list(args.persons) == ran["persons"]
        if track == "cd":
            assert args.cd_steps == ran["cd_steps"]
            assert args.cd_lr == pytest.approx(ran["cd_lr"]) and args.cd_lr < args.ft_lr
            assert (args.prior_data, args.prior_split) == (ran["prior_data"], "train")
            assert list(args.cd_eval_steps) == ran["cd_eval_steps"]  # parsed and range-checked
    results = json.loads((out / "results.json").read_text())
    # paste-back: every method leaves every pixel outside the mask as it was
    for method in method_rows(QUICK):
        assert results["table"][method]["mean"]["outside_error"] == 0.0
    for method in cd_rows(QUICK):
        assert results["cd_table"][method]["mean"]["outside_error"] == 0.0


def test_quick_demo_resumes_and_refuses_foreign_folders(quick_demo, tmp_path):
    out, _ = quick_demo
    before = (out / "demo.json").read_text()
    cmd = [sys.executable, "-m", "pva.cli", "demo", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== " not in proc.stdout  # no stage ran again; the report was rewritten
    assert (out / "demo.json").read_text() == before
    proc = subprocess.run(cmd + ["--only", "report"], capture_output=True, text=True)
    assert proc.returncode == 0 and "== " not in proc.stdout, proc.stderr[-2000:]
    # other settings in the same folder are refused, as is a folder that is not a demo
    proc = subprocess.run(cmd + ["--seed", "1"], capture_output=True, text=True)
    assert proc.returncode != 0 and "other settings" in proc.stderr
    (tmp_path / "mine.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "pva.cli", "demo", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "not a demo folder" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_stand_in_vae_with_a_single_thread_head_is_reproducible():
    import torch

    from pva.demo.stage0 import train_vae

    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    threads = torch.get_num_threads()
    seen = []
    real_set = torch.set_num_threads

    def record(n):
        seen.append(n)
        real_set(n)

    torch.set_num_threads = record
    try:
        a = train_vae(
            images, steps=4, batch_size=2, crop=8, seed=0, progress=False, single_thread_steps=2
        )
    finally:
        torch.set_num_threads = real_set
    b = train_vae(
        images, steps=4, batch_size=2, crop=8, seed=0, progress=False, single_thread_steps=2
    )
    assert seen[:2] == [1, threads] and torch.get_num_threads() == threads  # 1, then restored
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _four_photos():
    """A stage-0 PhotoSet of 4 random 64-px photos of 2 persons, one box for every region."""
    import torch

    from pva.demo.stage0 import PhotoSet

    g = torch.Generator().manual_seed(0)
    box = [16, 16, 48, 48]
    return PhotoSet(
        images=torch.rand(4, 3, 64, 64, generator=g) * 2 - 1,
        faces=torch.zeros(4, 3, 112, 112),
        landmarks=np.zeros((4, 68, 2), np.float32),
        boxes=[dict.fromkeys(("lowerface", "eyebrow", "wholeface"), box)] * 4,
        captions=["smiling"] * 4,
        labels=torch.tensor([0, 0, 1, 1]),
        persons=["a", "b"],
    )


def test_stand_in_unet_min_snr_weighting():
    import torch

    from pva.backbone import build_tiny_backbone
    from pva.demo.stage0 import train_backbone

    photos = _four_photos()
    vae = build_tiny_backbone(0).vae

    def unet_after(gamma: float) -> dict:
        bb = train_backbone(
            vae, photos, steps=2, batch_size=4, min_snr_gamma=gamma, seed=0, progress=False
        )
        return bb.unet.state_dict()

    plain, huge, weighted = unet_after(0.0), unet_after(1e12), unet_after(5.0)
    # A cap above every SNR weights every sample by exactly 1: plain epsilon MSE.
    assert all(torch.equal(plain[k], huge[k]) for k in plain)
    # A cap of 5 down-weights the low-noise samples: the update differs.
    assert any(not torch.equal(plain[k], weighted[k]) for k in plain)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        train_backbone(vae, photos, steps=1, min_snr_gamma=-1.0, progress=False)


def test_stand_in_text_encoder_trains_at_its_own_rate_or_stays_frozen():
    import torch

    from pva.backbone import build_tiny_backbone
    from pva.demo.stage0 import train_backbone

    photos = _four_photos()
    fresh = build_tiny_backbone(0)
    kw = dict(steps=2, batch_size=4, caption_prob=1.0, text_dropout=0.0, seed=0, progress=False)
    frozen = train_backbone(fresh.vae, photos, text_lr=0.0, **kw)
    trained = train_backbone(fresh.vae, photos, **kw)
    init, fz, tr = (m.text_encoder.state_dict() for m in (fresh, frozen, trained))
    assert all(torch.equal(init[k], fz[k]) for k in init)  # text_lr=0: exactly the init
    assert any(not torch.equal(init[k], tr[k]) for k in init)  # default: trained with the UNet
    assert any(
        not torch.equal(frozen.unet.state_dict()[k], v)  # the UNet trains either way
        for k, v in fresh.unet.state_dict().items()
    )
    with pytest.raises(ValueError, match="text_lr"):
        train_backbone(fresh.vae, photos, steps=1, text_lr=-1.0, progress=False)
