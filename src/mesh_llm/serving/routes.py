"""The proxy's table, written in one place: every model this node answers for, with all
its servers: its own llama-server when it runs the model, and a tunnel to each peer
that serves it (peers whose model is still loading or waiting are listed too, not
ready, so a request gets 503 with their reason instead of a 404).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh_llm.api.proxy import Route, Server, UpstreamTable
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import Member, PeerRecord
from mesh_llm.mesh.tunnels import TunnelListener
from mesh_llm.mesh.wire import StreamKind


@dataclass(frozen=True)
class Hosted:
    """A model as a peer hosts it (pure view of its record)."""

    peer: str
    model: str
    ready: bool
    words: str  # its state in words
    aliases: tuple[str, ...]


def hosted_by_peers(members: Sequence[Member]) -> list[Hosted]:
    """Every model the mesh's other nodes run llama-server for."""
    out = []
    for m in members:
        r = m.record
        if r.role == "client":
            continue
        for h in r.hosting:
            words = "ready" if h.state == "ready" else f"{h.detail or h.state} on {r.hostname or r.id[:8]}"
            out.append(Hosted(r.id, h.name, h.state == "ready", words, h.aliases))
    return out


@dataclass(frozen=True)
class LocalRoute:
    """A model this node itself answers for."""

    server: Server
    aliases: tuple[str, ...]


@dataclass
class _PeerServer:
    """What this node keeps for a model a peer runs: the tunnel (once it was ready) and its state now."""

    server: Server
    tunnel: TunnelListener | None = None
    ready: bool = False
    words: str = ""


class MeshRoutes:
    """Keeps one HTTP tunnel per (peer, model) that peer serves, and rewrites the table.

    A tunnel stays while the peer still lists the model, ready or not: a model the peer is
    unloading takes no new requests from here, but the ones already running finish."""

    def __init__(self, mesh: Mesh, table: UpstreamTable, refusal: Callable[[PeerRecord, str], str | None] = lambda peer, model: None) -> None:
        """`refusal(peer, model)`: why this node must not send that model's prompts to that peer
        (it is then listed, not ready, with that reason), or None."""
        self.mesh, self.table, self.refusal = mesh, table, refusal
        self._peers: dict[tuple[str, str], _PeerServer] = {}
        self._lock = asyncio.Lock()  # one rewrite at a time: two would open one tunnel twice

    async def sync(self, local: dict[str, LocalRoute]) -> None:
        async with self._lock:
            await self._sync(local)

    async def _sync(self, local: dict[str, LocalRoute]) -> None:
        members = self.mesh.members()
        rtt = {m.record.id: m.rtt_ms for m in members}
        records = {m.record.id: m.record for m in members}
        hosted = hosted_by_peers(members)
        listed = {(h.peer, h.model) for h in hosted}
        for key in [k for k in self._peers if k not in listed]:
            gone = self._peers.pop(key)
            if gone.tunnel is not None:
                await gone.tunnel.close()
        routes: dict[str, Route] = {model: Route(model, [entry.server], entry.aliases) for model, entry in local.items()}
        for h in hosted:
            entry = self._peers.get((h.peer, h.model))
            if entry is None:
                entry = self._peers[(h.peer, h.model)] = _peer_server(h.peer)
            refused = self.refusal(records[h.peer], h.model)
            if h.ready and refused is None and entry.tunnel is None:
                entry.tunnel = TunnelListener(self.mesh, h.peer, StreamKind.HTTP, {"model": h.model})
                entry.server.base_url = f"http://127.0.0.1:{await entry.tunnel.start()}"
            entry.ready = h.ready and refused is None and entry.tunnel is not None
            entry.words = refused or h.words
            entry.server.rtt_ms = _rtt_of(rtt, h.peer)
            route = routes.setdefault(h.model, Route(h.model, [], ()))
            route.servers.append(entry.server)
            route.aliases = tuple(dict.fromkeys((*route.aliases, *h.aliases)))
        self.table.set_routes(list(routes.values()))

    async def close(self) -> None:
        for entry in self._peers.values():
            if entry.tunnel is not None:
                await entry.tunnel.close()
        self._peers.clear()


def _peer_server(peer: str) -> _PeerServer:
    """An entry whose server reads its state from the entry (updated on every rewrite)."""
    entry = _PeerServer(Server(peer, "", is_ready=lambda: False))
    entry.server.is_ready = lambda: entry.ready
    entry.server.status = lambda: entry.words
    return entry


def _rtt_of(rtt: dict[str, float | None], peer: str) -> Callable[[], float | None]:
    value = rtt.get(peer)
    return lambda: value
