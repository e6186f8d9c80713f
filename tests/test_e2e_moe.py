"""End to end: a mixture-of-experts model (the tiny Mixtral-style one) as a user meets it.

Issue 17, steps 1 and 6: the experts read from its header are what `mesh-llm models show` reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import run_cli

MOE_SPEC = TinyModelSpec(n_experts=4, n_experts_used=2, seed=17, name="tiny-moe")


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("moe") / "tiny-moe.gguf", MOE_SPEC)


def test_models_show_prints_the_experts_of_an_moe_file_only(moe_model: Path, tiny_model: Path) -> None:
    shown = run_cli("models", "show", str(moe_model))
    assert shown.returncode == 0, shown.stderr
    assert "experts   : 4 (2 used per token)" in shown.stdout
    dense = run_cli("models", "show", str(tiny_model))
    assert dense.returncode == 0 and "experts" not in dense.stdout
