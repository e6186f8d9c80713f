"""Every bad input gets one actionable line on stderr, a non-zero exit and no traceback."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import pytest

from mesh_llm.engine import build as build_mod
from mesh_llm.engine.source import PinnedSource, sha256_of
from mesh_llm.errors import UserError
from tests.conftest import assert_one_line_error, free_port, run_cli


def test_no_arguments_prints_help_and_exits_0() -> None:
    r = run_cli()
    assert r.returncode == 0 and "usage: mesh-llm" in r.stdout and "--model" in r.stdout


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("mesh-llm ")


def test_missing_model_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--model", str(tmp_path / "missing.gguf"), "--port", str(free_port())), "model file not found")


def test_unknown_model_name_lists_known_names() -> None:
    assert_one_line_error(run_cli("--model", "no-such-model", "--port", str(free_port())), "unknown model 'no-such-model'", "gemma-3-270m")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "notes.gguf"
    f.write_text("hello\n" * 100)
    assert_one_line_error(run_cli("--model", str(f), "--port", str(free_port())), "not a GGUF file")


def test_truncated_gguf(tmp_path: Path, tiny_model: Path) -> None:
    f = tmp_path / "half.gguf"
    f.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    assert_one_line_error(run_cli("--model", str(f), "--port", str(free_port())), "truncated")


def test_port_in_use(tiny_model: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(run_cli("--model", str(tiny_model), "--port", str(port)), f"port {port}", "already in use", "--port")


def test_console_port_in_use(tiny_model: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_cli("--model", str(tiny_model), "--port", str(free_port()), "--console", str(port))
        assert_one_line_error(result, f"console port {port}", "already in use", "--console N")


@pytest.mark.parametrize(("value", "fragment", "code"), [("0", "--console 0 is not a port", 1), ("70000", "--console 70000 is not a port", 1), ("x", "argument --console: invalid int value: 'x'", 2)])
def test_bad_console_port(tiny_model: Path, value: str, fragment: str, code: int) -> None:
    assert_one_line_error(run_cli("--model", str(tiny_model), "--console", value), fragment, code=code)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--port", "x"), ("argument --port: invalid int value: 'x'", "(see: mesh-llm --help)")),
        (("--no-such-flag",), ("unrecognized arguments: --no-such-flag",)),
        (("models", "frobnicate"), ("argument action: invalid choice: 'frobnicate'", "(see: mesh-llm models --help)")),
        (("engine", "--llama-flavor", "tpu"), ("argument --llama-flavor: invalid choice: 'tpu'",)),
    ],
)
def test_usage_errors_are_one_line_too(args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    assert_one_line_error(run_cli(*args), *fragments, code=2)


def test_console_on_the_api_port(tiny_model: Path) -> None:
    port = str(free_port())
    assert_one_line_error(run_cli("--model", str(tiny_model), "--port", port, "--console", port), "API port too")


def test_client_with_model(tiny_model: Path) -> None:
    assert_one_line_error(run_cli("--client", "--model", str(tiny_model)), "--client runs without a model")


def test_client_without_join() -> None:
    assert_one_line_error(run_cli("--client"), "--join TOKEN")


def test_bad_bin_dir(tmp_path: Path, tiny_model: Path) -> None:
    assert_one_line_error(run_cli("--model", str(tiny_model), "--bin-dir", str(tmp_path), "--port", str(free_port())), "--bin-dir", "lacks llama-server")


def test_engine_that_fails_to_start(tmp_path: Path, tiny_model: Path) -> None:
    bins = tmp_path / "bin"
    bins.mkdir()
    for name in ("llama-server", "ggml-rpc-server"):
        (bins / name).write_text("#!/bin/sh\necho 'error: this engine is broken' >&2\nexit 1\n")
        (bins / name).chmod(0o755)
    r = run_cli("--model", str(tiny_model), "--bin-dir", str(bins), "--port", str(free_port()), "--state-dir", str(tmp_path / "state"))
    assert_one_line_error(r, "tiny-llama: llama-server failed to start", "exited with code 1", "this engine is broken", "llama-server-tiny-llama.log")


def test_build_without_cmake(tmp_path: Path, tiny_model: Path) -> None:
    env = {"PATH": str(tmp_path), "MESH_LLM_CACHE_DIR": str(tmp_path / "cache")}
    r = run_cli("--model", str(tiny_model), "--port", str(free_port()), env=env)
    assert_one_line_error(r, "cmake is not installed")


def test_build_failure_names_the_log(tmp_path: Path, monkeypatch) -> None:
    """A real cmake run on a tree that fails to configure."""
    sdist = tmp_path / "broken-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        data = b'cmake_minimum_required(VERSION 3.14)\nproject(x)\nmessage(FATAL_ERROR "this tree is broken")\n'
        info = tarfile.TarInfo("broken-1.0/llama.cpp/CMakeLists.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    pin = PinnedSource("broken", "1.0", "http://127.0.0.1:9/x", sha256_of(sdist), "broken-1.0/llama.cpp/")
    monkeypatch.setattr(build_mod, "LLAMA_CPP", pin)
    monkeypatch.setenv("MESH_LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MESH_LLM_ENGINE_SDIST", str(sdist))
    with pytest.raises(UserError) as info:
        build_mod.build_engine("cpu")
    message = str(info.value)
    assert "engine configure failed" in message and "build.log" in message and "\n" not in message
    log = (tmp_path / "cache" / "engine" / "llama.cpp-b1-cpu" / "build.log").read_text()
    assert "this tree is broken" in log
    assert not build_mod.engine_dir("cpu").is_built()


def _some_token() -> str:
    from mesh_llm.mesh.identity import MeshCredentials
    from mesh_llm.mesh.token import InviteToken

    return InviteToken(MeshCredentials.generate(), b"\1" * 32, ("127.0.0.1:9",)).encode()


def test_quic_port_in_use(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        taken = udp.getsockname()[1]
        r = run_cli("--client", "--join", _some_token(), "--no-relay", "--bind-host", "127.0.0.1", "--bind-port", str(taken), "--port", str(free_port()), "--state-dir", str(tmp_path))
    assert_one_line_error(r, "QUIC socket", "already in use", "--bind-port")


def test_unreachable_token_says_so(tmp_path: Path) -> None:
    r = run_cli("--client", "--join", _some_token(), "--no-relay", "--bind-host", "127.0.0.1", "--port", str(free_port()), "--state-dir", str(tmp_path))
    assert_one_line_error(r, "cannot join the mesh", "could not reach", "127.0.0.1:9")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--relay", "https://r.example/", "--no-relay"), "contradict"),
        (("--bind-port", "70000"), "not a port"),
        (("--join", "not-a-token!"), "garbled"),
    ],
)
def test_bad_mesh_flags(args: tuple[str, ...], fragment: str, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--client", "--join", _some_token(), *args, "--port", str(free_port()), "--state-dir", str(tmp_path)), fragment)


@pytest.mark.parametrize("text", ["inf,1", "nan,1", "1e13,1", "-1,2", "0,0", "a,b"])
def test_bad_tensor_split_is_refused_before_it_reaches_gossip(text: str) -> None:
    from mesh_llm.cli import parse_tensor_split

    with pytest.raises(UserError, match="--tensor-split"):
        parse_tensor_split(text)


def test_remote_runtime_needs_listen_all(tiny_model: Path) -> None:
    assert_one_line_error(run_cli("--model", str(tiny_model), "--allow-remote-runtime", "--port", str(free_port())), "--allow-remote-runtime needs --listen-all")


def test_a_model_file_named_with_control_characters_is_refused_in_one_line(tmp_path: Path, tiny_model: Path) -> None:
    odd = tmp_path / "tiny\x1b[2Jmodel.gguf"  # peers would refuse the name, and a terminal would act on it
    odd.write_bytes(tiny_model.read_bytes())
    r = run_cli("--model", str(odd), "--port", str(free_port()), "--state-dir", str(tmp_path / "s"))
    assert_one_line_error(r, "not plain printable text", "rename the file")
    assert "\x1b" not in r.stderr


@pytest.mark.parametrize(("args", "fragments"), [
    (("--idle-unload", "0"), ("--idle-unload 0", "positive number of seconds")),
    (("--idle-unload", "nan"), ("--idle-unload nan", "positive")),
    (("--client", "--join", "x", "--on-demand", "m.gguf"), ("--client", "--on-demand")),
])
def test_bad_demand_flags(args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    assert_one_line_error(run_cli(*args, "--port", str(free_port())), *fragments)


def test_on_demand_files_must_be_on_disk_and_named_once(tmp_path: Path, tiny_model: Path) -> None:
    port = str(free_port())
    assert_one_line_error(run_cli("--on-demand", str(tmp_path / "missing.gguf"), "--port", port), "model file not found")
    assert_one_line_error(run_cli("--on-demand", "qwen3-8b", "--port", port), "not downloaded yet")  # never fetched at start
    assert_one_line_error(run_cli("--model", str(tiny_model), "--on-demand", str(tiny_model), "--port", port), "--on-demand", "pass each model once")
