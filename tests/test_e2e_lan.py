"""LAN discovery between two network namespaces joined by a veth pair (real mDNS multicast,
real iroh QUIC): a browse in one sees the other's mesh, and a member whose address changed
is found again through its announcement, with no new token."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class Netns:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"mla{tag}", f"mlb{tag}")
        self.dev = (f"mlva{tag}", f"mlvb{tag}")

    def up(self) -> None:
        for ns in self.ns:
            ip("netns", "add", ns)
        ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for i, (ns, dev) in enumerate(zip(self.ns, self.dev, strict=True)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"10.77.0.{i + 1}/24", "dev", dev)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "route", "replace", "224.0.0.0/4", "dev", dev)  # mDNS goes out on the veth

    def readdress(self, old: str, new: str) -> None:
        """A DHCP change in the first namespace."""
        ip("-n", self.ns[0], "addr", "del", f"{old}/24", "dev", self.dev[0])
        ip("-n", self.ns[0], "addr", "add", f"{new}/24", "dev", self.dev[0])
        ip("-n", self.ns[0], "route", "replace", "224.0.0.0/4", "dev", self.dev[0])

    def down(self) -> None:
        for ns in self.ns:
            ip("netns", "del", ns, check=False)  # takes its end of the veth with it


@pytest.fixture
def netns() -> Iterator[Netns]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs `ip netns` and root")
    n = Netns()
    try:
        n.up()
    except (subprocess.CalledProcessError, OSError) as exc:
        n.down()
        pytest.skip(f"cannot make network namespaces here: {getattr(exc, 'stderr', exc)}")
    try:
        yield n
    finally:
        n.down()


class Proc:
    """A tests.lan_ns_node process in a namespace; its JSON lines on a queue."""

    def __init__(self, ns: str, *args: str) -> None:
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.lan_ns_node", *args], cwd=ROOT, env=ENV,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.seen.append(line.rstrip())
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, key: str, cond: Any = lambda v: True, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                doc = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if key in doc and cond(doc[key]):
                return doc
        raise AssertionError(f"no {key!r} line in time:\n" + "\n".join(self.seen[-30:]))

    def stop(self) -> None:
        if self.p.poll() is None:
            assert self.p.stdin is not None
            self.p.stdin.close()  # a graceful leave
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


def browse(ns: str, timeout: float = 4.0) -> dict[str, Any]:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.lan_ns_node", "browse", "--timeout", str(timeout)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_lan_browse_sees_a_mesh_and_a_member_is_found_again_after_its_address_changed(netns: Netns) -> None:
    key = os.urandom(32).hex()
    mesh_id, secret = os.urandom(16).hex(), os.urandom(32).hex()
    port = "47311"
    procs: list[Proc] = []
    try:
        a = Proc(netns.ns[0], "node", "--key", key, "--mesh", f"{mesh_id}:{secret}", "--port", port, "--name", "a")
        procs.append(a)
        first = a.wait_for("token")
        assert f"10.77.0.1:{port}" in first["addrs"]

        # a browse in the other namespace sees A's mesh: ids and addresses, and no secret
        found = browse(netns.ns[1])
        mine = [entry for entry in found["listings"] if entry.get("node_id") == first["id"]]
        assert mine, found
        assert mine[0]["mesh_id"] == mesh_id and mine[0]["private"] is True and f"10.77.0.1:{port}" in mine[0]["addrs"]
        assert secret not in json.dumps(found)

        # B joins with A's token, then A moves to another address (and restarts with its state)
        b = Proc(netns.ns[1], "node", "--key", os.urandom(32).hex(), "--mesh", f"{mesh_id}:{secret}", "--port", "47312", "--name", "b",
                 "--join", first["token"])
        procs.append(b)
        b.wait_for("links", lambda v: first["id"] in v)
        a.stop()
        b.wait_for("links", lambda v: first["id"] not in v)
        netns.readdress("10.77.0.1", "10.77.0.3")
        a = Proc(netns.ns[0], "node", "--key", key, "--mesh", f"{mesh_id}:{secret}", "--port", port, "--name", "a")
        procs.append(a)
        again = a.wait_for("token")
        assert again["id"] == first["id"] and f"10.77.0.3:{port}" in again["addrs"] and f"10.77.0.1:{port}" not in again["addrs"]
        # B's token still says 10.77.0.1: only the LAN announcement can lead it to 10.77.0.3
        b.wait_for("links", lambda v: first["id"] in v, timeout=45)
        assert any("LAN:" in line and "10.77.0.3" in line for line in b.seen), "\n".join(b.seen[-20:])
    finally:
        for p in procs:
            p.stop()


def test_a_published_mesh_announces_its_listing_with_the_token(netns: Netns) -> None:
    secret = os.urandom(32).hex()
    a = Proc(netns.ns[0], "node", "--key", os.urandom(32).hex(), "--mesh", f"{os.urandom(16).hex()}:{secret}", "--port", "47313",
             "--listing", json.dumps({"name": "poker-night", "nodes": 1, "models": ["tiny"]}))
    try:
        first = a.wait_for("token")
        listings = browse(netns.ns[1])["listings"]
        assert {"name": "poker-night", "nodes": 1, "models": ["tiny"], "token": first["token"]} in listings, listings
    finally:
        a.stop()


@pytest.mark.engine
def test_a_real_node_announces_unless_told_not_to(netns: Netns, tiny_model: Path, engine: Any, tmp_path: Path) -> None:
    from mesh_llm.mesh.token import decode_token
    from tests.conftest import NodeProcess

    prefix = ("ip", "netns", "exec", netns.ns[0])
    node = NodeProcess(["--model", str(tiny_model), "--no-relay"], tmp_path / "a", 9337, prefix=prefix, env=ENV)
    try:
        node_id = decode_token(node.token()).endpoint_id.hex()
        assert node_id in [e.get("node_id") for e in browse(netns.ns[1])["listings"]]
    finally:
        node.proc.terminate()
        node.proc.wait(30)
    quiet = NodeProcess(["--model", str(tiny_model), "--no-relay", "--no-lan"], tmp_path / "a", 9337, prefix=prefix, env=ENV)
    try:
        quiet.token()
        assert browse(netns.ns[1])["listings"] == []
    finally:
        quiet.proc.terminate()
        quiet.proc.wait(30)


def ns_http(ns: str, url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    """GET (or POST `body` as JSON) from inside a namespace: its loopback is not ours."""
    code = ("import json,sys,urllib.request as u;b=sys.argv[2];"
            "r=u.Request(sys.argv[1],b.encode() if b else None,{'Content-Type':'application/json'});"
            "print(u.urlopen(r,timeout=50).read().decode())")
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, url, json.dumps(body) if body else ""],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def ns_cli(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "mesh_llm", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.engine
def test_a_named_mesh_is_found_and_joined_over_the_lan_with_no_relay_and_no_token(netns: Netns, tiny_model: Path, engine: Any,
                                                                                   tmp_path: Path) -> None:
    """Two shells, no token pasted, no relay: `--mesh-name lan-party --no-nostr` lists the mesh on
    the LAN only; `discover --no-nostr` in the other namespace shows it; `--auto --mesh-name
    lan-party --client` joins it there and answers through its own :9337."""
    from tests.conftest import NodeProcess

    a = NodeProcess(["--model", str(tiny_model), "--no-relay", "--mesh-name", "lan-party", "--no-nostr"], tmp_path / "a", 9337,
                    prefix=("ip", "netns", "exec", netns.ns[0]), env=ENV)
    c: NodeProcess | None = None
    try:
        a.wait_output("Listing the mesh on this LAN only")
        status = ns_http(netns.ns[0], "http://127.0.0.1:9337/api/status")
        mesh_id = status["mesh"]["id"]
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:  # the first listing goes out once the node is ready
            result = ns_cli(netns.ns[1], "discover", "--no-nostr", "--json")
            assert result.returncode == 0, result.stderr
            doc = json.loads(result.stdout)
            found = [m for m in doc["meshes"] if m["mesh_id"] == mesh_id]
        assert found, doc
        m = found[0]
        assert (m["name"], m["source"], m["token_kind"], m["serving"], m["freshness"]) == ("lan-party", "lan", "client", ["tiny-llama"], "fresh")
        assert doc["unreachable"] == [] and doc["private_on_lan"] == []
        discovery = ns_http(netns.ns[0], "http://127.0.0.1:9337/api/status")["discovery"]
        assert discovery["mesh_name"] == "lan-party" and discovery["lan_announced"] is True
        assert discovery["listing"]["listed"] is True and discovery["listing"]["relays"] == [] and discovery["listing"]["token_kind"] == "client"

        c = NodeProcess(["--auto", "--mesh-name", "lan-party", "--client", "--no-nostr", "--no-relay"], tmp_path / "c", 9337,
                        prefix=("ip", "netns", "exec", netns.ns[1]), env=ENV)
        c.wait_output("ready as a client", timeout=90)
        assert "Joining mesh 'lan-party', listed on this LAN" in c.output()
        assert ns_http(netns.ns[1], "http://127.0.0.1:9337/api/status")["mesh"]["id"] == mesh_id
        deadline = time.monotonic() + 60
        while "tiny-llama" not in ns_http(netns.ns[1], "http://127.0.0.1:9337/api/status")["api"]["models"]:
            assert time.monotonic() < deadline, c.output()
            time.sleep(0.5)
        answer = ns_http(netns.ns[1], "http://127.0.0.1:9337/v1/completions", {"model": "tiny-llama", "prompt": "ab", "max_tokens": 4})
        assert answer["choices"][0]["text"] is not None and answer["usage"]["completion_tokens"] > 0
    finally:
        for node in (c, a):
            if node is not None:
                node.proc.terminate()
                node.proc.wait(30)
