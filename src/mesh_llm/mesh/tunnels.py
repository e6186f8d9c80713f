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
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mesh_llm.mesh.mesh import Mesh, PeerGone
from mesh_llm.mesh.rpc_traffic import RpcTraffic
from mesh_llm.mesh.transport import describe, iroh
from mesh_llm.mesh.wire import FramedReader, StreamKind, get_str
from mesh_llm.text import printable

CHUNK = 256 * 1024


Tap = Callable[[bytes], None]


async def _tcp_to_quic(reader: asyncio.StreamReader, send: Any, tap: Tap | None = None, delay_s: float = 0.0) -> None:
    if delay_s > 0:
        await _delayed_tcp_to_quic(reader, send, tap, delay_s)
        return
    while data := await reader.read(CHUNK):
        if tap:
            tap(data)
        await send.write_all(data)
    await send.finish()


async def _delayed_tcp_to_quic(reader: asyncio.StreamReader, send: Any, tap: Tap | None, delay_s: float) -> None:
    """Like a longer wire: every chunk leaves `delay_s` after it arrived, in order, and
    whatever is due by then leaves with it. For measuring how latency adds up (benchmarks)."""
    pending: deque[tuple[float, bytes]] = deque()  # (due time, data); b"" marks the end
    arrived = asyncio.Event()

    async def forward() -> None:
        while True:
            while not pending:
                arrived.clear()
                await arrived.wait()
            if (wait := pending[0][0] - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            batch = []
            while pending and pending[0][0] <= now:
                batch.append(pending.popleft()[1])
            if b"" in batch:
                if any(batch):
                    await send.write_all(b"".join(batch))
                return
            await send.write_all(b"".join(batch))

    forwarder = asyncio.ensure_future(forward())
    try:
        while data := await reader.read(CHUNK):
            if tap:
                tap(data)
            pending.append((time.monotonic() + delay_s, data))
            arrived.set()
        pending.append((time.monotonic() + delay_s, b""))
        arrived.set()
        await forwarder
    finally:
        forwarder.cancel()
    await send.finish()


async def _quic_to_tcp(recv: Any, first: bytes, writer: asyncio.StreamWriter, tap: Tap | None = None) -> None:
    if first:
        writer.write(first)
    while data := await recv.read(CHUNK):
        if tap:
            tap(data)
        writer.write(data)
        await writer.drain()
    await writer.drain()


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, send: Any, recv: Any, first: bytes = b"",
                tap: Tap | None = None, answer_tap: Tap | None = None, delay_s: float = 0.0) -> BaseException | None:
    """Pump both ways until either side ends, then close both. `tap` sees what goes out, `answer_tap` what comes back.
    Returns what ended the way back, if it was an error (e.g. the peer reset the stream)."""
    up = asyncio.ensure_future(_tcp_to_quic(reader, send, tap, delay_s))
    down = asyncio.ensure_future(_quic_to_tcp(recv, first, writer, answer_tap))
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
    return down.exception() if down.done() and not down.cancelled() else None


class TunnelListener:
    """127.0.0.1:<port> → a peer, one QUIC stream per TCP connection.

    `traffic` counts the RPC commands sent through it; `delay_s` holds every
    outgoing chunk back that long (injected latency for benchmarks); `on_refused` hears why
    the peer reset a stream before it answered anything (it refused it)."""

    def __init__(self, mesh: Mesh, peer_id: str, kind: StreamKind, header: dict[str, Any], *, traffic: RpcTraffic | None = None, delay_s: float = 0.0,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.mesh, self.peer_id, self.kind, self.header = mesh, peer_id, kind, header
        self.traffic, self.delay_s, self.on_refused = traffic, delay_s, on_refused
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
            tap, answer_tap = self._taps()
            answered = [False]

            def seen(data: bytes) -> None:
                answered[0] = True
                if answer_tap:
                    answer_tap(data)

            ended = await relay(reader, writer, send, recv, tap=tap, answer_tap=seen, delay_s=self.delay_s)
            if isinstance(ended, iroh.IrohError) and not answered[0] and self.on_refused is not None:
                self.on_refused(describe(ended))
        except PeerGone:
            writer.close()  # the client sees a closed connection: the proxy answers 502
        except asyncio.CancelledError:
            pass  # closing the listener; asyncio's stream callback must not see the cancellation
        finally:
            self._conns.discard(task)

    def _taps(self) -> tuple[Tap | None, Tap | None]:
        """One RPC parser per connection: commands out, answer times back."""
        if self.traffic is None:
            return None, None
        parser = self.traffic.connection()
        return (lambda data: parser.feed(data, time.monotonic())), (lambda data: parser.answered(time.monotonic()))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None


FIRST_COMMAND_SECS = 10.0  # an admitted RPC stream must send its first command within this
RECHECK_SECS = 5.0  # while attached, the host must still be the one this node's plan lends to


class RpcAttachments:
    """Which host each lent worker serves (pure bookkeeping): one host peer at a time.

    llama.cpp's RPC client keeps one connection per endpoint, but drops and re-opens it
    during start-up (each `get_dispatcher` whose last user is gone closes its socket), so
    a host's next connection may arrive while its last one is still closing: several
    streams of the attached host are let through (ggml-rpc-server takes them one by one);
    anyone else is refused until the host's last stream has ended."""

    def __init__(self) -> None:
        self._by_model: dict[str, tuple[str, int]] = {}  # model -> (host peer, streams open)

    def holder(self, model: str) -> str | None:
        held = self._by_model.get(model)
        return held[0] if held else None

    def attach(self, model: str, peer: str) -> str | None:
        """Count a stream of `peer` for `model`'s worker, or say why not."""
        held = self._by_model.get(model)
        if held is not None and held[0] != peer:
            return f"the worker serves {held[0][:8]} now (one host at a time)"
        self._by_model[model] = (peer, (held[1] if held else 0) + 1)
        return None

    def detach(self, model: str, peer: str) -> None:
        held = self._by_model.get(model)
        if held is not None and held[0] == peer:
            if held[1] <= 1:
                del self._by_model[model]
            else:
                self._by_model[model] = (peer, held[1] - 1)


def serve_rpc_tunnels(mesh: Mesh, lent_port: Callable[[str, str], int | str | None], log: Callable[[str], None] | None = None,
                      first_command_secs: float = FIRST_COMMAND_SECS, recheck_secs: float = RECHECK_SECS) -> RpcAttachments:
    """Answer RPC streams with the RPC worker this node lends for the named model, to the host
    its own plan lends it to (`lent_port`: the port, or why not). Everyone else, clients
    first, gets the stream reset and a line in the log; so does an admitted stream that sends
    no command within `first_command_secs` (llama-server sends its HELLO at once; a split idle
    between requests is not cut: that bound is on a stream's first bytes only), and one whose
    host this node's plan no longer lends to (checked every `recheck_secs`)."""
    say = log or mesh.log
    attached = RpcAttachments()

    async def handler(peer_id: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        model = printable(get_str(header, "model", 256, ""), 100)  # it goes into log lines
        if mesh.is_client(peer_id):
            refusal: str | None = "a client may not use RPC workers"
            port = None
        else:
            lent = lent_port(peer_id, model)
            port, refusal = (lent, None) if isinstance(lent, int) else (None, lent or "this node lends no worker for it")
            if port is not None:
                refusal = attached.attach(model, peer_id)
        if port is None or refusal is not None:
            say(f"Refused an RPC stream from {peer_id[:8]} for {model[:100] or '?'}: {refusal}")
            with contextlib.suppress(iroh.IrohError):
                await send.reset(2)
            return
        try:
            first = reader.leftover()
            if not first:
                try:
                    first = await asyncio.wait_for(reader.recv.read(CHUNK), first_command_secs)
                except TimeoutError:
                    say(f"Closed an RPC stream from {peer_id[:8]} for {model[:100]}: no command within {first_command_secs:.0f} s")
                    with contextlib.suppress(iroh.IrohError):
                        await send.reset(2)
                    return
                if not first:
                    return
            await _relay_while(port, send, reader, first, lambda: lent_port(peer_id, model), recheck_secs,
                               lambda why: say(f"Closed the RPC stream of {peer_id[:8]} for {model[:100]}: {why}"))
        finally:
            attached.detach(model, peer_id)

    mesh.on_stream(StreamKind.RPC, handler)
    return attached


async def _relay_while(port: int, send: Any, reader: FramedReader, first: bytes, still: Callable[[], int | str | None], every: float,
                       closed: Callable[[str], None]) -> None:
    """Relay to the worker while `still()` gives a port; once it gives a reason, end the stream."""
    relaying = asyncio.ensure_future(_connect_and_relay(port, send, reader, first))
    try:
        while True:
            done, _ = await asyncio.wait({relaying}, timeout=every)
            if done:
                return
            now = still()
            if not isinstance(now, int):
                closed(now or "its worker is no longer lent")
                return
    finally:
        relaying.cancel()
        with contextlib.suppress(BaseException):
            await relaying


async def _connect_and_relay(port: int, send: Any, reader: FramedReader, first: bytes | None = None) -> None:
    try:
        tcp_reader, tcp_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        with contextlib.suppress(iroh.IrohError):
            await send.reset(2)
        return
    await relay(tcp_reader, tcp_writer, send, reader.recv, reader.leftover() if first is None else first)
