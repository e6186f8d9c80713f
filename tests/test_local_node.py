"""local_api: the node on this machine is reused; else a client node joins a mesh for the call and is stopped after."""

from __future__ import annotations

import json
import os
import stat
import urllib.request
from pathlib import Path

import psutil
import pytest

from mesh_llm.agents.local_node import local_api, probe
from mesh_llm.errors import UserError
from mesh_llm.mesh.identity import LAST_JOIN_FILE, load_last_join, save_last_join
from tests.conftest import LOCAL, free_port, wait_for


def _models(base: str) -> list[str]:
    with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


def _mesh_llm_on(port: int) -> list[psutil.Process]:
    """Live processes running `mesh_llm ... --port PORT` (any we left behind)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            argv = p.info["cmdline"] or []
            if p.info["status"] != psutil.STATUS_ZOMBIE and "mesh_llm" in argv and "--port" in argv and argv[argv.index("--port") + 1] == str(port):
                found.append(p)
        except (psutil.Error, IndexError):
            pass
    return found


@pytest.mark.engine
def test_a_running_node_is_reused_and_nothing_is_started(start_node, tiny_model: Path, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    said: list[str] = []
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    with local_api(a.port, say=said.append, need_model=True, state_dir=tmp_path / "none") as base:
        assert base == f"http://127.0.0.1:{a.port}"
        assert _models(base) == ["tiny-llama"]
        assert {c.pid for c in psutil.Process().children(recursive=True)} == before
    assert a.proc.poll() is None  # the user's node keeps running
    assert any("Using the mesh-llm node" in line for line in said)


@pytest.mark.engine
def test_a_client_joins_with_the_token_waits_for_a_model_and_is_stopped(start_node, tiny_model: Path, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    member = start_node("--model", str(tiny_model), *LOCAL)
    token = member.token()  # printed before the model is ready: the client waits for it
    port = free_port()
    user_state = tmp_path / "user-state"
    with local_api(port, [token], say=lambda line: None, need_model=True, timeout=120, state_dir=user_state) as base:
        assert base == f"http://127.0.0.1:{port}"
        assert _models(base) == ["tiny-llama"]
        (client,) = _mesh_llm_on(port)
        assert "--client" in client.cmdline() and token not in " ".join(client.cmdline())  # the token stays out of ps
        roles = {n["role"] for n in member.status()["nodes"] if not n["self"]}
        assert roles == {"client"}
    assert not _mesh_llm_on(port)
    assert probe(f"http://127.0.0.1:{port}") == "none"
    assert not user_state.exists()  # the client had a state dir of its own
    wait_for(lambda: len(member.status()["nodes"]) == 1, 30, "the client leaving the mesh")


@pytest.mark.engine
def test_the_mesh_joined_last_is_remembered_and_rejoined(start_node, tiny_model: Path, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    token = a.token()
    b = start_node("--join", token, *LOCAL)  # a client (no model) that joined with a member token
    b.wait_ready()
    wait_for(lambda: (b.state_dir / LAST_JOIN_FILE).exists(), 30, "last-join written")
    assert load_last_join(b.state_dir) == token
    assert stat.S_IMODE((b.state_dir / LAST_JOIN_FILE).stat().st_mode) == 0o600
    b.stop()
    port = free_port()
    with local_api(port, say=lambda line: None, need_model=True, state_dir=b.state_dir) as base:
        assert _models(base) == ["tiny-llama"]
    assert not _mesh_llm_on(port)
    assert load_last_join(b.state_dir) == token  # the client's own state dir took its writes


def test_no_node_and_no_token_is_one_line_naming_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err, local_api(free_port(), say=lambda line: None, state_dir=tmp_path):
        pass
    message = str(err.value)
    assert "\n" not in message and "--join TOKEN" in message and "mesh-llm --model" in message


def test_a_garbled_token_is_one_line_before_any_client_starts(tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(UserError) as err, local_api(free_port(), ["not-a-token"], say=said.append, timeout=60):
        pass
    message = str(err.value)
    assert "\n" not in message and message.startswith("--join: invite token is garbled") and said == []


def test_last_join_is_private_and_rewritten_only_when_it_changes(tmp_path: Path) -> None:
    save_last_join(tmp_path, "TOKEN-A")
    path = tmp_path / LAST_JOIN_FILE
    assert path.read_text() == "TOKEN-A\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    save_last_join(tmp_path, "TOKEN-A")
    assert path.stat().st_ino == inode
    save_last_join(tmp_path, "TOKEN-B")
    assert load_last_join(tmp_path) == "TOKEN-B"
    os.chmod(path, 0o644)
    assert load_last_join(tmp_path) == "TOKEN-B" and stat.S_IMODE(path.stat().st_mode) == 0o600
