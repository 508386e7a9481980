"""The `pva` command, train.py and shipped configs, run as a user runs them (subprocesses)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from conftest import REPO

from datamodules import PersonPhotosDataModule
from pva.adapter import read_adapter
from pva.training import main as training_main


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


def test_every_shipped_config_parses_through_the_cli(tmp_path):
    overlays = {"ddp.yaml"}  # parsed on top of stage1.yaml
    for config in sorted((REPO / "configs").glob("*.yaml")):
        args = ["--config", str(config)]
        if config.name in overlays:
            args = ["--config", str(REPO / "configs/stage1.yaml"), *args]
        out = io.StringIO()  # in-process: one interpreter for every config, not one each
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            training_main(["fit", *args, "--print_config"])
        assert exit_.value.code in (0, None), config
        printed = yaml.safe_load(out.getvalue())
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


def test_shards_build_cli(tmp_path):
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
        f"pva shards build: error: --out '{out}' is a file, not a folder; "
        "pass --overwrite to replace it"
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
    printed = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "train",
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--print_config",
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    same = _run(
        sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--print_config"
    )
    assert printed.stdout == same.stdout and "lr_pva: 0.000125" in printed.stdout
    bad = _run(
        sys.executable,
        "-m",
        "pva.cli",
        "train",
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--model.lr_pva=.nan",
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "pva train: error: model.lr_pva must be a finite number > 0, got nan"
    )


def test_every_command_is_generated_from_its_function_and_docstring():
    import dataclasses
    import inspect

    from pva.cli import _REQUIRED, COMMANDS, _plain, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in COMMANDS:
        sub = subparsers
        for word in command.name.split()[:-1]:
            group = sub.choices[word]
            sub = next(a for a in group._actions if isinstance(a, argparse._SubParsersAction))
        cmd_parser = sub.choices[command.name.split()[-1]]
        by_dest = {a.dest: a for a in cmd_parser._actions}
        options = {o.name: o for o in command.options()}
        fn = command.function()
        expected = set()  # every parameter, or every field of a dataclass parameter
        for name, param in inspect.signature(fn).parameters.items():
            default = param.default
            if dataclasses.is_dataclass(default):
                expected |= {f.name for f in dataclasses.fields(default)}
            else:
                expected.add(name)
        assert set(options) == expected - set(command.hidden), command.name
        for name, option in options.items():
            action = by_dest[name]  # a flag (or a positional) per option
            first_words = _plain(option.doc).split()[:2]
            assert all(w.strip(".") in action.help for w in first_words), (command.name, name)
            if option.default is _REQUIRED:
                assert action.required or not action.option_strings, (command.name, name)
            else:
                assert action.default == option.default, (command.name, name)


def test_a_new_command_is_one_function(tmp_path, capsys, monkeypatch):
    import types

    from pva.checks import POSITIVE_INT, Range
    from pva.cli import Command, run

    module = types.ModuleType("dummy_commands")

    def greet(
        name: str,
        times: int = 2,
        style: Literal["plain", "loud"] = "plain",
        scales: tuple[float, ...] = (1.0,),
        dry_run: bool = False,
    ) -> str:
        """Say hello.

        Args:
            name: Who to greet.
            times: How often.
            style: How.
            scales: Scales to list.
            dry_run: Print nothing.
        """
        text = (f"hello {name} " * times).strip()
        if not dry_run:
            print(text.upper() if style == "loud" else text, scales)
        return text

    module.greet = greet
    module.RANGES = {"times": POSITIVE_INT, "scales": Range(0, 10)}
    monkeypatch.setitem(sys.modules, "dummy_commands", module)
    commands = [Command("greet", "dummy_commands:greet", "dummy_commands:RANGES")]
    argv = ["greet", "--name", "ada", "--times", "1", "--style", "loud", "--scales", "1,2.5"]
    assert run(argv, commands, prog="demo-tool") == 0
    assert capsys.readouterr().out.strip() == "HELLO ADA (1.0, 2.5)"
    with pytest.raises(SystemExit):
        run(["greet", "--name", "ada", "--times", "0"], commands, prog="demo-tool")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "demo-tool greet: error: argument --times: must be an integer >= 1, got '0'"
    with pytest.raises(SystemExit):
        run(["greet", "--help"], commands, prog="demo-tool")
    help_text = capsys.readouterr().out
    assert "Say hello." in help_text and "Who to greet." in help_text
    assert "How often (default: 2)." in help_text and "--dry-run" in help_text
