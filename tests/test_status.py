"""The status document (pure) and the change feed behind /api/events."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from mesh_llm.api import status_feed
from mesh_llm.api.console import WebConsole
from mesh_llm.api.proxy import ApiProxy, UpstreamTable, host_allowed
from mesh_llm.api.status import PeerView, Ports, memory_used, stable_view, status_document
from mesh_llm.api.status_feed import StatusFeed
from mesh_llm.errors import UserError
from mesh_llm.mesh.peers import HostedModel, PeerRecord, Slice
from tests.conftest import free_port
from tests.mesh_helpers import wait_until

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
GB = 10**9


def split_mesh() -> tuple[PeerRecord, list[PeerView]]:
    """A hosts a split over B (1 share) and itself (3 shares); C hosts a small model alone; D is a client."""
    split = (Slice(B, 1.0, 0, 1, False), Slice(A, 3.0, 2, 7, True))
    a = PeerRecord(id=A, role="host", hostname="alpha", vram_bytes=12 * GB, models_on_disk=("big",),
                   hosting=(HostedModel("big", "ready", size_bytes=7 * GB, need_bytes=8 * GB, ctx=8192, split=split),))
    b = PeerRecord(id=B, role="worker", hostname="beta", vram_bytes=4 * GB, models_on_disk=("big",))
    c = PeerRecord(id=C, role="host", hostname="gamma", vram_bytes=8 * GB, models_on_disk=("small",),
                   hosting=(HostedModel("small", "ready", size_bytes=1 * GB, need_bytes=2 * GB, ctx=4096),))
    d = PeerRecord(id=D, role="client", hostname="laptop")
    return a, [PeerView(d, 3.0, 0.5), PeerView(c, 2.0, 0.4), PeerView(b, 1.5, 1.2)]


def test_memory_used_shares_a_split_by_weight_and_counts_solo_hosts() -> None:
    a, peers = split_mesh()
    used = memory_used([a] + [p.record for p in peers])
    assert used == {A: 6 * GB, B: 2 * GB, C: 2 * GB}


def test_memory_is_credited_to_members_only() -> None:
    ghost = "e" * 64
    split = (Slice(ghost, 1.0, 0, 1, False), Slice(D, 1.0, 2, 3, False), Slice(A, 2.0, 4, 7, True))
    a = PeerRecord(id=A, role="host", hosting=(HostedModel("big", "ready", need_bytes=4 * GB, split=split),))
    client = PeerRecord(id=D, role="client", hosting=(HostedModel("fake", "ready", need_bytes=9 * GB),))
    assert memory_used([a, client]) == {A: 2 * GB}  # not the unknown node, not the client
    zero = PeerRecord(id=A, role="host", hosting=(HostedModel("big", "loading", need_bytes=4 * GB, split=(Slice(B, 0.0, 0, 1, False),)),))
    assert memory_used([zero]) == {A: 4 * GB}  # all-zero shares: no division by zero


def test_a_model_that_waits_holds_no_memory() -> None:
    a = PeerRecord(id=A, hosting=(HostedModel("big", "waiting", "Waiting for more peers", need_bytes=8 * GB),))
    assert memory_used([a]) == {}


def test_status_document_lists_nodes_models_split_and_commands() -> None:
    a, peers = split_mesh()
    doc = status_document(a, peers, mesh_id="m1", token="TOKEN", ports=Ports(9337, 3131), routes=["big", "small"])
    assert doc["node"]["id"] == A and doc["node"]["self"] and doc["token"] == "TOKEN"
    assert [n["name"] for n in doc["nodes"]] == ["alpha", "gamma", "beta", "laptop"]  # me, then hosts, workers, clients
    assert doc["mesh"] == {"id": "m1", "node_count": 4, "total_memory_bytes": 24 * GB}  # clients offer nothing
    beta = next(n for n in doc["nodes"] if n["id"] == B)
    assert (beta["role"], beta["memory_bytes"], beta["used_bytes"], beta["rtt_ms"]) == ("worker", 4 * GB, 2 * GB, 1.5)
    big, small = doc["models"]
    assert (big["name"], big["host_name"], big["state"], big["ready"]) == ("big", "alpha", "ready", True)
    assert [(s["node_name"], s["share"], s["first"], s["last"], s["output"]) for s in big["split"]] == [
        ("beta", 0.25, 0, 1, False), ("alpha", 0.75, 2, 7, True)]
    assert small["split"] == [] and small["host_name"] == "gamma"
    assert "GOOSE_MODEL=big" in big["commands"]["goose"] and "localhost:9337" in big["commands"]["goose"]
    assert json.loads(big["commands"]["pi models.json"])["providers"]["mesh"]["models"][0]["contextWindow"] == 8192
    assert doc["api"] == {"port": 9337, "url": "http://localhost:9337/v1", "listen_all": False, "models": ["big", "small"], "servers": {}}
    json.dumps(doc)  # JSON all the way down


def test_waiting_model_carries_its_reason() -> None:
    a = PeerRecord(id=A, role="host", hosting=(HostedModel("big", "waiting", "Waiting for more peers — need 8.00 GB, have 4.00 GB"),))
    doc = status_document(a, [], mesh_id="m", token=None, ports=Ports(9337), routes=["big"])
    assert doc["models"][0]["state"] == "waiting" and not doc["models"][0]["ready"]
    assert "need 8.00 GB" in doc["models"][0]["detail"]
    assert doc["token"] is None


def test_an_moe_model_carries_its_experts_through_gossip_and_a_dense_one_none() -> None:
    moe = HostedModel("mixture", "ready", size_bytes=GB, experts=8, experts_used=2)
    c = PeerRecord(id=C, role="host", hostname="gamma", hosting=(moe, HostedModel("small", "ready")))
    heard = PeerRecord.from_wire(json.loads(json.dumps(c.to_wire())))  # what A knows of C is what C gossiped
    a = PeerRecord(id=A, role="standby")
    doc = status_document(a, [PeerView(heard)], mesh_id="m", token=None, ports=Ports(9337), routes=["mixture", "small"])
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["mixture"]["moe"] == {"experts": 8, "experts_used": 2, "shard": None}
    grouped = PeerRecord(id=C, role="host", hosting=(HostedModel("g", "ready", experts=8, experts_used=2, expert_groups=4, shard="f"),))
    entry = status_document(a, [PeerView(grouped)], mesh_id="m", token=None, ports=Ports(9337), routes=["g"])["models"][0]
    assert entry["moe"] == {"experts": 8, "experts_used": 2, "groups": 4, "shard": [0, 1, 2, 3]}
    assert by_name["small"]["moe"] is None
    # a peer from before MoE detection sends neither field: dense as far as anyone knows
    assert HostedModel.from_wire({"name": "old", "state": "ready"}).experts == 0


def test_stable_view_ignores_heartbeat_drift_but_not_changes() -> None:
    a, peers = split_mesh()
    base = status_document(a, peers, mesh_id="m", token="T", ports=Ports(9337), routes=[])
    drift = status_document(a, [PeerView(p.record, (p.rtt_ms or 0) + 0.7, p.last_seen_secs + 1) for p in peers], mesh_id="m", token="T", ports=Ports(9337), routes=[])
    assert base != drift and stable_view(base) == stable_view(drift)
    fewer = status_document(a, peers[1:], mesh_id="m", token="T", ports=Ports(9337), routes=[])
    assert stable_view(fewer) != stable_view(base)


@pytest.mark.parametrize(
    ("host", "listen_all", "ok"),
    [("localhost:3131", False, True), ("127.0.0.1:3131", False, True), ("[::1]:3131", False, True), ("LOCALHOST", False, True),
     ("evil.example:3131", False, False), ("127.0.0.1.evil.example", False, False), ("192.168.1.5:3131", True, True)],
)
def test_console_answers_loopback_names_only_unless_listening_on_all(host: str, listen_all: bool, ok: bool) -> None:
    assert host_allowed(host, listen_all) is ok


class Board:
    """A stand-in status source whose document the test changes."""

    def __init__(self) -> None:
        self.doc = {"node": {"id": "x"}, "nodes": [{"id": "x", "rtt_ms": 1.0, "last_seen_secs": 0.1}], "models": []}
        self.builds = 0

    def build(self) -> dict:
        self.builds += 1
        return {**json.loads(json.dumps(self.doc)), "token": "SECRET"}


async def test_feed_publishes_changes_and_rations_drift(monkeypatch) -> None:
    board = Board()
    feed = StatusFeed(board.build)
    feed.start()
    try:
        assert not feed.refresh()  # nothing changed
        board.doc["nodes"][0]["rtt_ms"] = 2.0
        assert not feed.refresh()  # drift alone waits for REFRESH_SECS
        monkeypatch.setattr(status_feed, "REFRESH_SECS", 0.0)
        assert feed.refresh() and feed.latest["nodes"][0]["rtt_ms"] == 2.0
        board.doc["models"] = [{"name": "m", "state": "ready"}]
        version = feed.version
        feed.poke()
        await wait_until(lambda: feed.version > version)
        assert feed.version == version + 1 and feed.latest["models"][0]["name"] == "m"
    finally:
        await feed.close()


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, str]]:
    """(event name or ':' for a comment, data) pairs, `count` of them."""
    out: list[tuple[str, str]] = []
    event, data = "", ""
    while len(out) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith(":"):
            out.append((":", line[1:].strip()))
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "" and event:
            out.append((event, data))
            event, data = "", ""
    return out


@pytest.fixture
async def console_server(monkeypatch):
    monkeypatch.setattr(status_feed, "KEEPALIVE_SECS", 0.3)
    board = Board()
    feed = StatusFeed(board.build)
    proxy = ApiProxy(UpstreamTable())
    api_port, port = free_port(), free_port()
    await proxy.start("127.0.0.1", api_port)
    console = WebConsole(feed, proxy)
    await console.start("127.0.0.1", port)
    feed.start()
    async with aiohttp.ClientSession() as session:
        yield board, feed, session, f"http://127.0.0.1:{port}", port
    await console.close()
    await proxy.close()


async def test_events_stream_sends_status_then_changes_and_keepalives(console_server) -> None:
    board, feed, session, base, _ = console_server
    async with session.get(base + "/api/events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        [(kind, data)] = await read_events(resp, 1)
        assert kind == "status" and json.loads(data)["node"]["id"] == "x"
        assert (await read_events(resp, 1))[0][0] == ":"  # keep-alive while nothing changes
        board.doc["models"] = [{"name": "m"}]
        feed.poke()
        events = await read_events(resp, 2)
        changed = [json.loads(d) for k, d in events if k == "status"]
        assert changed and changed[0]["models"] == [{"name": "m"}]


async def test_the_token_reaches_local_callers_only(console_server) -> None:
    _, _, session, base, port = console_server
    async with session.get(base + "/api/status") as r:
        assert (await r.json())["token"] == "SECRET"
    async with session.get(base + "/api/events") as resp:
        [(_, data)] = await read_events(resp, 1)
        assert json.loads(data)["token"] == "SECRET"
    # A page served from a name re-pointed at 127.0.0.1 gets nothing, let alone the token.
    async with session.get(base + "/api/events", headers={"Host": f"rebound.example:{port}"}) as r:
        assert r.status == 403


async def test_closing_the_console_ends_open_event_streams(monkeypatch) -> None:
    monkeypatch.setattr(status_feed, "KEEPALIVE_SECS", 30.0)
    feed = StatusFeed(Board().build)
    proxy = ApiProxy(UpstreamTable())
    console = WebConsole(feed, proxy)
    port = free_port()
    await console.start("127.0.0.1", port)
    feed.start()
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/api/events") as resp:
        await read_events(resp, 1)
        await asyncio.wait_for(console.close(), 5)  # not aiohttp's 60 s shutdown wait
        assert await asyncio.wait_for(resp.content.read(), 5) == b""  # the stream ended cleanly
    await proxy.close()


async def test_a_failing_rebuild_is_reported_and_the_feed_lives_on() -> None:
    board, warnings = Board(), []
    feed = StatusFeed(board.build, warnings.append)
    feed.start()
    try:
        real = feed.build
        feed.build = lambda: {}["boom"]
        feed.poke()
        await wait_until(lambda: warnings)
        assert warnings and "KeyError" in warnings[0]
        feed.build = real
        board.doc["models"] = [{"name": "back"}]
        version = feed.version
        feed.poke()
        await wait_until(lambda: feed.version > version)
        assert feed.latest["models"] == [{"name": "back"}]
    finally:
        await feed.close()


async def test_console_routes_page_assets_and_json_errors(console_server) -> None:
    _, _, session, base, port = console_server
    async with session.get(base + "/") as r:
        page = await r.text()
        assert r.status == 200 and "/static/console.js" in page and "cluster-bar" in page
        assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing from elsewhere: works offline
    for asset in ("console.js", "console.css"):
        async with session.get(f"{base}/static/{asset}") as r:
            assert r.status == 200 and len(await r.read()) > 1000
    for path in ("/nope", "/static/missing.js", "/static/..%2f..%2fconsole.py", "/api/unknown"):
        async with session.get(base + path) as r:
            assert r.status == 404 and r.content_type == "application/json", path
            assert "no route" in (await r.json())["error"]["message"]
    async with session.get(base + "/api/status") as r:
        assert (await r.json())["node"]["id"] == "x"
    async with session.get(base + "/v1/models") as r:
        assert (await r.json())["data"] == []
    async with session.post(base + "/v1/chat/completions", json={"model": "ghost", "messages": []}) as r:
        assert r.status == 404 and "not served here" in (await r.json())["error"]["message"]
    async with session.get(base + "/api/status", headers={"Host": f"rebound.example:{port}"}) as r:
        assert r.status == 403 and "localhost" in (await r.json())["error"]["message"]


async def test_console_port_in_use_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        console = WebConsole(StatusFeed(Board().build), ApiProxy(UpstreamTable()))
        with pytest.raises(UserError, match=f"console port {port} on 127.0.0.1 is already in use"):
            await console.start("127.0.0.1", port)


async def test_api_status_keeps_the_token_from_remote_callers() -> None:
    proxy = ApiProxy(UpstreamTable())
    proxy.status_source = lambda: {"token": "T"}
    cases = [("127.0.0.1", "localhost:9337", "T"), ("::1", "[::1]:9337", "T"), ("192.168.1.9", "192.168.1.2:9337", None),
             ("127.0.0.1", "rebound.example:9337", None)]  # DNS rebinding: loopback peer, foreign name
    for remote, host, token in cases:
        request = make_mocked_request("GET", "/api/status", headers={"Host": host}, app=proxy.app()).clone(remote=remote)
        assert json.loads((await proxy.status(request)).body)["token"] == token, (remote, host)


class FakeMesh:
    def __init__(self) -> None:
        self.me = PeerRecord(id=A)

    def update_self(self, **changes) -> None:  # type: ignore[no-untyped-def]
        self.me = replace(self.me, **changes)

    def members(self) -> list:  # type: ignore[type-arg]
        return []


async def test_the_fleet_advertises_what_each_model_does(tiny_model) -> None:
    """Every lifecycle phase maps to what gossip (and so every console) says; standby and gone say nothing."""
    from mesh_llm.models.gguf_file import inspect_model
    from mesh_llm.plan.split import LayerRange, Solo, Split, Standby, Waiting
    from mesh_llm.serving.fleet import Fleet, Loaded, SplitOptions
    from mesh_llm.serving.lifecycle import Life, Phase
    from mesh_llm.serving.runner import ModelSpec

    info = inspect_model(tiny_model)
    mesh = FakeMesh()
    fleet = Fleet(mesh, None, UpstreamTable(), offer=GB, engine_version="e", settings=None, say=lambda line: None, warn=lambda line: None)  # type: ignore[arg-type]
    spec = ModelSpec("tiny", tiny_model, info, "f", need=GB // 4, ctx=512, aliases=("tiny-alias",))
    fleet.loaded["tiny"] = Loaded(spec, SimpleNamespace(server_port=1, gate=None, is_ready=lambda: True), SplitOptions(), 0.0)  # type: ignore[arg-type]
    split = Split(A, (B,), (1.0, 3.0), (LayerRange(B, 0, 0, False), LayerRange(A, 1, 3, True)))
    for life, expected in [
        (Life(Phase.STARTING, Solo(), ("solo",), "loading"), ("loading", "loading", 0)),
        (Life(Phase.READY, Solo(), ("solo",), "ready"), ("ready", "", 0)),
        (Life(Phase.WAITING, Waiting(GB, GB // 2), None, "Waiting for more peers"), ("waiting", "Waiting for more peers", 0)),
        (Life(Phase.STARTING, split, None, "starting the 1 worker(s) of the split"), ("loading", "starting the 1 worker(s) of the split", 2)),
        (Life(Phase.FAILED, Solo(), None, "llama-server exited with code 1"), ("error", "llama-server exited with code 1", 0)),
        (Life(Phase.UNLOADING, Solo(), ("solo",), "unloading"), ("unloading", "unloading", 0)),
    ]:
        fleet.loaded["tiny"].life = life
        fleet.publish()
        [hosted] = mesh.me.hosting
        assert (hosted.state, hosted.detail, len(hosted.split)) == expected, life
        assert hosted.aliases == ("tiny-alias",) and hosted.need_bytes == GB // 4 and hosted.size_bytes == info.file_size
    assert mesh.me.models_on_disk == ()  # an unloading model is offered to no split
    fleet.loaded["tiny"].life = Life(Phase.READY, Solo(), ("solo",), "ready")
    fleet.publish()
    assert mesh.me.role == "host" and mesh.me.models_on_disk == ("tiny",) and mesh.me.fingerprints == ("f",)
    for life in (Life(Phase.STANDBY, Standby(B)), Life(Phase.GONE)):
        fleet.loaded["tiny"].life = life
        fleet.publish()
        assert mesh.me.hosting == () and mesh.me.role == "standby"  # the split's host speaks for the model
    assert mesh.me.models_served == ()
