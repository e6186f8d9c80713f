"""The mesh API proxy: OpenAI/Anthropic-compatible HTTP on :9337.

Requests are routed by their `model` field to an upstream llama-server and
relayed byte for byte: streamed responses (SSE) are written chunk by chunk as
they arrive, never buffered, and a client that disconnects cancels the
upstream request (handler cancellation closes the upstream connection, which
llama-server treats as a cancelled task).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from mesh_llm.api.routing import pick_model, requested_model
from mesh_llm.errors import UserError

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus ones aiohttp sets itself.
HOP_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
LOOPBACK_ADDRS = {"127.0.0.1", "::1"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
SHUTDOWN_SECS = 2.0  # open streams (SSE, long generations) are cut after this on exit
MAX_BODY = 64 * 1024 * 1024  # agents send long contexts; cap what one request may hold


@dataclass
class Upstream:
    model_id: str
    base_url: str  # e.g. http://127.0.0.1:41234
    is_ready: Callable[[], bool]
    status: Callable[[], str] = lambda: "ready"


class UpstreamTable:
    """The models this node can answer for, and where each one is served."""

    def __init__(self) -> None:
        self._by_model: dict[str, Upstream] = {}

    def add(self, upstream: Upstream) -> None:
        self._by_model[upstream.model_id] = upstream

    def remove(self, model_id: str, only: Upstream | None = None) -> None:
        """Drop the entry for `model_id` (with `only`: just if it is still that entry)."""
        if only is None or self._by_model.get(model_id) is only:
            self._by_model.pop(model_id, None)

    def models(self) -> list[str]:
        return list(self._by_model)

    def get(self, model_id: str) -> Upstream:
        return self._by_model[model_id]


def port_in_use(host: str, port: int) -> UserError:
    return UserError(f"port {port} on {host} is already in use: stop the other process or pass --port N")


async def listen(app: web.Application, host: str, port: int, in_use: Callable[[str, int], UserError]) -> web.AppRunner:
    """Serve `app` on host:port; a port that is taken becomes the one-line `in_use` error."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_SECS)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)  # see check_port_free
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise in_use(host, port) from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return runner


def host_allowed(host_header: str, listen_all: bool) -> bool:
    """On loopback, only requests addressed to a loopback name: a page whose own name was
    re-pointed at 127.0.0.1 (DNS rebinding) gets no answers from us."""
    if listen_all:
        return True
    name = host_header if host_header.endswith("]") else host_header.rsplit(":", 1)[0]
    return name.lower() in LOOPBACK_NAMES


def is_local(request: web.Request) -> bool:
    """Sent from this machine to a loopback name: may see the invite token."""
    return request.remote in LOOPBACK_ADDRS and host_allowed(request.host, False)


def for_caller(status: dict[str, Any], request: web.Request) -> dict[str, Any]:
    """The status document as this caller may see it: the token (the key to the mesh) stays local."""
    return status if is_local(request) else {**status, "token": None}


def error_response(status: int, message: str, kind: str, **extra: object) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    headers = {"Retry-After": "5"} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


async def _still_ready(upstream: Upstream, grace: float = 1.0) -> bool:
    """After a failed relay: is the upstream still up? A server that just died takes a
    moment to be noticed (process reaped, plan recomputed), so watch for up to `grace`."""
    deadline = time.monotonic() + grace
    while upstream.is_ready() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return upstream.is_ready()


class ApiProxy:
    def __init__(self, table: UpstreamTable, *, created: int | None = None) -> None:
        self.table = table
        self.status_source: Callable[[], dict[str, Any]] | None = None  # the node's status document
        self.created = created or int(time.time())
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_get("/api/status", self.status)
        app.router.add_post("/v1/{tail:.*}", self.forward)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    async def start(self, host: str, port: int) -> None:
        # No total timeout: a long generation is legitimate. One upstream connection per
        # request: llama-server closes the socket after a streamed reply while still
        # advertising keep-alive, so a pooled connection breaks the next request.
        # A loopback connect costs tens of microseconds.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        try:
            self._runner = await listen(self.app(), host, port, port_in_use)
        except UserError:
            await self.close()
            raise

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        if self._session:
            await self._session.close()
            self._session = None

    # -- handlers --------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        models = {m: self.table.get(m).status() for m in self.table.models()}
        ok = any(self.table.get(m).is_ready() for m in models)
        return web.json_response({"status": "ok" if ok else "loading", "models": models}, status=200 if ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        if self.status_source is None:
            return error_response(503, "the node is starting; retry shortly", "unavailable_error")
        return web.json_response(for_caller(self.status_source(), request))

    def _model_entry(self, model_id: str) -> dict[str, object]:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "mesh-llm"}

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_entry(m) for m in self.table.models()]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = pick_model(request.match_info["model"], self.table.models())
        if name is None:
            return self._unknown_model(request.match_info["model"])
        return web.json_response(self._model_entry(name))

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"no route for {request.method} {request.path}", "not_found_error")

    def _unknown_model(self, requested: str | None) -> web.Response:
        served = self.table.models()
        listing = ", ".join(served) if served else "none yet"
        return error_response(404, f"model {requested!r} is not served here; available: {listing}", "model_not_found", available=served)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds {MAX_BODY // (1024 * 1024)} MiB", "invalid_request_error")
        wanted = requested_model(body)
        model = pick_model(wanted, self.table.models())
        if model is None:
            return self._unknown_model(wanted)
        upstream = self.table.get(model)
        if not upstream.is_ready():
            return error_response(503, f"model {model} is {upstream.status()}; retry shortly", "unavailable_error")
        return await self._relay(request, upstream, body)

    async def _relay(self, request: web.Request, upstream: Upstream, body: bytes) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        url = upstream.base_url + request.path_qs
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(request.method, url, data=body, headers=headers) as up:
                out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
                response = web.StreamResponse(status=up.status, reason=up.reason, headers=out_headers)
                if up.content_length is not None:
                    response.content_length = up.content_length
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            message = f"upstream for {upstream.model_id} failed: {exc.__class__.__name__}: {exc}"
            code, kind = 502, "upstream_error"
            if not await _still_ready(upstream):  # it went away under us: restarting or re-planning
                code, kind = 503, "unavailable_error"
                message = f"model {upstream.model_id} is {upstream.status()}; retry shortly ({message})"
            if response is None:
                return error_response(code, message, kind)
            # Mid-stream: tell an SSE client in-band, then end the stream.
            if "text/event-stream" in (response.headers.get("Content-Type") or ""):
                event = {"error": {"message": message, "type": kind, "code": code}}
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
            return response
