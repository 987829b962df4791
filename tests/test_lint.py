"""The habits that keep the code easy to change: lint, format and type checks, run with the suite (and
by pre-commit, see .pre-commit-config.yaml), so CI fails on them like on any other test."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harness import REPO

CHECKS = {
    "ruff check": [sys.executable, "-m", "ruff", "check", "."],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "."],
    "mypy": [sys.executable, "-m", "mypy", "exporter"],
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_clean(name: str) -> None:
    done = subprocess.run(CHECKS[name], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name} is not clean:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
