"""Real node processes forming a mesh on loopback (relays off, loopback addresses in tokens)."""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.token import InviteToken, decode_token
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import LOCAL, run_cli, wait_for

pytestmark = pytest.mark.engine

def chat(port: int, model: str) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models2") / "tiny-other.gguf", TinyModelSpec(seed=7))


def test_three_nodes_and_a_client_form_one_mesh_from_single_tokens(start_node, tiny_model, second_model, engine, tmp_path):
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    b = start_node("--model", str(second_model), "--join", a.token(), *LOCAL)
    b.wait_ready()
    c = start_node("--join", b.token(), *LOCAL)  # standby: no model, learns A from B by gossip
    c.wait_output("ready")
    # The lite client runs where no llama.cpp exists: empty cache, nothing on PATH.
    bare = {"MESH_LLM_CACHE_DIR": str(tmp_path / "empty-cache"), "PATH": "/nonexistent", "MESH_LLM_BIN_DIR": ""}
    client = start_node("--client", "--join", c.token(), *LOCAL, env=bare)
    client.wait_ready()
    nodes = [a, b, c, client]
    ids = {n: n.node_id() for n in nodes}
    servers = [a, b, c]
    for n in nodes:
        others = {ids[m] for m in (servers if n is client else nodes) if m is not n}
        wait_for(lambda n=n, others=others: others <= n.peer_ids(), what=f"{n.state_dir.name} sees every member")
    assert "Invite token: " not in client.output()  # clients don't hand out tokens
    assert not (tmp_path / "empty-cache" / "engine").exists()  # and never looked for an engine

    # The client serves nothing itself; both models are answered by the nodes that serve them.
    listed = json.loads(urllib.request.urlopen(f"{client.base_url}/v1/models", timeout=5).read())
    assert sorted(m["id"] for m in listed["data"]) == ["tiny-llama", "tiny-other"]
    for model in ("tiny-llama", "tiny-other"):
        reply = chat(client.port, model)
        assert reply["choices"][0]["message"]["content"], reply
        assert reply["model"].startswith(model)
    # A node that does not serve a model reaches it over the mesh too, streaming included.
    req = urllib.request.Request(f"{a.base_url}/v1/chat/completions", json.dumps({"model": "tiny-other", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    # Nobody serves this one: 404 naming what exists.
    with pytest.raises(urllib.error.HTTPError) as err:
        chat(client.port, "no-such-model")
    assert err.value.code == 404
    assert sorted(json.loads(err.value.read())["error"]["available"]) == ["tiny-llama", "tiny-other"]

    # kill -9 of B: everyone else drops it within the 10 s bound.
    b_id = ids[b]
    b.stop(signal.SIGKILL)
    killed = time.monotonic()
    for n in (a, c, client):
        wait_for(lambda n=n: b_id not in n.peer_ids(), timeout=15, what=f"{n.state_dir.name} drops B")
    assert time.monotonic() - killed <= 10.5
    with pytest.raises(urllib.error.HTTPError) as err:
        chat(client.port, "tiny-other")
    assert err.value.code == 404

    # B restarts from the same state (same key) and token, and is back everywhere.
    b2 = start_node("--model", str(second_model), "--join", a.token(), *LOCAL, port=b.port, state_dir=b.state_dir)
    b2.wait_ready()
    assert b2.node_id() == b_id
    for n in (a, c, client):
        wait_for(lambda n=n: b_id in n.peer_ids(), what=f"{n.state_dir.name} sees B again")
    wait_for(lambda: chat(client.port, "tiny-other")["choices"], what="tiny-other served again")

    # Ctrl-C is a graceful leave: peers drop A at once, not after the silence bound.
    a_id = ids[a]
    a.stop(signal.SIGINT)
    left = time.monotonic()
    wait_for(lambda: a_id not in c.peer_ids(), timeout=5, what="C drops A")
    assert time.monotonic() - left < 5
    assert "left the mesh" in c.output()


def _forge(token: str, creds: MeshCredentials) -> str:
    t = decode_token(token)
    return InviteToken(creds, t.endpoint_id, t.addrs, t.relay_url).encode()


def test_bad_tokens_get_a_clear_error_and_no_membership(start_node, tiny_model, engine, tmp_path):
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    token = a.token()
    real = decode_token(token).mesh
    cases = {
        "garbled": ("x" + token[5:-7], "invite token is garbled"),
        "another mesh": (_forge(token, MeshCredentials.generate()), "belongs to a different mesh"),
        "forged secret": (_forge(token, MeshCredentials(real.mesh_id, b"\x01" * 32)), "mesh secret in your token does not match"),
    }
    for name, (bad, expected) in cases.items():
        r = run_cli("--client", "--join", bad, *LOCAL, "--state-dir", str(tmp_path / name), timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0, name
        assert len(lines) == 1 and expected in lines[0], (name, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
    assert a.peer_ids() == set()
    a.wait_output("token of another mesh", timeout=5)
    a.wait_output("wrong mesh secret", timeout=5)
    # The node is still up and serving after refusing them.
    assert chat(a.port, "tiny-llama")["choices"]


@pytest.fixture
def netns():  # type: ignore[no-untyped-def]
    """A network namespace joined to this one by a veth pair: a second host."""
    import os
    import subprocess

    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"mlt{tag}", f"mlh{tag}", f"mln{tag}"
    host_ip, ns_ip = "10.231.0.1", "10.231.0.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create a network namespace here: {exc}")
    yield ns, host_ip, ns_ip
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def test_a_node_in_another_network_namespace_joins_over_the_veth(start_node, tiny_model, engine, netns):
    ns, host_ip, ns_ip = netns
    a = start_node("--model", str(tiny_model), "--no-relay", "--bind-host", host_ip)
    a.wait_ready()
    token = a.token()
    assert [addr.rsplit(":", 1)[0] for addr in decode_token(token).addrs] == [host_ip]
    far = start_node("--join", token, "--no-relay", "--listen-all", prefix=("ip", "netns", "exec", ns), host=ns_ip)
    far.wait_ready()
    far_id = far.node_id()
    wait_for(lambda: far_id in a.peer_ids(), what="A sees the node in the namespace")
    assert all(addr.startswith(ns_ip + ":") for addr in far.status()["node"]["addrs"])  # it lives on the far side
    body = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"{far.base_url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        reply = json.loads(r.read())
    assert reply["choices"][0]["message"]["content"]
