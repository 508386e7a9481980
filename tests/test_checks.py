"""Every number a user can give is range-checked: each CLI flag, each config value, each call."""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import math
import subprocess
import sys
import types
import typing

import pytest
import yaml
from conftest import REPO

from benchmarks import BENCHMARKS
from callbacks.crash import SimulatedCrash
from callbacks.identity import (
    PERSONALIZATION_RANGES,
    VALIDATION_RANGES,
    IdentityValidation,
    PersonalizationCheck,
)
from datamodules.photos import PHOTOS_RANGES, PersonPhotosDataModule
from datamodules.shards import DATA_RANGES, ShardDataModule
from pva.checks import POSITIVE, POSITIVE_INT, Range, RangeError
from pva.cli import COMMANDS, build_parser, main, run
from pva.data.writer import BUILD_RANGES, build_shards
from pva.evaluate import RANGES as EVALUATE_RANGES
from pva.evaluate import FineTuning, Sampling, Scoring, Selection, evaluate
from pva.model import CONFIG_RANGES, PVAConfig
from pva.module import MODULE_RANGES, PVAModule
from pva.pipeline import CALL_RANGES, PVAInpaintPipeline

BAD = ("0", "-1", "nan", "inf")


def test_range_describes_and_checks():
    assert Range(1, integer=True).describe() == "an integer >= 1"
    assert Range(0, 1).describe() == "a finite number in [0, 1]"
    assert POSITIVE.describe() == "a finite number > 0"
    assert Range(64, integer=True, multiple_of=8).contains(72)
    assert not Range(64, integer=True, multiple_of=8).contains(68)
    for value in (math.nan, math.inf, -math.inf):
        assert not Range().contains(value)
    assert not Range(0, integer=True).contains(1.5) and not Range().contains(True)
    with pytest.raises(RangeError, match=r"^data.x must be a finite number > 0, got 0$"):
        POSITIVE.check("data.x", 0)


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))
    if path:
        yield path, parser


PROGRAMS = {"pva": (COMMANDS, main), "python -m benchmarks": (BENCHMARKS, None)}
"""Both generated command lines: the ``pva`` command and ``python -m benchmarks``."""


def _parser(prog: str) -> argparse.ArgumentParser:
    return build_parser(PROGRAMS[prog][0], prog=prog)


def _main(prog: str, argv: list[str]) -> int:
    entry = PROGRAMS[prog][1]
    return entry(argv) if entry else run(argv, PROGRAMS[prog][0], prog=prog)


def _numeric_flags():
    """(program, command path, flag, Range) for every flag of every command taking numbers."""
    found = []
    for prog in PROGRAMS:
        for path, parser in _subparsers(_parser(prog)):
            for action in parser._actions:
                assert action.type not in (int, float), f"{prog} {' '.join(path)} {action}"
                kind = action.type
                allowed = getattr(kind, "__self__", None) or getattr(kind, "allowed", None)
                if isinstance(allowed, Range):
                    found.append((prog, path, action.option_strings[0], allowed))
    return found


def test_the_walk_finds_the_flags_the_issue_names():
    flags = {(prog, " ".join(p), f) for prog, p, f, _ in _numeric_flags()}
    assert {
        ("pva", "inpaint", "--steps"),
        ("pva", "inpaint", "--num-images"),
        ("pva", "inpaint", "--guidance"),
        ("pva", "evaluate", "--cd-eval-steps"),
        ("pva", "shards build", "--val-fraction"),
        ("python -m benchmarks", "text-use", "--guidance"),
        ("pva", "quickstart", "--image-size"),
    } <= flags
    assert len(flags) > 50


@pytest.mark.parametrize(
    "prog,path,flag,allowed",
    _numeric_flags(),
    ids=[f"{prog.split()[-1]}-{'-'.join(p)}{f}" for prog, p, f, _ in _numeric_flags()],
)
def test_every_numeric_flag_refuses_0_minus_1_nan_and_inf_outside_its_range(
    prog, path, flag, allowed, capsys
):
    for text in BAD:
        value = int(text) if allowed.integer and text in ("0", "-1") else float(text)
        ok = allowed.contains(value) and not (allowed.integer and text in ("nan", "inf"))
        if ok:  # accepted by the flag (the command may still miss its required flags)
            with pytest.raises(SystemExit) if _has_required(prog, path) else _nothing():
                _parser(prog).parse_args([*path, flag, text])
            assert f"argument {flag}" not in capsys.readouterr().err
            continue
        with pytest.raises(SystemExit) as exit_info:  # through the entry point, as a user
            _main(prog, [*path, flag, text])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"{prog} {' '.join(path)}: error: argument {flag}"), last
        assert allowed.describe() in last and repr(text) in last, last


def _has_required(prog: str, path: tuple[str, ...]) -> bool:
    parser = dict(_subparsers(_parser(prog)))[path]
    return any(a.required for a in parser._actions)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_issues_examples_through_the_real_cli(tmp_path):
    for args, needle in (
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        (["--num-images", "0"], "argument --num-images: must be an integer in [1, 64], got '0'"),
        (["--guidance", "nan"], "argument --guidance: must be a finite number >= 0, got 'nan'"),
    ):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pva.cli",
                "inpaint",
                "--adapter",
                "a.safetensors",
                "--image",
                "x.jpg",
                "--refs",
                ".",
                "--mask-region",
                "eyebrow",
                "--out",
                str(tmp_path / "o.png"),
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines()[-1] == f"pva inpaint: error: {needle}"
        assert not (tmp_path / "o.png").exists()


def _numeric_params(fn) -> list[str]:
    """Parameters of ``fn`` (or fields of a dataclass) annotated int or float (or optional)."""
    if dataclasses.is_dataclass(fn):
        hints = typing.get_type_hints(fn)
    else:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    names = []
    for name, hint in hints.items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = set(typing.get_args(hint)) if union else {hint}
        if typing.get_origin(hint) in (collections.abc.Sequence, list, tuple):
            args = set(typing.get_args(hint))  # a list of numbers: each is checked
        if name != "return" and args & {int, float}:
            names.append(name)
    return names


OWNERS = {
    "model": (PVAModule, MODULE_RANGES, {"backbone": "b", "face_model": "f"}),
    "model.pva": (PVAConfig, CONFIG_RANGES, {}),
    "data (shards)": (ShardDataModule, DATA_RANGES, {"shards": "s"}),
    "data (photos)": (PersonPhotosDataModule, PHOTOS_RANGES, {}),
    "IdentityValidation": (IdentityValidation, VALIDATION_RANGES, {}),
    "PersonalizationCheck": (PersonalizationCheck, PERSONALIZATION_RANGES, {}),
    "SimulatedCrash": (SimulatedCrash, {"at_step": POSITIVE_INT}, {"at_step": 1}),
}


@pytest.mark.parametrize("owner", list(OWNERS))
def test_every_numeric_config_value_is_checked_on_construction(owner):
    cls, ranges, required = OWNERS[owner]
    names = _numeric_params(cls)
    assert names and set(names) == set(ranges), owner  # a new number needs a range
    for name in names:
        for text in BAD:
            value = float(text)
            value = int(value) if math.isfinite(value) and ranges[name].integer else value
            if ranges[name].contains(value):
                cls(**{**required, name: value})  # accepted
                continue
            with pytest.raises(RangeError, match=rf"{name} must be .*, got {value!r}$"):
                cls(**{**required, name: value})


def test_the_functions_behind_the_commands_check_every_number():
    settings = (Selection, Sampling, FineTuning, Scoring)
    evaluate_numbers = {n for cls in settings for n in _numeric_params(cls)}
    assert evaluate_numbers == set(EVALUATE_RANGES)
    assert not _numeric_params(evaluate)  # its numbers are all in the settings
    for fn, ranges in (
        (build_shards, BUILD_RANGES),
        (PVAInpaintPipeline.__call__, CALL_RANGES),
    ):
        assert set(_numeric_params(fn)) == set(ranges), fn.__name__
    with pytest.raises(RangeError, match="--ft-steps must be an integer >= 1, got 0"):
        FineTuning(ft_steps=0)
    with pytest.raises(RangeError, match="--shard-index must be an integer >= 0"):
        Selection(shard_index=-1)
    with pytest.raises(ValueError, match="--shard-index must be below --num-shards"):
        Selection(shard_index=2, num_shards=2)
    with pytest.raises(RangeError, match="--cd-eval-steps must be an integer >= 1, got 0"):
        FineTuning(cd_eval_steps=(40, 0))


def test_train_py_refuses_bad_config_values_in_one_line(tiny_assets, tmp_path):
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    cfg["model"].update(backbone=str(tiny_assets.backbone), face_model=str(tiny_assets.face_model))
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cases = {
        "--model.lr_pva=.nan": "train.py: error: model.lr_pva must be a finite number > 0, got nan",
        "--data.init_args.batch_size=0": "train.py: error: data.batch_size must be an integer >= "
        "1, got 0",
    }
    for flag, line in cases.items():
        res = subprocess.run(
            [sys.executable, "train.py", "fit", "--config", str(path), flag],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1] == line
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()
