"""In-process meshes on loopback with relays off, for fast tests of the mesh layer."""

from __future__ import annotations

import asyncio
import time

from mesh_llm.mesh.identity import MeshCredentials, new_secret_key
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import HostedModel, PeerRecord
from mesh_llm.mesh.transport import TransportConfig

LOOPBACK = TransportConfig.loopback()


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
