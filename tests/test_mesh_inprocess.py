"""The mesh layer over real iroh endpoints in one process (loopback, relays off)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import struct
import time

import pytest

from mesh_llm.errors import UserError
from mesh_llm.mesh import iroh_fastpath
from mesh_llm.mesh.handshake import Refused
from mesh_llm.mesh.identity import MeshCredentials, load_or_create_key, rotate_key
from mesh_llm.mesh.peers import HostedModel
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.transport import bind_endpoint, endpoint_addr, iroh
from mesh_llm.mesh.tunnels import TunnelListener, serve_rpc_tunnels
from mesh_llm.mesh.wire import ALPN, MAX_FRAME, StreamKind, stream_prefix
from tests.mesh_helpers import LOOPBACK, make_mesh, wait_until


async def joined_pair():  # type: ignore[no-untyped-def]
    creds = MeshCredentials.generate()
    a, b = make_mesh(creds, name="a"), make_mesh(creds, name="b")
    await a.start()
    await b.start()
    await b.join([decode_token(a.token())])
    await wait_until(lambda: len(a.members()) == 1 and len(b.members()) == 1)
    return a, b


async def test_bytes_cross_iroh_intact_with_the_fast_path() -> None:
    iroh_fastpath.install()
    assert iroh_fastpath.is_installed()
    server = await bind_endpoint(LOOPBACK, os.urandom(32))
    client = await bind_endpoint(LOOPBACK, os.urandom(32))
    sizes = [0, 1, 4095, 65536, 1_000_003]
    payloads = [os.urandom(n) for n in sizes]

    async def echo() -> None:
        conn = await (await (await server.accept_next()).accept()).connect()
        for _ in sizes:
            bi = await conn.accept_bi()
            data = await bi.recv().read_to_end(2_000_000)
            await bi.send().write_all(data)
            await bi.send().finish()
        await conn.closed()  # dropping the connection object would close it under the client
    task = asyncio.ensure_future(echo())
    conn = await client.connect(endpoint_addr(server.id().to_bytes().hex(), server.addr().direct_addresses(), None), ALPN)
    for data in payloads:
        bi = await conn.open_bi()
        await bi.send().write_all(bytearray(data) if len(data) % 2 else data)  # bytes-likes too
        await bi.send().finish()
        assert await bi.recv().read_to_end(2_000_000) == data
    conn.close(0, b"done")
    await asyncio.wait_for(task, 10)
    await client.close()
    await server.close()


def test_fast_path_refuses_an_iroh_it_was_not_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iroh_fastpath, "_installed", False)
    monkeypatch.setattr(iroh_fastpath.metadata, "version", lambda name: "9.9.9")
    with pytest.raises(iroh_fastpath.FastPathError, match="9.9.9"):
        iroh_fastpath.install()


@pytest.mark.parametrize(
    "garbage",
    [
        bytes([99]) + b"whatever",  # unknown stream kind
        stream_prefix(StreamKind.GOSSIP, {})[:1] + struct.pack(">I", MAX_FRAME + 1),  # oversized frame
        stream_prefix(StreamKind.GOSSIP, {})[:1] + struct.pack(">I", 5) + b"{oops",  # bad JSON
        stream_prefix(StreamKind.GOSSIP, {})[:1] + struct.pack(">I", 4000) + b"[" * 2000 + b"]" * 2000,  # nested past json's recursion limit
        stream_prefix(StreamKind.GOSSIP, {"self": {"id": "zz"}}),  # bad record
        stream_prefix(StreamKind.HELLO, {}),  # handshake again after admission
        stream_prefix(StreamKind.RPC, {}),  # a stream kind this node does not serve
    ],
)
async def test_a_malformed_stream_closes_that_stream_only(garbage: bytes) -> None:
    a, b = await joined_pair()
    link = b.links[a.me.id]
    bi = await link.conn.open_bi()
    await bi.send().write_all(garbage)
    with pytest.raises(iroh.IrohError):
        # The node resets the stream rather than answering it.
        data = await asyncio.wait_for(bi.recv().read_to_end(MAX_FRAME), 5)
        assert data, "stream ended without an answer"
        raise AssertionError(f"got an answer to garbage: {data[:80]!r}")
    await wait_until(lambda: any("malformed stream" in line for line in a.logs))
    # Same connection, same members: gossip still flows.
    b.update_self(hosting=(HostedModel("new", "ready"),))
    await wait_until(lambda: a.members()[0].record.models_served == ("new",))
    assert len(a.members()) == 1
    await b.close()
    await a.close()


async def test_an_unadmitted_connection_gets_nothing() -> None:
    creds = MeshCredentials.generate()
    a = make_mesh(creds, name="a", served=("secret-model",))
    await a.start()
    intruder = await bind_endpoint(LOOPBACK, os.urandom(32))
    conn = await intruder.connect(endpoint_addr(a.me.id, a.me.addrs, None), ALPN)
    bi = await conn.open_bi()
    await bi.send().write_all(stream_prefix(StreamKind.GOSSIP, {"self": {"id": "00" * 32}, "peers": []}))
    await bi.send().finish()
    with pytest.raises(iroh.IrohError):
        reply = await asyncio.wait_for(bi.recv().read_to_end(MAX_FRAME), 5)
        assert b"secret-model" not in reply
        raise AssertionError("unexpected reply")
    await wait_until(lambda: any("handshake" in line for line in a.logs))
    assert a.members() == []
    await intruder.close()
    await a.close()


FLIP = bytes(range(256))[::-1]  # the echo server maps every byte b to 255-b: chunking cannot matter


async def test_tunnel_carries_a_tcp_byte_stream_both_ways() -> None:
    a, b = await joined_pair()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.translate(FLIP))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    serve_rpc_tunnels(a, lambda peer, model: server.sockets[0].getsockname()[1])
    tunnel = TunnelListener(b, a.me.id, StreamKind.RPC, {})
    port = await tunnel.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for msg in (b"hello", b"\0", os.urandom(65537), os.urandom(300_000), os.urandom(2_000_003)):
        writer.write(msg)
        await writer.drain()
        back = await asyncio.wait_for(reader.readexactly(len(msg)), 30)
        assert hashlib.sha256(back).digest() == hashlib.sha256(msg.translate(FLIP)).digest(), len(msg)
    writer.close()
    await tunnel.close()
    server.close()
    await b.close()
    await a.close()


async def test_delayed_and_counted_rpc_tunnel_keeps_order_and_counts_commands() -> None:
    """The benchmark's injected latency holds every message back at least that long, in order
    (each message's own send → arrival time, so a tunnel that ignores the delay fails for all
    of them); the traffic counter sees the RPC commands that crossed."""
    from mesh_llm.mesh.rpc_traffic import RpcTraffic

    delay, count, size = 0.2, 20, 17
    a, b = await joined_pair()
    received = bytearray()
    arrived: list[float] = []  # when message i was complete at the far end
    done = asyncio.Event()

    sink_writers: list[asyncio.StreamWriter] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink_writers.append(writer)
        while data := await reader.read(65536):
            received.extend(data)
            now = time.monotonic()
            arrived.extend([now] * (len(received) // size - len(arrived)))
            if len(arrived) >= count:
                done.set()
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    serve_rpc_tunnels(a, lambda peer, model: server.sockets[0].getsockname()[1])
    traffic = RpcTraffic()
    tunnel = TunnelListener(b, a.me.id, StreamKind.RPC, {}, traffic=traffic, delay_s=delay)
    port = await tunnel.start()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    messages = [struct.pack("<BQQ", 15, 8, i) for i in range(count)]  # DEVICE_COUNT, numbered: order shows
    sent: list[float] = []
    for msg in messages:
        sent.append(time.monotonic())
        writer.write(msg)
        await writer.drain()
        await asyncio.sleep(0.005)
    await asyncio.wait_for(done.wait(), 30)
    held = [arrival - start for start, arrival in zip(sent, arrived, strict=True)]
    assert min(held) >= delay, held
    assert bytes(received) == b"".join(messages)
    assert traffic.commands["DEVICE_COUNT"] == count and traffic.round_trips == count
    # The answers come back through the tunnel: each round trip it times holds the delay.
    for i in range(3):
        sink_writers[0].write(struct.pack("<Q", 1))
        await sink_writers[0].drain()
        await wait_until(lambda i=i: len(traffic.rtts) == i + 1)
    assert min(traffic.rtts) >= delay, traffic.rtts
    writer.close()
    await tunnel.close()
    server.close()
    await b.close()
    await a.close()


async def test_join_errors_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh_llm.mesh import mesh as mesh_module

    monkeypatch.setattr(mesh_module, "DIAL_SECS", 1.0)
    creds = MeshCredentials.generate()
    a = make_mesh(creds)
    await a.start()
    with pytest.raises(Refused, match="own"):
        await a.join([decode_token(a.token())])
    lonely = make_mesh(creds)
    await lonely.start()
    tok = decode_token(a.token())
    await a.close()
    with pytest.raises(Refused, match="could not reach"):
        await lonely.join([tok])
    await lonely.close()


def test_node_key_is_private_stable_and_rotatable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = load_or_create_key(tmp_path)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert load_or_create_key(tmp_path) == key
    new = rotate_key(tmp_path)
    assert new != key and load_or_create_key(tmp_path) == new
    (tmp_path / "key").write_text("nonsense")
    with pytest.raises(UserError, match="rotate-key"):
        load_or_create_key(tmp_path)


async def test_a_hello_past_the_hello_limit_is_dropped_unread() -> None:
    creds = MeshCredentials.generate()
    a = make_mesh(creds, name="a")
    await a.start()
    stranger = await bind_endpoint(LOOPBACK, os.urandom(32))
    conn = await stranger.connect(endpoint_addr(a.me.id, a.me.addrs, None), ALPN)
    bi = await conn.open_bi()
    # well-formed and shallow, but 8 KB: a stranger's first frame may be 4 KiB at most
    await bi.send().write_all(stream_prefix(StreamKind.HELLO, {"v": 2, "mesh": creds.mesh_id.hex(), "nonce": "00" * 16, "pad": "x" * 8000}))
    await wait_until(lambda: any("exceeds the 4096-byte limit" in line for line in a.logs))
    assert a.members() == []
    await stranger.close()
    await a.close()


async def test_a_stranger_that_says_hello_then_stalls_is_cut_off_at_the_admission_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 3 s HELLO limit is only the first step: one deadline covers the whole admission, so a
    stranger that sends a proper HELLO and then never answers the challenge gives its slot back."""
    import mesh_llm.mesh.mesh as mesh_module

    monkeypatch.setattr(mesh_module, "ADMISSION_SECS", 1.5)
    creds = MeshCredentials.generate()
    a = make_mesh(creds, name="a")
    await a.start()
    stranger = await bind_endpoint(LOOPBACK, os.urandom(32))
    try:
        conn = await stranger.connect(endpoint_addr(a.me.id, a.me.addrs, None), ALPN)
        bi = await conn.open_bi()
        await bi.send().write_all(stream_prefix(StreamKind.HELLO, {"v": 3, "mesh": creds.mesh_id.hex(), "kind": "member", "nonce": "00" * 32}))
        await wait_until(lambda: a.pending_handshakes == 1, timeout=10)  # its admission is under way
        await wait_until(lambda: any("no answer to the mesh handshake within 2 s" in line for line in a.logs), timeout=10)
        assert a.pending_handshakes == 0 and a.members() == []
    finally:
        await stranger.close()
        await a.close()


async def test_a_full_node_refuses_admission_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh_llm.mesh import peers

    monkeypatch.setattr(peers, "MAX_MEMBERS", 1)
    a, b = await joined_pair()
    late = make_mesh(a.creds, name="late")
    await late.start()
    with pytest.raises(Refused, match="members"):
        await late.join([decode_token(a.token())])
    await wait_until(lambda: any("mesh full" in line for line in a.logs))
    assert [m.record.id for m in a.members()] == [b.me.id]
    await late.close()
    await b.close()
    await a.close()


async def test_hints_from_a_member_make_only_a_few_dials_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh_llm.mesh.peers import HINTED_DIALS_AT_ONCE, DialHint, DialLimiter

    a, b = await joined_pair()
    a.hinted_dials = DialLimiter(per_sec=0.0, burst=HINTED_DIALS_AT_ONCE + 2)  # no refill: what starts is what the rule allows, not timing
    running, most, started = 0, 0, []
    release = asyncio.Event()

    async def fake_dial(peer_id: str, addrs: object, relay: object) -> None:
        nonlocal running, most
        started.append(peer_id)
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        raise Refused("unreachable")

    monkeypatch.setattr(a, "_dial", fake_dial)
    flood = [DialHint(f"{i:064x}", "host", (f"10.9.{i // 250}.{i % 250 + 1}:9",)) for i in range(200)]
    for _ in range(5):  # five frames from the member in a row
        a._heard(a.links[b.me.id], b.me, flood, None)
    await asyncio.sleep(0)
    assert len(started) == HINTED_DIALS_AT_ONCE  # the rest wait for room and for the rate
    release.set()
    await wait_until(lambda: running == 0)
    for _ in range(5):
        a._heard(a.links[b.me.id], b.me, flood, None)
    await wait_until(lambda: len(started) >= HINTED_DIALS_AT_ONCE + 2 and running == 0)
    for _ in range(5):
        a._heard(a.links[b.me.id], b.me, flood, None)
        await asyncio.sleep(0.01)
    assert most == HINTED_DIALS_AT_ONCE and len(started) == HINTED_DIALS_AT_ONCE + 2, started  # the burst, never the 200
    await b.close()
    await a.close()
