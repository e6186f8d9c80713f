"""In-process meshes on loopback with relays off, for fast tests of the mesh layer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from mesh_llm.mesh.identity import MeshCredentials, new_secret_key
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import HostedModel, PeerRecord
from mesh_llm.mesh.transport import TransportConfig

LOOPBACK = TransportConfig.loopback()
_T = TypeVar("_T")


def make_mesh(creds: MeshCredentials, role: str = "standby", name: str = "n", served: tuple[str, ...] = ()) -> Mesh:
    logs: list[str] = []
    hosting = tuple(HostedModel(model, "ready") for model in served)
    m = Mesh(secret_key=new_secret_key(), creds=creds, me=PeerRecord(id="", role=role, hostname=name, hosting=hosting), transport=LOOPBACK, log=logs.append)
    m.logs = logs  # type: ignore[attr-defined]
    return m


async def wait_until(cond, timeout: float = 30.0, step: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


class LoopThread:
    """An asyncio loop on a thread, for in-process meshes next to real node processes
    (an attacker's, or a member whose loop a test stalls); the test stays synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 120) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
