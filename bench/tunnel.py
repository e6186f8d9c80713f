"""Mesh tunnel vs plain TCP on loopback: throughput and small-message round trips.

Two processes: this one (the near node) and a far node started as a child.
The far node runs a test server on 127.0.0.1 and a mesh endpoint that relays
RPC-tunnel streams to it. The near node measures the same workload directly
against the server (plain TCP) and through a TunnelListener (TCP → QUIC →
TCP), interleaved round by round so both see the same machine load. It also times
round trips over bare iroh streams between the two processes: the floor that
the Python bindings set for any tunnel built on them.

    .venv/bin/python bench/tunnel.py [--rounds 5] [--mb 64] [--pings 2000]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import time

from mesh_llm.mesh.identity import MeshCredentials, new_secret_key
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import PeerRecord
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.transport import TransportConfig, bind_endpoint, endpoint_addr
from mesh_llm.mesh.tunnels import TunnelListener, serve_rpc_tunnels
from mesh_llm.mesh.wire import ALPN, StreamKind

LOOPBACK = TransportConfig.loopback()
PING = b"p" * 32
BLOCK = b"\0" * (256 * 1024)


# -- the far side: a sink/echo server behind a mesh node -------------------------------------


async def handle_test_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    mode = await reader.readexactly(1)
    if mode == b"T":  # throughput: u64 length, then that many bytes; answer b"k"
        (n,) = struct.unpack(">Q", await reader.readexactly(8))
        while n > 0:
            data = await reader.read(min(n, 1 << 20))
            if not data:
                return
            n -= len(data)
        writer.write(b"k")
    else:  # ping: echo 32-byte messages until the client goes
        while True:
            try:
                msg = await reader.readexactly(len(PING))
            except asyncio.IncompleteReadError:
                break
            writer.write(msg)
    await writer.drain()
    writer.close()


async def raw_iroh_echo(endpoint) -> None:  # type: ignore[no-untyped-def]
    """Echo on bare iroh streams: the floor any tunnel over these bindings stands on."""
    conn = await (await (await endpoint.accept_next()).accept()).connect()
    while True:
        try:
            bi = await conn.accept_bi()
        except Exception:
            return
        recv, send = bi.recv(), bi.send()
        while data := await recv.read(65536):
            await send.write_all(data)


async def far(creds_hex: str) -> None:
    raw = await bind_endpoint(LOOPBACK, new_secret_key())
    raw_task = asyncio.ensure_future(raw_iroh_echo(raw))
    server = await asyncio.start_server(handle_test_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    creds = MeshCredentials(bytes.fromhex(creds_hex[:32]), bytes.fromhex(creds_hex[32:]))
    mesh = Mesh(secret_key=new_secret_key(), creds=creds, me=PeerRecord(id="", role="worker", hostname="far"), transport=LOOPBACK, log=lambda s: None)
    await mesh.start()
    serve_rpc_tunnels(mesh, lambda peer, model: port)
    raw_addr = {"id": raw.id().to_bytes().hex(), "addrs": raw.addr().direct_addresses()}
    print(json.dumps({"token": mesh.token(), "port": port, "raw": raw_addr}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    raw_task.cancel()
    await mesh.close()
    await raw.close()


# -- the near side -----------------------------------------------------------------------------


async def throughput(port: int, nbytes: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(b"T" + struct.pack(">Q", nbytes))
    sent = 0
    while sent < nbytes:
        chunk = BLOCK[: min(len(BLOCK), nbytes - sent)]
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    assert await reader.readexactly(1) == b"k"
    elapsed = time.perf_counter() - start
    writer.close()
    return nbytes / elapsed / 1e6


async def round_trips(port: int, count: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"P" + PING)
    await writer.drain()
    await reader.readexactly(len(PING))  # warm-up: stream setup is not a round trip
    times = []
    for _ in range(count):
        start = time.perf_counter()
        writer.write(PING)
        await writer.drain()
        await reader.readexactly(len(PING))
        times.append(time.perf_counter() - start)
    writer.close()
    return statistics.median(times) * 1000


async def raw_round_trips(info: dict, count: int) -> float:  # type: ignore[type-arg]
    endpoint = await bind_endpoint(LOOPBACK, new_secret_key())
    conn = await endpoint.connect(endpoint_addr(info["id"], info["addrs"], None), ALPN)
    bi = await conn.open_bi()
    recv, send = bi.recv(), bi.send()
    times = []
    for _ in range(count + 1):
        start = time.perf_counter()
        await send.write_all(PING)
        got = b""
        while len(got) < len(PING):
            got += await recv.read(65536)
        times.append(time.perf_counter() - start)
    conn.close(0, b"done")
    await endpoint.close()
    return statistics.median(times[1:]) * 1000


async def near(args: argparse.Namespace) -> dict[str, float]:
    creds = MeshCredentials.generate()
    child = subprocess.Popen([sys.executable, __file__, "--far", creds.mesh_id.hex() + creds.secret.hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        mesh = Mesh(secret_key=new_secret_key(), creds=creds, me=PeerRecord(id="", role="host", hostname="near"), transport=LOOPBACK, log=lambda s: None)
        await mesh.start()
        tok = decode_token(info["token"])
        await mesh.join([tok])
        tunnel = TunnelListener(mesh, tok.endpoint_id.hex(), StreamKind.RPC, {})
        mesh_port = await tunnel.start()
        tcp_port = info["port"]
        nbytes = args.mb * 1_000_000
        res: dict[str, list[float]] = {"mesh_mb_s": [], "tcp_mb_s": [], "mesh_rtt_ms": [], "tcp_rtt_ms": []}
        await throughput(mesh_port, nbytes // 8)  # warm-up
        for r in range(args.rounds):
            order = [("mesh", mesh_port), ("tcp", tcp_port)]
            if r % 2:
                order.reverse()
            for name, port in order:
                res[f"{name}_mb_s"].append(await throughput(port, nbytes))
                res[f"{name}_rtt_ms"].append(await round_trips(port, args.pings))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in res.items()), file=sys.stderr)
        raw_rtt = await raw_round_trips(info["raw"], args.pings)
        await tunnel.close()
        await mesh.close()
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(10)
    out = {k: round(statistics.median(v), 3) for k, v in res.items()}
    out["mesh_rtt_added_ms"] = round(out["mesh_rtt_ms"] - out["tcp_rtt_ms"], 3)
    out["raw_iroh_rtt_ms"] = round(raw_rtt, 3)  # bare iroh streams, no tunnel code, no TCP hops
    out["throughput_ratio"] = round(out["mesh_mb_s"] / out["tcp_mb_s"], 4)
    out.update({"rounds": args.rounds, "mb_per_transfer": args.mb, "pings": args.pings, "cpus": os.cpu_count() or 0})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mb", type=int, default=64, help="MB per throughput transfer")
    p.add_argument("--pings", type=int, default=2000, help="round trips per measurement")
    p.add_argument("--far", metavar="CREDS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.far:
        asyncio.run(far(args.far))
        return
    print(json.dumps(asyncio.run(near(args))))


if __name__ == "__main__":
    main()
