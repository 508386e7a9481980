"""Personalize and inpaint: pipeline invariants, personalization isolation, CLI bad inputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FACES, REPO, make_batch
from PIL import Image

from pva.adapter import read_adapter, save_adapter
from pva.attention import identity_processors
from pva.backbone import build_tiny_backbone
from pva.faces import detect_landmarks, load_rgb, region_box
from pva.model import PVAModel
from pva.pipeline import PVAInpaintPipeline
from pva.sampling import ddim_inpaint
from pva.tiny import build_tiny_face_model, tiny_pva_config

PERSON = FACES / "deepface/id01_img1"
TARGET = PERSON / "img1.jpg"


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, proc in identity_processors(model.unet):
            for p in proc.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    model = PVAModel.from_paths(
        tiny_assets.backbone, tiny_assets.face_model, tiny_pva_config(face_crop="none")
    )
    _perturb(model)
    adapter = save_adapter(model, root / "adapter.safetensors")
    refs = root / "refs"
    refs.mkdir()
    for f in sorted(PERSON.iterdir())[1:5]:
        (refs / f.name).symlink_to(f)
    return {"root": root, "adapter": adapter, "refs": refs}


@pytest.fixture
def pipe(setup):
    return PVAInpaintPipeline.from_pretrained(
        read_adapter(setup["adapter"])[1]["paths"]["backbone"]
    ).load_pva(setup["adapter"])


def _two_call_cfg(model, images, masks, refs, prompts, scale, steps, eta, mode, seed):
    """Classifier-free guidance written as two separate UNet calls per step (the reference)."""
    g = torch.Generator().manual_seed(seed)
    sched = model.scheduler
    sched.set_timesteps(steps)
    b, _, h, w = images.shape
    f = model.vae_downsample
    lat = torch.randn(b, 4, h // f, w // f, generator=g) * sched.init_noise_sigma  # diffusers order
    mask_lat, masked_lat = model.inpaint_conditioning(images, masks, g)
    text = model.encode_prompt(prompts)
    uncond = model.encode_prompt(["photo of a person"] * len(prompts))
    ident = model.encode_identity(refs)
    for t in sched.timesteps:
        e_u = model.predict_noise(
            lat, t, mask_lat, masked_lat, uncond, ident if mode == "edit" else None
        )
        e_c = model.predict_noise(lat, t, mask_lat, masked_lat, text, ident)
        lat = sched.step(e_u + scale * (e_c - e_u), t, lat, eta=eta, generator=g).prev_sample
    return model.decode_latents(lat)


@pytest.mark.parametrize("mode", ["inpaint", "edit"])
def test_batched_cfg_equals_two_call_cfg(make_model, mode):
    model = make_model().eval()
    _perturb(model)
    batch = make_batch(batch_size=2, num_refs=2)
    prompts = ["photo of a <new1> person", "photo of a <new1> person, smiling"]
    with torch.no_grad():
        batched = ddim_inpaint(
            model,
            batch["image"],
            batch["mask"],
            batch["references"],
            prompts,
            guidance_scale=6.0,
            num_steps=4,
            mode=mode,
            generator=torch.Generator().manual_seed(3),
        )
        two_call = _two_call_cfg(
            model, batch["image"], batch["mask"], batch["references"], prompts, 6.0, 4, 1.0, mode, 3
        )
    torch.testing.assert_close(batched, two_call, atol=1e-4, rtol=0)


def test_identity_tokens_once_paste_back_and_determinism(pipe, setup):
    calls = []
    enc = pipe.pva.identity_encoder
    original = enc.forward
    enc.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    inp = load_rgb(TARGET)
    landmarks, _ = detect_landmarks(inp)
    x0, y0, x1, y1 = region_box(landmarks, "lowerface", (inp.shape[1], inp.shape[0]))
    mask = np.zeros(inp.shape[:2], np.uint8)
    mask[y0:y1, x0:x1] = 255
    refs = sorted(setup["refs"].iterdir())
    kw = dict(
        mask_image=Image.fromarray(mask),
        reference_images=refs,
        num_inference_steps=3,
        num_images_per_prompt=2,
    )
    out = pipe(TARGET, generator=torch.Generator().manual_seed(0), **kw).images
    assert len(calls) == 1  # one encoder pass for 2 images x 3 steps x 2 CFG branches
    again = pipe(TARGET, generator=torch.Generator().manual_seed(0), **kw).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
    changed = (np.asarray(out[0]) != inp).any(-1)
    assert changed.sum() > 0.5 * (mask > 0).sum()
    assert not (changed & (mask == 0)).any()  # outside the mask: exactly the input
    no_paste = pipe(
        TARGET, generator=torch.Generator().manual_seed(0), paste_back=False, **kw
    ).images[0]
    assert ((np.asarray(no_paste) != inp).any(-1) & (mask == 0)).any()  # the whole face square


def test_awkward_photos_just_work(pipe, setup, tmp_path):
    with Image.open(TARGET) as im:
        im = im.convert("RGB")
        im.thumbnail((512, 512))
        im.convert("CMYK").save(tmp_path / "cmyk.jpg")
        im.convert("L").save(tmp_path / "gray.png")
        rgba = im.convert("RGBA")
        rgba.putalpha(255)
        rgba.save(tmp_path / "rgba.png")
    refs = sorted(setup["refs"].iterdir())[:2]
    for name in ("cmyk.jpg", "gray.png", "rgba.png"):
        out = pipe(
            tmp_path / name, mask_region="eyebrow", reference_images=refs, num_inference_steps=2
        ).images[0]
        assert out.size == Image.open(tmp_path / name).size


def test_personalization_changes_only_its_parameters_and_persons_start_identical(
    pipe, setup, tmp_path
):
    from pva.apps import personalize_cli

    both = tmp_path / "both"
    for name, src in (("a", "deepface/id01_img1"), ("b", "deepface/id03_img8")):
        (both / name).mkdir(parents=True)
        for f in sorted((FACES / src).iterdir())[:3]:
            (both / name / f.name).symlink_to(f)
    written = personalize_cli(str(setup["adapter"]), str(both), str(tmp_path / "out"), steps=6)
    alone = personalize_cli(
        str(setup["adapter"]), str(both / "b"), str(tmp_path / "b.safetensors"), steps=6
    )[0]
    b_in_run, _ = read_adapter(written[1])
    b_alone, _ = read_adapter(alone)
    assert b_in_run.keys() == b_alone.keys()
    assert all(torch.equal(b_in_run[k], b_alone[k]) for k in b_alone)  # no leak from person a
    base, _ = read_adapter(setup["adapter"])
    a, _ = read_adapter(written[0])
    changed = {k for k in base if not torch.equal(base[k], a[k])}
    assert changed and all(
        ".processor.to_" in k or k == "modifier_token.embedding" for k in changed
    )
    assert "modifier_token.embedding" in changed
    assert not any(k.startswith("identity_encoder") for k in changed)

    cross = personalize_cli(
        str(setup["adapter"]),
        str(both / "a"),
        str(tmp_path / "x.safetensors"),
        steps=4,
        variant="crossqkv",
    )[0]
    tensors, header = read_adapter(cross)
    assert "crossqkv" in header["contents"]
    # every attn2 weight, the output projection included (the reference: lib/pva.py:365-367)
    for part in (".attn2.to_q.", ".attn2.to_k.", ".attn2.to_v.", ".attn2.to_out.0."):
        assert any(part in k for k in tensors), part
    # loading it into the pipeline, then the plain adapter, restores the pretrained attn2 weights
    for part in (".attn2.to_k.", ".attn2.to_out.0."):
        key = next(k for k in tensors if part in k)
        before = pipe.pva.state_dict()[key].clone()
        pipe.load_pva(cross)
        assert not torch.equal(pipe.pva.state_dict()[key], before)
        pipe.load_pva(setup["adapter"])
        assert torch.equal(pipe.pva.state_dict()[key], before)


def test_save_pretrained_round_trip(pipe, tmp_path):
    path = pipe.save_pretrained(tmp_path / "saved")
    again = PVAInpaintPipeline.from_pretrained(path)
    a, b = pipe.pva.adapter_state_dict(), again.pva.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (path / "model_index.json").is_file() and (path / "pva" / "face.pth").is_file()


# ------------------------------------------------------------------------ CLI bad inputs
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pva.cli", *args],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=300,
        env=env,
    )


def _inpaint_args(setup, out: Path, *extra: str, image: Path = TARGET) -> list[str]:
    return [
        "inpaint",
        "--adapter",
        str(setup["adapter"]),
        "--image",
        str(image),
        "--refs",
        str(setup["refs"]),
        "--out",
        str(out),
        "--steps",
        "2",
        *extra,
    ]


def test_cli_inpaint_writes_and_refuses_overwrite(setup, tmp_path):
    out = tmp_path / "o.png"
    res = _cli(*_inpaint_args(setup, out, "--mask-region", "wholeface"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert Image.open(out).size == Image.open(TARGET).size
    stamp = out.stat().st_mtime_ns
    again = _cli(*_inpaint_args(setup, out, "--mask-region", "wholeface"))
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert out.stat().st_mtime_ns == stamp


def test_cli_bad_inputs_fail_clearly_and_write_nothing(setup, tmp_path):
    out = tmp_path / "o.png"
    text_jpg = tmp_path / "text.jpg"
    text_jpg.write_text("not an image")
    cases = {
        "missing image": (
            _inpaint_args(setup, out, "--mask-region", "eyebrow", image=tmp_path / "nope.jpg"),
            "nope.jpg",
        ),
        "unreadable image": (
            _inpaint_args(setup, out, "--mask-region", "eyebrow", image=text_jpg),
            "text.jpg",
        ),
        "missing mask": (_inpaint_args(setup, out, "--mask", str(tmp_path / "m.png")), "m.png"),
    }
    wide = PVAModel(
        build_tiny_backbone(cross_attention_dim=48), build_tiny_face_model(), tiny_pva_config()
    )
    wide_adapter = save_adapter(
        wide, tmp_path / "wide.safetensors", paths=read_adapter(setup["adapter"])[1]["paths"]
    )
    args = _inpaint_args(setup, out, "--mask-region", "eyebrow")
    args[args.index("--adapter") + 1] = str(wide_adapter)
    cases["adapter for another backbone"] = (args, "cross_attention_dim=48")
    h, w = load_rgb(TARGET).shape[:2]
    Image.new("L", (w, w)).save(tmp_path / "bad_aspect.png")  # square vs portrait
    cases["mask aspect"] = (
        _inpaint_args(setup, out, "--mask", str(tmp_path / "bad_aspect.png")),
        "aspect ratio",
    )
    for name, (argv, needle) in cases.items():
        res = _cli(*argv)
        assert res.returncode != 0, name
        last = res.stderr.strip().splitlines()[-1]
        assert needle in last and last.startswith("pva inpaint: error:"), (name, last)
        assert not out.exists(), name


def test_cli_references_without_faces(setup, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(refs / "wall.jpg")
    out = tmp_path / "o.png"
    args = _inpaint_args(setup, out, "--mask-region", "eyebrow")
    args[args.index("--refs") + 1] = str(refs)
    res = _cli(*args)
    assert res.returncode != 0 and "wall.jpg" in res.stderr and "no face" in res.stderr
    res = _cli(*args, "--skip-bad-refs")
    assert res.returncode != 0 and "no usable reference" in res.stderr
    (refs / "face.jpg").symlink_to(sorted(PERSON.iterdir())[2])
    res = _cli(*args, "--skip-bad-refs")
    assert res.returncode == 0 and "wall.jpg" in res.stderr and out.is_file()


def test_mask_size_empty_mask_and_edit_prompt_warnings(pipe, setup):
    refs = sorted(setup["refs"].iterdir())[:2]
    h, w = load_rgb(TARGET).shape[:2]
    half = np.zeros((h // 2, w // 2), np.uint8)
    half[h // 4 : h // 4 + 40, w // 4 : w // 4 + 40] = 255
    with pytest.warns(UserWarning, match="resizing"):
        out = pipe(
            TARGET, mask_image=Image.fromarray(half), reference_images=refs, num_inference_steps=2
        ).images[0]
    assert out.size == (w, h)
    with pytest.warns(UserWarning, match="empty"):
        same = pipe(
            TARGET, mask_image=Image.new("L", (w, h)), reference_images=refs, num_inference_steps=2
        ).images[0]
    assert np.array_equal(np.asarray(same), load_rgb(TARGET))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(
            TARGET,
            mask_region="eyebrow",
            reference_images=refs,
            prompt="a person, smiling",
            mode="edit",
            num_inference_steps=2,
        )
    assert any("<new1>" in str(c.message) for c in caught)


# ------------------------------------------------------------ issue 20: wrong pixels, names
def _small_face_on_a_wide_canvas(tmp_path: Path) -> Path:
    """TARGET shrunk to 200 px wide on a 480 x 360 textured canvas: the face square lies inside."""
    with Image.open(TARGET) as im:
        face = im.convert("RGB")
        face.thumbnail((200, 200))
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(60, 200, (360, 480, 3), dtype=np.uint8))
    canvas.paste(face, (140, 40))
    path = tmp_path / "wide.png"
    canvas.save(path)
    return path


def _black(img: np.ndarray) -> np.ndarray:
    return (img == 0).all(-1)


def test_a_mask_past_the_face_square_is_inpainted_not_blacked(pipe, setup, tmp_path):
    from pva.faces import face_centred_crop

    photo = _small_face_on_a_wide_canvas(tmp_path)
    rgb = load_rgb(photo)
    h, w = rgb.shape[:2]
    left, top, side = face_centred_crop(rgb, detect_landmarks(rgb)[0], 8).box
    beyond = np.ones((h, w), bool)  # pixels outside the face-centred square
    beyond[max(top, 0) : top + side, max(left, 0) : left + side] = False
    assert 0.3 < beyond.mean() < 0.95
    beyond &= ~_black(rgb)  # pixels that were not black before
    refs = sorted(setup["refs"].iterdir())[:2]
    half = np.zeros((h, w), np.uint8)
    half[:, : w // 2] = 255  # the left half: part of the face and the canvas to the edge
    for mask in (np.full((h, w), 255, np.uint8), half):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pipe(
                photo,
                mask_image=Image.fromarray(mask),
                reference_images=refs,
                num_inference_steps=2,
            ).images[0]
        out = np.asarray(out)
        inside = mask > 0
        assert np.array_equal(out[~inside], rgb[~inside])  # paste-back: outside exactly kept
        assert _black(out)[inside & beyond].mean() < 0.01  # before: every such pixel was black
        assert (out != rgb).any(-1)[inside & beyond].mean() > 0.5  # the model's fill
        past = [c for c in caught if "reaches past the" in str(c.message)]
        assert past and past[0].filename == __file__  # attributed to this call, not torch


def test_cli_full_mask_and_the_messages_name_the_file(setup, tmp_path):
    photo = _small_face_on_a_wide_canvas(tmp_path)
    h, w = load_rgb(photo).shape[:2]
    Image.new("L", (w, h), 255).save(tmp_path / "full.png")
    out = tmp_path / "o.png"
    res = _cli(*_inpaint_args(setup, out, "--mask", str(tmp_path / "full.png"), image=photo))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _black(np.asarray(Image.open(out).convert("RGB"))).mean() < 0.01  # before: 88% here
    assert "pva inpaint: warning: the mask reaches past" in res.stderr
    wall = tmp_path / "wall.png"
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(wall)
    res = _cli(*_inpaint_args(setup, tmp_path / "x.png", "--mask-region", "eyebrow", image=wall))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"pva inpaint: error: no face detected in the input image '{wall}'"
    )
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "wall.png").symlink_to(wall)
    (refs / "face.jpg").symlink_to(sorted(PERSON.iterdir())[2])
    args = _inpaint_args(setup, tmp_path / "y.png", "--mask-region", "eyebrow", "--skip-bad-refs")
    args[args.index("--refs") + 1] = str(refs)
    res = _cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    warning = [line for line in res.stderr.splitlines() if "wall.png" in line]
    assert warning == [
        f"pva inpaint: warning: no face detected in reference {refs / 'wall.png'}; skipping it"
    ]


def test_the_pixel_limit_is_the_projects_not_pils(setup, tmp_path):
    from pva.faces import MAX_PIXELS

    under, over = tmp_path / "under.png", tmp_path / "over.png"
    Image.new("L", (10_000, 10_000), 128).save(under)  # 100 MP: PIL's own guard refused it
    side = int(MAX_PIXELS**0.5) + 1
    Image.new("L", (side, side), 128).save(over)
    res = _cli(*_inpaint_args(setup, tmp_path / "u.png", "--mask-region", "eyebrow", image=under))
    assert res.stderr.strip().splitlines()[-1] == (
        f"pva inpaint: error: no face detected in the input image '{under}'"  # it was read
    )
    res = _cli(*_inpaint_args(setup, tmp_path / "v.png", "--mask-region", "eyebrow", image=over))
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and str(over) in last and f"{MAX_PIXELS:,}-pixel limit" in last


def test_outputs_that_are_files_or_folders_by_mistake(setup, tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    res = _cli(*_inpaint_args(setup, folder, "--mask-region", "eyebrow", "--overwrite"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"pva inpaint: error: --out '{folder}' is a folder; give the path of a file"
    )


def test_pipeline_numbers_are_checked(pipe, setup):
    from pva.checks import RangeError

    refs = sorted(setup["refs"].iterdir())[:1]
    cases = (
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite"),
        ({"eta": 2.0}, "eta must be a finite number in [0, 1]"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be"),
    )
    for kw, needle in cases:
        with pytest.raises(RangeError, match=re.escape(needle)):
            pipe(TARGET, mask_region="eyebrow", reference_images=refs, **kw)


def test_the_personalize_path_reads_the_adapter_file_once(setup, tmp_path, monkeypatch):
    import pva.adapter as adapter_module
    from pva.apps import personalize_cli

    reads = []
    real = adapter_module._read

    def counted(path, tensors):
        reads.append(tensors)
        return real(path, tensors)

    monkeypatch.setattr(adapter_module, "_read", counted)
    out = tmp_path / "me.safetensors"
    personalize_cli(str(setup["adapter"]), str(setup["refs"]), str(out), steps=1)
    assert reads.count(True) == 1  # tensors read once (before: six whole-file reads)
    assert out.is_file()


def test_an_80_px_face_in_a_2000_px_photo_is_found_inpainted_and_pasted_back(pipe, setup, tmp_path):
    rgb = load_rgb(TARGET)
    extent = np.ptp(detect_landmarks(rgb)[0], axis=0).max()
    small = Image.fromarray(rgb)
    small = small.resize((round(small.width * 80 / extent), round(small.height * 80 / extent)))
    rng = np.random.default_rng(1)
    canvas = Image.fromarray(rng.integers(60, 200, (1500, 2000, 3), dtype=np.uint8))
    canvas.paste(small, (1200, 700))
    photo = np.asarray(canvas)
    found = detect_landmarks(photo)
    assert found is not None  # before: the 1024-px detection copy lost the face
    face = np.ptp(found[0], axis=0).max()
    assert 70 < face < 90
    refs = sorted(setup["refs"].iterdir())[:2]
    (x0, y0), (x1, y1) = found[0].min(0).astype(int), found[0].max(0).astype(int)
    mask = np.zeros(photo.shape[:2], bool)
    mask[(y0 + y1) // 2 : y1 + 5, x0 - 5 : x1 + 5] = True  # the lower face, about 85 x 45 px
    kw = dict(mask_image=Image.fromarray(mask), reference_images=refs, num_inference_steps=2)
    hard = np.asarray(pipe(photo, **kw).images[0])
    soft = np.asarray(pipe(photo, blend=True, **kw).images[0])
    for out in (hard, soft):
        assert out.shape == photo.shape
        assert np.array_equal(out[~mask], photo[~mask])  # pasted back: the rest is the input
        assert (out != photo).any(-1)[mask].mean() > 0.5  # the model filled the hole
    assert not np.array_equal(hard, soft)  # the blend changed the composite, inside only


def test_a_prepared_face_gives_the_same_picture_and_keeps_its_mask(pipe, setup):
    from pva.pipeline import prepare_face

    refs = sorted(setup["refs"].iterdir())
    job = prepare_face(TARGET, pipe.resolution, mask_region="lowerface")
    kw = dict(reference_images=refs, num_inference_steps=2)
    a = pipe(job, generator=torch.Generator().manual_seed(0), **kw).images[0]
    b = pipe(TARGET, mask_region="lowerface", generator=torch.Generator().manual_seed(0), **kw)
    assert np.array_equal(np.asarray(a), np.asarray(b.images[0]))
    with pytest.raises(ValueError, match="carries its mask"):
        pipe(job, mask_region="eyebrow", **kw)
