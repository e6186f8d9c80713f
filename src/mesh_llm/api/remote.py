"""Models served elsewhere in the mesh, made reachable through this node's proxy.

Each (peer, model) pair the routing rule picks gets a loopback TunnelListener;
the proxy's upstream table points at it like at any local llama-server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from mesh_llm.api.proxy import Upstream, UpstreamTable
from mesh_llm.api.routing import choose_servers
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.tunnels import TunnelListener
from mesh_llm.mesh.wire import StreamKind


def _served_by(peer: str) -> Callable[[], str]:
    return lambda: f"served by {peer[:8]}"


class RemoteModels:
    def __init__(self, mesh: Mesh, table: UpstreamTable) -> None:
        self.mesh = mesh
        self.table = table
        self.local_models: set[str] = set()  # served here: never routed to a peer
        self.routes: dict[str, tuple[str, TunnelListener, Upstream]] = {}  # model -> (peer, tunnel, proxy entry)
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # sync runs from the event follower and from start-up

    def start(self) -> None:
        events = self.mesh.subscribe()

        async def follow() -> None:
            while True:
                await events.get()
                while not events.empty():  # coalesce bursts (a join brings several events)
                    events.get_nowait()
                await self.sync()

        self._task = asyncio.ensure_future(follow())

    async def claim(self, model: str) -> None:
        """This node serves `model` itself from now on: drop any route to a peer for it."""
        self.local_models.add(model)
        await self.sync()

    async def release(self, model: str) -> None:
        """This node stopped serving `model`: route it to whoever in the mesh serves it."""
        self.local_models.discard(model)
        await self.sync()

    def served_by(self) -> dict[str, list[tuple[str, float | None]]]:
        out: dict[str, list[tuple[str, float | None]]] = {}
        for m in self.mesh.members():
            for model in m.record.models_served:
                out.setdefault(model, []).append((m.record.id, m.rtt_ms))
        return out

    async def sync(self) -> None:
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        wanted = choose_servers(self.local_models, self.served_by(), {m: peer for m, (peer, _, _) in self.routes.items()})
        for model in list(self.routes):
            if wanted.get(model) != self.routes[model][0]:
                _, tunnel, entry = self.routes.pop(model)
                self.table.remove(model, only=entry)  # never an entry the model's runner added meanwhile
                await tunnel.close()
        for model, peer in wanted.items():
            if model in self.routes:
                continue
            tunnel = TunnelListener(self.mesh, peer, StreamKind.HTTP, {"model": model})
            await tunnel.start()
            entry = Upstream(model, f"http://127.0.0.1:{tunnel.port}", is_ready=lambda: True, status=_served_by(peer))
            self.routes[model] = (peer, tunnel, entry)
            self.table.add(entry)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, tunnel, _ in self.routes.values():
            await tunnel.close()
        self.routes.clear()
