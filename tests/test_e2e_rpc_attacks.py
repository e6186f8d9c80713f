"""Attacks on RPC workers and on the election, by rogue members built from the project's own
Mesh class, against real node processes running a real split of the tiny model."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from typing import Any

import pytest

from mesh_llm.engine.rpc_worker import CONN_CAPS
from mesh_llm.engine.rpc_worker import HELLO as RPC_HELLO
from mesh_llm.mesh.peers import HostedModel, PeerRecord, Slice
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.transport import iroh
from mesh_llm.mesh.wire import FramedReader, StreamKind, encode_frame
from mesh_llm.serving.proofs import serve_file_proofs
from tests.conftest import LOCAL, SPLIT_SPEC, wait_for
from tests.mesh_helpers import make_mesh, wait_until
from tests.test_e2e_split import need_gb, serving

pytestmark = pytest.mark.engine
CTX = ("--ctx-size", "512")
MODEL = SPLIT_SPEC.name
HELLO = struct.pack("<BQ", RPC_HELLO, CONN_CAPS) + bytes(CONN_CAPS)  # what llama-server sends first


async def blocking(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking test helper, off the loop (the rogue's mesh must keep talking meanwhile)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def rogue_member(node: Any, role: str = "standby") -> Any:
    """A member made with the node's own invite token and the project's own Mesh."""
    token = decode_token(await blocking(node.token))
    rogue = make_mesh(token.mesh, role=role, name=f"rogue-{role}")
    await rogue.start()
    await rogue.join([token])
    node_id = await blocking(node.node_id)
    await wait_until(lambda: node_id in rogue.membership.members)
    await blocking(wait_for, lambda: rogue.me.id in node.peer_ids(), what="the node admits the rogue")
    return rogue


def claim(rogue: Any, real: PeerRecord, **changes: Any) -> None:
    """Gossip what the real node says of its model: its fingerprint and engine, and `changes`."""
    rogue.update_self(engine_version=real.engine_version, models_on_disk=(MODEL,), fingerprints=real.fingerprints, **changes)


async def refused(rogue: Any, node_id: str) -> bool:
    """Open an RPC stream to `node_id`'s worker and say HELLO: is it reset without an answer?"""
    send, recv = await rogue.open_stream(node_id, StreamKind.RPC, {"model": MODEL})
    await send.write_all(HELLO)
    try:
        answer = await asyncio.wait_for(recv.read(64), 30)
    except iroh.IrohError:
        return True
    return answer == b""


def chat(node: Any) -> int:
    import json
    import urllib.request

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
    req = urllib.request.Request(node.base_url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return int(r.status)


async def test_rogue_members_and_clients_cannot_use_a_lent_worker(start_node, split_model) -> None:
    need = need_gb(split_model, 512)
    a = start_node("--model", str(split_model), *CTX, "--max-vram", f"{0.6 * need:.6f}", *LOCAL)
    await blocking(a.wait_output, "Waiting for more peers")
    b = start_node("--model", str(split_model), *CTX, "--max-vram", f"{0.45 * need:.6f}", "--join", await blocking(a.token), *LOCAL)
    state = await blocking(wait_for, lambda: serving(a)["state"] == "ready" and serving(a), timeout=120, what="2-node split ready")
    a_id, b_id = await blocking(a.node_id), await blocking(b.node_id)
    assert state["split"]["workers"] == [b_id]

    # A member that says it hosts a split naming B (what B used to check) and claims B's own file.
    rogue = await rogue_member(b)
    real = rogue.membership.members[b_id].record
    budget = (await blocking(b.status))["node"]["free_bytes"]
    split = (Slice(b_id, 1.0, 0, 3, False), Slice(rogue.me.id, 1.0, 4, 7, True))  # half of a huge need on B
    claim(rogue, real, hosting=(HostedModel(MODEL, "ready", need_bytes=4 * real.vram_bytes, split=split),))
    await blocking(wait_for, lambda: any(n["id"] == rogue.me.id and MODEL in n["models_served"] for n in b.status()["nodes"]), what="B hears the rogue's claim")
    assert await refused(rogue, b_id)
    line = await blocking(b.wait_output, f"Refused an RPC stream from {rogue.me.id[:8]} for {MODEL}")
    assert f"this node's plan for {MODEL} does not lend to it ({a_id[:8]} hosts it)" in line, line  # B's own plan, not the rogue's word
    await asyncio.sleep(1.0)  # a few planning rounds with the claim in gossip
    assert (await blocking(b.status))["node"]["free_bytes"] == budget  # nor does its claim hold any of B's memory

    client = await rogue_member(b, role="client")
    assert await refused(client, b_id)
    await blocking(b.wait_output, f"Refused an RPC stream from {client.me.id[:8]} for {MODEL}: a client may not use RPC workers")

    # B kept serving its real host throughout
    assert await blocking(chat, a) == 200 and await blocking(chat, b) == 200
    assert (await blocking(serving, a))["split"]["workers"] == [b_id]
    await client.close()
    await rogue.close()


async def test_a_rogue_claiming_the_file_is_neither_elected_nor_used_nor_routed_to(start_node, split_model) -> None:
    need = need_gb(split_model, 512)
    a = start_node("--model", str(split_model), *CTX, "--max-vram", f"{0.6 * need:.6f}", *LOCAL)
    await blocking(a.wait_output, "Waiting for more peers")
    a_id = await blocking(a.node_id)

    # Two members claiming A's fingerprint and engine, a ready hosted copy of the model and memory:
    # one just enough to be A's worker, one more than A has (it would win the election and get every prompt).
    worker_rogue, host_rogue = await rogue_member(a), await rogue_member(a)
    real = worker_rogue.membership.members[a_id].record
    need_bytes = int(need * 1e9)
    ready = (HostedModel(MODEL, "ready", need_bytes=need_bytes),)
    claim(worker_rogue, real, vram_bytes=need_bytes // 2, free_bytes=need_bytes // 2, lending=(MODEL,), hosting=ready)
    claim(host_rogue, real, vram_bytes=int(0.9 * need_bytes), free_bytes=0, hosting=ready)

    async def forged(peer_id: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        await send.write_all(encode_frame({"hash": hashlib.sha256(header["nonce"].encode()).hexdigest()}))
        await send.finish()

    host_rogue.on_stream(StreamKind.PROVE, forged)  # it answers, without the bytes
    await blocking(a.wait_output, f"peer {worker_rogue.me.id[:8]} failed the file check for {MODEL}")
    await blocking(a.wait_output, f"peer {host_rogue.me.id[:8]} failed the file check for {MODEL}: its answer does not match")
    await asyncio.sleep(1.0)  # a few planning rounds with both rogues in gossip
    assert (await blocking(serving, a))["state"].startswith("Waiting for more peers")  # neither elected nor used
    assert (await blocking(a.status))["api"]["servers"].get(MODEL, []) == []  # nor routed to

    # An honest worker with the file joins: the split forms with it alone, and nobody routes to the rogues.
    b = start_node("--model", str(split_model), *CTX, "--max-vram", f"{0.45 * need:.6f}", "--join", await blocking(a.token), *LOCAL)
    state = await blocking(wait_for, lambda: serving(a)["state"] == "ready" and serving(a), timeout=120, what="split with the honest worker")
    b_id = await blocking(b.node_id)
    assert state["split"]["workers"] == [b_id] and state["split"]["host"] == a_id
    await blocking(b.wait_output, f"peer {host_rogue.me.id[:8]} failed the file check for {MODEL}")
    await blocking(wait_for, lambda: b.status()["api"]["servers"].get(MODEL) == [a_id], what="B routes to A only")
    assert (await blocking(a.status))["api"]["servers"][MODEL] == ["local"]
    for _ in range(4):
        assert await blocking(chat, b) == 200 and await blocking(chat, a) == 200
    assert b.status()["api"]["servers"][MODEL] == [a_id]
    await worker_rogue.close()
    await host_rogue.close()


async def test_a_host_that_sends_nothing_is_cut_off_and_the_worker_stays_free(start_node, split_model) -> None:
    """The no-first-command bound, against a real worker: the rogue *is* the host in the worker's
    own view (it holds the file and proves it, it has the most memory, its split names the worker)."""
    need = need_gb(split_model, 512)
    b = start_node("--model", str(split_model), *CTX, "--max-vram", f"{0.45 * need:.6f}", *LOCAL)
    await blocking(b.wait_output, "Waiting for more peers")
    b_id = await blocking(b.node_id)
    rogue = await rogue_member(b, role="host")
    serve_file_proofs(rogue, lambda model: split_model if model == MODEL else None, rogue.log)
    real = rogue.membership.members[b_id].record
    need_bytes = int(need * 1e9)
    split = (Slice(b_id, 1.0, 0, 3, False), Slice(rogue.me.id, 1.0, 4, 7, True))
    claim(rogue, real, vram_bytes=int(0.6 * need_bytes), hosting=(HostedModel(MODEL, "loading", need_bytes=need_bytes, split=split),))
    await blocking(b.wait_output, f"{rogue.me.id[:8]} hosts the split")
    await blocking(wait_for, lambda: b.status()["node"]["lending"] == [MODEL], timeout=60, what="B lends its worker to the rogue")

    silent_send, silent_recv = await rogue.open_stream(b_id, StreamKind.RPC, {"model": MODEL})
    await silent_send.write_all(b"")  # opened, and not a byte of RPC
    send, recv = await rogue.open_stream(b_id, StreamKind.RPC, {"model": MODEL})
    await send.write_all(HELLO)
    size = struct.unpack("<Q", await asyncio.wait_for(recv.read_exact(8), 30))[0]
    assert size >= 3  # the silent stream never reached the worker: it answers another one meanwhile
    await send.finish()
    line = await blocking(b.wait_output, f"Closed an RPC stream from {rogue.me.id[:8]} for {MODEL}: no command within", timeout=60)
    assert "10 s" in line
    try:
        assert await asyncio.wait_for(silent_recv.read(64), 30) == b""
    except iroh.IrohError:
        pass  # reset: what the worker does
    await rogue.close()
