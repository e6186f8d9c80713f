"""Admission: the first stream on every connection proves both ends hold the mesh secret.

dialer → HELLO {v, mesh, kind, nonce}
acceptor → {v, nonce, proof, kind}      or {error}
dialer → {proof, record, incarnation}
acceptor → {ok, record}                 or {error}

`kind` is the admission the dialer asks for: "member" (proved with the mesh
secret) or "client" (proved with the clients' secret; API use only). Both
proofs use the key of that kind; the acceptor says which kind it holds.
Nothing about the mesh (records, models, members) is sent before the dialer's
proof checks out. Errors are one line meant for the person at the other end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from mesh_llm.mesh import auth
from mesh_llm.mesh.admission import HANDSHAKE_MAX_FRAME, HELLO_MAX_FRAME, HELLO_SECS
from mesh_llm.mesh.identity import KINDS, MeshCredentials
from mesh_llm.mesh.peers import MAX_CLIENTS, MAX_MEMBERS, PeerRecord
from mesh_llm.mesh.wire import PROTOCOL_VERSION, FramedReader, ProtocolError, StreamKind, encode_frame, get_hex, get_int, get_str, stream_prefix
from mesh_llm.text import printable

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
    kind: str = "member"  # the other side's admission: a "client" may use the API and nothing else


def _check_version(doc: dict) -> None:
    v = get_int(doc, "v", 0, 2**31)
    if v != PROTOCOL_VERSION:
        raise Refused(f"protocol version mismatch: the other node speaks v{v}, this one v{PROTOCOL_VERSION}: run the same mesh-llm version on both")


async def _send(send: iroh.SendStreamProtocol, doc: dict) -> None:
    await send.write_all(encode_frame(doc))


async def dial_handshake(conn: iroh.ConnectionProtocol, creds: MeshCredentials, my_id: bytes, me: PeerRecord) -> Admitted:
    peer_id = conn.remote_id().to_bytes()
    bi = await conn.open_bi()
    send, reader = bi.send(), FramedReader(bi.recv(), HELLO_MAX_FRAME)
    nonce = auth.new_nonce()
    kind = creds.kind
    await send.write_all(stream_prefix(StreamKind.HELLO, {"v": PROTOCOL_VERSION, "mesh": creds.mesh_id.hex(), "kind": kind, "nonce": nonce.hex()}))
    reply = await reader.read_frame()
    reader.decoder.max_frame = HANDSHAKE_MAX_FRAME  # the final answer carries a record
    if "error" in reply:
        raise Refused(printable(get_str(reply, "error", 512), 512))
    _check_version(reply)
    their_nonce = get_hex(reply, "nonce", auth.NONCE_BYTES)
    # A member can only have proved with the mesh secret; a client cannot tell, so it takes the word.
    their_kind = "member" if kind == "member" else get_str(reply, "kind", 16, "member")
    if their_kind not in KINDS:
        raise ProtocolError(f"unknown admission kind {their_kind!r}")
    expected = auth.proof(creds.secret, "acceptor", my_id, peer_id, nonce, their_nonce, kind)
    if not auth.check(expected, get_hex(reply, "proof", 32)):
        await _send(send, {"error": "secret mismatch"})
        await send.finish()
        raise Refused("the mesh secret in your token does not match the member's: the token is forged or damaged; ask a member for a fresh one", told_peer=True)
    mine = auth.proof(creds.secret, "dialer", my_id, peer_id, nonce, their_nonce, kind)
    await _send(send, {"proof": mine.hex(), "record": me.to_wire()})
    final = await reader.read_frame()
    if "error" in final:
        raise Refused(printable(get_str(final, "error", 512), 512))
    record = PeerRecord.from_wire(final.get("record"))
    if record.id != peer_id.hex():
        raise ProtocolError("peer record id does not match its TLS identity")
    await send.finish()
    return Admitted(record, their_kind)


async def accept_handshake(conn: iroh.ConnectionProtocol, creds: MeshCredentials, my_id: bytes, me: PeerRecord,
                           has_room: Callable[[str, bool], bool] = lambda peer_id, client: True) -> Admitted:
    peer_id = conn.remote_id().to_bytes()

    async def first_words() -> tuple[iroh.SendStreamProtocol, FramedReader, dict]:
        bi = await conn.accept_bi()
        send, reader = bi.send(), FramedReader(bi.recv(), HELLO_MAX_FRAME)  # a stranger's first words: small
        if await reader.read_kind() != StreamKind.HELLO:
            raise ProtocolError("first stream is not a HELLO")
        return send, reader, await reader.read_frame()

    try:  # an honest dialer sends its HELLO at once: a silent stranger gives its slot back soon
        send, reader, hello = await asyncio.wait_for(first_words(), HELLO_SECS)
    except TimeoutError:
        raise Refused(f"no HELLO within {HELLO_SECS:.0f} s") from None
    reader.decoder.max_frame = HANDSHAKE_MAX_FRAME  # the proof frame carries the dialer's record

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
    kind = get_str(hello, "kind", 16, "member")
    key = creds.secret_for(kind)
    if key is None:
        why = "this node holds a client token: it admits no members; dial a member of the mesh" if kind == "member" else f"unknown admission kind {kind!r}"
        raise await refuse(why, f"{kind} admission asked of a node that cannot grant it")
    their_nonce = get_hex(hello, "nonce", auth.NONCE_BYTES)
    nonce = auth.new_nonce()
    mine = auth.proof(key, "acceptor", peer_id, my_id, their_nonce, nonce, kind)
    await _send(send, {"v": PROTOCOL_VERSION, "nonce": nonce.hex(), "proof": mine.hex(), "kind": creds.kind})
    answer = await reader.read_frame()
    if "error" in answer:
        raise Refused("wrong mesh secret")
    expected = auth.proof(key, "dialer", peer_id, my_id, their_nonce, nonce, kind)
    if not auth.check(expected, get_hex(answer, "proof", 32)):
        raise await refuse("wrong mesh secret: your invite token is forged or damaged; ask a member for a fresh one", f"wrong mesh secret ({kind} token)")
    record = PeerRecord.from_wire(answer.get("record"))
    if record.id != peer_id.hex():
        raise ProtocolError("peer record id does not match its TLS identity")
    client = kind == "client" or record.role == "client"
    if not has_room(record.id, client):
        what = f"{MAX_CLIENTS} clients" if client else f"{MAX_MEMBERS} members"
        raise await refuse(f"this node already has {what}, the most a mesh node admits", f"mesh full ({what})")
    await _send(send, {"ok": True, "record": me.to_wire()})
    await send.finish()
    return Admitted(record, kind)


async def with_timeout(coro: Awaitable[_T], secs: float = HANDSHAKE_SECS) -> _T:
    try:
        return await asyncio.wait_for(coro, secs)
    except TimeoutError:
        raise Refused(f"no answer to the mesh handshake within {secs:.0f} s") from None
