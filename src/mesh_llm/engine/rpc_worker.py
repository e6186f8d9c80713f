"""The RPC worker (ggml-rpc-server): command line and a safe idle probe.

Every node with a model runs one, bound to 127.0.0.1 only: it has no
authentication, so peers reach it solely through the mesh's RPC tunnel.
GGML_RPC_SERVER_GGUF names the node's own copy of the model, from which our
patched worker reads weights instead of receiving them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

HELLO = 14
CONN_CAPS = 24


def rpc_worker_argv(binary: Path, port: int, device: str | None = None) -> list[str]:
    argv = [str(binary), "--host", "127.0.0.1", "--port", str(port)]
    return argv + ["--device", device] if device else argv


def rpc_worker_env(model: Path | None) -> dict[str, str]:
    return {"GGML_RPC_SERVER_GGUF": str(model)} if model else {}


async def rpc_hello(port: int, timeout: float = 2.0) -> tuple[int, int, int] | None:
    """The worker's protocol version, or None. Only while no host is attached:
    a worker serves one client at a time and would leave a second one unanswered."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(struct.pack("<BQ", HELLO, CONN_CAPS) + bytes(CONN_CAPS))
        await writer.drain()
        size = struct.unpack("<Q", await asyncio.wait_for(reader.readexactly(8), timeout))[0]
        if size < 3:
            return None
        reply = await asyncio.wait_for(reader.readexactly(size), timeout)
        return reply[0], reply[1], reply[2]
    except (TimeoutError, OSError, asyncio.IncompleteReadError, struct.error):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
