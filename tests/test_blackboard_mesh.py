"""Blackboard keepers over real iroh meshes in one process: push, sync on join, clients,
a node that was down, and malformed BLACKBOARD streams."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import replace
from pathlib import Path

from mesh_llm.blackboard.board import Item, item_id
from mesh_llm.blackboard.keeper import BlackboardKeeper, frames_of
from mesh_llm.blackboard.signing import signer
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.wire import MAX_FRAME, StreamKind, encode_frame, stream_prefix
from tests.mesh_helpers import make_mesh, wait_until


def texts(keeper: BlackboardKeeper) -> set[str]:
    return {i.text for i in keeper.board.items.values()}


async def started(mesh: Mesh, state: Path) -> BlackboardKeeper:
    await mesh.start()
    keeper = BlackboardKeeper(mesh, state, lambda line: None)
    keeper.start()
    return keeper


async def test_posts_reach_members_and_clients_and_a_returning_node_catches_up(tmp_path: Path) -> None:
    creds = MeshCredentials.generate()
    a, b, c = make_mesh(creds, name="a"), make_mesh(creds, name="b"), make_mesh(creds.for_clients(), role="client", name="c")
    ka = await started(a, tmp_path / "a")
    kb = await started(b, tmp_path / "b")
    kc = await started(c, tmp_path / "c")
    try:
        ka.post("before anyone joined", "alice")
        await b.join([decode_token(a.token())])
        client_token = a.token("client")
        assert client_token is not None
        await c.join([decode_token(client_token)])
        await wait_until(lambda: texts(kb) == texts(kc) == {"before anyone joined"})  # synced on join
        item, found = kc.post("from the client: mail me at c@example.org", "carol")
        assert found == [("email", 1)] and item.text == "from the client: mail me at [email]"
        await wait_until(lambda: item.id in ka.board.items and item.id in kb.board.items)
        kb.post("from b", "bob")
        await wait_until(lambda: "from b" in texts(ka) and "from b" in texts(kc))
        # B goes down; A posts; B returns with the same state dir and gets what it missed
        await kb.close()
        await b.close()
        assert (tmp_path / "b" / "blackboard.json").exists()
        missed, _ = ka.post("while b was down", "alice")
        await wait_until(lambda: missed.id in kc.board.items)
        b2 = make_mesh(creds, name="b")
        kb2 = await started(b2, tmp_path / "b")
        assert "from b" in texts(kb2)  # from its file
        await b2.join([decode_token(a.token())])
        await wait_until(lambda: missed.id in kb2.board.items)
        assert texts(kb2) == texts(ka) == texts(kc)
        await kb2.close()
        await b2.close()
    finally:
        for keeper in (ka, kc):
            await keeper.close()
        await asyncio.gather(a.close(), c.close(), return_exceptions=True)


async def test_malformed_blackboard_streams_close_that_stream_only(tmp_path: Path) -> None:
    creds = MeshCredentials.generate()
    a, rogue = make_mesh(creds, name="a"), make_mesh(creds, name="rogue")
    ka = await started(a, tmp_path / "a")
    await rogue.start()
    try:
        await rogue.join([decode_token(a.token())])
        await wait_until(lambda: len(a.members()) == 1)
        rid = a.members()[0].record.id
        link = rogue.links[a.me.id]
        node = rogue.me.id
        forged = Item(item_id("x", "r", node, 1.0), "other text", "r", node, 1.0).to_doc()
        headers = [
            {"op": "sync", "ids": ["x" * 33]},
            {"op": "sync", "ids": ["a" * 32] * 501},
            {"op": "post", "items": [forged]},
            {"op": "post", "items": [{"id": 1}]},
            {"op": "post", "items": "nope"},
            {"op": "delete"},
            {"no": "op"},
        ]
        for header in headers:
            bi = await link.conn.open_bi()
            await bi.send().write_all(stream_prefix(StreamKind.BLACKBOARD, header))
            await bi.send().finish()
            assert await _answer_or_reset(bi) is None, header
        for raw in (bytes([StreamKind.BLACKBOARD]) + struct.pack(">I", MAX_FRAME + 1) + b"{",
                    bytes([StreamKind.BLACKBOARD]) + struct.pack(">I", 5) + b"[1,2]",
                    bytes([StreamKind.BLACKBOARD]) + struct.pack(">I", 3) + b"\xff\xfe\xfd"):
            bi = await link.conn.open_bi()
            await bi.send().write_all(raw)
            await bi.send().finish()
            assert await _answer_or_reset(bi) is None
        assert ka.board.items == {}
        # the connection and the board still work: an honest post from the same peer is taken
        now = time.time()
        honest = Item(item_id("ok", "r", node, now), "ok", "r", node, now)
        # unsigned, or signed by this peer in another node's name: refused
        posing = Item(item_id("ok", "r", a.me.id, now), "ok", "r", a.me.id, now)
        for bad in (honest, replace(posing, sig=signer(rogue.secret_key)(posing.id))):
            bi = await link.conn.open_bi()
            await bi.send().write_all(stream_prefix(StreamKind.BLACKBOARD, {"op": "post", "items": [bad.to_doc()]}))
            await bi.send().finish()
            assert await _answer_or_reset(bi) is None
        assert ka.board.items == {}
        honest = replace(honest, sig=signer(rogue.secret_key)(honest.id))  # signed with the key its node id is
        bi = await link.conn.open_bi()
        await bi.send().write_all(stream_prefix(StreamKind.BLACKBOARD, {"op": "post", "items": [honest.to_doc()]}))
        await bi.send().finish()
        assert await _answer_or_reset(bi) == {"taken": 1}
        assert texts(ka) == {"ok"} and rid == rogue.me.id
        assert a.members() and rogue.links
    finally:
        await ka.close()
        await asyncio.gather(a.close(), rogue.close(), return_exceptions=True)


async def _answer_or_reset(bi) -> dict | None:  # type: ignore[no-untyped-def]
    """The one frame a post answers with, or None when the node reset the stream."""
    try:
        data = await asyncio.wait_for(bi.recv().read_to_end(MAX_FRAME), 10)
    except Exception:  # noqa: BLE001 - reset by the node
        return None
    if len(data) < 4:
        return None
    (size,) = struct.unpack(">I", data[:4])
    return json.loads(data[4 : 4 + size])


def test_sync_answers_are_cut_into_frames_under_the_limit() -> None:
    node = "e" * 64
    items = [Item(item_id(t, "x", node, 1.0 + n), t, "x", node, 1.0 + n) for n in range(500) for t in ["𝔵" * 1024]]
    frames = frames_of(items)
    assert len(frames) > 1 and all(len(f) <= MAX_FRAME for f in frames)
    assert sum(len(json.loads(f[4:])["items"]) for f in frames) == 500
    assert encode_frame({"done": True})


async def test_a_burst_of_posts_reaches_a_peer_by_push_alone(tmp_path: Path) -> None:
    """Ten posts at once: pushed one stream at a time per peer, none refused as too many
    streams (the minute's resync is not waited for)."""
    creds = MeshCredentials.generate()
    a, b = make_mesh(creds, name="a"), make_mesh(creds, name="b")
    ka = await started(a, tmp_path / "a")
    kb = await started(b, tmp_path / "b")
    try:
        served = b.handlers[StreamKind.BLACKBOARD]
        open_now, most = 0, 0

        async def slow(peer: str, header: dict, send: object, reader: object) -> None:  # each stream held open a while
            nonlocal open_now, most
            open_now += 1
            most = max(most, open_now)
            try:
                await asyncio.sleep(0.05)
                await served(peer, header, send, reader)  # type: ignore[arg-type]
            finally:
                open_now -= 1

        b.on_stream(StreamKind.BLACKBOARD, slow)
        await b.join([decode_token(a.token())])
        await wait_until(lambda: len(a.members()) == 1 and len(b.members()) == 1)
        posted = {ka.post(f"burst {n}", "alice")[0].id for n in range(10)}
        await wait_until(lambda: posted <= set(kb.board.items), timeout=20)
        assert most <= 2  # one push and one sync at a time from A
        assert not any("malformed" in line for line in a.logs + b.logs)  # type: ignore[attr-defined]
    finally:
        await asyncio.gather(ka.close(), kb.close())
        await asyncio.gather(a.close(), b.close(), return_exceptions=True)
