"""Who may use a lent RPC worker, and the file proof, over real iroh endpoints in one process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.tunnels import RpcAttachments, TunnelListener, serve_rpc_tunnels
from mesh_llm.mesh.wire import StreamKind
from mesh_llm.serving.proofs import FileProofs, serve_file_proofs
from tests.mesh_helpers import make_mesh, wait_until

MODEL = "split-tiny"


async def mesh_of(*roles: str):  # type: ignore[no-untyped-def]
    """A worker `w` and one joined peer per role, every one a member of w."""
    creds = MeshCredentials.generate()
    w = make_mesh(creds, name="w")
    await w.start()
    peers = []
    for i, role in enumerate(roles):
        p = make_mesh(creds, role=role, name=f"p{i}")
        await p.start()
        await p.join([decode_token(w.token())])
        peers.append(p)
    await wait_until(lambda: len(w.members()) == len(roles) and all(w.membership.members[p.me.id].record.role == p.me.role for p in peers))
    return w, peers


class Echo:
    """The stand-in for ggml-rpc-server: echoes, counts the connections it was given."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


async def connect(tunnel: TunnelListener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", tunnel.port)


async def answers(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes = b"\x0ehello") -> bool:
    """Does the worker behind the tunnel echo? (False: the stream was closed on us.)"""
    reader, writer = conn
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.readexactly(len(data)), 15) == data
    except asyncio.IncompleteReadError:
        return False


async def test_a_worker_serves_one_host_at_a_time_and_never_a_client() -> None:
    w, (host, other, client) = await mesh_of("host", "standby", "client")
    echo = Echo()
    port = await echo.start()
    logs: list[str] = []
    attached = serve_rpc_tunnels(w, lambda peer, model: port, logs.append)
    refused: list[str] = []
    tunnels = {}
    for name, p in (("host", host), ("other", other), ("client", client)):
        tunnels[name] = TunnelListener(p, w.me.id, StreamKind.RPC, {"model": MODEL}, on_refused=refused.append)
        await tunnels[name].start()

    first = await connect(tunnels["host"])
    assert await answers(first)
    again = await connect(tunnels["host"])  # llama.cpp re-opens its connection while the last one closes
    assert await answers(again)
    assert attached.holder(MODEL) == host.me.id
    assert not await answers(await connect(tunnels["other"]))  # a second peer while the host is attached
    assert any(f"Refused an RPC stream from {other.me.id[:8]} for {MODEL}: the worker serves {host.me.id[:8]} now" in line for line in logs), logs
    await wait_until(lambda: len(refused) == 1)  # the refused side hears it was refused
    assert not await answers(await connect(tunnels["client"]))
    assert any(f"Refused an RPC stream from {client.me.id[:8]} for {MODEL}: a client may not use RPC workers" in line for line in logs), logs
    assert await answers(first) and await answers(again)  # the host kept its worker throughout
    assert echo.connections == 2

    for _, writer in (first, again):
        writer.close()
    await wait_until(lambda: attached.holder(MODEL) is None)
    assert await answers(await connect(tunnels["other"]))  # once the host is gone, the next one may attach
    for tunnel in tunnels.values():
        await tunnel.close()
    for m in (host, other, client, w):
        await m.close()


async def test_an_rpc_stream_that_sends_nothing_is_closed_before_it_reaches_the_worker() -> None:
    w, (host,) = await mesh_of("host")
    echo = Echo()
    port = await echo.start()
    logs: list[str] = []
    attached = serve_rpc_tunnels(w, lambda peer, model: port, logs.append, first_command_secs=0.5)
    tunnel = TunnelListener(host, w.me.id, StreamKind.RPC, {"model": MODEL})
    await tunnel.start()
    reader, writer = await connect(tunnel)
    assert await asyncio.wait_for(reader.read(10), 15) == b""  # closed on us, though we never sent a byte
    assert any(f"Closed an RPC stream from {host.me.id[:8]} for {MODEL}: no command within" in line for line in logs), logs
    assert echo.connections == 0 and attached.holder(MODEL) is None  # the worker never saw it, nobody holds it
    writer.close()
    assert await answers(await connect(tunnel))  # a stream that speaks goes through
    await tunnel.close()
    await host.close()
    await w.close()


async def test_a_host_this_nodes_plan_no_longer_lends_to_is_cut_off() -> None:
    w, (host,) = await mesh_of("host")
    echo = Echo()
    port = await echo.start()
    logs: list[str] = []
    lends = [True]
    serve_rpc_tunnels(w, lambda peer, model: port if lends[0] else "this node's plan for it has another host", logs.append, recheck_secs=0.1)
    tunnel = TunnelListener(host, w.me.id, StreamKind.RPC, {"model": MODEL})
    await tunnel.start()
    conn = await connect(tunnel)
    assert await answers(conn)
    await asyncio.sleep(0.3)
    assert await answers(conn)  # while the plan lends to it, an idle host keeps its stream
    lends[0] = False
    assert await asyncio.wait_for(conn[0].read(10), 15) == b""
    assert any(f"Closed the RPC stream of {host.me.id[:8]} for {MODEL}: this node's plan for it has another host" in line for line in logs), logs
    await tunnel.close()
    await host.close()
    await w.close()


def test_attachments_count_the_streams_of_one_host() -> None:
    a = RpcAttachments()
    assert a.attach("m", "h") is None and a.attach("m", "h") is None
    assert "serves h" in (a.attach("m", "x") or "")
    assert a.attach("other-model", "x") is None  # one host per worker, and one worker per model
    a.detach("m", "x")  # not attached: changes nothing
    a.detach("m", "h")
    assert a.holder("m") == "h"
    a.detach("m", "h")
    assert a.holder("m") is None and a.attach("m", "x") is None


async def test_file_proofs_pass_for_the_same_file_only(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    mine, same, other = tmp_path / "mine.gguf", tmp_path / "same.gguf", tmp_path / "other.gguf"
    mine.write_bytes(data)
    same.write_bytes(data)
    other.write_bytes(data[:100_000] + os.urandom(100_000))
    w, (good, bad, none) = await mesh_of("standby", "standby", "standby")
    logs: dict[str, list[str]] = {"good": [], "bad": [], "none": []}
    serve_file_proofs(good, lambda m: same if m == MODEL else None, logs["good"].append)
    serve_file_proofs(bad, lambda m: other if m == MODEL else None, logs["bad"].append)
    serve_file_proofs(none, lambda m: None, logs["none"].append)
    warned: list[str] = []
    results = [0]
    proofs = FileProofs(w, warned.append, lambda: results.__setitem__(0, results[0] + 1))
    records = {p: w.membership.members[p.me.id].record for p in (good, bad, none)}
    for p in (good, bad, none):
        proofs.ask(records[p], MODEL, mine, "fp")
    await wait_until(lambda: results[0] == 3)
    assert proofs.proven(records[good], "fp")
    assert not proofs.proven(records[bad], "fp") and not proofs.proven(records[none], "fp")
    assert not proofs.proven(records[good], "another-fp")  # proven for one file, not for another
    assert f"peer {bad.me.id[:8]} failed the file check for {MODEL}: its answer does not match this node's copy — left out" in warned, warned
    assert f"peer {none.me.id[:8]} failed the file check for {MODEL}: it says: this node has no {MODEL} — left out" in warned, warned
    assert any(f"peer {w.me.id[:8]} challenged this node for {MODEL}, a file it does not have" in line for line in logs["none"])
    proofs.ask(records[good], MODEL, mine, "fp")  # one round trip per peer and file: not asked again
    proofs.ask(records[bad], MODEL, mine, "fp")  # a failure is not asked again at once either
    await asyncio.sleep(0.2)
    assert results[0] == 3
    # A prover whose file went away answers that it cannot read it (no traceback), and so does a
    # challenger whose own copy is gone.
    gone = tmp_path / "gone.gguf"
    serve_file_proofs(none, lambda m: gone if m == MODEL else None, logs["none"].append)
    proofs.keep_only({(good.me.id, records[good].incarnation), (bad.me.id, records[bad].incarnation)})
    proofs.ask(records[none], MODEL, mine, "fp")
    await wait_until(lambda: results[0] == 4)
    assert any("it says: this node cannot read its copy" in line for line in warned), warned
    assert await proofs._verify(good.me.id, MODEL, gone) is not None
    proofs.keep_only({(bad.me.id, records[bad].incarnation)})  # the others left (or restarted)
    assert not proofs.proven(records[good], "fp")
    proofs.ask(records[good], MODEL, mine, "fp")  # and are asked again when they come back
    await wait_until(lambda: results[0] == 5 and proofs.proven(records[good], "fp"))
    await proofs.close()
    for m in (good, bad, none, w):
        await m.close()
