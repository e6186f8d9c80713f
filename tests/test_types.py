"""The type hints in src/ hold: mypy, configured in pyproject.toml, reports nothing."""

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
