"""Speculative decoding: draft choice, vocabulary checks, engine flags, and real runs (solo and split)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from mesh_llm.engine.llama_server import ServerConfig, server_argv
from mesh_llm.errors import UserError
from mesh_llm.models.catalog import by_name
from mesh_llm.models.draft import choose_draft
from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.resolve import ResolvedModel
from mesh_llm.models.tiny import COMMON_PAIRS, TinyModelSpec, tiny_vocab, write_tiny_model
from mesh_llm.models.vocab import vocab_mismatch
from tests.conftest import LOCAL, assert_one_line_error, run_cli
from tests.hub_standin import HubStandIn

EXTRA_PAIRS = tuple(f"{a} {b}" for a in "bcdfghjklmnpqrstvwxyz" for b in "aeiouyr")  # about 146 more merged tokens


@pytest.fixture(scope="module")
def drafts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafts")
    return {
        "same": write_tiny_model(root / "same-vocab.gguf", TinyModelSpec(n_layers=1, seed=9, name="draft")),
        "texts": write_tiny_model(root / "other-texts.gguf", TinyModelSpec(n_layers=1, merges=tuple(reversed(COMMON_PAIRS)))),
        "bigger": write_tiny_model(root / "more-tokens.gguf", TinyModelSpec(n_layers=1, merges=tuple(COMMON_PAIRS) + EXTRA_PAIRS)),
        "adds-bos": write_tiny_model(root / "adds-bos.gguf", TinyModelSpec(n_layers=1, add_bos=True)),
        "other-bos": write_tiny_model(root / "other-bos.gguf", TinyModelSpec(n_layers=1, add_bos=True, bos_token="<|im_start|>")),
        "adds-eos": write_tiny_model(root / "adds-eos.gguf", TinyModelSpec(n_layers=1, add_eos=True)),
        "other-eos": write_tiny_model(root / "other-eos.gguf", TinyModelSpec(n_layers=1, add_eos=True, eos_token="<|endoftext|>")),
        "other-eos-unused": write_tiny_model(root / "other-eos-unused.gguf", TinyModelSpec(n_layers=1, eos_token="<|endoftext|>")),
    }


def test_vocabulary_rules(tiny_model: Path, drafts: dict[str, Path]) -> None:
    target = inspect_model(tiny_model)
    assert vocab_mismatch(target, inspect_model(drafts["same"])) is None
    assert vocab_mismatch(target, target) is None
    assert vocab_mismatch(target, inspect_model(drafts["texts"])) == "token texts differ"
    assert "vocabulary sizes differ by more than 128" in str(vocab_mismatch(target, inspect_model(drafts["bigger"])))
    # BOS/EOS: whether each is added must agree, and when it is added, which token
    bos, im_start, eos = (tiny_vocab()[0].index(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert vocab_mismatch(target, inspect_model(drafts["adds-bos"])) == f"BOS tokens differ (draft adds token {bos}, target adds none)"
    assert vocab_mismatch(inspect_model(drafts["adds-bos"]), inspect_model(drafts["other-bos"])) == f"BOS tokens differ (draft adds token {im_start}, target adds token {bos})"
    assert vocab_mismatch(target, inspect_model(drafts["adds-eos"])) == f"EOS tokens differ (draft adds token {eos}, target adds none)"
    assert vocab_mismatch(inspect_model(drafts["adds-eos"]), inspect_model(drafts["other-eos"])) == f"EOS tokens differ (draft adds token {bos}, target adds token {eos})"
    assert vocab_mismatch(target, inspect_model(drafts["other-eos-unused"])) is None  # an EOS nobody adds is not compared


@pytest.mark.gemma
def test_gemma_cannot_draft_for_a_gpt2_vocabulary(tiny_model: Path) -> None:
    from mesh_llm.models.resolve import resolve_model

    gemma = inspect_model(resolve_model("gemma-3-270m").path)
    assert vocab_mismatch(inspect_model(tiny_model), gemma) == "tokenizer types differ (llama vs gpt2)"
    assert vocab_mismatch(gemma, gemma) is None  # 262k tokens compared


def test_server_argv_runs_the_draft_on_the_host_only(tmp_path: Path) -> None:
    base = dict(model=tmp_path / "m.gguf", alias="m", port=1, draft=tmp_path / "d.gguf", draft_max=6)
    cpu = server_argv(Path("llama-server"), ServerConfig(**base, draft_device="none", rpc=("127.0.0.1:5",)))  # type: ignore[arg-type]
    i = cpu.index("--spec-type")
    assert cpu[i:i + 8] == ["--spec-type", "draft-simple", "--spec-draft-model", str(tmp_path / "d.gguf"), "--spec-draft-n-max", "6", "--spec-draft-device", "none"]
    assert "--spec-draft-ngl" not in cpu and "--draft-max" not in cpu
    gpu = server_argv(Path("llama-server"), ServerConfig(**base, draft_device="CUDA0"))  # type: ignore[arg-type]
    assert gpu[gpu.index("--spec-draft-device") + 1] == "CUDA0" and gpu[gpu.index("--spec-draft-ngl") + 1] == "all"
    plain = server_argv(Path("llama-server"), ServerConfig(model=tmp_path / "m.gguf", alias="m", port=1))
    assert not [a for a in plain if a.startswith("--spec")]


def test_choose_draft(tiny_model: Path, drafts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh_llm.models.draft as draft_module

    said: list[str] = []
    info = inspect_model(tiny_model)
    as_catalog = ResolvedModel(tiny_model, by_name("Qwen2.5-3B-Instruct-Q4_K_M"))
    monkeypatch.setattr(draft_module, "locate", lambda ref: drafts["same"])
    chosen = choose_draft(None, as_catalog, info, said.append)
    assert chosen is not None and chosen.path == drafts["same"]  # the pairing, found on disk
    monkeypatch.setattr(draft_module, "locate", lambda ref: drafts["texts"])
    assert choose_draft(None, as_catalog, info, said.append) is None
    assert said[-1] == "Not using Qwen2.5-0.5B-Instruct-Q4_K_M as a draft for tiny-llama: token texts differ"
    monkeypatch.setattr(draft_module, "locate", lambda ref: None)
    assert choose_draft(None, as_catalog, info, said.append) is None
    assert said[-1].startswith("Tip: Qwen2.5-0.5B-Instruct-Q4_K_M (0.49 GB) speeds up tiny-llama as a draft: mesh-llm download")
    assert choose_draft(None, ResolvedModel(tiny_model, None), info, said.append) is None  # not in the catalog: no pairing
    explicit = choose_draft(str(drafts["same"]), ResolvedModel(tiny_model, None), info, said.append)
    assert explicit is not None and explicit.model_id == "same-vocab"
    with pytest.raises(UserError, match=r"--draft .*other-texts.gguf cannot draft for tiny-llama: token texts differ; pick a model"):
        choose_draft(str(drafts["texts"]), ResolvedModel(tiny_model, None), info, said.append)


def test_cli_refuses_bad_draft_options(tiny_model: Path, drafts: dict[str, Path]) -> None:
    model = ("--model", str(tiny_model), "--port", "0")
    assert_one_line_error(run_cli(*model, "--draft", str(drafts["texts"])), "cannot draft for tiny-llama: token texts differ", "--no-draft")
    assert_one_line_error(run_cli(*model, "--draft", str(drafts["adds-bos"])), "adds-bos.gguf cannot draft for tiny-llama: BOS tokens differ")
    assert_one_line_error(run_cli(*model, "--draft", str(drafts["adds-eos"])), "adds-eos.gguf cannot draft for tiny-llama: EOS tokens differ")
    assert_one_line_error(run_cli(*model, "--draft", str(drafts["same"]), "--no-draft"), "contradict")
    assert_one_line_error(run_cli(*model, "--draft-max", "0"), "--draft-max 0 must be from 1 to 64")
    assert_one_line_error(run_cli(*model, "--draft", "/nope/d.gguf"), "model file not found: /nope/d.gguf")


def chat(port: int, max_tokens: int = 48) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.engine
def test_catalog_draft_is_found_on_disk_and_used(start_node, tiny_model: Path, drafts: dict[str, Path], tmp_path: Path) -> None:
    """`download 3b --draft` from the hub stand-in, then `--model 3b` offline: the pairing runs."""
    hub = HubStandIn()
    hub.add("Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-q4_k_m.gguf", tiny_model)
    hub.add("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf", drafts["same"])
    hub.start()
    try:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        assert run_cli("download", "3b", "--draft", env=env).returncode == 0
    finally:
        hub.stop()
    node = start_node("--model", "3b", "--ctx-size", "512", *LOCAL, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    node.wait_ready()
    banner = node.wait_output("ready")
    assert "draft qwen2.5-0.5b-instruct-q4_k_m (up to 8 tokens)" in banner, banner
    timings = chat(node.port)["timings"]
    assert timings["draft_n"] > 0, timings  # llama-server really drafted
    (model,) = node.status()["models"]
    assert model["name"] == "qwen2.5-3b-instruct-q4_k_m" and model["draft"] == "qwen2.5-0.5b-instruct-q4_k_m"
    argv = node.llama_server().cmdline()
    assert argv[argv.index("--spec-draft-model") + 1].endswith("qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert "--spec-draft-device" not in argv  # solo: the draft follows the model's own device
    node.stop()

    # --no-draft wins over the pairing on disk: no draft runs, none is advertised.
    plain = start_node("--model", "3b", "--no-draft", "--ctx-size", "512", *LOCAL, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    plain.wait_ready()
    assert "draft" not in plain.wait_output("ready")
    assert not [a for a in plain.llama_server().cmdline() if a.startswith("--spec")]
    assert plain.status()["models"][0]["draft"] is None
    assert chat(plain.port)["timings"].get("draft_n", 0) == 0


@pytest.mark.engine
def test_split_host_runs_the_draft_itself(start_node, split_model: Path, tmp_path: Path) -> None:
    """In a two-node split the draft stays on the host: workers still receive exactly their layers."""
    from tests.test_e2e_split import CTX, assert_placement_as_predicted, serving

    draft = write_tiny_model(tmp_path / "split-draft.gguf", TinyModelSpec(n_layers=1, n_embd=64, seed=9, name="split-draft"))
    a = start_node("--model", str(split_model), *CTX, "--split", "--draft", str(draft), "--draft-max", "4", *LOCAL)
    a.wait_output("Waiting for more peers")
    b = start_node("--model", str(split_model), *CTX, "--split", "--max-vram", "1", "--join", a.token(), *LOCAL)
    a.wait_output("Now serving")
    timings = chat(a.port)["timings"]
    assert timings["draft_n"] > 0, timings
    assert_placement_as_predicted(serving(a), 8)
    argv = a.llama_server().cmdline()
    assert argv[argv.index("--spec-draft-n-max") + 1] == "4" and argv[argv.index("--spec-draft-device") + 1] == "none"
    assert a.status()["models"][0]["draft"] == "split-draft"
    b.stop()
