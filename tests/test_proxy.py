"""The API proxy against a scripted upstream: routing, streaming, cancellation, errors."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from mesh_llm.api.proxy import ApiProxy, Route, Server, UpstreamTable
from mesh_llm.api.routing import affinity
from mesh_llm.errors import UserError
from tests.conftest import free_port


class FakeUpstream:
    """An SSE upstream that sends event N+1 only after the test saw event N."""

    def __init__(self) -> None:
        self.seen = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.requests: list[dict] = []
        self.port = free_port()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body, "auth": request.headers.get("Authorization"), "x-api-key": request.headers.get("x-api-key"),
                              "cookie": request.headers.get("Cookie"), "proxy-auth": request.headers.get("Proxy-Authorization"),
                              "raw_path": request.raw_path, "anthropic-version": request.headers.get("anthropic-version")})
        if not body.get("stream"):
            return web.json_response({"choices": [{"message": {"content": "hi"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(3):
                await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
                self.seen.clear()
                await asyncio.wait_for(self.seen.wait(), 5)
            if body.get("hang"):
                await asyncio.sleep(30)
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.set()
            raise
        return resp

    async def __aenter__(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def proxied():
    async with FakeUpstream() as up:
        table = UpstreamTable()
        state = {"ready": True}
        local = Server("local", f"http://127.0.0.1:{up.port}", is_ready=lambda: state["ready"], status=lambda: "ready" if state["ready"] else "restarting")
        table.set_routes([Route("tiny", [local], ("tiny-alias",))])
        proxy = ApiProxy(table)
        port = free_port()
        await proxy.start("127.0.0.1", port)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            yield up, client, state, table
        await proxy.close()


async def test_stream_is_relayed_event_by_event(proxied) -> None:
    up, client, _, _ = proxied
    events = []
    async with client.post("/v1/chat/completions", json={"model": "tiny", "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                events.append(line.strip())
                up.seen.set()  # the upstream waits for this before its next event: buffering would deadlock
    assert events[-1] == b"data: [DONE]" and len(events) == 4


async def test_non_streaming_and_headers_pass_through(proxied) -> None:
    up, client, _, _ = proxied
    async with client.post("/v1/chat/completions", json={"model": "tiny"}, headers={"anthropic-version": "2023-06-01"}) as r:
        assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "hi"
    assert up.requests[-1]["anthropic-version"] == "2023-06-01" and up.requests[-1]["body"] == {"model": "tiny"}


async def test_the_query_reaches_upstream_byte_for_byte(proxied) -> None:
    up, client, _, _ = proxied
    port = client._base_url.port
    for query in ("beta=true", "beta=true&x=%0d%0a+a%20b%23frag%26y=1&z=%2F..%2Fslots", "a=%E2%82%AC&b=&&c"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model": "tiny"}'
        writer.write(b"POST /v1/chat/completions?%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (query.encode(), len(body), body))
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert up.requests[-1]["raw_path"] == f"/v1/chat/completions?{query}"


async def test_client_disconnect_cancels_upstream(proxied) -> None:
    up, client, _, _ = proxied
    r = await client.post("/v1/chat/completions", json={"model": "tiny", "stream": True, "hang": True})
    await r.content.readline()
    r.close()  # the client goes away mid-stream
    up.seen.set()
    await asyncio.wait_for(up.cancelled.wait(), 5)


async def test_unknown_model_is_404_naming_models(proxied) -> None:
    _, client, _, _ = proxied
    async with client.post("/v1/chat/completions", json={"model": "gpt-4"}) as r:
        body = await r.json()
    assert r.status == 404 and body["error"]["available"] == ["tiny"] and "tiny" in body["error"]["message"]


async def test_models_and_health(proxied) -> None:
    _, client, state, _ = proxied
    async with client.get("/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["tiny"]
    async with client.get("/v1/models/tiny") as r:
        assert r.status == 200 and (await r.json())["id"] == "tiny"
    async with client.get("/health") as r:
        assert r.status == 200
    state["ready"] = False
    async with client.get("/health") as r:
        assert r.status == 503 and (await r.json())["models"] == {"tiny": "restarting"}


async def test_not_ready_is_503_json(proxied) -> None:
    _, client, state, _ = proxied
    state["ready"] = False
    async with client.post("/v1/chat/completions", json={"model": "tiny"}) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "5"
        assert (await r.json())["error"]["type"] == "unavailable_error"


async def test_upstream_down_is_502_json(proxied) -> None:
    _, client, _, table = proxied
    table.set_routes([*(table.get(m) for m in table.models()), Route("dead", [Server("local", f"http://127.0.0.1:{free_port()}", is_ready=lambda: True)])])
    async with client.post("/v1/chat/completions", json={"model": "dead"}) as r:
        assert r.status == 502 and "upstream for dead failed" in (await r.json())["error"]["message"]


async def test_unknown_route_is_404_json(proxied) -> None:
    _, client, _, _ = proxied
    async with client.get("/nope") as r:
        assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"


async def test_port_in_use_is_a_user_error() -> None:
    port = free_port()
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    try:
        with pytest.raises(UserError, match=f"port {port} .* already in use"):
            await ApiProxy(UpstreamTable()).start("127.0.0.1", port)
    finally:
        blocker.close()


async def test_a_model_answers_to_its_other_names_and_ambiguity_lists_candidates(proxied) -> None:
    up, client, _, table = proxied
    async with client.post("/v1/chat/completions", json={"model": "tiny-alias"}) as r:
        assert r.status == 200  # the name it was loaded by
    assert up.requests[-1]["body"]["model"] == "tiny-alias"  # passed on as sent: llama-server answers to any name
    dead = Server("local", "http://127.0.0.1:9", lambda: True)
    table.set_routes([Route("tiny-q4", [dead]), Route("tiny-q8", [dead])])
    async with client.post("/v1/chat/completions", json={"model": "TINY"}) as r:
        body = await r.json()
    assert r.status == 404 and body["error"]["candidates"] == ["tiny-q4", "tiny-q8"], body
    assert "could be any of tiny-q4, tiny-q8" in body["error"]["message"]


def two_peers(a: FakeUpstream, c: FakeUpstream) -> tuple[UpstreamTable, list[Server]]:
    """Model "m" served by two peers' servers, A nearer than C."""
    table = UpstreamTable()
    servers = [Server("peer-a", f"http://127.0.0.1:{a.port}", lambda: True, rtt_ms=lambda: 2.0),
               Server("peer-c", f"http://127.0.0.1:{c.port}", lambda: True, rtt_ms=lambda: 3.0)]
    table.set_routes([Route("m", servers)])
    return table, servers


async def test_requests_spread_over_servers_and_conversations_stick() -> None:
    async with FakeUpstream() as a, FakeUpstream() as c:
        table, servers = two_peers(a, c)
        proxy = ApiProxy(table)
        port = free_port()
        await proxy.start("127.0.0.1", port)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
                # two streams open at once: the second goes where nothing is in flight
                first = await client.post("/v1/chat/completions", json={"model": "m", "stream": True})
                await first.content.readline()
                second = await client.post("/v1/chat/completions", json={"model": "m", "stream": True})
                await second.content.readline()
                assert (len(a.requests), len(c.requests)) == (1, 1)
                assert servers[0].gate.in_flight == 1 and servers[1].gate.in_flight == 1
                first.close()
                second.close()
                for _ in range(3):
                    a.seen.set()
                    c.seen.set()
                    await asyncio.sleep(0.05)
                # without a conversation: the nearer server while nothing is in flight
                async with client.post("/v1/chat/completions", json={"model": "m"}) as r:
                    assert r.status == 200
                assert len(a.requests) == 2
                # a conversation new to this node goes where its session hashes (so every node picks the same server)
                on_a = [u for u in (f"user-{i}" for i in range(40)) if max(("peer-a", "peer-c"), key=lambda n: affinity(f"u:{u}", n)) == "peer-a"]
                on_c = [u for u in (f"user-{i}" for i in range(40)) if u not in on_a]
                carol, dave = on_a[0], on_c[0]
                for user in (dave, carol, dave):
                    async with client.post("/v1/chat/completions", json={"model": "m", "user": user}) as r:
                        assert r.status == 200
                assert [r["body"].get("user") for r in c.requests[1:]] == [dave, dave]
                assert a.requests[-1]["body"]["user"] == carol
                busy = await client.post("/v1/chat/completions", json={"model": "m", "stream": True, "user": carol})
                await busy.content.readline()  # carol's stream runs on A
                async with client.post("/v1/chat/completions", json={"model": "m"}) as r:
                    assert r.status == 200  # a request of its own goes where nothing is in flight: C
                async with client.post("/v1/chat/completions", json={"model": "m", "user": carol}, headers={}) as r:
                    assert r.status == 200  # carol stays on A although a stream runs there
                assert [r["body"].get("user") for r in c.requests[1:]] == [dave, dave, None]
                assert a.requests[-1]["body"]["user"] == carol
                busy.close()
                a.seen.set()
        finally:
            await proxy.close()


async def test_full_servers_send_a_conversation_elsewhere_and_all_full_is_429() -> None:
    async with FakeUpstream() as a, FakeUpstream() as c:
        table, servers = two_peers(a, c)
        proxy = ApiProxy(table, max_inflight=1)
        port = free_port()
        await proxy.start("127.0.0.1", port)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
                first = await client.post("/v1/chat/completions", json={"model": "m", "stream": True, "user": "carol"})
                await first.content.readline()  # carol's conversation holds A's one slot
                second = await client.post("/v1/chat/completions", json={"model": "m", "stream": True, "user": "carol"})
                await second.content.readline()
                assert (len(a.requests), len(c.requests)) == (1, 1)  # her next request went to C rather than wait
                async with client.post("/v1/chat/completions", json={"model": "m"}) as r:
                    assert r.status == 429 and r.headers["Retry-After"] == "2"
                    body = await r.json()
                assert body["error"]["type"] == "rate_limit_error" and "busy" in body["error"]["message"]
                assert (len(a.requests), len(c.requests)) == (1, 1)  # refused here: nothing queued upstream
                first.close()
                second.close()
                a.seen.set()
                c.seen.set()
        finally:
            await proxy.close()


async def test_connections_past_the_bound_get_503_and_the_bound_frees_up() -> None:
    proxy = ApiProxy(UpstreamTable(), max_connections=2)
    port = free_port()
    await proxy.start("127.0.0.1", port)

    async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive: the connection stays open
        await writer.drain()
        return await reader.readuntil(b"\r\n\r\n")

    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for reader, writer in held:
            assert b" 503 " in await health(reader, writer)  # answered by the app (nothing served yet: loading)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 10)  # the whole reply, then the server's close
        assert reply.startswith(b"HTTP/1.1 503") and b"connections open already" in reply and b"Retry-After: 5" in reply
        writer.close()
        held[0][1].close()
        await held[0][1].wait_closed()

        async def admitted() -> bool:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            try:
                return b"connections open already" not in await health(r, w) + await r.read(200)
            finally:
                w.close()

        deadline = asyncio.get_running_loop().time() + 10
        while not await admitted():  # the server notices the close when its read ends
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        held[1][1].close()
    finally:
        await proxy.close()


async def test_a_peer_that_never_answers_is_504_and_the_proxy_lives_on() -> None:
    async def wedged(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)  # takes the request, never answers
        await asyncio.Event().wait()

    silent = await asyncio.start_server(wedged, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    async with FakeUpstream() as up:
        table = UpstreamTable()
        table.set_routes([Route("m", [Server("peer-x", f"http://127.0.0.1:{silent_port}", lambda: True)]),
                          Route("ok", [Server("peer-y", f"http://127.0.0.1:{up.port}", lambda: True)])])
        proxy = ApiProxy(table, upstream_timeout=0.5)
        port = free_port()
        await proxy.start("127.0.0.1", port)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=aiohttp.ClientTimeout(total=30)) as client:  # a bound, not a threshold
                async with client.post("/v1/chat/completions", json={"model": "m"}) as r:
                    assert r.status == 504 and "did not start its answer within 0.5 s" in (await r.json())["error"]["message"]
                assert table.get("m").servers[0].gate.in_flight == 0
                async with client.post("/v1/chat/completions", json={"model": "ok"}) as r:
                    assert r.status == 200
        finally:
            await proxy.close()
            silent.close()



async def test_without_keys_the_callers_own_credentials_are_not_relayed_either(proxied) -> None:
    up, client, _, _ = proxied
    sent = {"Authorization": "Bearer sk-ant-the-users-real-key", "x-api-key": "sk-the-users-real-key", "Cookie": "session=1", "Proxy-Authorization": "Basic eDp5"}
    async with client.post("/v1/chat/completions", json={"model": "tiny"}, headers=sent) as r:
        assert r.status == 200
    assert [(r["auth"], r["x-api-key"], r["cookie"], r["proxy-auth"]) for r in up.requests] == [(None, None, None, None)]


async def test_with_keys_the_callers_key_is_not_relayed(tmp_path) -> None:
    from mesh_llm.api.keys import KeyRing, create_key, store_path

    key, _ = create_key(tmp_path)
    async with FakeUpstream() as up:
        table = UpstreamTable()
        table.set_routes([Route("tiny", [Server("peer-a", f"http://127.0.0.1:{up.port}", lambda: True)])])
        proxy = ApiProxy(table)
        proxy.policy.keys = KeyRing(store_path(tmp_path))
        port = free_port()
        await proxy.start("127.0.0.1", port)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
                async with client.post("/v1/chat/completions", json={"model": "tiny"}, headers={"x-api-key": key}) as r:
                    assert r.status == 200
                async with client.post("/v1/chat/completions", json={"model": "tiny"}, headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
        finally:
            await proxy.close()
    assert [(r["auth"], r["x-api-key"]) for r in up.requests] == [(None, None), (None, None)]  # a peer never learns this node's keys


@pytest.mark.parametrize("request_head", [
    b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",  # HTTP/1.1 needs a Host: aiohttp's parser refuses it
    b"GET /health HTTP/1.0\r\n\r\n",  # HTTP/1.0 may omit it: the guard refuses it
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\nConnection: close\r\n\r\n",
])
async def test_a_request_without_host_or_with_a_broken_head_is_a_json_400_without_a_traceback(request_head: bytes, caplog) -> None:
    proxy = ApiProxy(UpstreamTable())
    port = free_port()
    await proxy.start("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head)
        reply = await reader.read()
        writer.close()
    finally:
        await proxy.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400" and b"application/json" in head, reply
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert not [r for r in caplog.records if r.levelno >= 40 or r.exc_info], caplog.records


async def test_a_burst_of_connections_cannot_overshoot_the_bound() -> None:
    import socket

    proxy = ApiProxy(UpstreamTable(), max_connections=2)
    port = free_port()
    await proxy.start("127.0.0.1", port)
    # Ten connections the kernel completes before the loop runs again: asyncio accepts them in one batch.
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    try:
        streams = [await asyncio.open_connection(sock=s) for s in socks]
        replies = []
        for reader, writer in streams:
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive: admitted ones stay open
            await writer.drain()
            replies.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) + await reader.read(200))
        assert sum(b"connections open already" not in r for r in replies) == 2, replies
    finally:
        for _, writer in streams:
            writer.close()
        await proxy.close()


def test_a_connection_past_the_bound_is_closed_once_its_503_is_written() -> None:
    from mesh_llm.api.proxy import _TooManyConnections

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.written, self.closed = b"", False

        def write(self, data: bytes) -> None:  # type: ignore[override]
            self.written += data

        def close(self) -> None:
            self.closed = True

    async def run() -> None:
        over = _TooManyConnections(2)
        transport = Transport()
        over.connection_made(transport)
        over.data_received(b"GET / HTTP/1.1\r\n")
        assert transport.written.startswith(b"HTTP/1.1 503") and transport.closed
        over.data_received(b"Host: x\r\n\r\n")  # the rest of its request: no second reply
        assert transport.written.count(b"HTTP/1.1") == 1

    asyncio.run(run())


async def test_idle_connections_are_closed_but_a_long_stream_is_not_cut(proxied, monkeypatch) -> None:
    import mesh_llm.api.proxy as proxy_module

    monkeypatch.setattr(proxy_module, "KEEPALIVE_SECS", 0.2)
    up, _, _, table = proxied
    proxy = ApiProxy(table)
    port = free_port()
    await proxy.start("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # connects, never sends: closed, not held
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            async with client.post("/v1/chat/completions", json={"model": "tiny", "stream": True}) as r:
                events = []
                async for line in r.content:
                    if line.startswith(b"data:"):
                        events.append(line)
                        await asyncio.sleep(0.5)  # longer than the idle timeout, mid-response
                        up.seen.set()
                assert events[-1].strip() == b"data: [DONE]" and len(events) == 4
    finally:
        await proxy.close()
