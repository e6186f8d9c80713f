"""The far end of HTTP tunnels: a peer's proxy sends one request per stream for a model
this node serves; it is checked (api.guard.tunnelled_request) before llama-server sees it.

The proxy on the peer already refuses what the mesh does not serve, but a member or a
client-token holder can open HTTP streams with its own code: so the route, the body
length and the requests in flight are checked again here, and the stream carries exactly
one request (llama-server is told `Connection: close`; bytes past the body are dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from mesh_llm.api.guard import MAX_TUNNEL_HEAD, RequestRefused, tunnelled_request
from mesh_llm.api.proxy import MAX_BODY, Gate  # the proxy's own limit and request count
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.transport import iroh
from mesh_llm.mesh.tunnels import CHUNK, relay
from mesh_llm.mesh.wire import FramedReader, StreamKind, get_str

HEAD_SECS = 30.0  # a request head must arrive within this (our proxy sends it at once)


def http_reply(status: int, message: str, kind: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP response in the proxy's JSON error shape: a peer's proxy passes it on as is."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    extra = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _BodyThenEnd:
    """The peer's side of the stream as llama-server may see it: `remaining` body bytes, then
    nothing more. Whatever follows is read and dropped, so the peer leaving (end of stream)
    still ends the relay and tells llama-server its client went away."""

    def __init__(self, recv: Any, remaining: int) -> None:
        self.recv, self.remaining = recv, remaining

    async def read(self, size_limit: int) -> bytes:
        if self.remaining > 0:
            data: bytes = await self.recv.read(min(size_limit, self.remaining))
            self.remaining -= len(data)
            return data
        while await self.recv.read(size_limit):
            pass
        return b""

    async def stop(self, code: int) -> None:
        await self.recv.stop(code)


async def _read_head(reader: FramedReader) -> tuple[bytes, bytes]:
    """(request head through its blank line, bytes after it); RequestRefused if too long."""
    buf = bytearray(reader.leftover())
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_TUNNEL_HEAD:
            raise RequestRefused(431, f"request head exceeds {MAX_TUNNEL_HEAD} bytes")
        data = await reader.recv.read(CHUNK)
        if not data:
            raise RequestRefused(400, "stream ended before the request head")
        buf += data
    return bytes(buf[: end + 4]), bytes(buf[end + 4 :])


def serve_http_tunnels(mesh: Mesh, local_server: Callable[[str], tuple[int, Gate] | None], has_room: Callable[[Gate], bool]) -> None:
    """Answer HTTP streams with the named model's local llama-server, one checked request each
    (counted at the server's gate; 429 when it is full, as the proxy would answer)."""

    async def answer(send: Any, reply: bytes) -> None:
        with contextlib.suppress(iroh.IrohError):
            await send.write_all(reply)
            await send.finish()

    async def handler(peer_id: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        model = get_str(header, "model", 256)
        server = local_server(model)
        if server is None:
            await answer(send, http_reply(503, f"model {model[:200]} is not served by this node right now; retry shortly", "unavailable_error", 5))
            return
        port, gate = server
        try:
            head, rest = await asyncio.wait_for(_read_head(reader), HEAD_SECS)
            upstream_head, body_length = tunnelled_request(head, MAX_BODY)
        except RequestRefused as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            await answer(send, http_reply(exc.status, str(exc), kind))
            return
        except TimeoutError:
            await answer(send, http_reply(408, f"no request within {HEAD_SECS:.0f} s", "invalid_request_error"))
            return
        if not has_room(gate):
            await answer(send, http_reply(429, f"model {model[:200]} has as many requests as it takes at once on this node; retry shortly", "rate_limit_error", 2))
            return
        gate.enter()
        try:
            try:
                tcp_reader, tcp_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await answer(send, http_reply(503, f"model {model[:200]} is restarting on this node; retry shortly", "unavailable_error", 5))
                return
            body = rest[:body_length]
            await relay(tcp_reader, tcp_writer, send, _BodyThenEnd(reader.recv, body_length - len(body)), upstream_head + body)
        finally:
            gate.leave()

    mesh.on_stream(StreamKind.HTTP, handler)
