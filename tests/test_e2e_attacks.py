"""Attacks on real node processes: bloated members, idle and malformed handshakes, names
that are markup or terminal escapes. The attacker is built from the project's own Mesh
and transport, in this process, on a loop of its own (the test itself stays synchronous)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mesh_llm.mesh.handshake import Refused
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.transport import bind_endpoint, endpoint_addr
from mesh_llm.mesh.wire import ALPN, StreamKind
from tests.conftest import LOCAL, wait_for
from tests.mesh_helpers import LOOPBACK, LoopThread, make_mesh

pytestmark = pytest.mark.engine

# What a throw-away identity could put in its record before the bounds: 32 addresses and a
# relay of characters JSON escapes twelvefold (27 KB per member in every frame that names it).
BLOAT: dict[str, Any] = {"addrs": tuple("𝔵" * 64 for _ in range(32)), "relay": "𝔵" * 256}


@pytest.fixture
def attacker():  # type: ignore[no-untyped-def]
    loop = LoopThread()
    yield loop
    loop.close()


def chat(port: int, model: str = "tiny-llama") -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def no_traceback(*outputs: str) -> None:
    for out in outputs:
        assert "Traceback" not in out and "RecursionError" not in out and "MarkupError" not in out, out


def stubborn(m: Mesh) -> Mesh:
    """An attacker that never drops the node it attacks, however silent (honest meshes would)."""
    m.membership.silent = lambda now, limit=0.0: []  # type: ignore[method-assign]
    return m


async def close_all(meshes: list[Mesh]) -> None:
    await asyncio.gather(*(m.close() for m in meshes), return_exceptions=True)


async def close_endpoints(endpoints: list[Any]) -> None:
    await asyncio.gather(*(e.close() for e in endpoints), return_exceptions=True)


def test_bloated_members_cannot_split_two_honest_nodes(start_node, tiny_model, engine, attacker):  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    b = start_node("--join", a.token(), *LOCAL)
    b.wait_output("ready")
    a_id, b_id = a.node_id(), b.node_id()
    wait_for(lambda: a.peer_ids() == {b_id} and b.peer_ids() == {a_id}, what="A and B see each other")
    token = decode_token(a.token())

    async def attack() -> tuple[list[Mesh], Mesh, list[object]]:
        # 40 throw-away identities that hold the secret, each with a bloated record: their
        # hints alone would push every frame of A's past the frame limit
        rogues = [make_mesh(token.mesh, name=f"rogue{i}") for i in range(40)]
        for r in rogues:
            await r.start()
            stubborn(r).me = replace(r.me, **BLOAT)
        joins = await asyncio.gather(*(r.join([token]) for r in rogues), return_exceptions=True)
        # and one that joins with a fair record, then bloats it
        turncoat = make_mesh(token.mesh, name="turncoat")
        await turncoat.start()
        await stubborn(turncoat).join([token])
        turncoat.update_self(**BLOAT)
        return rogues, turncoat, joins

    rogues, turncoat, joins = attacker.run(attack())
    try:
        assert all(isinstance(j, Refused) for j in joins), joins  # bloated records are refused at admission
        # The turncoat's bloated record is refused too: its gossip fails, so both honest
        # nodes drop it as silent. Had its record (or the 40) been taken, A's frames would
        # have been too big and A and B would have dropped each other instead.
        wait_for(lambda: turncoat.me.id not in a.peer_ids() | b.peer_ids(), timeout=90, what="the turncoat dropped by A and B")
        assert a.peer_ids() == {b_id} and b.peer_ids() == {a_id}
        assert f"Peer left: standby {b_id[:8]}" not in a.output() and f"Peer left: host {a_id[:8]}" not in b.output()  # not even for a while
        assert chat(a.port) == 200 and chat(b.port) == 200  # B's request crosses the mesh to A
        assert "Closed a malformed stream from " + turncoat.me.id[:8] in a.output()
        assert "Dropped a connection that failed the handshake: field 'addrs'" in a.output()
        no_traceback(a.output(), b.output())
    finally:
        attacker.run(close_all([*rogues, turncoat]))


def test_strangers_cannot_exhaust_or_crash_admission(start_node, tiny_model, engine, attacker):  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    token = decode_token(a.token())
    addr_of_a = endpoint_addr(token.endpoint_id.hex(), token.addrs, None)

    async def deep_hellos() -> Any:
        """A HELLO nested 2,000 deep (small enough for the HELLO limit) and one far too big."""
        ep = await bind_endpoint(LOOPBACK, os.urandom(32))
        for payload in (b"[" * 2000 + b"]" * 2000, b"[" * 100_000):
            conn = await ep.connect(addr_of_a, ALPN)
            bi = await conn.open_bi()
            await bi.send().write_all(bytes([StreamKind.HELLO]) + struct.pack(">I", len(payload)) + payload)
            try:
                await asyncio.wait_for(bi.recv().read_to_end(4096), 15)
            except Exception:  # noqa: BLE001 - refused: the stream or connection ends, how does not matter
                pass
        return ep

    deep = attacker.run(deep_hellos())
    a.wait_output("frame nests deeper than 32 levels")  # the second one's line is held back: one per kind per 10 s

    async def idle(n: int = 60) -> tuple[list[Any], list[Any]]:
        """Connections that never say HELLO, from a handful of endpoints."""
        endpoints = [await bind_endpoint(LOOPBACK, os.urandom(32)) for _ in range(6)]
        conns = await asyncio.gather(*(endpoints[i % 6].connect(addr_of_a, ALPN) for i in range(n)), return_exceptions=True)
        return endpoints, conns

    endpoints, conns = attacker.run(idle())
    a.wait_output("handshakes already under way")  # the ones past 32 are turned away at once

    async def join_soon(m: Mesh) -> None:
        """An honest member: joins as soon as admission has room again (the idle ones time out)."""
        await m.start()
        for _ in range(60):
            try:
                await m.join([token])
                return
            except Refused:
                await asyncio.sleep(1)
        raise AssertionError("never admitted")

    honest = make_mesh(token.mesh, name="honest")
    try:
        attacker.run(join_soon(honest), timeout=120)
        wait_for(lambda: honest.me.id in a.peer_ids(), what="the honest member admitted")
        assert chat(a.port) == 200
        wait_for(lambda: "no HELLO within 3 s" in a.output(), timeout=60, what="the idle ones timed out")
        out = a.output()
        # refusals are logged, but rate-limited: a line now and then with a count, not one per stranger
        assert out.count("handshakes already under way") <= 2, out
        assert out.count("no HELLO within 3 s") <= 2, out
        assert a.proc.poll() is None
        no_traceback(out)
    finally:
        attacker.run(close_all([honest]))
        attacker.run(close_endpoints([deep, *endpoints]))
        del conns


def test_names_that_are_markup_or_escapes_are_shown_literally(start_node, tiny_model, engine, attacker, tmp_path: Path):  # type: ignore[no-untyped-def]
    # A local file whose name is markup: the node starts and prints it as it is.
    odd = tmp_path / "[bold]x[red]y.gguf"
    shutil.copy(tiny_model, odd)
    a = start_node("--model", str(odd), *LOCAL)
    a.wait_ready()
    assert "serving [bold]x[red]y" in a.wait_output("ready")
    token = decode_token(a.token())

    async def rogues() -> tuple[Mesh, Mesh, BaseException | None]:
        # a member serving a model named `[/x]` (a closing tag with no opening: Rich raises on it)
        markup = make_mesh(token.mesh, name="[bold]rogue[/]", served=("[/x]",))
        await markup.start()
        await markup.join([token])
        # one whose hostname would clear the screen and retitle the terminal
        ansi = make_mesh(token.mesh, name="evil\x1b[2J\x1b]0;pwned\x07")
        await ansi.start()
        try:
            await ansi.join([token])
        except Refused as exc:
            return markup, ansi, exc
        return markup, ansi, None

    markup, ansi, refused = attacker.run(rogues())
    try:
        assert refused is not None  # unprintable hostnames are refused at admission
        line = a.wait_output(f"Peer joined: standby {markup.me.id[:8]}")
        assert "([bold]rogue[/]), serving [/x]" in line
        # A node starting into that mesh prints the peer's names as text, markup and all.
        c = start_node("--join", markup.token(), *LOCAL)
        c.wait_output("ready")
        assert "[/x]" in c.wait_output("the mesh serves")  # a closing tag with no opening: Rich raised on it here
        assert "Peer joined" in c.output() and "[bold]rogue[/]" in c.output()
        for out in (a.output(), c.output()):
            assert "\x1b" not in out and "\x07" not in out
        no_traceback(a.output(), c.output())
        assert a.proc.poll() is None and c.proc.poll() is None
    finally:
        attacker.run(close_all([markup, ansi]))
