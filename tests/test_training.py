"""pva train / train.py (pva.training) end to end: logs, checkpoints, DDP, resume, callbacks."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import FACES, REPO, count_calls
from data_fixtures import _shrink
from PIL import Image

from callbacks import PersonalizationCheck
from datamodules import ShardDataModule
from pva.data.writer import build_shards
from pva.module import PVAModule
from pva.objective import denoising_loss
from pva.tiny import tiny_pva_config


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_shards")
    people = root / "people"
    for src in (
        "deepface/id01_img1",
        "deepface/id02_img3",
        "deepface/id03_img8",
        "deepface/id05_img16",
        "photomaker/yangmi_woman",
    ):
        folder = people / Path(src).name
        folder.mkdir(parents=True)
        for photo in sorted((FACES / src).iterdir())[:5]:
            _shrink(photo, folder / photo.name, 400)
    build_shards(
        people, root / "shards", image_size=128, val_fraction=0.2, test_fraction=0.2, progress=False
    )
    return root / "shards"


def _config(tmp: Path, tiny_assets, shards: Path, **trainer) -> Path:
    """configs/tiny.yaml pointed at test assets, with small intervals."""
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    cfg["model"]["backbone"] = str(tiny_assets.backbone)
    cfg["model"]["face_model"] = str(tiny_assets.face_model)
    cfg["data"]["init_args"].update(shards=str(shards), samples_per_epoch=400, batch_size=2)
    cfg["trainer"].update(
        {"default_root_dir": str(tmp / "run"), "max_steps": 4, "log_every_n_steps": 1, **trainer}
    )
    for cb in cfg["trainer"]["callbacks"]:
        args = cb.setdefault("init_args", {})
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "ModelCheckpoint":
            args.update(dirpath=str(tmp / "ckpt"), every_n_train_steps=2)
        elif name == "IdentityValidation":
            args.update(
                every_n_steps=2, num_persons=1, ddim_steps=2, max_samples=2, run_at_end=False
            )
        elif name == "PersonalizationCheck":
            args.update(every_n_steps=4, steps=2, ddim_steps=2)
        elif name == "AdapterExport":
            args.update(dirpath=str(tmp / "run"))
    path = tmp / "test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(*args: str, env: dict | None = None, timeout: int = 600):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "train.py", "fit", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def test_fit_tiny_config_logs_identity_and_writes_adapter_only_checkpoints(
    tiny_assets, train_shards, tmp_path
):
    cfg = _config(tmp_path, tiny_assets, train_shards)
    res = _train("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-4000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next((tmp_path / "run" / "lightning_logs").iterdir())
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/grad_norm",
        "train/samples_per_s",
        "lr-AdamW/pva",
        "lr_effective/pva",
        "val/identity_sim",
        "val/identity_sim/wholeface",
        "personalize/identity_sim_before",
        "personalize/identity_sim_after",
        "personalize/seconds",
        "data/skipped_records",
    ):
        assert tag in scalars, tag
    assert "val/inpainting" in events.Tags()["images"]
    sims = [e.value for e in events.Scalars("val/identity_sim")]
    assert all(-1 <= s <= 1 for s in sims)
    assert events.Scalars("lr_effective/pva")[0].value == pytest.approx(2.5e-4 * 2)
    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert {c.name for c in ckpts} >= {"last.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"}
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(
        k.startswith(("model.unet.", "model.identity_encoder.projection.", "model.modifier_token."))
        for k in state
    )
    assert all(".processor." in k for k in state if k.startswith("model.unet."))
    assert not list((tmp_path / "ckpt").glob(".*tmp*"))
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert (run / "config.yaml").is_file()


def test_ddp_two_ranks_train_on_different_data_and_stay_identical(
    tiny_assets, train_shards, tmp_path
):
    cfg = _config(tmp_path, tiny_assets, train_shards, strategy="ddp", devices=2, max_steps=3)
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["callbacks"] = [
        {"class_path": "helpers.dump.DumpRankState", "init_args": {"out": str(tmp_path / "dump")}}
    ]
    raw["trainer"]["enable_checkpointing"] = False
    cfg.write_text(yaml.safe_dump(raw))
    res = _train("--config", str(cfg), env={"PYTHONPATH": str(REPO / "tests")})
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["end_step"] == r1["end_step"] == 3
    assert r0["start_digest"] == r1["start_digest"]
    assert r0["end_digest"] == r1["end_digest"] != r0["start_digest"]
    assert r0["samples"] != r1["samples"]  # different data, same weights
    # gradients really are averaged: DDP's gradient is the mean of the two ranks' own gradients
    local0, local1 = torch.tensor(r0["local_grad"]), torch.tensor(r1["local_grad"])
    ddp0, ddp1 = torch.tensor(r0["ddp_grad"]), torch.tensor(r1["ddp_grad"])
    assert torch.equal(ddp0, ddp1)
    torch.testing.assert_close(ddp0, (local0 + local1) / 2, atol=1e-6, rtol=1e-4)
    assert (local0 - local1).abs().max() > 100 * (ddp0 - (local0 + local1) / 2).abs().max()


def test_sigkill_then_resume_from_last_checkpoint(tiny_assets, train_shards, tmp_path):
    cfg = _config(tmp_path, tiny_assets, train_shards, max_steps=10_000)
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["callbacks"] = [
        cb
        for cb in raw["trainer"]["callbacks"]
        if cb["class_path"].endswith(("ModelCheckpoint", "AdapterExport"))
    ]
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", "fit", "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            # Step 6's checkpoint means step 4's saves (its own file, then last.ckpt) are done;
            # killing as soon as step 4's file appears can land before last.ckpt is updated.
            if (tmp_path / "ckpt" / "epoch=0-step=6.ckpt").exists():
                break
            time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert step >= 4 and step % 2 == 0
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}

    raw["trainer"]["max_steps"] = step + 2
    raw["trainer"]["callbacks"].append(
        {"class_path": "helpers.dump.DumpRankState", "init_args": {"out": str(tmp_path / "dump")}}
    )
    cfg.write_text(yaml.safe_dump(raw))
    res = _train(
        "--config", str(cfg), "--ckpt_path", str(last), env={"PYTHONPATH": str(REPO / "tests")}
    )
    assert res.returncode == 0, res.stderr[-4000:]
    dump = json.loads((tmp_path / "dump" / "rank0.json").read_text())
    assert dump["start_step"] == step
    assert dump["start_digest"] == _digest(saved)  # identical adapter weights to the checkpoint
    assert dump["end_step"] == step + 2 and dump["end_digest"] != dump["start_digest"]


def test_personalization_check_restores_weights_optimizer_and_rng(
    tiny_assets, train_shards, tmp_path
):
    module = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(face_crop="none"),
        batch_size=2,
        timestep_draws=1,
    )
    dm = ShardDataModule(str(train_shards), batch_size=2, samples_per_epoch=8, num_workers=0)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    weights = {k: v.clone() for k, v in module.model.state_dict().items()}
    optim = copy.deepcopy(trainer.optimizers[0].state_dict())
    rng = torch.get_rng_state()
    check = PersonalizationCheck(every_n_steps=1, steps=3, ddim_steps=2)
    metrics = check.run(trainer, module)
    assert set(metrics) == {
        "personalize/identity_sim_before",
        "personalize/identity_sim_after",
        "personalize/seconds",
    }
    assert metrics["personalize/identity_sim_before"] != metrics["personalize/identity_sim_after"]
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    new_optim = trainer.optimizers[0].state_dict()
    for pid, st in optim["state"].items():
        assert all(torch.equal(st[k], new_optim["state"][pid][k]) for k in st)
    assert torch.equal(torch.get_rng_state(), rng)


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tiny_assets, train_shards, tmp_path):
    def nan_loss(*args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True)

    dm = ShardDataModule(str(train_shards), batch_size=2, samples_per_epoch=8, num_workers=0)
    kw = dict(pva=tiny_pva_config(face_crop="none"), batch_size=2, timestep_draws=1)
    module = PVAModule(str(tiny_assets.backbone), str(tiny_assets.face_model), **kw)
    module.configure_model()
    module.objective = nan_loss
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match="at step 0"):
        trainer.fit(module, datamodule=dm)

    skipper = PVAModule(
        str(tiny_assets.backbone), str(tiny_assets.face_model), nonfinite="skip", **kw
    )
    skipper.configure_model()
    before = {k: v.clone() for k, v in skipper.model.adapter_state_dict().items()}
    skipper.objective = nan_loss
    trainer = L.Trainer(
        max_steps=2,
        limit_train_batches=3,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(skipper, datamodule=dm)
    assert skipper.nonfinite_skipped == 2  # every batch of the run (skipped steps still count)
    after = skipper.model.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_help_documents_every_option():
    res = subprocess.run(
        [sys.executable, "train.py", "fit", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0
    text = " ".join(res.stdout.split())  # argparse wraps lines
    for needle in (
        "--model.lr_pva",
        "total batch",
        "--model.pva.variant",
        "joint softmax",
        "--model.nonfinite",
        "--trainer.max_steps",
    ):
        assert needle in text, needle


def test_cache_encodings_matches_the_encoders_and_skips_them_once_cached(tiny_assets, train_shards):
    dm = ShardDataModule(
        str(train_shards), batch_size=3, samples_per_epoch=36, num_workers=0, flip_ref_prob=1.0
    )
    batches = list(dm.train_dataloader())  # 12 batches: photos and flips recur
    module = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(),
        timestep_draws=2,
        cache_encodings=True,
    )
    module.configure_model()
    model = module.model.train()
    calls = {"vae": 0, "face": 0}
    count_calls(calls, "vae", model.vae, "encode")
    count_calls(calls, "face", model.identity_encoder.backbone, "forward")
    for batch in batches:
        cached = module.encodings.fill(module.model, batch)  # encodes what it lacks, then looks up
        with torch.no_grad():
            moments = model.encode_moments(batch["image"])  # (B, 8, h, w)
            emb = model.identity_encoder.embed(batch["references"])  # (B, K, E)
        valid = batch["reference_mask"]
        torch.testing.assert_close(cached["latent_moments"], moments, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            cached["reference_embeddings"][valid], emb[valid], rtol=1e-4, atol=1e-5
        )
        torch.manual_seed(1)
        expected = denoising_loss(model, batch, 2)
        torch.manual_seed(1)
        got = denoising_loss(model, cached, 2)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    keys = {k for b in batches for k in b["image_key"]}
    assert any(k.endswith("/flip") for k in keys) and len(module.encodings.moments) == len(keys)
    calls.update(vae=0, face=0)
    for batch in batches:  # everything is cached now: only the masked images are encoded
        denoising_loss(model, module.encodings.fill(module.model, batch), 2)
    assert calls == {"vae": len(batches), "face": 0}
    with pytest.raises(ValueError, match="frozen face backbone"):
        PVAModule("b", "f", pva=tiny_pva_config(train_face_backbone=True), cache_encodings=True)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_with_nothing_readable_stops_train_py_in_one_line(
    tiny_assets, train_shards, tmp_path, split
):
    from data_fixtures import unreadable_split

    names = unreadable_split(train_shards, tmp_path / "bad", split)
    cfg = _config(tmp_path, tiny_assets, tmp_path / "bad")
    text = yaml.safe_load(cfg.read_text())
    text["data"]["init_args"]["num_workers"] = 1  # the training error crosses a worker
    cfg.write_text(yaml.safe_dump(text))
    res = _train("--config", str(cfg), timeout=300)  # before: train spun forever, val gave 0
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    what = "no training sample" if split == "train" else "no person record"
    assert last.startswith(
        f"train.py: error: {what} could be read from any of the 2 shards of the {split} split: "
    )
    assert all(name in last for name in names) and "Traceback" not in res.stderr


def test_every_skipped_record_is_logged_even_off_the_logging_steps(
    tiny_assets, train_shards, tmp_path
):
    import csv
    import tarfile

    from data_fixtures import first_record, record_members, write_tar
    from lightning.pytorch.loggers import CSVLogger

    shards = tmp_path / "shards"
    shards.mkdir()
    index = json.loads((train_shards / "index.json").read_text())
    for info in index["splits"].values():
        for name in info["shards"]:
            (shards / name).write_bytes((train_shards / name).read_bytes())
    first = train_shards / index["splits"]["train"]["shards"][0]
    good = first_record(first)
    members = {}
    for k in range(3):  # three unreadable records ahead of the good ones: read at every visit
        members.update(record_members(good, f"bad{k}", f"bad{k}"))
        members[f"bad{k}.extra.pyd"] = b"x"
    with tarfile.open(first) as tar:
        members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    write_tar(shards / "train-mixed.tar", members)
    index["splits"]["train"]["shards"] = ["train-mixed.tar"]
    (shards / "index.json").write_text(json.dumps(index))
    L.seed_everything(0)
    dm = ShardDataModule(str(shards), batch_size=2, max_refs=2, samples_per_epoch=40, num_workers=1)
    module = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(face_crop="none"),
        timestep_draws=1,
    )
    trainer = L.Trainer(
        max_steps=3,
        log_every_n_steps=50,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="log"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    rows = list(csv.DictReader(open(next((tmp_path / "log").rglob("metrics.csv")))))
    logged = [float(r["data/skipped_records"]) for r in rows if r.get("data/skipped_records")]
    assert dm.skipped_records > 0  # warned in the DataLoader worker
    assert logged and logged[-1] == dm.skipped_records  # before: nothing (no logging step)


def test_the_model_token_reaches_the_data_prompts(tiny_assets, train_shards, tmp_path):
    sys.path.insert(0, str(REPO))
    from train import PVACLI

    cfg = _config(tmp_path, tiny_assets, train_shards)
    cli = PVACLI(
        PVAModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(cfg), "--model.pva.modifier_token", "<zz>"],
    )
    assert cli.model.pva_config.modifier_token == "<zz>"
    assert cli.datamodule.hparams.modifier_token == "<zz>"  # linked: set in one place
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert all(p.startswith("photo of a <zz> person") for p in batch["prompt"])


def test_a_dlib_face_encoder_trains_end_to_end_and_its_adapter_refuses_arcface(
    tiny_assets, train_shards, tmp_path
):
    from pva.adapter import AdapterMismatchError, load_adapter, read_adapter_header
    from pva.model import PVAModel
    from pva.pipeline import PVAInpaintPipeline

    cfg = _config(tmp_path, tiny_assets, train_shards)
    res = _train("--config", str(cfg), "--model.face_model", "dlib")
    assert res.returncode == 0, res.stderr[-4000:]
    adapter = tmp_path / "run" / "adapter.safetensors"
    header = read_adapter_header(adapter)
    assert header["backbone"]["face_encoder"] == "dlib"
    assert header["backbone"]["face_embed_dim"] == 128  # the projection's input follows it
    assert header["paths"]["face_model"] == "dlib"
    pipe = PVAInpaintPipeline.from_pretrained(tiny_assets.backbone).load_pva(adapter)
    photo = FACES / "deepface/id01_img1/img1.jpg"
    refs = sorted((FACES / "deepface/id01_img1").iterdir())[1:3]
    out = pipe(photo, mask_region="lowerface", reference_images=refs, num_inference_steps=2)
    assert out.images[0].size == Image.open(photo).size
    arcface = PVAModel.from_paths(tiny_assets.backbone, tiny_assets.face_model, tiny_pva_config())
    with pytest.raises(AdapterMismatchError, match="face_encoder=dlib"):
        load_adapter(arcface, adapter)
    with pytest.raises(ValueError, match="arcface_torch IResNet"):  # stage 2 needs a .pth
        PVAModel.from_paths(tiny_assets.backbone, "dlib", tiny_pva_config(train_face_backbone=True))
