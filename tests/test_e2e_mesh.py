"""Real node processes forming a mesh on loopback (relays off, loopback addresses in tokens)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.peers import DEAD_AFTER_SECS, HUNG_AFTER_SECS
from mesh_llm.mesh.token import InviteToken, decode_token
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import LOCAL, assert_one_line_error, free_port, leave_mid_stream, run_cli, wait_for
from tests.mesh_helpers import LoopThread, make_mesh

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
    body = {"model": "tiny-other", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    req = urllib.request.Request(f"{a.base_url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    # Nobody serves this one: 404 naming what exists.
    with pytest.raises(urllib.error.HTTPError) as err:
        chat(client.port, "no-such-model")
    assert err.value.code == 404
    assert sorted(json.loads(err.value.read())["error"]["available"]) == ["tiny-llama", "tiny-other"]

    # kill -9 of B: everyone else notices its silence and drops it (how soon: bench/console.py).
    b_id = ids[b]
    b.stop(signal.SIGKILL)
    for n in (a, c, client):
        wait_for(lambda n=n: b_id not in n.peer_ids(), timeout=60, what=f"{n.state_dir.name} drops B")
        assert re.search(rf"Peer left: \w+ {b_id[:8]} .*: (silent for|connection lost)", n.output()), n.output()
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

    # Ctrl-C is a graceful leave: A says goodbye, so peers drop it for that reason, not for silence.
    a_id = ids[a]
    seen = {n: len(n.output().splitlines()) for n in (c, client)}  # (what came before is another story)
    a.stop(signal.SIGINT)
    for n in (c, client):
        line = n.wait_output(f"Peer left: host {a_id[:8]} ", timeout=60, after=seen[n])
        assert line.endswith(": left the mesh"), line
        wait_for(lambda n=n: a_id not in n.peer_ids(), what=f"{n.state_dir.name} drops A")


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
        assert_one_line_error(run_cli("--client", "--join", bad, *LOCAL, "--state-dir", str(tmp_path / name), timeout=60), expected)
    assert a.peer_ids() == set()
    a.wait_output("token of another mesh", timeout=5)
    a.wait_output("wrong mesh secret", timeout=5)
    # The node is still up and serving after refusing them.
    assert chat(a.port, "tiny-llama")["choices"]


@pytest.fixture
def netns():  # type: ignore[no-untyped-def]
    """A network namespace joined to this one by a veth pair: a second host."""
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


LOCAL_READ = """
import json, sys, urllib.request
api, console = sys.argv[1:]
for url in (f"http://127.0.0.1:{api}/api/status", f"http://localhost:{console}/api/status"):
    print(json.loads(urllib.request.urlopen(url, timeout=10).read())["token"])
with urllib.request.urlopen(f"http://127.0.0.1:{console}/api/events", timeout=10) as events:
    for line in events:
        if line.startswith(b"data:"):
            print(json.loads(line[5:])["token"])
            break
"""


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def first_event(url: str) -> dict:
    """The first status document on a server-sent event stream."""
    with urllib.request.urlopen(url, timeout=10) as events:
        for line in events:
            if line.startswith(b"data:"):
                return json.loads(line[5:])
    raise AssertionError(f"{url} ended without an event")


def test_a_node_in_another_network_namespace_joins_over_the_veth(start_node, tiny_model, engine, netns):
    ns, host_ip, ns_ip = netns
    a = start_node("--model", str(tiny_model), "--no-relay", "--bind-host", host_ip)
    a.wait_ready()
    token = a.token()
    assert [addr.rsplit(":", 1)[0] for addr in decode_token(token).addrs] == [host_ip]
    console = free_port()
    far = start_node("--join", token, "--no-relay", "--listen-all", "--console", str(console), prefix=("ip", "netns", "exec", ns), host=ns_ip)
    far.wait_ready()
    far_id = far.node_id()
    wait_for(lambda: far_id in a.peer_ids(), what="A sees the node in the namespace")
    assert all(addr.startswith(ns_ip + ":") for addr in far.status()["node"]["addrs"])  # it lives on the far side
    # --listen-all: the API answers on the namespace's own address, for the mesh's models too.
    body = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"{far.base_url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        reply = json.loads(r.read())
    assert reply["choices"][0]["message"]["content"]

    # Callers from another machine see the mesh but never its token, on either port, JSON or SSE.
    api, page = f"http://{ns_ip}:{far.port}", f"http://{ns_ip}:{console}"
    for url in (api + "/api/status", page + "/api/status"):
        doc = get_json(url)
        assert doc["token"] is None and doc["node"]["id"] == far_id, url
    assert first_event(page + "/api/events")["token"] is None
    with pytest.raises(urllib.error.HTTPError) as err:  # the API port has no event stream to leak from
        urllib.request.urlopen(api + "/api/events", timeout=10)
    assert err.value.code == 404
    for base in (api, page):  # nor may another machine load or unload models (no --allow-remote-runtime)
        post = urllib.request.Request(base + "/api/runtime/models", json.dumps({"model": "gemma-3-270m"}).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(post, timeout=10)
        assert err.value.code == 403 and "callers on this machine only" in err.value.read().decode()
    far_token = far.token()
    assert far_token not in urllib.request.urlopen(page + "/", timeout=10).read().decode()
    # ... while a caller on the far machine itself gets it, from both.
    local = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", LOCAL_READ, str(far.port), str(console)],
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 0, local.stderr
    assert local.stdout.split() == [far_token, far_token, far_token]


def test_a_restarted_first_node_still_admits_its_old_token_and_rotate_key_gives_a_new_id(start_node, tiny_model, engine):
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    old_token, a_id, mesh_id = a.token(), a.node_id(), a.status()["mesh"]["id"]
    a.stop()
    # Same state dir: same key, same mesh, same QUIC port, so the token printed before still leads here.
    again = start_node("--model", str(tiny_model), *LOCAL, port=a.port, state_dir=a.state_dir)
    again.wait_ready()
    assert again.node_id() == a_id and again.status()["mesh"]["id"] == mesh_id
    joiner = start_node("--client", "--join", old_token, *LOCAL)
    joiner.wait_ready()
    assert joiner.peer_ids() == {a_id}
    again.stop()

    rotated = run_cli("rotate-key", "--state-dir", str(a.state_dir))
    assert rotated.returncode == 0 and "New node key" in rotated.stdout, rotated.stderr
    fresh = start_node("--model", str(tiny_model), *LOCAL, port=a.port, state_dir=a.state_dir)
    fresh.wait_ready()
    assert fresh.node_id() != a_id  # a new identity ...
    assert fresh.status()["mesh"]["id"] == mesh_id  # ... in the same mesh


def test_a_client_that_leaves_on_another_node_frees_the_slot_where_it_was_served(start_node, tiny_model, engine):
    """B's proxy, and B's console (whose Stop button ends the request the same way), tunnel to A's
    llama-server: hanging up on B must cancel the generation on A, not leave it running."""
    a = start_node("--model", str(tiny_model), "--ctx-size", "16384", *LOCAL)
    a.wait_ready()
    console = free_port()
    b = start_node("--client", "--join", a.token(), "--console", str(console), *LOCAL)
    b.wait_ready()
    upstream = a.llama_server_url()
    for n, port in enumerate((b.port, console), start=1):
        leave_mid_stream(port, while_streaming=lambda: a.busy_slots(upstream) == 1)
        wait_for(lambda n=n: a.cancelled_tasks() == n and a.busy_slots(upstream) == 0, timeout=60, what=f"generation {n} on A cancelled")


def test_a_member_too_starved_to_gossip_stays_until_it_hangs(start_node, tiny_model, engine):  # type: ignore[no-untyped-def]
    """A loaded machine may not gossip in time; while its QUIC stack still answers, it is
    alive (dropping it would re-plan every split it is in). Only long gossip silence drops it."""
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    token = decode_token(a.token())
    thread = LoopThread()
    member = make_mesh(token.mesh, name="starved")
    try:
        async def join() -> None:
            await member.start()
            await member.join([token])
        thread.run(join())
        wait_for(lambda: member.me.id in a.peer_ids(), what="A admits the member")

        stall_secs = 4 * DEAD_AFTER_SECS  # its node runs nothing meanwhile: no gossip at all
        thread.loop.call_soon_threadsafe(time.sleep, stall_secs)
        until = time.monotonic() + stall_secs + 1
        while time.monotonic() < until:
            assert member.me.id in a.peer_ids(), a.output()
            time.sleep(0.2)
        assert f"Peer left: standby {member.me.id[:8]}" not in a.output()

        thread.loop.call_soon_threadsafe(time.sleep, HUNG_AFTER_SECS + 2)  # hung: gone, for that reason
        line = a.wait_output(f"Peer left: standby {member.me.id[:8]}", timeout=60)
        assert ": connected but no gossip for " in line, line
    finally:
        thread.run(member.close())
        thread.close()
