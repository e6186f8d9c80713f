"""End to end: a mixture-of-experts model (the tiny Mixtral-style one) served by a real node.

Issue 17, steps 1 and 6: llama-server loads and generates from the tiny MoE GGUF, and the
experts read from its header are what `/api/status` and `mesh-llm models show` report.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import run_cli

MOE_SPEC = TinyModelSpec(n_experts=4, n_experts_used=2, seed=17, name="tiny-moe")


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("moe") / "tiny-moe.gguf", MOE_SPEC)


@pytest.mark.engine
def test_a_node_serves_the_tiny_moe_model_and_reports_its_experts(engine, moe_model: Path, start_node) -> None:
    node = start_node("--model", str(moe_model), "--ctx-size", "512")
    node.wait_ready()

    body = json.dumps({"model": "tiny-moe", "prompt": "the cat", "max_tokens": 12, "temperature": 0}).encode()
    request = urllib.request.Request(node.base_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        answer = json.loads(r.read())
    assert answer["choices"][0]["text"].strip(), answer
    assert answer["usage"]["completion_tokens"] == 12

    assert "serving tiny-moe solo (llama, 4 layers, MoE: 4 experts, 2 active, context 512)" in node.output()
    (entry,) = node.status()["models"]
    assert (entry["name"], entry["ready"], entry["moe"]) == ("tiny-moe", True, {"experts": 4, "experts_used": 2, "shard": None})


def test_models_show_prints_the_experts_of_an_moe_file_only(moe_model: Path, tiny_model: Path) -> None:
    shown = run_cli("models", "show", str(moe_model))
    assert shown.returncode == 0, shown.stderr
    assert "experts   : 4 (2 used per token)" in shown.stdout
    dense = run_cli("models", "show", str(tiny_model))
    assert dense.returncode == 0 and "experts" not in dense.stdout
