"""The proxy's table, written in one place: every model this node answers for, with all
its servers: its own llama-server when it runs the model, and a tunnel to each peer
that serves it (peers whose model is still loading or waiting are listed too, not
ready, so a request gets 503 with their reason instead of a 404).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh_llm.api.proxy import Route, Server, UpstreamTable
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import Member
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


class MeshRoutes:
    """Keeps one HTTP tunnel per (peer, model) that peer serves, and rewrites the table."""

    def __init__(self, mesh: Mesh, table: UpstreamTable) -> None:
        self.mesh, self.table = mesh, table
        self._tunnels: dict[tuple[str, str], tuple[TunnelListener, Server]] = {}

    async def sync(self, local: dict[str, LocalRoute]) -> None:
        members = self.mesh.members()
        rtt = {m.record.id: m.rtt_ms for m in members}
        hosted = hosted_by_peers(members)
        wanted = {(h.peer, h.model) for h in hosted if h.ready}
        for key in [k for k in self._tunnels if k not in wanted]:
            tunnel, _ = self._tunnels.pop(key)
            await tunnel.close()
        routes: dict[str, Route] = {}
        for model, entry in local.items():
            routes[model] = Route(model, [entry.server], entry.aliases)
        for h in hosted:
            if h.ready and (h.peer, h.model) not in self._tunnels:
                tunnel = TunnelListener(self.mesh, h.peer, StreamKind.HTTP, {"model": h.model})
                await tunnel.start()
                self._tunnels[(h.peer, h.model)] = (tunnel, Server(h.peer, f"http://127.0.0.1:{tunnel.port}", _yes, _said("ready"), _rtt_of(rtt, h.peer)))
            server = self._tunnels[(h.peer, h.model)][1] if h.ready else Server(h.peer, "", _no, _said(h.words))
            server.rtt_ms = _rtt_of(rtt, h.peer)
            route = routes.setdefault(h.model, Route(h.model, [], ()))
            route.servers.append(server)
            route.aliases = tuple(dict.fromkeys((*route.aliases, *h.aliases)))
        self.table.set_routes(list(routes.values()))

    async def close(self) -> None:
        for tunnel, _ in self._tunnels.values():
            await tunnel.close()
        self._tunnels.clear()


def _yes() -> bool:
    return True


def _no() -> bool:
    return False


def _said(words: str) -> Callable[[], str]:
    return lambda: words


def _rtt_of(rtt: dict[str, float | None], peer: str) -> Callable[[], float | None]:
    value = rtt.get(peer)
    return lambda: value
