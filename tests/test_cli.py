"""The `pva` command, train.py and shipped configs, run as a user runs them (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import REPO

from datamodules import PersonPhotosDataModule
from pva.adapter import read_adapter


def _run(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_quickstart_runs_end_to_end_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "qs"
    res = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "quickstart",
        "--out",
        str(out),
        "--steps",
        "4",
        "--sample-steps",
        "3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reloaded bit-exact: True" in res.stdout
    tensors, header = read_adapter(out / "adapter.safetensors")
    assert header["contents"] == ["projection", "pva", "token"]
    assert (out / "inpainted.png").stat().st_size > 0
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    ckpts = list(out.rglob("*.ckpt"))
    assert ckpts and all(p.stat().st_size < 2_000_000 for p in ckpts)  # adapter only
    again = _run(sys.executable, "-m", "pva.cli", "quickstart", "--out", str(out), "--steps", "2")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (out / "adapter.safetensors").is_file()  # nothing lost


def test_quickstart_rejects_a_missing_photo_folder(tmp_path):
    res = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "quickstart",
        "--out",
        str(tmp_path / "o"),
        "--photos",
        str(tmp_path / "nowhere"),
    )
    assert res.returncode == 2 and "nowhere" in res.stderr and "does not exist" in res.stderr


def test_bench_attention_prints_its_table():
    res = _run(sys.executable, "-m", "pva.cli", "bench", "attention", "--small", "--repeats", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    for needle in (
        "PVA reference",
        "PVA fused",
        "stock (text only)",
        "attn2 layers",
        "trainable params, stage 1",
        "FLOP overhead",
    ):
        assert needle in res.stdout
    line = next(x for x in res.stdout.splitlines() if x.strip().startswith("attn2 layers"))
    assert line.split()[-1] == "16"  # SD2 has 16 cross-attention layers


def test_every_shipped_config_parses_through_the_cli(tmp_path):
    overlays = {"ddp.yaml"}  # parsed on top of stage1.yaml
    for config in sorted((REPO / "configs").glob("*.yaml")):
        args = ["--config", str(config)]
        if config.name in overlays:
            args = ["--config", str(REPO / "configs/stage1.yaml"), *args]
        res = _run(sys.executable, "train.py", "fit", *args, "--print_config")
        assert res.returncode == 0, (config, res.stderr[-3000:])
        printed = yaml.safe_load(res.stdout)
        assert printed["model"]["backbone"] and printed["data"]["class_path"]
        if config.name == "ddp.yaml":
            assert printed["trainer"]["strategy"] == "ddp" and printed["trainer"]["num_nodes"] == 2


def test_train_py_fits_the_quickstart_config(tiny_assets, tmp_path):
    res = _run(
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--model.backbone",
        str(tiny_assets.backbone),
        "--model.face_model",
        str(tiny_assets.face_model),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_steps",
        "2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert (run_dir / "adapter.safetensors").is_file() and (run_dir / "config.yaml").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    # the data batch size is linked into the module, where it scales the PVA learning rate
    assert hparams["batch_size"] == saved["data"]["init_args"]["batch_size"] == 4


def test_photo_datamodule_batches(tmp_path):
    dm = PersonPhotosDataModule(image_size=64, num_refs=3, batch_size=2, samples_per_epoch=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["references"].shape == (2, 3, 3, 64, 64)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["mask"].shape == (2, 1, 64, 64) and set(batch["mask"].unique().tolist()) == {0, 1}
    assert batch["prompt"] == ["photo of a <new1> person"] * 2


def test_photo_datamodule_reads_a_real_person_folder():
    folder = next(
        p for p in sorted((REPO.parent / "shared/data/faces/photomaker").iterdir()) if p.is_dir()
    )
    dm = PersonPhotosDataModule(photos=str(folder), image_size=64, batch_size=2)
    dm.setup()
    assert len(dm.dataset.photos) >= 2
    assert all(p.shape == (3, 64, 64) and torch.isfinite(p).all() for p in dm.dataset.photos)


def test_shards_build_cli_and_bench_data(tmp_path):
    people = tmp_path / "people"
    people.mkdir()
    for name in ("deepface/id02_img3", "photomaker/yangmi_woman"):
        (people / name.split("/")[1]).symlink_to(REPO.parent / "shared/data/faces" / name)
    out = tmp_path / "shards"
    res = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "shards",
        "build",
        str(people),
        "--out",
        str(out),
        "--image-size",
        "128",
        "--test-fraction",
        "0",
        "--val-fraction",
        "0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train: 2 persons" in res.stdout
    again = _run(sys.executable, "-m", "pva.cli", "shards", "build", str(people), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    missing = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "shards",
        "build",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "x"),
    )
    assert missing.returncode == 2 and "nope" in missing.stderr
    root = tmp_path / "faces"  # the bench's layout: <root>/<source>/<person>/
    root.mkdir()
    (root / "src").symlink_to(people)
    bench = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "bench",
        "data",
        "--photos",
        str(root),
        "--image-size",
        "128",
        "--refs",
        "2",
        "--samples",
        "4",
        "--build-workers",
        "1",
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "ratio (ours / naive)" in bench.stdout and "workers one GPU needs" in bench.stdout


def test_bench_step_prints_both_configurations():
    res = _run(sys.executable, "-m", "pva.cli", "bench", "step", "--repeats", "1", "--refs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    for needle in ("tiny:", "mid:", "base UNet fwd+bwd", "PVA UNet fwd+bwd", "full PVA step"):
        assert needle in res.stdout


def test_bench_sample_prints_both_tables():
    res = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "bench",
        "sample",
        "--short",
        "1",
        "--long",
        "2",
        "--cd-steps",
        "3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for needle in (
        "PVA, batched CFG",
        "StableDiffusionInpaintPipeline",
        "PVA-FT (METHOD 7)",
        "Custom-Diffusion-style",
    ):
        assert needle in res.stdout
    rows = [line for line in res.stdout.splitlines() if "PVA-FT" in line or "Custom-Diff" in line]
    assert len(rows) == 4 and sum("reused" in r for r in rows) == 2  # each method, both ways


def test_an_output_folder_given_as_an_existing_file(tmp_path, capsys):
    from pva.cli import main

    people = tmp_path / "people"
    people.mkdir()
    (people / "id02_img3").symlink_to(REPO.parent / "shared/data/faces/deepface/id02_img3")
    out = tmp_path / "shards"
    out.write_bytes(b"")  # an empty file where the output folder goes
    args = [
        "shards",
        "build",
        str(people),
        "--out",
        str(out),
        "--image-size",
        "64",
        "--test-fraction",
        "0",
        "--val-fraction",
        "0",
    ]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"pva shards: error: --out '{out}' is a file, not a folder; pass --overwrite to replace it"
    )  # before: "exists and is not empty"
    assert main([*args, "--overwrite"]) == 0
    assert (out / "index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["people", "shards"]  # no .old-PID
    quick = tmp_path / "q"
    quick.write_bytes(b"")
    assert main(["quickstart", "--out", str(quick), "--steps", "1"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"--out '{quick}' is a file, not a folder; pass --overwrite to replace it")
    )


def test_pva_train_is_train_py(tiny_assets, tmp_path):
    printed = _run(sys.executable, "-m", "pva.cli", "train", "fit", "--config",
                   "configs/tiny.yaml", "--print_config")  # fmt: skip
    assert printed.returncode == 0, printed.stderr[-2000:]
    same = _run(
        sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--print_config"
    )
    assert printed.stdout == same.stdout and "lr_pva: 0.000125" in printed.stdout
    bad = _run(sys.executable, "-m", "pva.cli", "train", "fit", "--config", "configs/tiny.yaml",
               "--model.lr_pva=.nan")  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "pva train: error: model.lr_pva must be a finite number > 0, got nan"
    )
