"""Shard building and streaming on real photos: schema, index, bad inputs, masks, DDP split."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, SHARED
from data_fixtures import (
    SPLIT,
    make_celebahq_idi,
    make_people,
    record_members,
    to_authors_annotation,
    unreadable_split,
    write_tar,
)
from PIL import Image

from datamodules.shards import ShardDataModule
from pva.data.masks import box_mask, brush_stroke_mask
from pva.data.reader import DecodedCache, decode_jpeg
from pva.data.schema import parse_record, read_index
from pva.data.writer import build_shards
from pva.module import PVAModule
from pva.tiny import tiny_pva_config

SIZE = 128


@pytest.fixture(scope="module")
def idi(tmp_path_factory):
    root = tmp_path_factory.mktemp("idi")
    facts = make_celebahq_idi(
        root / "celebahq", SHARED / "data/captions/celeba_dialog_style_samples.json"
    )
    out = root / "shards"
    index = build_shards(
        root / "celebahq", out, image_size=SIZE, persons_per_shard=2, progress=False
    )
    return {"root": root / "celebahq", "out": out, "index": index, **facts}


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    root = tmp_path_factory.mktemp("people")
    expected = make_people(root / "people")
    out = root / "shards"
    index = build_shards(
        root / "people",
        out,
        image_size=SIZE,
        workers=2,
        progress=False,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    return {"root": root / "people", "out": out, "index": index, "expected": expected}


def _records(out: Path, split: str):
    idx = read_index(out)
    for name in idx["splits"][split]["shards"]:
        with tarfile.open(out / name) as tar:
            groups: dict = {}
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                groups.setdefault(key, {"__key__": key})[field] = tar.extractfile(m).read()
        for sample in groups.values():
            yield parse_record(sample)


def test_celebahq_idi_index_counts_and_schema(idi):
    index = idi["index"]
    assert index["schema"] == 1 and index["source"]["format"] == "celebahq-idi"
    assert index["source"]["captions"] is True
    expected_persons = {"train": 3, "val": 1, "test": 1}  # 0006 is dropped
    for split, n in expected_persons.items():
        assert index["splits"][split]["persons"] == n
    assert [d["person"] for d in index["dropped_persons"]] == ["0006"]
    assert index["dropped_persons"][0]["usable_images"] == 1
    skipped = {Path(s["file"]).name: s["reason"] for s in index["skipped_images"]}
    assert list(skipped.values()) == ["no face detected"]  # 0006's black image
    total = sum(len(v["infer"]) + len(v["ref"]) for v in idi["id2image"].values())
    kept = sum(s["images"] for s in index["splits"].values())
    assert kept == total - len(skipped) - 1  # minus the dropped person's one usable photo
    assert index["splits"]["train"]["shards"] == ["train-00000.tar", "train-00001.tar"]
    assert not list(idi["out"].glob("*.tmp")) and not list(idi["out"].parent.glob(".shards*"))

    for rec in _records(idi["out"], "train"):
        assert SPLIT[rec.meta["person"]] == "train"
        meta = rec.meta
        assert meta["image_size"] == SIZE and len(rec.img) == len(meta["images"]) >= 2
        roles = {e["file"]: e["role"] for e in meta["images"]}
        assert set(roles) <= set(
            idi["id2image"][meta["person"]]["infer"] + idi["id2image"][meta["person"]]["ref"]
        )
        for entry, img, face in zip(meta["images"], rec.img, rec.face):
            assert decode_jpeg(img).shape == (3, SIZE, SIZE)
            assert decode_jpeg(face).shape == (3, 112, 112)
            lm = np.array(entry["landmarks"])
            assert lm.shape == (68, 2) and (lm > -SIZE).all() and (lm < 2 * SIZE).all()
            assert set(entry["boxes"]) >= {"lowerface", "eyebrow", "wholeface", "mouth", "nose"}
            cap = idi["captions"].get(entry["file"])
            assert entry["caption"] == (cap["overall_caption"] if cap else None)


def test_the_authors_annotation_files_build_every_photo_with_their_own_boxes(tmp_path):
    # annotation/landmarks.json nested as the authors write it, and their region_bbox.pth
    root = tmp_path / "celebahq"
    facts = make_celebahq_idi(root, SHARED / "data/captions/celeba_dialog_style_samples.json")
    boxes = to_authors_annotation(root)
    out = tmp_path / "shards"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pva.cli",
            "shards",
            "build",
            str(root),
            "--out",
            str(out),
            "--image-size",
            str(SIZE),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    index = read_index(out)
    skipped = [Path(s["file"]).name for s in index["skipped_images"]]
    assert skipped == [n for n in _all_files(facts) if n not in boxes]  # the black image only
    kept = sum(s["images"] for s in index["splits"].values())
    assert kept == len(boxes) - 1  # every photo with a face, but the dropped person's one
    assert index["source"]["landmarks"] and index["source"]["region_bbox"]
    widths = {p.name: Image.open(p).width for p in (root / "image").iterdir()}
    seen = 0
    for split in ("train", "val", "test"):
        for rec in _records(out, split):
            for entry in rec.meta["images"]:
                scale = SIZE / widths[entry["file"]]  # lib/dataset.py:422-423
                for region, box in boxes[entry["file"]].items():
                    assert entry["boxes"][region] == [int(v * scale) for v in box], region
                seen += 1
    assert seen == kept
    moved = [int(v * SIZE / widths["0.jpg"]) for v in (20, 10, 90, 60)]  # image 0's own box
    assert boxes["0.jpg"]["lowerface"] == [20, 10, 90, 60]
    assert [
        e["boxes"]["lowerface"]
        for rec in _records(out, "train")
        for e in rec.meta["images"]
        if e["file"] == "0.jpg"
    ] == [moved]

    (root / "annotation" / "landmarks.json").write_text(json.dumps({"0.jpg": {"image": {}}}))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pva.cli",
            "shards",
            "build",
            str(root),
            "--out",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 2 and "landmarks.json': entry '0.jpg'" in res.stderr
    assert not (tmp_path / "bad").exists()


def _all_files(facts: dict) -> list[str]:
    names = [n for v in facts["id2image"].values() for n in v["infer"] + v["ref"]]
    return sorted(names, key=lambda n: int(n.split(".")[0]))


def test_landmarks_land_on_the_face_in_the_stored_crop(idi):
    """Eyebrows above the mouth, the nose centred inside the whole face, on every image."""
    for split in ("train", "val", "test"):
        for rec in _records(idi["out"], split):
            for e in rec.meta["images"]:
                b = e["boxes"]
                assert b["eyebrow"][1] < b["mouth"][1]
                whole = b["wholeface"]
                cx, cy = (b["nose"][0] + b["nose"][2]) / 2, (b["nose"][1] + b["nose"][3]) / 2
                assert whole[0] <= cx <= whole[2] and whole[1] <= cy <= whole[3]


def test_people_folder_bad_inputs_are_listed_never_fatal(people):
    index = people["index"]
    assert index["source"]["format"] == "people"
    skipped = {Path(s["file"]).name: s["reason"] for s in index["skipped_images"]}
    for name, outcome in people["expected"].items():
        if outcome == "ok":
            assert name not in skipped, (name, skipped.get(name))
        else:
            assert outcome in skipped[name], (name, skipped[name])
    # the awkward but valid photos (CMYK, 16-bit, EXIF-rotated, RGBA) made it into the shards
    files = {
        e["file"]
        for s in ("train", "val", "test")
        for r in _records(people["out"], s)
        for e in r.meta["images"]
    }
    assert {"cmyk.jpg", "sixteen_bit.png", "exif_rotated.jpg", "rgba.png"} <= files
    persons = sum(index["splits"][s]["persons"] for s in ("train", "val", "test"))
    assert persons == 5 and index["splits"]["val"]["persons"] == 1


def test_people_split_is_seeded_and_rebuild_refuses_without_overwrite(people, tmp_path):
    again = build_shards(
        people["root"],
        tmp_path / "again",
        image_size=SIZE,
        progress=False,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    for split in ("train", "val", "test"):
        a = sorted(r.meta["person"] for r in _records(people["out"], split))
        b = sorted(r.meta["person"] for r in _records(tmp_path / "again", split))
        assert a == b
    assert again["splits"] == people["index"]["splits"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_shards(people["root"], tmp_path / "again", image_size=SIZE, progress=False)
    assert read_index(tmp_path / "again")["splits"] == again["splits"]  # nothing lost


def _dm(out, **kw):
    kw.setdefault("num_workers", 0)
    return ShardDataModule(str(out), **kw)


def test_training_batches_shapes_references_and_masks(idi):
    dm = _dm(idi["out"], batch_size=4, samples_per_epoch=48)
    faces = {}
    for rec in _records(idi["out"], "train"):
        faces[rec.meta["person"]] = {
            e["file"]: decode_jpeg(f) for e, f in zip(rec.meta["images"], rec.face)
        }
    batches = list(dm.train_dataloader())
    assert len(batches) == 12
    ks = set()
    for batch in batches:
        assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["mask"].shape == (
            4,
            1,
            SIZE,
            SIZE,
        )
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        torch.testing.assert_close(batch["masked_image"], batch["image"] * (batch["mask"] < 0.5))
        refs, valid = batch["references"], batch["reference_mask"]
        assert refs.shape[:2] == valid.shape and refs.shape[2:] == (3, 112, 112)
        ks.add(refs.shape[1])
        for b in range(4):
            own = faces[batch["person"][b]]
            target_face = own[batch["file"][b]]
            for j in range(refs.shape[1]):
                if not valid[b, j]:
                    assert refs[b, j].abs().sum() == 0
                    continue
                r = refs[b, j]
                same = [f for f in own.values() if torch.equal(r, f) or torch.equal(r, f.flip(-1))]
                assert same, "reference not from the same person"
                assert not torch.equal(r, target_face) and not torch.equal(r, target_face.flip(-1))
            assert batch["prompt"][b].startswith("photo of a <new1> person")
    assert len(ks) > 1  # K varies per batch
    prompts = [p for b in batches for p in b["prompt"]]
    assert any(p == "photo of a <new1> person" for p in prompts)
    assert any(p.startswith("photo of a <new1> person. ") for p in prompts)  # with caption


def test_each_training_reference_is_flipped_with_p_half_and_keyed_by_its_pixels(idi):
    # lib/dataset.py:428-430: every reference flipped with p=0.5 (flip_p=0.5 in pva_train.py)
    faces = {rec.key: [decode_jpeg(f) for f in rec.face] for rec in _records(idi["out"], "train")}
    dm = _dm(idi["out"], batch_size=4, samples_per_epoch=160)
    flipped = []
    for batch in dm.train_dataloader():
        for b, keys in enumerate(batch["reference_keys"]):
            for j, key in enumerate(keys):
                if not key:
                    continue
                record, index = key.split("/")[:2]
                face = faces[record][int(index)]
                is_flipped = key.endswith("/flip")
                expected = face.flip(-1) if is_flipped else face
                assert torch.equal(batch["references"][b, j], expected), key
                flipped.append(is_flipped)
    assert len(flipped) > 200 and 0.4 < np.mean(flipped) < 0.6


def test_decode_cache_gives_the_same_batches_and_stays_within_its_bound(idi):
    def batches(cache_mb):
        torch.manual_seed(0)  # the training stream's seed (no workers)
        dm = _dm(idi["out"], batch_size=4, samples_per_epoch=48, decode_cache_mb=cache_mb)
        loader = dm.train_dataloader()
        return list(loader), loader.dataset

    plain, _ = batches(0)
    cached, stream = batches(64)
    assert len(plain) == len(cached) == 12
    assert 0 < len(stream._decoded) and stream._decoded.bytes <= 64 * 2**20  # photos were cached
    for a, b in zip(plain, cached):
        for key in ("image", "masked_image", "mask", "references", "reference_mask"):
            assert torch.equal(a[key], b[key]), key
        assert a["image_key"] == b["image_key"] and a["reference_keys"] == b["reference_keys"]

    rec = next(_records(idi["out"], "train"))
    face = decode_jpeg(rec.face[0])  # (3, 112, 112): 37632 bytes as uint8
    cache = DecodedCache(2 * face.numel())
    for i in range(3):
        assert torch.equal(cache.get(f"f{i}", rec.face[i]), decode_jpeg(rec.face[i]))
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes  # f0 evicted, least recent
    cache.get("f1", b"not read on a hit")
    cache.get("f3", rec.face[3])  # evicts f2, the least recently used now
    assert torch.equal(cache.get("f1", b"still cached"), decode_jpeg(rec.face[1]))
    with pytest.raises(OSError):
        cache.get("f2", b"evicted, so this is decoded")
    off = DecodedCache(0)
    off.get("f0", rec.face[0])
    assert len(off) == 0
    with pytest.raises(ValueError, match="decode_cache_mb"):
        ShardDataModule(str(idi["out"]), decode_cache_mb=-1)


def test_evaluation_masks_cover_the_landmark_region_exactly(idi):
    dm = _dm(idi["out"], batch_size=8)
    boxes = {
        (r.meta["person"], e["file"]): e["boxes"]
        for r in _records(idi["out"], "test")
        for e in r.meta["images"]
    }
    seen = set()
    for batch in dm.test_dataloader():
        for b, kind in enumerate(batch["mask_region"]):
            seen.add(kind)
            m = batch["mask"][b, 0].numpy() > 0.5
            box = boxes[(batch["person"][b], batch["file"][b])]
            if kind == "random":
                assert any(
                    (m & box_mask(SIZE, box[r])).sum() == box_mask(SIZE, box[r]).sum()
                    for r in ("lowerface", "eyebrow", "wholeface")
                )
            else:
                assert np.array_equal(m, box_mask(SIZE, box[kind]))
    assert seen == {"lowerface", "eyebrow", "wholeface", "random"}


def test_training_masks_contain_a_region_box(idi):
    import random

    rng = random.Random(0)
    strokes = brush_stroke_mask(SIZE, rng)
    assert 0.005 < strokes.mean() < 0.8
    dm = _dm(idi["out"], batch_size=2, samples_per_epoch=8)
    for batch in dm.train_dataloader():
        for b in range(2):
            m = batch["mask"][b, 0].numpy() > 0.5
            assert m.any() and not m.all()


def test_evaluation_is_identical_on_every_run(idi):
    def keys():
        dm = _dm(idi["out"], batch_size=3)
        out = []
        for batch in dm.val_dataloader():
            out += [
                (p, f, k, float(m.sum()))
                for p, f, k, m in zip(
                    batch["person"], batch["file"], batch["mask_region"], batch["mask"]
                )
            ]
        return out

    first = keys()
    assert first and first == keys()


class _Boom:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create this file


def test_corrupt_and_pickle_members_are_skipped_counted_and_never_unpickled(idi, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    index = read_index(idi["out"])
    good = next(_records(idi["out"], "train"))
    raw = {f"{good.key}.meta.json": json.dumps(good.meta).encode()}
    for i, (img, face) in enumerate(zip(good.img, good.face)):
        raw[f"{good.key}.img.{i:03d}.jpg"], raw[f"{good.key}.face.{i:03d}.jpg"] = img, face
    marker = tmp_path / "UNPICKLED"

    def renamed(key: str, person: str) -> dict:
        rec = {k.replace(good.key, key): v for k, v in raw.items()}
        rec[f"{key}.meta.json"] = json.dumps({**good.meta, "person": person}).encode()
        return rec

    evil = renamed("evil", "evil")
    evil["evil.extra.pyd"] = pickle.dumps(_Boom(str(marker)))
    broken = renamed("broken", "broken")
    broken["broken.img.000.jpg"] = b"\xff\xd8\xff garbage"  # corrupt JPEG
    write_tar(out / "train-00000.tar", {**raw, **evil, **broken})
    (out / "train-00001.tar").write_bytes((idi["out"] / "train-00000.tar").read_bytes()[:5000])
    index["splits"]["train"]["shards"] = ["train-00000.tar", "train-00001.tar"]
    (out / "index.json").write_text(json.dumps(index))
    dm = _dm(out, batch_size=2, samples_per_epoch=40, max_refs=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 20
    assert sum(int(b["skipped"]) for b in batches) >= 3  # pickle record, bad JPEG, torn tar
    assert not marker.exists()
    persons = {p for b in batches for p in b["person"]}
    assert "evil" not in persons and persons == {good.meta["person"], "broken"}


def _ddp_worker(rank: int, world: int, out: str, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dm = ShardDataModule(out, batch_size=2, samples_per_epoch=20, num_workers=1)
    val = [
        (p, f, k)
        for b in dm.val_dataloader()
        for p, f, k in zip(b["person"], b["file"], b["mask_region"])
    ]
    n_train = sum(1 for _ in dm.train_dataloader())
    Path(result_dir, f"{rank}.json").write_text(json.dumps({"val": val, "train": n_train}))
    torch.distributed.destroy_process_group()


def test_ddp_two_ranks_split_evaluation_and_train_equally(people, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, str(people["out"]), port, str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    single = [
        (p, f, k)
        for b in _dm(people["out"], batch_size=2).test_dataloader()
        for p, f, k in zip(b["person"], b["file"], b["mask_region"])
    ]
    assert r0["train"] == r1["train"] == 20 // (2 * 2)
    v0, v1 = {tuple(x) for x in r0["val"]}, {tuple(x) for x in r1["val"]}
    full_val = {
        (p, f, k)
        for b in _dm(people["out"], batch_size=2).val_dataloader()
        for p, f, k in zip(b["person"], b["file"], b["mask_region"])
    }
    assert not v0 & v1 and v0 | v1 == full_val
    assert single  # test split readable too


def test_workers_split_evaluation_disjointly(people):
    def keys(workers):
        dm = _dm(people["out"], batch_size=2, num_workers=workers)
        return sorted(
            (p, f, k)
            for b in dm.test_dataloader()
            for p, f, k in zip(b["person"], b["file"], b["mask_region"])
        )

    assert keys(0) == keys(2)


def test_shards_feed_the_pva_module(idi, tiny_assets, tmp_path):
    module = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(face_crop="none"),
        batch_size=2,
        timestep_draws=1,
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=_dm(idi["out"], batch_size=2, samples_per_epoch=4))
    assert trainer.global_step == 2


# ------------------------------------------- issue 20: a split with nothing readable, counts
class _Spins(BaseException):
    """Not an Exception: the stream's error handlers must not swallow it."""


def _alarm(seconds: int):
    def boom(*_):
        raise _Spins(f"no answer within {seconds} s (the stream spins)")

    signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)


def test_a_training_split_with_nothing_readable_stops_naming_shards_and_reasons(idi, tmp_path):
    from pva.data.reader import ShardReadError

    names = unreadable_split(idi["out"], tmp_path / "bad", "train")
    dm = _dm(tmp_path / "bad", batch_size=2, samples_per_epoch=8)
    _alarm(60)
    try:
        with pytest.raises(ShardReadError) as info:
            next(iter(dm.train_dataloader()))
    finally:
        signal.alarm(0)
    message = str(info.value)
    assert message.startswith(
        "no training sample could be read from any of the 2 shards of the train split"
    )
    for name in names:
        assert name in message
    assert "outside the schema" in message and "ReadError" in message  # each shard's reason
    assert dm.skipped_records >= 2


def test_validation_with_nothing_readable_stops_instead_of_giving_no_batch(idi, tmp_path):
    from pva.data.reader import ShardReadError

    unreadable_split(idi["out"], tmp_path / "bad", "val")
    dm = _dm(tmp_path / "bad", batch_size=2)
    for read in (
        lambda: list(dm.val_dataloader()),
        lambda: dm.fixed_batches("val", 2, 2),
        lambda: dm.person_photos("val"),
        lambda: list(dm.records("val")),
    ):
        with pytest.raises(
            ShardReadError,
            match=r"no person record could be read from any of "
            r"the 2 shards of the val split: '.*val-torn",
        ):
            read()


@pytest.mark.parametrize("workers", [0, 1])
def test_records_skipped_after_the_last_batch_are_counted(idi, tmp_path, workers):
    out = tmp_path / "shards"
    out.mkdir()
    index = read_index(idi["out"])
    good = next(_records(idi["out"], "val"))
    members = record_members(good, "good", good.meta["person"])
    for k in range(3):  # three bad records after every good sample
        bad = record_members(good, f"bad{k}", f"bad{k}")
        bad[f"bad{k}.extra.pyd"] = b"x"
        members.update(bad)
    write_tar(out / "val-00000.tar", members)
    index["splits"]["val"]["shards"] = ["val-00000.tar"]
    (out / "index.json").write_text(json.dumps(index))
    dm = _dm(out, batch_size=1, num_workers=workers)
    batches = list(dm.val_dataloader())
    assert len(batches) > 1 and all(b["person"] == [good.meta["person"]] for b in batches)
    assert sum(int(b["skipped"]) for b in batches) == 3  # before: 0 (all after the last batch)
    assert dm.skipped_records == 3  # counted where they happen, in the worker too
