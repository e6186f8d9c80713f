"""The mesh shell: the one owner of the iroh endpoint, its connections and gossip.

Decisions (who is a member, whom to dial, which of two connections survives)
live in `peers.py`; this module does the sockets and timers around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mesh_llm.mesh import handshake
from mesh_llm.mesh.admission import ADMISSION_SECS, MAX_PENDING_HANDSHAKES, LogLimiter
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.peers import (
    HEARTBEAT_SECS,
    MAX_DIAL_ADDRS,
    MAX_MEMBERS,
    REDIAL_BACKOFF_SECS,
    DialHint,
    DialLimiter,
    EventKind,
    Member,
    Membership,
    MeshEvent,
    PeerRecord,
    as_client,
    decode_gossip,
    encode_gossip,
    is_dial_addr,
    keep_new_connection,
    own_dial_addrs,
    rank_hints,
)
from mesh_llm.mesh.token import InviteToken
from mesh_llm.mesh.transport import TransportConfig, bind_endpoint, describe, endpoint_addr, iroh
from mesh_llm.mesh.wire import ALPN, FramedReader, ProtocolError, StreamKind, encode_frame, stream_prefix
from mesh_llm.text import printable

DIAL_SECS = 10.0
EXCHANGE_SECS = 3.0
FIRST_BYTE_SECS = 10.0  # an inbound stream must say what it is within this
REJOIN_SECS = 10.0  # with no members left, re-dial the invite tokens this often
CLIENT_STREAMS = frozenset({StreamKind.GOSSIP, StreamKind.HTTP, StreamKind.BLACKBOARD})  # all a client-token peer may open
DISCOVERY_TTL_SECS = 3 * HEARTBEAT_SECS  # a peer mentioned in gossip is worth dialing this long
MAX_KNOWN_IDS = 2 * MAX_MEMBERS  # members (and token endpoints) this run remembers, for outside hints

# (peer id, header, send stream, reader positioned after the header) -> None
StreamHandler = Callable[[str, dict[str, Any], Any, FramedReader], Awaitable[None]]


class PeerGone(Exception):
    pass


@dataclass(eq=False)
class Link:
    conn: Any
    peer_id: str
    incarnation: str
    dialer: str
    client: bool = False  # admitted with a client token: API use only
    exchanging: bool = False  # a gossip exchange is in flight: don't stack another
    rx_datagrams: int = 0  # packets received on the connection at the last heartbeat


class Mesh:
    def __init__(self, *, secret_key: bytes, creds: MeshCredentials, me: PeerRecord, transport: TransportConfig, log: Callable[[str], None]) -> None:
        self.secret_key = secret_key
        self.creds = creds
        self.me = replace(me, incarnation=me.incarnation or secrets.token_hex(8))
        self.transport = transport
        self.log = log
        self.endpoint: Any = None
        self.my_id = b""
        self.membership = Membership(self_id="")
        self.links: dict[str, Link] = {}
        self.hints_from: dict[str, tuple[list[DialHint], float]] = {}  # member id -> the dial hints of its last frame
        self.hinted_dials = DialLimiter()
        self.refusal_log = LogLimiter()
        self.pending_handshakes = 0
        self.handlers: dict[StreamKind, StreamHandler] = {}
        self.join_tokens: list[InviteToken] = []
        self.known_ids: OrderedDict[str, None] = OrderedDict()  # ids that were members this run: `hint` may redial them
        self.outside_tries: dict[str, tuple[tuple[str, ...], float]] = {}  # id -> addrs of its last outside hint, when
        self._subscribers: list[asyncio.Queue[MeshEvent]] = []
        self._dialing: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.endpoint = await bind_endpoint(self.transport, self.secret_key)
        self.my_id = self.endpoint.id().to_bytes()
        addr = self.endpoint.addr()
        # only what peers accept: a machine with many interfaces must not get its record refused
        self.me = replace(self.me, id=self.my_id.hex(), addrs=own_dial_addrs(addr.direct_addresses()), relay=addr.relay_url() or "")
        self.membership = Membership(self_id=self.me.id)
        self._spawn(self._accept_loop())
        self._spawn(self._heartbeat_loop())

    def token(self, kind: str = "member") -> str | None:
        """An invite token to this node: a member's, or a client's (API use only). A node that
        joined with a client token can hand out neither."""
        if self.creds.kind != "member":
            return None
        creds = self.creds if kind == "member" else self.creds.for_clients()
        return InviteToken(creds, self.my_id, self.me.addrs, self.me.relay or None).encode()

    async def close(self) -> None:
        """Graceful leave: peers see the connection close with reason 'leaving' at once."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for link in list(self.links.values()):
            with contextlib.suppress(Exception):
                link.conn.close(0, b"leaving")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.endpoint is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.endpoint.close(), 3)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- public surface ----------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[MeshEvent]:
        q: asyncio.Queue[MeshEvent] = asyncio.Queue()
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[MeshEvent]) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)

    def on_stream(self, kind: StreamKind, handler: StreamHandler) -> None:
        self.handlers[kind] = handler

    def members(self) -> list[Member]:
        return list(self.membership.members.values())

    def is_client(self, peer_id: str) -> bool:
        """A client may use the mesh's API and nothing else (no RPC, never a server): it came
        with a client token, or says it is one. Unknown peers count as clients."""
        link = self.links.get(peer_id)
        member = self.membership.members.get(peer_id)
        return link is None or link.client or member is None or member.record.role == "client"

    def update_self(self, **changes: Any) -> None:
        """Change this node's record and tell every member now rather than at the next heartbeat."""
        new = replace(self.me, **changes)
        if new != self.me:
            self.me = new
            for link in list(self.links.values()):
                self._exchange_soon(link)

    async def open_stream(self, peer_id: str, kind: StreamKind, header: dict[str, Any]) -> tuple[Any, Any]:
        link = self.links.get(peer_id)
        if link is None:
            raise PeerGone(f"peer {peer_id[:8]} is not connected")
        try:
            bi = await link.conn.open_bi()
            send = bi.send()
            await send.write_all(stream_prefix(kind, header))
        except iroh.IrohError as exc:
            raise PeerGone(f"peer {peer_id[:8]}: {describe(exc)}") from None
        return send, bi.recv()

    def hint(self, peer_id: str, addrs: Sequence[str]) -> bool:
        """Addresses for a peer heard of outside the mesh (a LAN announcement naming this mesh):
        dial it there if it was a member this run (or a join token's member) and is not connected.

        Anyone on the LAN can announce anything, so: unknown ids are ignored, at most
        MAX_DIAL_ADDRS valid addresses are used, the same addresses are retried only after
        REDIAL_BACKOFF_SECS, and the dial counts against the hinted-dial limits. The handshake
        still proves the mesh secret both ways. Returns whether a dial started."""
        addrs = tuple(a for a in addrs if isinstance(a, str) and is_dial_addr(a))[:MAX_DIAL_ADDRS]
        if not addrs or peer_id == self.me.id or peer_id not in self.known_ids or self._closing:
            return False
        if peer_id in self.links or peer_id in self._dialing:
            return False
        now = time.monotonic()
        last = self.outside_tries.get(peer_id)
        if last is not None and last[0] == addrs and now - max(last[1], self.membership.dial_failed_at.get(peer_id, 0.0)) < REDIAL_BACKOFF_SECS:
            return False
        if not self.hinted_dials.try_start(now):
            return False
        self.outside_tries[peer_id] = (addrs, now)
        self._dial_soon(peer_id, addrs, None, hinted=True)
        return True

    def _know(self, peer_id: str) -> None:
        self.known_ids[peer_id] = None
        self.known_ids.move_to_end(peer_id)
        while len(self.known_ids) > MAX_KNOWN_IDS:
            gone, _ = self.known_ids.popitem(last=False)
            self.outside_tries.pop(gone, None)

    async def join(self, tokens: list[InviteToken]) -> None:
        """Dial every token; succeed if one admits us, else raise Refused with the reason."""
        self.join_tokens = list(tokens)
        for tok in tokens:
            if tok.endpoint_id != self.my_id:
                self._know(tok.endpoint_id.hex())
        errors: list[str] = []
        for tok in tokens:
            if tok.endpoint_id == self.my_id:
                errors.append("that token is this node's own")
                continue
            try:
                await self._dial(tok.endpoint_id.hex(), tok.addrs, tok.relay_url)
                return
            except handshake.Refused as exc:
                errors.append(str(exc))
        raise handshake.Refused(errors[-1] if errors else "no invite token given")

    # -- connections -----------------------------------------------------------

    def _say(self, line: str) -> None:
        self.log(printable(line, 2000))  # lines quote peers (names, error texts): no control characters

    def _say_limited(self, kind: str, line: str) -> None:
        """Refusals and malformed streams: anyone can cause them, so at most one line per kind now and then."""
        limited = self.refusal_log.line(kind, line, time.monotonic())
        if limited is not None:
            self._say(limited)

    def _emit(self, event: MeshEvent | None) -> None:
        if event is None:
            return
        p = event.peer
        who = f"{p.role} {p.id[:8]} ({printable(p.hostname, 64) or '?'})"
        if event.kind == EventKind.JOINED:
            served = ", ".join(printable(m, 80) for m in p.models_served) or "nothing yet"
            self._say(f"Peer joined: {who}, serving {served}")
        elif event.kind == EventKind.LEFT:
            self._say(f"Peer left: {who}: {event.reason}")
        for q in self._subscribers:
            q.put_nowait(event)

    async def _dial(self, peer_id: str, addrs: tuple[str, ...] | list[str], relay: str | None) -> None:
        self._dialing.add(peer_id)
        conn = None
        try:
            try:
                addr = endpoint_addr(peer_id, addrs, relay)
            except iroh.IrohError as exc:  # e.g. a hinted id that is no public key
                raise handshake.Refused(f"cannot dial {peer_id[:8]}: {describe(exc)}") from None
            try:
                conn = await asyncio.wait_for(self.endpoint.connect(addr, ALPN), DIAL_SECS)
            except (TimeoutError, iroh.IrohError) as exc:
                where = ", ".join(addrs) or relay or "?"
                raise handshake.Refused(f"could not reach mesh member {peer_id[:8]} at {where} ({describe(exc)}): is it running, and is the token current?") from None
            try:
                admitted = await handshake.with_timeout(handshake.dial_handshake(conn, self.creds, self.my_id, self.me))
            except (ProtocolError, iroh.IrohError) as exc:
                raise handshake.Refused(f"mesh member {peer_id[:8]} broke the handshake: {describe(exc)}") from None
            self._add_link(conn, admitted.record, dialer=self.me.id, client=admitted.kind == "client")
            conn = None
        except handshake.Refused as exc:
            self.membership.note_dial_failure(peer_id, time.monotonic())
            if conn is not None:
                await self._hang_up(conn, exc.told_peer)
                conn = None
            raise
        finally:
            self._dialing.discard(peer_id)
            if conn is not None:
                conn.close(1, b"refused")

    async def _accept_loop(self) -> None:
        while True:
            incoming = await self.endpoint.accept_next()
            if incoming is None:
                return
            if self.pending_handshakes >= MAX_PENDING_HANDSHAKES:
                # strangers that never finish must not hold more: turn the rest away unread
                self._say_limited("busy", f"Refused a connection at once: {MAX_PENDING_HANDSHAKES} handshakes already under way")
                self._spawn(self._refuse(incoming))
                continue
            self.pending_handshakes += 1
            self._spawn(self._accept_one(incoming))

    @staticmethod
    async def _refuse(incoming: Any) -> None:
        with contextlib.suppress(Exception):
            await incoming.refuse()

    async def _accept_one(self, incoming: Any) -> None:
        conn = None

        async def admit() -> handshake.Admitted:
            nonlocal conn
            conn = await (await incoming.accept()).connect()
            return await handshake.accept_handshake(conn, self.creds, self.my_id, self.me, self.membership.has_room_for)

        try:
            # one deadline for the whole admission: a stranger cannot stretch it step by step
            admitted = await handshake.with_timeout(admit(), ADMISSION_SECS)
        except handshake.Refused as exc:
            who = conn.remote_id().to_bytes().hex()[:8] if conn is not None else "?"
            self._say_limited(f"refused: {exc}", f"Refused a connection from {who}: {exc}")  # each reason its own allowance
            if conn is not None:
                await self._hang_up(conn, exc.told_peer)
            return
        except Exception as exc:  # noqa: BLE001 - whatever a stranger sends, it ends here, never in a traceback
            self._say_limited("dropped", f"Dropped a connection that failed the handshake: {describe(exc)}")
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close(1, b"bad handshake")
            return
        finally:
            self.pending_handshakes -= 1
        assert conn is not None
        dialer = conn.remote_id().to_bytes().hex()
        self._add_link(conn, admitted.record, dialer=dialer, client=admitted.kind == "client")

    @staticmethod
    async def _hang_up(conn: Any, told_peer: bool) -> None:
        """Close a refused connection; if we sent the reason, let it reach the peer first."""
        if told_peer:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.closed(), 2)
        conn.close(1, b"refused")

    def _add_link(self, conn: Any, record: PeerRecord, dialer: str, client: bool = False) -> None:
        if not self.membership.has_room_for(record.id, client or record.role == "client"):
            self._say_limited("full", f"Refused {record.id[:8]}: this node already has as many {'clients' if client or record.role == 'client' else 'members'} as it admits")
            conn.close(4, b"mesh full")
            return
        link = Link(conn, record.id, record.incarnation, dialer, client)
        if client:
            record = as_client(record)
        old = self.links.get(record.id)
        if old is not None:
            lower = min(self.me.id, record.id)
            if not keep_new_connection(old.incarnation, link.incarnation, old.dialer, link.dialer, lower):
                conn.close(2, b"duplicate")
                return
            self.links.pop(record.id)
            old.conn.close(2, b"duplicate")
            if old.incarnation != link.incarnation:
                self._emit(self.membership.remove(record.id, "restarted"))
        self.links[record.id] = link
        if not client and record.role != "client":
            self._know(record.id)
        if record.id not in self.membership.members:
            self._emit(self.membership.admit(record, time.monotonic()))
        self._spawn(self._serve_streams(link))
        self._spawn(self._watch_closed(link))
        self._exchange_soon(link)  # learn its members now, not at the next heartbeat

    def _drop(self, link: Link, reason: str) -> None:
        if self.links.get(link.peer_id) is not link:
            return  # replaced by a newer connection
        del self.links[link.peer_id]
        self.hints_from.pop(link.peer_id, None)
        with contextlib.suppress(Exception):
            link.conn.close(3, reason.encode()[:64])
        self._emit(self.membership.remove(link.peer_id, reason))

    async def _watch_closed(self, link: Link) -> None:
        reason = await link.conn.closed()
        if not self._closing:
            self._drop(link, "left the mesh" if "leaving" in reason else f"connection lost ({reason})")

    # -- streams -----------------------------------------------------------------

    async def _serve_streams(self, link: Link) -> None:
        while True:
            try:
                bi = await link.conn.accept_bi()
            except iroh.IrohError:
                return
            self._spawn(self._serve_stream(link, bi))

    async def _serve_stream(self, link: Link, bi: Any) -> None:
        send, reader = bi.send(), FramedReader(bi.recv())
        try:
            kind = await asyncio.wait_for(reader.read_kind(), FIRST_BYTE_SECS)
            if kind == StreamKind.GOSSIP:
                me_doc = encode_gossip(self.me, self.membership.records())
                record, known = decode_gossip(await asyncio.wait_for(reader.read_frame(), EXCHANGE_SECS))
                self._heard(link, record, known, None)
                await send.write_all(encode_frame(me_doc))
                await send.finish()
                return
            if link.client and kind not in CLIENT_STREAMS:
                raise ProtocolError(f"a client token does not allow {kind.name} streams")
            handler = self.handlers.get(kind)
            if handler is None:
                raise ProtocolError(f"this node does not serve {kind.name} streams")
            header = await asyncio.wait_for(reader.read_frame(), FIRST_BYTE_SECS)
            await handler(link.peer_id, header, send, reader)
        except (TimeoutError, ProtocolError) as exc:
            self._say_limited("malformed", f"Closed a malformed stream from {link.peer_id[:8]}: {describe(exc)}")
            with contextlib.suppress(Exception):
                await send.reset(1)
            with contextlib.suppress(Exception):
                await bi.recv().stop(1)
        except iroh.IrohError:
            pass  # the peer reset the stream or went away; the connection watcher handles the latter
        except (OSError, ValueError, RuntimeError) as exc:  # a handler's local trouble ends that stream only, in one line
            self._say_limited("stream failed", f"A {link.peer_id[:8]} stream failed here: {describe(exc)}")
            with contextlib.suppress(Exception):
                await send.reset(1)

    # -- gossip -----------------------------------------------------------------

    def _heard(self, link: Link, record: PeerRecord, known: list[DialHint], rtt_ms: float | None) -> None:
        if record.id != link.peer_id:
            raise ProtocolError("gossip sender id does not match the connection")
        if self.links.get(link.peer_id) is not link:
            return
        if link.client:  # a client serves nothing, and does not tell members whom to dial
            record, known = as_client(record), []
        now = time.monotonic()
        self._emit(self.membership.heard_from(record, now, rtt_ms))
        self.hints_from[link.peer_id] = (known, now)  # replaces its last list: one member holds at most one frame's worth
        self._dial_discovered(now)

    def _dial_discovered(self, now: float) -> None:
        self.hints_from = {pid: (hints, seen) for pid, (hints, seen) in self.hints_from.items() if now - seen < DISCOVERY_TTL_SECS and pid in self.links}
        candidates = rank_hints({pid: hints for pid, (hints, _) in self.hints_from.items()})
        for p in self.membership.to_dial(candidates, now):
            if p.id in self._dialing:
                continue
            if not self.hinted_dials.try_start(now):
                return  # the rest wait for a later round (they are still in members' frames)
            self._dial_soon(p.id, p.addrs, p.relay or None, hinted=True)

    def _dial_soon(self, peer_id: str, addrs: tuple[str, ...], relay: str | None, hinted: bool = False) -> None:
        """Dial in the background unless a dial to this peer is already under way."""
        if peer_id not in self._dialing:
            self._dialing.add(peer_id)
            self._spawn(self._dial_quietly(peer_id, addrs, relay, hinted))
        elif hinted:
            self.hinted_dials.finished()

    def _exchange_soon(self, link: Link) -> None:
        if not link.exchanging:  # a dead peer's exchange hangs until its timeout; don't stack them
            link.exchanging = True
            self._spawn(self._exchange(link))

    async def _exchange(self, link: Link) -> None:
        start = time.perf_counter()
        try:
            bi = await asyncio.wait_for(link.conn.open_bi(), EXCHANGE_SECS)
            send, reader = bi.send(), FramedReader(bi.recv())
            await send.write_all(stream_prefix(StreamKind.GOSSIP, encode_gossip(self.me, self.membership.records())))
            await send.finish()
            record, known = decode_gossip(await asyncio.wait_for(reader.read_frame(), EXCHANGE_SECS))
            self._heard(link, record, known, (time.perf_counter() - start) * 1000)
        except (TimeoutError, ProtocolError, iroh.IrohError):
            pass  # silence is judged by the heartbeat loop
        finally:
            link.exchanging = False

    async def _heartbeat_loop(self) -> None:
        last_rejoin = last_tick = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_SECS)
            now = time.monotonic()
            if (late := now - last_tick - HEARTBEAT_SECS) > HEARTBEAT_SECS:  # we were held up, not our peers
                self.membership.excuse(late)
            last_tick = now
            for link in list(self.links.values()):
                self._note_signal(link, now)
                self._exchange_soon(link)
            for pid in self.membership.silent(now):
                silent = self.links.get(pid)
                if silent is not None:
                    self._drop(silent, self.membership.why_silent(pid, now))
            self._dial_discovered(now)
            if not self.links and self.join_tokens and now - last_rejoin > REJOIN_SECS:
                last_rejoin = now
                for tok in self.join_tokens:
                    self._dial_soon(tok.endpoint_id.hex(), tok.addrs, tok.relay_url)

    def _note_signal(self, link: Link, now: float) -> None:
        """Packets arrived since the last heartbeat: the peer's machine and process live. Each
        heartbeat sends a one-byte datagram nobody reads, so its QUIC stack has something to
        acknowledge even while its node is too busy to gossip (or an exchange is stuck)."""
        try:
            rx = link.conn.stats().udp_rx_datagrams
            link.conn.send_datagram(b"\0")
        except Exception:  # a closed connection: its watcher drops it
            return
        if rx != link.rx_datagrams:
            link.rx_datagrams = rx
            self.membership.signal(link.peer_id, now)

    async def _dial_quietly(self, peer_id: str, addrs: tuple[str, ...], relay: str | None, hinted: bool = False) -> None:
        try:
            with contextlib.suppress(handshake.Refused):
                await self._dial(peer_id, addrs, relay)
        finally:
            if hinted:
                self.hinted_dials.finished()

