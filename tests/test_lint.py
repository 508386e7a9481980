"""The code base stays ruff-clean (the project's lint rules in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_check_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0, res.stdout[-3000:]


def test_ruff_format_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(REPO)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-3000:]
