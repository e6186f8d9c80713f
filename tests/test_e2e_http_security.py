"""End to end: the attacks a browser page or a rebinding name could mount on a real node's
HTTP ports (:9337 and the console), and what a user-approved web app still gets."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from mesh_llm.mesh.token import decode_token
from mesh_llm.mesh.wire import FramedReader, StreamKind
from tests.conftest import LOCAL, free_port, open_stream, run_cli, wait_for
from tests.mesh_helpers import make_mesh

pytestmark = pytest.mark.engine

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
EVIL = "https://evil.example"
APP = "https://app.example"


def call(port: int, method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A raw request: the path goes out exactly as given (`curl --path-as-is`), any Host header too."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, resp.headers, resp.read()
    conn.close()
    return out


def test_browsers_rebound_names_and_other_llama_endpoints_are_refused(engine, tiny_model: Path, start_node) -> None:
    console = free_port()
    node = start_node("--model", str(tiny_model), "--console", str(console), "--cors-origin", APP)
    node.wait_ready()
    for port in (node.port, console):
        # A page elsewhere posts a "simple" (no preflight) request: refused, and no CORS header lets it read anything.
        status, headers, body = call(port, "POST", "/v1/chat/completions", CHAT, {"Origin": EVIL, "Content-Type": "text/plain"})
        assert status == 403 and json.loads(body)["error"]["type"] == "forbidden", (port, body)
        assert "--cors-origin" in json.loads(body)["error"]["message"]
        assert not [h for h in headers if h.lower().startswith("access-control-")], (port, headers)
        status, _, _ = call(port, "OPTIONS", "/v1/chat/completions", None, {"Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert status == 403

        # The app the user allowed: a preflight, then its answer with our CORS header (llama-server's own is gone).
        status, headers, _ = call(port, "OPTIONS", "/v1/chat/completions", None,
                                  {"Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == APP
        assert "Authorization" in headers["Access-Control-Allow-Headers"] and "x-api-key" in headers["Access-Control-Allow-Headers"]
        status, headers, body = call(port, "POST", "/v1/chat/completions", CHAT, {"Origin": APP})
        assert status == 200 and headers.get_all("Access-Control-Allow-Origin") == [APP], (port, body)
        status, headers, _ = call(port, "GET", "/api/status", None, {"Origin": APP})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers  # an approved app gets /v1, not the token

        # Non-browser callers (no Origin) and the console's own page work as before.
        status, headers, _ = call(port, "POST", "/v1/chat/completions", CHAT)
        assert status == 200 and not [h for h in headers if h.lower().startswith("access-control-")], headers  # llama-server's are dropped
        assert call(port, "POST", "/v1/chat/completions", CHAT, {"Origin": f"http://127.0.0.1:{console}"})[0] == 200
        assert call(port, "POST", "/v1/messages?beta=true", {**CHAT, "max_tokens": 4})[0] == 200  # Claude Code's query is kept

        # DNS rebinding: a foreign name pointed at 127.0.0.1 gets nothing.
        for path in ("/api/status", "/v1/models"):
            status, _, body = call(port, "GET", path, None, {"Host": f"evil.example:{port}"})
            assert status == 403 and json.loads(body)["error"]["type"] == "forbidden", (port, path)

        # llama-server's other endpoints are not the mesh's API, however the path is spelled.
        for path in ("/v1/../slots/0?action=erase", "/v1/%2e%2e/slots/0?action=erase", "/v1/slots", "/v1/../props", "/v1/../metrics"):
            status, headers, body = call(port, "POST", path, {})
            assert status == 404 and "llama.cpp" not in headers.get("Server", ""), (port, path, body)
            assert json.loads(body)["error"]["message"].startswith("no route for POST"), (port, path, body)  # ours, not llama-server's


def test_past_max_inflight_a_request_gets_429_not_a_queue(engine, tiny_model: Path, start_node) -> None:
    node = start_node("--model", str(tiny_model), "--max-inflight", "1")
    node.wait_ready()
    held = open_stream(node.port)  # takes the one request this node's server may work on
    try:
        status, headers, body = call(node.port, "POST", "/v1/chat/completions", CHAT)
        assert status == 429 and headers["Retry-After"] == "2", body
        assert json.loads(body)["error"]["type"] == "rate_limit_error"
    finally:
        held.close()
    wait_for(lambda: call(node.port, "POST", "/v1/chat/completions", CHAT)[0] == 200, what="served again once the stream ended")


async def test_a_wedged_peer_gets_the_caller_504_and_the_mesh_keeps_serving(engine, tiny_model: Path, start_node) -> None:
    """A member advertises a model and then never answers requests for it (a hung or hostile
    node): a client routed there gets 504 after --upstream-timeout, and still reaches other models."""
    member = start_node("--model", str(tiny_model), *LOCAL)
    await asyncio.to_thread(member.wait_ready)
    token = await asyncio.to_thread(member.token)
    taken: list[dict[str, object]] = []

    async def never_answers(peer_id: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        taken.append(header)
        await asyncio.Event().wait()  # reads nothing more, answers nothing: cancelled when the stream goes

    rogue = make_mesh(decode_token(token).mesh, name="rogue", served=("ghost-model",))  # no node has this file
    rogue.on_stream(StreamKind.HTTP, never_answers)
    await rogue.start()
    try:
        await rogue.join([decode_token(token)])
        client = start_node("--client", "--join", token, "--upstream-timeout", "3", "--listen-all", *LOCAL)
        await asyncio.to_thread(client.wait_ready)
        warning = await asyncio.to_thread(client.wait_output, "--listen-all with no API key")
        assert "mesh-llm auth key create" in warning  # open to the network, and said so once

        def routes_ghost() -> bool:
            return call(client.port, "GET", "/v1/models")[2].count(b"ghost-model") > 0

        await asyncio.to_thread(wait_for, routes_ghost, 60, "the client lists the rogue's model")
        ghost = {**CHAT, "model": "ghost-model"}
        status, _, body = await asyncio.to_thread(call, client.port, "POST", "/v1/chat/completions", ghost)
        assert status == 504 and "did not start its answer within 3 s" in json.loads(body)["error"]["message"], body
        assert taken and taken[0]["model"] == "ghost-model"  # it really went to the wedged peer
        for _ in range(2):  # the client is not wedged itself: other models, and the next try, are answered
            assert (await asyncio.to_thread(call, client.port, "POST", "/v1/chat/completions", CHAT))[0] == 200
            assert (await asyncio.to_thread(call, client.port, "POST", "/v1/chat/completions", ghost))[0] == 504
    finally:
        await rogue.close()


def test_api_keys_with_the_official_clients(engine, tiny_model: Path, start_node, tmp_path: Path) -> None:
    import anthropic
    import openai

    key_file = tmp_path / "keys.txt"
    key_file.write_text("# handed to the team\nteam-key-0123456789\n")
    console = free_port()
    node = start_node("--model", str(tiny_model), "--console", str(console), "--api-key-file", str(key_file))
    node.wait_ready()  # /health needs no key
    node.wait_output("API keys are on: put one of yours where the commands above say mesh or dummy")
    api = node.base_url + "/v1"

    good = openai.OpenAI(base_url=api, api_key="team-key-0123456789", max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny-llama"]
    stream = good.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
    assert [c for c in stream if c.choices]
    for wrong in ("nope", "team-key-012345678"):
        with pytest.raises(openai.AuthenticationError, match="auth key create"):
            openai.OpenAI(base_url=api, api_key=wrong, max_retries=0).models.list()
    status, headers, body = call(node.port, "POST", "/v1/chat/completions", CHAT)  # no key at all, as curl
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and "Authorization: Bearer" in json.loads(body)["error"]["message"]
    assert call(node.port, "GET", "/v1/models")[0] == 401

    claude = anthropic.Anthropic(base_url=node.base_url, api_key="team-key-0123456789", max_retries=0)  # sends x-api-key
    reply = claude.messages.create(model="tiny-llama", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.content
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=node.base_url, api_key="nope", max_retries=0).messages.create(
            model="tiny-llama", max_tokens=4, messages=[{"role": "user", "content": "hi"}])

    # A key made while the node runs works at once; revoked, it stops working at once.
    made = run_cli("auth", "key", "create", "--label", "late", "--state-dir", str(node.state_dir))
    late = made.stdout.strip()
    assert openai.OpenAI(base_url=api, api_key=late, max_retries=0).models.list().data
    assert run_cli("auth", "key", "revoke", "late", "--state-dir", str(node.state_dir)).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api, api_key=late, max_retries=0).models.list()

    # The console's chat: its page on this machine needs no key; the API port still does.
    assert call(console, "POST", "/v1/chat/completions", CHAT, {"Origin": f"http://localhost:{console}", "Host": f"localhost:{console}"})[0] == 200
    assert call(console, "GET", "/v1/models")[0] == 200
    assert call(node.port, "POST", "/v1/chat/completions", CHAT, {"Origin": f"http://localhost:{console}"})[0] == 401
    assert call(node.port, "GET", "/api/status")[0] == 200  # its own rules: the token for local callers only


async def _through_tunnel(rogue, node_id: str, model: str, raw: bytes) -> bytes:  # type: ignore[no-untyped-def]
    send, recv = await rogue.open_stream(node_id, StreamKind.HTTP, {"model": model})
    await send.write_all(raw)
    return bytes(await asyncio.wait_for(recv.read_to_end(1 << 20), 30))


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body


@contextlib.asynccontextmanager
async def rogue_member(node):  # type: ignore[no-untyped-def]
    """A member built from our own mesh classes with `node`'s token: it sends whatever it likes."""
    token = decode_token(node.token())
    rogue = make_mesh(token.mesh, name="rogue")
    await rogue.start()
    try:
        await rogue.join([token])
        yield rogue
    finally:
        await rogue.close()


async def test_a_member_reaches_only_the_api_routes_through_the_http_tunnel(engine, tiny_model: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), "--ctx-size", "256", *LOCAL)
    a.wait_ready()
    async with rogue_member(a) as rogue:
        node, model = a.node_id(), "tiny-llama"
        chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        # What a peer's proxy sends: answered, once.
        ok = await _through_tunnel(rogue, node, model, _post("/v1/chat/completions", chat))
        assert ok.startswith(b"HTTP/1.1 200") and b"choices" in ok
        # llama-server's other endpoints, however spelled, and other methods: refused before it sees them.
        for raw in (_post("/slots/0?action=erase", b"{}"), _post("/v1/../slots/0?action=erase", b"{}"), b"GET /props HTTP/1.1\r\nHost: x\r\n\r\n",
                    _post("/v1//../metrics", b"")):
            answer = await _through_tunnel(rogue, node, model, raw)
            assert answer.startswith(b"HTTP/1.1 404") and b"not_found_error" in answer, answer[:200]
        # A second request behind the first (keep-alive) is dropped: one stream, one request.
        answer = await _through_tunnel(rogue, node, model, _post("/v1/chat/completions", chat) + b"GET /props HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.count(b"HTTP/1.1 ") == 1 and b"default_generation_settings" not in answer
        chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        assert (await _through_tunnel(rogue, node, model, chunked)).startswith(b"HTTP/1.1 400")
        assert "/slots" not in a.llama_log()  # nothing of the above reached llama-server


async def test_a_member_cannot_queue_past_the_servers_cap_through_the_tunnel(engine, tiny_model: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), "--ctx-size", "256", "--max-inflight", "1", *LOCAL)
    a.wait_ready()
    async with rogue_member(a) as rogue:
        long = json.dumps({"prompt": "go", "max_tokens": 15000, "ignore_eos": True, "stream": True}).encode()
        send, recv = await rogue.open_stream(a.node_id(), StreamKind.HTTP, {"model": "tiny-llama"})
        await send.write_all(_post("/v1/completions", long))
        assert (await asyncio.wait_for(recv.read(4096), 30)).startswith(b"HTTP/1.1 200")  # holds the one place
        second = await _through_tunnel(rogue, a.node_id(), "tiny-llama", _post("/v1/completions", long))
        assert second.startswith(b"HTTP/1.1 429") and b"Retry-After" in second
        await send.reset(0)


def test_listen_all_rebinding_names_are_refused_and_remote_control_needs_a_key(engine, tiny_model: Path, start_node, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("team-key-0123456789\n")
    key_file.chmod(0o600)
    node = start_node("--model", str(tiny_model), "--listen-all", "--allow-remote-runtime", "--api-key-file", str(key_file), "--cors-origin", APP)
    node.wait_ready()
    port, bearer = node.port, {"Authorization": "Bearer team-key-0123456789"}

    # A rebinding page: its own name, re-pointed here, as Host and Origin alike. Refused whatever it sends.
    rebound = f"evil.example:{port}"
    for method, path, body in (("POST", "/v1/chat/completions", CHAT), ("GET", "/api/runtime", None), ("POST", "/api/runtime/models", {"model": "x"})):
        status, _, reply = call(port, method, path, body, {"Host": rebound, "Origin": f"http://{rebound}", **bearer})
        assert status == 403 and "origin" in json.loads(reply)["error"]["message"], (path, reply)

    # Another machine (here: the LAN address as Host) needs the key for the runtime API and the status too.
    lan = {"Host": f"192.0.2.7:{port}"}
    for path in ("/api/runtime", "/api/status"):
        assert call(port, "GET", path, None, lan)[0] == 401, path
        assert call(port, "GET", path, None, {**lan, **bearer})[0] == 200, path
    assert call(port, "DELETE", "/api/runtime/models/nothing-loaded", None, lan)[0] == 401
    assert call(port, "DELETE", "/api/runtime/models/nothing-loaded", None, {**lan, **bearer})[0] == 404
    # A caller on this machine (mesh-llm status/load/unload) needs none.
    assert call(port, "GET", "/api/runtime")[0] == 200 and call(port, "GET", "/api/status")[0] == 200

    # The official JS SDKs' own headers pass the allowed app's preflight.
    status, headers, _ = call(port, "OPTIONS", "/v1/chat/completions", None,
                              {"Origin": APP, "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,anthropic-dangerous-direct-browser-access"})
    assert status == 204 and "x-stainless-os" in headers["Access-Control-Allow-Headers"], headers
    assert "anthropic-dangerous-direct-browser-access" in headers["Access-Control-Allow-Headers"]
