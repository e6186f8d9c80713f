"""The type hints in src/ hold and the code is clean: mypy and ruff, configured in pyproject.toml, report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_errors() -> None:
    # files, strictness and per-module exceptions all come from [tool.mypy]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"mypy exited {proc.returncode}:\n{proc.stdout}{proc.stderr}", pytrace=False)


def test_ruff_finds_nothing_in_src() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "src"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"ruff exited {proc.returncode}:\n{proc.stdout}{proc.stderr}", pytrace=False)
