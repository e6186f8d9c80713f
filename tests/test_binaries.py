import os
from pathlib import Path

import pytest

from mesh_llm.engine.binaries import find_engine
from mesh_llm.errors import UserError


def fake_engine(d: Path, rpc_name: str = "ggml-rpc-server") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("llama-server", rpc_name):
        f = d / name
        f.write_text("#!/bin/sh\nexit 0\n")
        f.chmod(0o755)
    return d


def test_search_order(tmp_path: Path, monkeypatch) -> None:
    flag, env, path, cache = (fake_engine(tmp_path / n) for n in ("flag", "env", "path", "cache"))
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}/usr/bin")
    monkeypatch.setenv("MESH_LLM_BIN_DIR", str(env))
    assert find_engine(flag, cache).origin == "--bin-dir"
    assert find_engine(None, cache).llama_server.parent == env
    monkeypatch.delenv("MESH_LLM_BIN_DIR")
    assert find_engine(None, cache).origin == "PATH"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_engine(None, cache).origin == "cache"
    assert find_engine(None, None) is None


def test_older_worker_name(tmp_path: Path) -> None:
    found = find_engine(fake_engine(tmp_path / "old", "rpc-server"), None)
    assert found.rpc_server.name == "rpc-server"


def test_llama_server_without_worker_on_path_is_skipped(tmp_path: Path, monkeypatch) -> None:
    half = tmp_path / "half"
    half.mkdir()
    (half / "llama-server").write_text("#!/bin/sh\n")
    (half / "llama-server").chmod(0o755)
    monkeypatch.setenv("PATH", str(half))
    monkeypatch.delenv("MESH_LLM_BIN_DIR", raising=False)
    assert find_engine(None, None) is None


def test_bad_bin_dir_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="--bin-dir .* lacks llama-server"):
        find_engine(tmp_path, None)
    monkeypatch.setenv("MESH_LLM_BIN_DIR", str(tmp_path))
    with pytest.raises(UserError, match="MESH_LLM_BIN_DIR"):
        find_engine(None, None)
