"""Admission: the first stream on every connection proves both ends hold the mesh secret.

dialer → HELLO {v, mesh, nonce}
acceptor → {v, nonce, proof}            or {error}
dialer → {proof, record, incarnation}
acceptor → {ok, record}                 or {error}

Nothing about the mesh (records, models, members) is sent before the dialer's
proof checks out. Errors are one line meant for the person at the other end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from mesh_llm.mesh import auth
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.peers import PeerRecord
from mesh_llm.mesh.wire import PROTOCOL_VERSION, FramedReader, ProtocolError, StreamKind, encode_frame, get_hex, get_int, get_str, stream_prefix

if TYPE_CHECKING:
    import iroh

HANDSHAKE_SECS = 10.0
_T = TypeVar("_T")


class Refused(Exception):
    """Admission failed; the message is fit to show the user.

    `told_peer`: this side sent the other an error frame, so it must let the
    frame arrive (wait for the peer to hang up) before closing the connection.
    """

    def __init__(self, message: str, told_peer: bool = False) -> None:
        super().__init__(message)
        self.told_peer = told_peer


@dataclass(frozen=True)
class Admitted:
    record: PeerRecord


def _check_version(doc: dict) -> None:
    v = get_int(doc, "v", 0, 2**31)
    if v != PROTOCOL_VERSION:
        raise Refused(f"protocol version mismatch: the other node speaks v{v}, this one v{PROTOCOL_VERSION}: run the same mesh-llm version on both")


async def _send(send: iroh.SendStreamProtocol, doc: dict) -> None:
    await send.write_all(encode_frame(doc))


async def dial_handshake(conn: iroh.ConnectionProtocol, creds: MeshCredentials, my_id: bytes, me: PeerRecord) -> Admitted:
    peer_id = conn.remote_id().to_bytes()
    bi = await conn.open_bi()
    send, reader = bi.send(), FramedReader(bi.recv())
    nonce = auth.new_nonce()
    await send.write_all(stream_prefix(StreamKind.HELLO, {"v": PROTOCOL_VERSION, "mesh": creds.mesh_id.hex(), "nonce": nonce.hex()}))
    reply = await reader.read_frame()
    if "error" in reply:
        raise Refused(get_str(reply, "error", 512))
    _check_version(reply)
    their_nonce = get_hex(reply, "nonce", auth.NONCE_BYTES)
    expected = auth.proof(creds.secret, "acceptor", my_id, peer_id, nonce, their_nonce)
    if not auth.check(expected, get_hex(reply, "proof", 32)):
        await _send(send, {"error": "secret mismatch"})
        await send.finish()
        raise Refused("the mesh secret in your token does not match the member's: the token is forged or damaged; ask a member for a fresh one", told_peer=True)
    mine = auth.proof(creds.secret, "dialer", my_id, peer_id, nonce, their_nonce)
    await _send(send, {"proof": mine.hex(), "record": me.to_wire()})
    final = await reader.read_frame()
    if "error" in final:
        raise Refused(get_str(final, "error", 512))
    record = PeerRecord.from_wire(final.get("record"))
    if record.id != peer_id.hex():
        raise ProtocolError("peer record id does not match its TLS identity")
    await send.finish()
    return Admitted(record)


async def accept_handshake(conn: iroh.ConnectionProtocol, creds: MeshCredentials, my_id: bytes, me: PeerRecord) -> Admitted:
    peer_id = conn.remote_id().to_bytes()
    bi = await conn.accept_bi()
    send, reader = bi.send(), FramedReader(bi.recv())
    if await reader.read_kind() != StreamKind.HELLO:
        raise ProtocolError("first stream is not a HELLO")
    hello = await reader.read_frame()

    async def refuse(why: str, log_line: str) -> Refused:
        await _send(send, {"error": why})
        await send.finish()
        return Refused(log_line, told_peer=True)

    try:
        _check_version(hello)
    except Refused as exc:
        raise await refuse(str(exc), str(exc)) from None
    if get_hex(hello, "mesh", 16) != creds.mesh_id:
        raise await refuse("this node belongs to a different mesh than your token: ask a member of the mesh you mean for its token", "token of another mesh")
    their_nonce = get_hex(hello, "nonce", auth.NONCE_BYTES)
    nonce = auth.new_nonce()
    mine = auth.proof(creds.secret, "acceptor", peer_id, my_id, their_nonce, nonce)
    await _send(send, {"v": PROTOCOL_VERSION, "nonce": nonce.hex(), "proof": mine.hex()})
    answer = await reader.read_frame()
    if "error" in answer:
        raise Refused("wrong mesh secret")
    expected = auth.proof(creds.secret, "dialer", peer_id, my_id, their_nonce, nonce)
    if not auth.check(expected, get_hex(answer, "proof", 32)):
        raise await refuse("wrong mesh secret: your invite token is forged or damaged; ask a member for a fresh one", "wrong mesh secret")
    record = PeerRecord.from_wire(answer.get("record"))
    if record.id != peer_id.hex():
        raise ProtocolError("peer record id does not match its TLS identity")
    await _send(send, {"ok": True, "record": me.to_wire()})
    await send.finish()
    return Admitted(record)


async def with_timeout(coro: Awaitable[_T], secs: float = HANDSHAKE_SECS) -> _T:
    try:
        return await asyncio.wait_for(coro, secs)
    except TimeoutError:
        raise Refused(f"no answer to the mesh handshake within {secs:.0f} s") from None
