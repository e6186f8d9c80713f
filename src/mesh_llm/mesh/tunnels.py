"""TCP over QUIC: local listeners that carry byte streams to a peer, and the far end.

A `TunnelListener` listens on 127.0.0.1:<ephemeral>; every TCP connection it
accepts becomes one QUIC stream to the peer, whose handler connects the stream
to a loopback port of its own (a model's llama-server, or its rpc-server).
End of stream in either direction ends the whole relay: HTTP and RPC clients
never half-close, and a full close is what tells llama-server a client left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from mesh_llm.mesh.mesh import Mesh, PeerGone
from mesh_llm.mesh.transport import iroh
from mesh_llm.mesh.wire import FramedReader, StreamKind, get_str

CHUNK = 256 * 1024


async def _tcp_to_quic(reader: asyncio.StreamReader, send: Any) -> None:
    while data := await reader.read(CHUNK):
        await send.write_all(data)
    await send.finish()


async def _quic_to_tcp(recv: Any, first: bytes, writer: asyncio.StreamWriter) -> None:
    if first:
        writer.write(first)
    while data := await recv.read(CHUNK):
        writer.write(data)
        await writer.drain()
    await writer.drain()


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, send: Any, recv: Any, first: bytes = b"") -> None:
    """Pump both ways until either side ends, then close both."""
    up = asyncio.ensure_future(_tcp_to_quic(reader, send))
    down = asyncio.ensure_future(_quic_to_tcp(recv, first, writer))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        if up.cancelled() or up.exception() is not None:  # our side did not finish cleanly
            with contextlib.suppress(Exception):
                await send.reset(0)
        with contextlib.suppress(Exception):
            await recv.stop(0)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class TunnelListener:
    """127.0.0.1:<port> → a peer, one QUIC stream per TCP connection."""

    def __init__(self, mesh: Mesh, peer_id: str, kind: StreamKind, header: dict[str, Any]) -> None:
        self.mesh, self.peer_id, self.kind, self.header = mesh, peer_id, kind, header
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            send, recv = await self.mesh.open_stream(self.peer_id, self.kind, self.header)
            await relay(reader, writer, send, recv)
        except PeerGone:
            writer.close()  # the client sees a closed connection: the proxy answers 502
        except asyncio.CancelledError:
            pass  # closing the listener; asyncio's stream callback must not see the cancellation
        finally:
            self._conns.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None


UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 5\r\nContent-Length: %d\r\n\r\n%s"
)


def _unavailable(model: str) -> bytes:
    body = b'{"error":{"message":"model %s is not served by this node right now; retry shortly","type":"unavailable_error","code":503}}' % model.encode()[:200]
    return UNAVAILABLE % (len(body), body)


def serve_http_tunnels(mesh: Mesh, local_port: Callable[[str], int | None]) -> None:
    """Answer HTTP streams with the named model's local llama-server."""

    async def handler(peer_id: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        model = get_str(header, "model", 256)
        port = local_port(model)
        if port is None:
            await send.write_all(_unavailable(model))
            await send.finish()
            return
        await _connect_and_relay(port, send, reader)

    mesh.on_stream(StreamKind.HTTP, handler)


def serve_rpc_tunnels(mesh: Mesh, local_port: Callable[[], int | None]) -> None:
    """Answer RPC streams with this node's loopback rpc-server (used by split serving)."""

    async def handler(peer_id: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        port = local_port()
        if port is None:
            await send.reset(2)
            return
        await _connect_and_relay(port, send, reader)

    mesh.on_stream(StreamKind.RPC, handler)


async def _connect_and_relay(port: int, send: Any, reader: FramedReader) -> None:
    try:
        tcp_reader, tcp_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        with contextlib.suppress(iroh.IrohError):
            await send.reset(2)
        return
    await relay(tcp_reader, tcp_writer, send, reader.recv, reader.leftover())
