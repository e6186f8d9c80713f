"""The blackboard end to end: real node processes on loopback, the real CLI and HTTP API."""

from __future__ import annotations

import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from typing import Any

import pytest

from mesh_llm.blackboard.board import Item, item_id, parse_item
from mesh_llm.blackboard.signing import signer, verify_item
from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.wire import MAX_FRAME, StreamKind, stream_prefix
from tests.conftest import LOCAL, assert_one_line_error, free_port, run_cli, wait_for
from tests.mesh_helpers import LoopThread, make_mesh, wait_until

pytestmark = pytest.mark.engine

SECRET_POST = "FINDING: CUDA build fixed; ping dev.ops@example.com, key sk-proj-abcdefghijklmnop1234567890 in /home/alice/notes.txt"


def board(port: int, **query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/blackboard" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["items"]


def post(port: int, body: Any, content_type: str = "application/json", host: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Host": host} if host else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/blackboard", data, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def search_cli(port: int, query: str) -> list[dict[str, Any]]:
    result = run_cli("blackboard", "--search", query, "--json", "--port", str(port))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["items"]


def test_a_post_reaches_a_member_and_a_client_scrubbed_and_a_returning_node_catches_up(start_node, tiny_model, engine, tmp_path):  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    b = start_node("--join", a.token(), *LOCAL)  # a member with no model
    b.wait_output("ready")
    client_token = a.wait_output("Client token: ").split("Client token: ", 1)[1].split()[0]
    bare = {"MESH_LLM_CACHE_DIR": str(tmp_path / "empty-cache"), "PATH": "/nonexistent", "MESH_LLM_BIN_DIR": ""}
    c = start_node("--client", "--join", client_token, *LOCAL, env=bare)
    c.wait_ready()
    wait_for(lambda: {b.node_id(), c.node_id()} <= a.peer_ids(), what="A sees B and the client")

    posted = run_cli("blackboard", SECRET_POST, "--port", str(a.port))
    assert posted.returncode == 0, posted.stderr
    assert "scrubbed before posting: 1 api key, 1 email, 1 home path" in posted.stdout
    assert "dev.ops@example.com" not in posted.stdout and "sk-proj" not in posted.stdout
    expected = "FINDING: CUDA build fixed; ping [email], key [api-key] in [home-path]/notes.txt"
    for node in (b, c):
        found = wait_for(lambda node=node: search_cli(node.port, "cuda FIXED"), what=f"{node.state_dir.name} finds the post")
        assert [i["text"] for i in found] == [expected]
        assert found[0]["node"] == a.node_id() and "@" in found[0]["from"]
    # the client posts too, and a member reads it in the feed
    assert run_cli("blackboard", "QUESTION: who has a GPU free?", "--from", "carol", "--port", str(c.port)).returncode == 0
    wait_for(lambda: [i["from"] for i in board(b.port)] == ["carol", found[0]["from"]], what="B's feed has the client's post first")
    shown = run_cli("blackboard", "--feed", "--from", "CAROL", "--port", str(b.port))
    assert shown.returncode == 0 and "QUESTION: who has a GPU free?" in shown.stdout and "FINDING" not in shown.stdout

    # B goes down; posts made meanwhile reach it when it returns with the same state dir
    b.stop()
    missed = [f"STATUS: step {n} while B was down" for n in range(3)]
    for text in missed:
        assert run_cli("blackboard", text, "--port", str(a.port)).returncode == 0
    b2 = start_node("--join", a.token(), *LOCAL, port=b.port, state_dir=b.state_dir)
    b2.wait_output("ready")
    wait_for(lambda: {i["text"] for i in board(b2.port, limit="100")} >= {*missed, expected, "QUESTION: who has a GPU free?"},
             what="the returning node has every post")
    assert len(board(b2.port, limit="100")) == 5  # no duplicates
    assert (b.state_dir / "blackboard.json").exists()
    assert "Traceback" not in a.output() + b2.output() + c.output()


def test_the_http_api_enforces_its_limits(start_node, tiny_model, engine):  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    status, doc, _ = post(a.port, {"text": "call +1 (555) 123-4567", "from": None})
    assert status == 200 and doc["item"]["text"] == "call [phone]" and doc["scrubbed"] == [{"kind": "phone", "count": 1}]
    assert set(doc["item"]) == {"id", "text", "from", "node", "time", "sig"} and doc["item"]["node"] == a.node_id()
    assert verify_item(parse_item(doc["item"]))  # signed by A's own key
    assert post(a.port, {"text": "   "})[0] == 400
    assert post(a.port, {"text": "bell\x07"})[0] == 400
    assert post(a.port, {"nope": 1})[0] == 400
    assert post(a.port, {"text": "hi", "from": "x" * 129})[0] == 400
    assert post(a.port, {"text": "x" * 4097})[0] == 413
    assert post(a.port, b"text=hi", "application/x-www-form-urlencoded")[0] == 415
    assert post(a.port, {"text": "hi"}, host="evil.example:9337")[0] == 403
    for n in range(9):
        assert post(a.port, {"text": f"post {n}", "from": "bot"})[0] == 200
    status, doc, headers = post(a.port, {"text": "the eleventh", "from": "bot"})
    assert status == 429 and int(headers["Retry-After"]) >= 1 and "10 posts a minute" in doc["error"]["message"]
    cli = run_cli("blackboard", "one more", "--port", str(a.port))
    assert cli.returncode == 1 and "10 posts a minute" in cli.stderr
    items = board(a.port, limit="500")
    assert len(items) == 10 and items[0]["text"] == "post 8"  # newest first
    assert [i["text"] for i in board(a.port, search="phone")] == ["call [phone]"]
    assert len(board(a.port, **{"from": "bot"})) == 9
    assert len(board(a.port, limit="3")) == 3


def test_no_node_gives_one_line_naming_how_to_start_one(tmp_path):  # type: ignore[no-untyped-def]
    port = free_port()
    assert_one_line_error(run_cli("blackboard", "hello", "--port", str(port)), "no mesh-llm node answers", "mesh-llm --client --join TOKEN")
    assert_one_line_error(run_cli("blackboard", "--search", "x", "--join", "eyJfake", "--port", str(port)), "--join: invite token is garbled")
    assert_one_line_error(run_cli("blackboard", "text", "--search", "x", "--port", str(port)), "not both")
    assert_one_line_error(run_cli("blackboard", "--limit", "0", "--port", str(port)), "--limit 0 must be from 1 to 500")
    assert_one_line_error(run_cli("blackboard", "--since", "-1", "--port", str(port)), "--since -1 must be a positive number")


def test_a_hostile_peer_sending_malformed_blackboard_frames_does_not_hurt_the_node(start_node, tiny_model, engine):  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    token = decode_token(a.token())
    client_token = decode_token(a.wait_output("Client token: ").split("Client token: ", 1)[1].split()[0])
    loop = LoopThread()

    async def attack(creds: Any, tok: Any) -> dict[str, Any] | None:
        rogue = make_mesh(creds, name="rogue", role="client" if creds.kind == "client" else "standby")
        await rogue.start()
        try:
            await rogue.join([tok])
            await wait_until(lambda: bool(rogue.links))
            conn = next(iter(rogue.links.values())).conn
            me = rogue.me.id
            raws = [stream_prefix(StreamKind.BLACKBOARD, h) for h in (
                {"op": "sync", "ids": [1, 2]}, {"op": "post", "items": [{"id": "x"}] * 17}, {"op": "what"},
                {"op": "post", "items": [Item(item_id("a", "r", me, 1.0), "b", "r", me, 1.0).to_doc()]},
                {"op": "post", "items": [Item(item_id("hi", "r", me, time.time()), "hi", "r", me, time.time()).to_doc()]},  # unsigned
            )]
            raws += [bytes([StreamKind.BLACKBOARD]) + struct.pack(">I", MAX_FRAME + 1), bytes([StreamKind.BLACKBOARD]) + b"\0\0\0\x02{]",
                     bytes([StreamKind.BLACKBOARD]) + struct.pack(">I", 40) + b"[" * 40]
            for raw in raws * 3:
                bi = await conn.open_bi()
                await bi.send().write_all(raw)
                await bi.send().finish()
                try:
                    await bi.recv().read_to_end(MAX_FRAME)
                except Exception:  # noqa: BLE001 - reset by the node, as it should
                    pass
            now = time.time()
            honest = Item(item_id("rogue says hi", "r", me, now), "rogue says hi", "r", me, now)
            honest = replace(honest, sig=signer(rogue.secret_key)(honest.id))  # signed by the key its node id is
            bi = await conn.open_bi()
            await bi.send().write_all(stream_prefix(StreamKind.BLACKBOARD, {"op": "post", "items": [honest.to_doc()]}))
            await bi.send().finish()
            data = await bi.recv().read_to_end(MAX_FRAME)
            return json.loads(data[4:]) if data else None
        finally:
            await rogue.close()

    try:
        assert loop.run(attack(token.mesh, token)) == {"taken": 1}
        assert loop.run(attack(client_token.mesh, client_token)) == {"taken": 1}
    finally:
        loop.close()
    assert a.proc.poll() is None
    assert [i["text"] for i in board(a.port, search="rogue")] == ["rogue says hi", "rogue says hi"]
    assert post(a.port, {"text": "still fine"})[0] == 200
    assert "Closed a malformed stream" in a.output() and "Traceback" not in a.output()
