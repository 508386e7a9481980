"""Imports point one way: method core <- data format <- Lightning layer <- applications."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

CORE = {
    "pva.attention",
    "pva.identity",
    "pva.token",
    "pva.backbone",
    "pva.model",
    "pva.objective",
    "pva.sampling",
    "pva.adapter",
    "pva.personalize",
    "pva.prompts",
    "pva.faces",
    "pva.checks",
    "pva.composite",
    "pva.face_encoders",
    "pva.plots",
    "pva.fileio",
    "pva.recognizers",
    "pva.metrics",
    "pva.tiny",
}
"""The method and what it stands on: no Lightning, no data streams, no commands."""
LIGHTNING = {"pva.module"}
"""Besides ``datamodules`` and ``callbacks``."""
APPLICATIONS = {
    "pva",
    "pva.cli",
    "pva.apps",
    "pva.pipeline",
    "pva.stock",
    "pva.app",
    "pva.evaluate",
    "pva.methods",
    "pva.quickstart",
    "pva.training",
    "pva.rehearse",
    "train",
}
"""Besides ``pva.demo`` and ``benchmarks``; ``pva`` itself re-exports, lazily."""
INSTALLED = ("pva", "datamodules", "callbacks")
"""The installed packages (setup.cfg); ``benchmarks`` and ``train.py`` live only in a clone."""
NAMES = ("core", "data format", "Lightning layer", "application")


def layer(module: str) -> int:
    """0 core, 1 data format, 2 Lightning, 3 applications."""
    if module in CORE:
        return 0
    if module.startswith("pva.data"):
        return 1
    if module in LIGHTNING or module.split(".")[0] in ("datamodules", "callbacks"):
        return 2
    if module in APPLICATIONS or module.startswith(("pva.demo", "benchmarks")):
        return 3
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py")


def modules() -> dict[str, Path]:
    found = {"train": REPO / "train.py"}
    for package in (*INSTALLED, "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any depth (functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "pva":  # "from pva import x" may name a submodule
                names = [f"pva.{a.name}" for a in node.names]
            out.update(names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    known = modules()
    return {
        m
        for m in out
        if m.split(".")[0] in (*INSTALLED, "benchmarks")
        and (m in known or m.rsplit(".", 1)[0] in known)
    }


def test_every_import_points_down_or_sideways():
    known = modules()
    wrong = []
    for name, path in sorted(known.items()):
        for target in sorted(project_imports(path)):
            target = target if target in known else target.rsplit(".", 1)[0]
            if layer(target) > layer(name):
                wrong.append(
                    f"{name} ({NAMES[layer(name)]}) imports {target} ({NAMES[layer(target)]})"
                )
    assert not wrong, "\n".join(wrong)


def test_the_installed_packages_import_nothing_that_is_not_installed():
    known = modules()
    wrong = [
        f"{name} imports {target}"
        for name, path in sorted(known.items())
        if name.split(".")[0] in INSTALLED
        for target in sorted(project_imports(path))
        if target.split(".")[0] not in INSTALLED
    ]
    assert not wrong, "\n".join(wrong)
    setup = (REPO / "setup.cfg").read_text()
    packages = setup.split("[options.packages.find]")[1].split("[")[0]
    assert "benchmarks" not in packages and all(p in packages for p in INSTALLED)


def test_the_test_catches_a_wrong_arrow(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from datamodules.shards import ShardDataModule\n")
    assert "datamodules.shards" in project_imports(bad)
    assert layer("datamodules.shards") > layer("pva.model")


def test_importing_the_core_loads_no_higher_layer():
    code = (
        "import sys, pva.model, pva.sampling, pva.personalize, pva.data.reader; "
        "print(sorted(m for m in sys.modules if m.startswith(('datamodules', 'callbacks', "
        "'lightning', 'pva.pipeline', 'pva.module', 'pva.evaluate'))))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
