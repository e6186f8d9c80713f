"""Finding meshes end to end: real nodes publish to an in-process Nostr relay (no internet),
`mesh-llm discover` lists them, `--auto` joins the better one, a named mesh is started then
joined, `--max-clients` delists, a killed node's listing expires, a clean exit withdraws it."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import nostr_sdk as ns
import pytest

from tests.conftest import LOCAL, run_cli, wait_for
from tests.mesh_helpers import LoopThread

FAST = {"MESH_LLM_NOSTR_REPUBLISH_SECS": "1"}  # republished every second, so a listing expires 2 s after its node dies


@pytest.fixture(scope="module")
def relay() -> Iterator[str]:
    loop = LoopThread()

    async def start() -> tuple[ns.LocalRelay, str]:
        r = ns.LocalRelayBuilder().addr("127.0.0.1").build()
        await r.run()
        return r, str(await r.url())

    r, url = loop.run(start())
    yield url
    r.shutdown()
    loop.close()


def discover(url: str, *args: str) -> dict:
    result = run_cli("discover", "--json", "--nostr-relay", url, *args)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def mesh_ids(url: str, *args: str) -> set[str]:
    return {m["mesh_id"] for m in discover(url, *args)["meshes"]}


@pytest.mark.engine
def test_two_nodes_publish_discover_lists_them_auto_joins_the_better_and_delists(start_node, tiny_model: Path, engine, relay: str) -> None:  # type: ignore[no-untyped-def]
    nostr = ("--nostr-relay", relay)
    a = start_node("--model", str(tiny_model), "--max-vram", "1", "--region", "eu", "--publish", *nostr, *LOCAL, env=FAST)
    b = start_node("--model", str(tiny_model), "--max-vram", "2", "--region", "us", "--publish", "--max-clients", "1", *nostr, *LOCAL, env=FAST)
    a.wait_ready()
    b.wait_ready()
    ids = {a.status()["mesh"]["id"]: "a", b.status()["mesh"]["id"]: "b"}
    wait_for(lambda: set(ids) <= mesh_ids(relay), timeout=60, what="both meshes listed")
    listed = a.status()["discovery"]["listing"]
    assert listed["listed"] is True and listed["nostr_listed"] is True and listed["relays"] == [relay] and listed["relays_up"] == 1
    assert listed["token_kind"] == "client" and a.status()["discovery"]["lan_announced"] is False  # loopback QUIC: nothing on the LAN
    meshes = {m["mesh_id"]: m for m in discover(relay)["meshes"]}
    ma, mb = (next(m for i, m in meshes.items() if ids.get(i) == x) for x in "ab")
    assert ma["region"] == "eu" and mb["region"] == "us" and ma["serving"] == mb["serving"] == ["tiny-llama"]
    assert (ma["nodes"], ma["clients"], ma["max_clients"], mb["max_clients"]) == (1, 0, None, 1)
    assert ma["total_memory_bytes"] < mb["total_memory_bytes"] and ma["freshness"] == "fresh" and ma["token_kind"] == "client"
    assert ma["score"] > 0 and ma["version"]
    assert [m["mesh_id"] for m in discover(relay)["meshes"] if m["mesh_id"] in ids][0] == b.status()["mesh"]["id"]  # more memory first
    # Filters narrow it.
    assert set(ids) & mesh_ids(relay, "--region", "EU") == {a.status()["mesh"]["id"]}
    assert set(ids) & mesh_ids(relay, "--min-vram", "1.5") == {b.status()["mesh"]["id"]}
    assert set(ids) & mesh_ids(relay, "--model", "no-such-model") == set()
    assert set(ids) <= mesh_ids(relay, "--model", "TINY")
    table = run_cli("discover", "--nostr-relay", relay)
    assert table.returncode == 0 and "tiny-llama" in table.stdout and "fresh" in table.stdout

    # --auto --client joins the better one (b: as many nodes, more memory), with the client token.
    c = start_node("--auto", "--client", "--model", "tiny", *nostr, *LOCAL)
    c.wait_ready()
    assert c.status()["mesh"]["id"] == b.status()["mesh"]["id"]
    wait_for(lambda: {n["role"] for n in b.status()["nodes"] if not n["self"]} == {"client"}, what="b sees c as a client")
    assert "Joining mesh" in c.output()
    # b has its one client now: it delists itself (--max-clients 1); a stays listed.
    wait_for(lambda: b.status()["mesh"]["id"] not in mesh_ids(relay), timeout=60, what="b delisted")
    assert a.status()["mesh"]["id"] in mesh_ids(relay)
    assert "Delisted the mesh" in b.output()

    # A node killed outright cannot withdraw: its listing expires (2 s here, 120 s by default).
    a_id = a.status()["mesh"]["id"]
    a.stop(signal.SIGKILL)
    wait_for(lambda: a_id not in mesh_ids(relay), timeout=60, what="a's listing expired")


@pytest.mark.engine
def test_auto_mesh_name_starts_the_named_mesh_then_joins_it_and_a_clean_exit_withdraws_it(start_node, tiny_model: Path, engine, relay: str) -> None:  # type: ignore[no-untyped-def]
    nostr = ("--nostr-relay", relay)
    early = start_node("--auto", "--mesh-name", "poker-night", "--client", *nostr, *LOCAL, env={"MESH_LLM_AUTO_WAIT_SECS": "120"})
    early.wait_output("No mesh to join yet")  # a client started first waits for the mesh to be listed
    first = start_node("--auto", "--mesh-name", "poker-night", "--model", str(tiny_model), *nostr, *LOCAL)  # default 60 s / 120 s
    first.wait_ready()
    assert "starting it" in first.output()
    mesh_id = first.status()["mesh"]["id"]
    wait_for(lambda: mesh_id in mesh_ids(relay), timeout=60, what="the named mesh listed")
    (listed,) = [m for m in discover(relay)["meshes"] if m["mesh_id"] == mesh_id]
    assert listed["name"] == "poker-night"
    second = start_node("--auto", "--mesh-name", "Poker-Night", "--client", *nostr, *LOCAL)
    second.wait_ready()
    early.wait_ready()
    assert early.status()["mesh"]["id"] == mesh_id
    assert second.status()["mesh"]["id"] == mesh_id
    # An unnamed --auto never picks a named mesh; a node that serves needs a member token.
    nobody = run_cli("--auto", "--client", "--mesh-name", "nobody-here", *nostr, *LOCAL, env={"MESH_LLM_AUTO_WAIT_SECS": "0"})
    assert nobody.returncode == 1 and "no named 'nobody-here' mesh is listed" in nobody.stderr
    refused = run_cli("--auto", "--mesh-name", "poker-night", "--model", str(tiny_model), *nostr, *LOCAL, "--state-dir", str(first.state_dir.parent / "x"))
    assert refused.returncode == 1 and "client token only" in refused.stderr
    assert first.stop(signal.SIGINT) == 0
    assert mesh_id not in mesh_ids(relay)  # withdrawn at once, not after 120 s


@pytest.mark.engine
def test_a_mesh_listed_with_its_member_token_is_joined_as_a_member(start_node, tiny_model: Path, engine, relay: str) -> None:  # type: ignore[no-untyped-def]
    nostr = ("--nostr-relay", relay)
    first = start_node("--auto", "--mesh-name", "crew", "--publish-member-token", "--model", str(tiny_model), *nostr, *LOCAL)
    first.wait_ready()
    mesh_id = first.status()["mesh"]["id"]
    wait_for(lambda: mesh_id in mesh_ids(relay), timeout=60, what="the crew mesh listed")
    assert [m["token_kind"] for m in discover(relay)["meshes"] if m["mesh_id"] == mesh_id] == ["member"]
    second = start_node("--auto", "--mesh-name", "crew", "--model", str(tiny_model), *nostr, *LOCAL)
    second.wait_ready()
    assert second.status()["mesh"]["id"] == mesh_id and second.status()["node"]["role"] != "client"
    wait_for(lambda: second.node_id() in first.peer_ids(), what="first sees second")
    assert {n["role"] for n in first.status()["nodes"] if not n["self"]} != {"client"}
    # both publish the one mesh: discovery shows it once, with both nodes
    wait_for(lambda: [m["nodes"] for m in discover(relay)["meshes"] if m["mesh_id"] == mesh_id] == [2], timeout=90, what="listed once with 2 nodes")
    # the second lists it the way it found it, with the member token: a client-token listing of
    # its own would replace the first's and turn the next serving node away
    wait_for(lambda: (second.status()["discovery"]["listing"] or {}).get("nostr_listed"), timeout=60, what="second lists the mesh")
    assert second.status()["discovery"]["listing"]["token_kind"] == "member", second.output()
    third = run_cli("discover", "--json", "--nostr-relay", relay)
    assert [m["token_kind"] for m in json.loads(third.stdout)["meshes"] if m["mesh_id"] == mesh_id] == ["member"]


@pytest.mark.parametrize("args,fragment", [
    (("--auto", "--join", "x"), "--auto finds a mesh"),
    (("--client", "--publish", "--join", "x"), "cannot publish"),
    (("--client", "--mesh-name", "n", "--join", "x"), "needs --auto"),
    (("--model", "m", "--mesh-name", "bad\nname"), "printable"),
    (("--model", "m", "--max-clients", "0"), "--max-clients 0"),
    (("--model", "m", "--publish", "--nostr-relay", "http://relay"), "ws:// or wss://"),
])
def test_bad_discovery_flags_are_one_line_errors(args: tuple[str, ...], fragment: str, tmp_path: Path) -> None:
    from tests.conftest import assert_one_line_error

    assert_one_line_error(run_cli(*args, "--state-dir", str(tmp_path)), fragment, code=1)


def test_discover_with_no_relay_reachable_is_a_count_not_a_crash() -> None:
    result = run_cli("discover", "--nostr-relay", "ws://127.0.0.1:1")
    assert result.returncode == 0 and "unreachable" in result.stdout and "No meshes listed" in result.stdout
    assert discover("ws://127.0.0.1:1")["skipped"] == {"unreachable relays": 1}
    bad = run_cli("discover", "--nostr-relay", "nope")
    assert bad.returncode == 1 and "ws:// or wss://" in bad.stderr
