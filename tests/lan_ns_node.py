"""A mesh node (the mesh layer and its LAN announcer, no engine) or a LAN browse, for the
network-namespace test: `python -m tests.lan_ns_node node|browse ...`. Prints JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from mesh_llm.discovery.lan import LanAnnouncer, lan_listings
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import PeerRecord
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.transport import TransportConfig


def out(doc: dict[str, object]) -> None:
    print(json.dumps(doc), flush=True)


async def node(args: argparse.Namespace) -> None:
    mesh_id, secret = args.mesh.split(":")
    creds = MeshCredentials(bytes.fromhex(mesh_id), bytes.fromhex(secret))
    transport = TransportConfig(no_relay=True, bind_host="0.0.0.0", bind_port=args.port)
    mesh = Mesh(secret_key=bytes.fromhex(args.key), creds=creds, me=PeerRecord(id="", hostname=args.name), transport=transport,
                log=lambda line: out({"log": line}))
    await mesh.start()
    if args.join:
        await mesh.join([decode_token(args.join)])
    listing = {**json.loads(args.listing), "token": mesh.token()} if args.listing else None
    lan = LanAnnouncer(mesh, name="ns-test", listing=listing, say=lambda line: out({"log": line}))
    await lan.start()
    out({"id": mesh.me.id, "addrs": list(mesh.me.addrs), "token": mesh.token()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    last: list[str] | None = None
    while not stop.is_set():
        now = sorted(mesh.links)
        if now != last:
            out({"links": now})
            last = now
        with __import__("contextlib").suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    await lan.close()
    await mesh.close()


async def browse(args: argparse.Namespace) -> None:
    skipped: list[str] = []
    out({"listings": await lan_listings(args.timeout, skipped=skipped), "skipped": skipped})


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("node")
    n.add_argument("--key", required=True)
    n.add_argument("--mesh", required=True)
    n.add_argument("--port", type=int, required=True)
    n.add_argument("--name", default="n")
    n.add_argument("--join", default="")
    n.add_argument("--listing", default="", help="JSON: announce as a published mesh (its token added)")
    b = sub.add_parser("browse")
    b.add_argument("--timeout", type=float, default=4.0)
    args = p.parse_args()
    asyncio.run(node(args) if args.cmd == "node" else browse(args))


if __name__ == "__main__":
    main()
