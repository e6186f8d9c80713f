"""The proxy continuing a stream whose server went away, against scripted upstreams (in-process)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import mesh_llm.api.proxy as proxy_module
from mesh_llm.api.proxy import ApiProxy, Route, Server, UpstreamTable
from tests.conftest import free_port

Script = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def chunk(content: str | None = None, role: str | None = None, finish: str | None = None, cid: str = "chatcmpl-1") -> bytes:
    delta: dict[str, Any] = {"role": role} if role else {}
    if content is not None:
        delta["content"] = content
    return f"data: {json.dumps({'id': cid, 'created': 1, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n".encode()


async def vanish(request: web.Request) -> None:
    """The server's end of the connection is gone mid-answer (no [DONE], no chunk terminator)."""
    await asyncio.sleep(0.1)  # what was written has left (an abort drops what has not)
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(0.05)


class Scripted:
    """An SSE upstream that plays `script` and keeps the bodies it was sent."""

    def __init__(self, script: Script) -> None:
        self.script, self.port, self.bodies = script, free_port(), list[dict[str, Any]]()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await self.script(request, response)
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()


async def ask(scripts: list[Script], body: dict[str, Any]) -> tuple[list[Any], list[Scripted]]:
    """POST a streamed chat through a proxy whose servers play `scripts`; the events the caller read."""
    ups = [Scripted(s) for s in scripts]
    for up in ups:
        await up.start()
    table = UpstreamTable()
    table.set_routes([Route("m", [Server(f"peer{i}", f"http://127.0.0.1:{up.port}", is_ready=lambda: True) for i, up in enumerate(ups)])])
    proxy, port = ApiProxy(table), free_port()
    await proxy.start("127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m", "stream": True, **body}) as r:
            text = (await r.read()).decode()
    finally:
        await proxy.close()
        for up in ups:
            await up.runner.cleanup()
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    return [ln if ln == "[DONE]" else json.loads(ln) for ln in lines], ups


def contents(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and "choices" in e)


ASK = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 10}


async def test_a_stream_cut_long_after_it_began_continues_on_the_other_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "RESUME_SECS", 0.5)  # the stream below runs longer than that before its cut

    async def first(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(chunk(role="assistant"))
        for word in ("one ", "two "):
            await response.write(chunk(word))
            await asyncio.sleep(0.4)
        await vanish(request)

    async def second(request: web.Request, response: web.StreamResponse) -> None:  # echoes the partial answer, as llama-server does
        await response.write(chunk(role="assistant", cid="chatcmpl-2") + chunk("one two three", cid="chatcmpl-2"))
        await response.write(chunk(finish="stop", cid="chatcmpl-2") + b"data: [DONE]\n\n")

    events, (a, b) = await ask([first, second], ASK)
    assert contents(events) == "one two three" and events[-1] == "[DONE]"
    assert {e["id"] for e in events if isinstance(e, dict)} == {"chatcmpl-1"}
    assert sum(1 for e in events if isinstance(e, dict) and e["choices"][0]["delta"].get("role")) == 1
    assert b.bodies == [{**ASK, "model": "m", "stream": True, "max_tokens": 8,
                         "messages": [*ASK["messages"], {"role": "assistant", "content": "one two "}]}]


async def test_an_error_the_server_reports_ends_the_stream_without_running_it_again() -> None:
    async def failing(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(chunk(role="assistant") + chunk("part "))
        await response.write(b'data: {"error": {"code": 500, "message": "Failed to parse input", "type": "server_error"}}\n\n')

    events, ups = await ask([failing, failing], ASK)
    assert events[-1]["error"]["message"] == "Failed to parse input" and contents(events) == "part "
    assert sum(len(up.bodies) for up in ups) == 1


@pytest.mark.parametrize("tail", [b"data: [DONE]\n\n", b""])
async def test_an_answer_whose_connection_breaks_after_its_last_words_is_not_generated_again(tail: bytes) -> None:
    async def complete(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(chunk(role="assistant") + chunk("all of it") + chunk(finish="stop") + tail)
        await vanish(request)

    events, ups = await ask([complete, complete], ASK)
    assert contents(events) == "all of it" and events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert sum(len(up.bodies) for up in ups) == 1


async def test_a_stream_cut_again_and_again_is_continued_twice_then_ends_with_an_error() -> None:
    """At most MAX_RESUMES (2) continuations: four servers that each cut the stream see three
    attempts in all, and the caller gets the text so far and then one error event, not a hang."""
    async def cut(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(chunk(role="assistant") + chunk("w "))
        await vanish(request)

    events, ups = await asyncio.wait_for(ask([cut, cut, cut, cut], {**ASK, "max_tokens": 50}), 120)
    assert proxy_module.MAX_RESUMES == 2
    assert sum(len(u.bodies) for u in ups) == 1 + proxy_module.MAX_RESUMES
    assert contents(events).startswith("w ") and isinstance(events[-1], dict) and "error" in events[-1], events[-2:]
