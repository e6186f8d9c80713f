"""Real node processes forming a mesh on loopback (relays off, loopback addresses in tokens)."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.token import InviteToken, decode_token
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import run_cli

pytestmark = pytest.mark.engine

LOCAL = ("--no-relay", "--bind-host", "127.0.0.1")


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (OSError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


def chat(port: int, model: str) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models2") / "tiny-other.gguf", TinyModelSpec(seed=7))


def test_three_nodes_and_a_client_form_one_mesh_from_single_tokens(start_node, tiny_model, second_model, engine):
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    b = start_node("--model", str(second_model), "--join", a.token(), *LOCAL)
    b.wait_ready()
    c = start_node("--join", b.token(), *LOCAL)  # standby: no model, learns A from B by gossip
    c.wait_output("ready")
    client = start_node("--client", "--join", c.token(), *LOCAL)
    client.wait_ready()
    nodes = [a, b, c, client]
    ids = {n: n.node_id() for n in nodes}
    servers = [a, b, c]
    for n in nodes:
        others = {ids[m] for m in (servers if n is client else nodes) if m is not n}
        wait_for(lambda n=n, others=others: others <= n.peer_ids(), what=f"{n.state_dir.name} sees every member")
    assert "Invite token: " not in client.output()  # clients don't hand out tokens

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
    out = a.output()
    assert "token of another mesh" in out and "wrong mesh secret" in out
    # The node is still up and serving after refusing them.
    assert chat(a.port, "tiny-llama")["choices"]
