"""The mesh API proxy: OpenAI/Anthropic-compatible HTTP on :9337.

Requests are routed by their `model` field (its id, or a looser name) to one
of the model's servers, this node's llama-server or a peer's through the mesh:
a conversation stays where it started, other requests go where fewest are in
flight. Answers are relayed as they arrive, never buffered whole: streamed ones
(SSE) event by event, with a transcript so that another server can continue a
stream whose server went away (api.resume), others byte for byte. A client that
disconnects cancels the upstream request (handler cancellation closes the
upstream connection, which llama-server treats as a cancelled task).

Load is bounded: a server takes as many requests as it has slots (--max-inflight), a
request finding every ready server full gets 429 rather than a place in an endless queue,
a port holds at most MAX_CONNECTIONS clients, and a peer must start its answer within
--upstream-timeout (504). Who may call at all is api.http_guard's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from yarl import URL

from mesh_llm.api.guard import LOOPBACK_ADDRS, api_path, is_cors_header
from mesh_llm.api.guard import host_allowed as host_allowed  # runtime, console and tests use it from here
from mesh_llm.api.http_guard import Policy, install_guard
from mesh_llm.api.meter import ResponseMeter
from mesh_llm.api.metrics import NodeMetrics
from mesh_llm.api.resume import DIALECTS, NotResumable, Splice, SseEvent, SseEvents, Transcript, resumed_request
from mesh_llm.api.routing import Match, ServerView, choose_server, match_model, request_doc, requested_model, session_of
from mesh_llm.errors import UserError

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus ones aiohttp sets itself.
HOP_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
# Credentials are never relayed: a key for this node is ours (no peer learns it), and the key a
# caller sends for its usual provider (Claude Code, the SDKs send the user's real one) is none of a
# peer's business. llama-server runs without --api-key, so nothing upstream needs them.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})
SHUTDOWN_SECS = 2.0  # open streams (SSE, long generations) are cut after this on exit
MAX_BODY = 64 * 1024 * 1024  # agents send long contexts; cap what one request may hold
# llama-server's slots: the runner passes no --parallel, so llama-server runs its automatic 4
# (server.cpp: n_parallel = -1 → 4). A peer's server is one of ours too, so the same for it.
SERVER_SLOTS = 4
MAX_CONNECTIONS = 256  # client connections at once per port; more get a 503 and are closed
OVER_CAP_WAIT_SECS = 2.0  # a connection past the bound that sends nothing is closed after this
# An idle connection (before its first request, or between two; never during a response, however
# long it streams) is closed after this, so idle clients cannot hold the bound. Clients' pools
# drop theirs sooner (httpx 5 s, Node's 4 s), so none sends into a closing socket.
KEEPALIVE_SECS = 15.0
UPSTREAM_START_SECS = 300.0  # a peer must start its answer within this (non-streamed CPU generations are slow)
RETRY_AFTER = {429: "2", 503: "5"}


class Gate:
    """Requests at one server: how many are in flight now, how many were served, and a way
    to wait until none is in flight (an unload lets them finish)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.served = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.served += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def idle(self, timeout: float) -> bool:
        """True once nothing is in flight; False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass
class Server:
    """One place a model is served: this node's llama-server, or a tunnel to a peer's."""

    id: str  # "local", or the peer's id
    base_url: str | Callable[[], str]  # e.g. http://127.0.0.1:41234 (a callable: read per request)
    is_ready: Callable[[], bool]
    status: Callable[[], str] = lambda: "ready"
    rtt_ms: Callable[[], float | None] = lambda: 0.0
    gate: Gate = field(default_factory=Gate)
    slots: int = SERVER_SLOTS  # requests it works on at once; more would only queue there

    def url(self) -> str:
        return self.base_url() if callable(self.base_url) else self.base_url


@dataclass
class Route:
    """A model this node answers for: the names it answers to and where it is served."""

    model: str
    servers: list[Server]
    aliases: tuple[str, ...] = ()

    def status(self) -> str:
        """ready when a server is; else what the first one (this node's, if any) is doing."""
        if any(s.is_ready() for s in self.servers):
            return "ready"
        return self.servers[0].status() if self.servers else "not served"


class UpstreamTable:
    """The models this node can answer for, and where each one is served. One writer
    (`set_routes`) replaces the whole table; the proxy only reads it."""

    def __init__(self) -> None:
        self._by_model: dict[str, Route] = {}

    def set_routes(self, routes: list[Route]) -> None:
        self._by_model = {r.model: r for r in routes}

    def models(self) -> list[str]:
        return list(self._by_model)

    def names(self) -> dict[str, tuple[str, ...]]:
        return {m: r.aliases for m, r in self._by_model.items()}

    def get(self, model_id: str) -> Route:
        return self._by_model[model_id]

    def ready_servers(self) -> dict[str, list[str]]:
        """For each model, the servers ready to answer it now ("local", or a peer's id)."""
        return {m: [s.id for s in r.servers if s.is_ready()] for m, r in self._by_model.items()}


def relayed_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A request's headers as they go upstream: no hop-by-hop ones, no credentials."""
    return {k: v for k, v in headers if k.lower() not in HOP_HEADERS and k.lower() not in CREDENTIAL_HEADERS}


def port_in_use(host: str, port: int) -> UserError:
    return UserError(f"port {port} on {host} is already in use: stop the other process or pass --port N")


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 5\r\nContent-Length: %d\r\n\r\n%s")


class _TooManyConnections(asyncio.Protocol):
    """A connection past the bound: a 503 JSON once the request starts to arrive, then closed at
    once (the request read so far was taken, so the close is no reset). One that sends nothing
    is closed after OVER_CAP_WAIT_SECS; either way it holds its descriptor briefly."""

    def __init__(self, limit: int) -> None:
        message = f"this node has {limit} connections open already; retry shortly"
        body = json.dumps({"error": {"message": message, "type": "unavailable_error", "code": 503}}).encode()
        self.reply = BUSY % (len(body), body)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        asyncio.get_running_loop().call_later(OVER_CAP_WAIT_SECS, transport.close)  # a client that never sends or closes

    def data_received(self, data: bytes) -> None:
        if self.transport is not None and self.reply:
            self.transport.write(self.reply)
            self.reply = b""
            self.transport.close()  # sends what is buffered, then closes


class _JsonErrors(RequestHandler):
    """aiohttp's protocol, but a request it cannot parse (no Host on HTTP/1.1, a bad header line)
    gets our JSON error and a debug line, not a text/plain reply and a logged traceback; and
    `on_lost` is told once when the connection ends (the site's count of open connections)."""

    __slots__ = ("_on_lost",)

    def __init__(self, server: web.Server, on_lost: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._on_lost: Callable[[], None] | None = on_lost

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            lost, self._on_lost = self._on_lost, None
            if lost is not None:
                lost()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self.logger.debug("bad request from %s: %s", request.remote, exc.message)
        if request.writer.output_size > 0:
            raise ConnectionError("response is sent already")
        response = error_response(status, f"bad request: {exc.message.strip() or 'malformed HTTP'}", "invalid_request_error")
        response.force_close()
        return response


class BoundedTCPSite(web.TCPSite):
    """aiohttp's TCPSite with at most `max_connections` client connections at once: aiohttp itself
    has no such bound, so the protocol factory it hands to asyncio counts the connections it
    admits, as it admits them (asyncio calls the factory for each accepted socket, before any
    connection_made runs: a burst of accepts cannot overshoot), until each one is lost."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int) -> None:
        super().__init__(runner, host, port, reuse_address=True)  # see check_port_free
        self.max_connections = max_connections
        self.open_connections = 0

    def _lost(self) -> None:
        self.open_connections -= 1

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would pass the bare factory
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.BaseProtocol:
            if self.open_connections >= self.max_connections:
                return _TooManyConnections(self.max_connections)
            handler = _JsonErrors(server, self._lost, loop=loop, **server._kwargs)  # as server() builds it, with our errors and count
            self.open_connections += 1
            return handler

        self._server = await loop.create_server(protocol, self._host, self._port, reuse_address=True)


async def listen(app: web.Application, host: str, port: int, in_use: Callable[[str, int], UserError],
                 max_connections: int = MAX_CONNECTIONS) -> web.AppRunner:
    """Serve `app` on host:port; a port that is taken becomes the one-line `in_use` error."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_SECS, keepalive_timeout=KEEPALIVE_SECS)
    await runner.setup()
    site = BoundedTCPSite(runner, host, port, max_connections)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise in_use(host, port) from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return runner


def is_local(request: web.Request) -> bool:
    """Sent from this machine to a loopback name: may see the invite token."""
    return request.remote in LOOPBACK_ADDRS and host_allowed(request.host, False)


def for_caller(status: dict[str, Any], request: web.Request) -> dict[str, Any]:
    """The status document as this caller may see it: the tokens (keys to the mesh) stay local."""
    return status if is_local(request) else {**status, "token": None, "client_token": None}


def error_response(status: int, message: str, kind: str, **extra: object) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    headers = {"Retry-After": RETRY_AFTER[status]} if status in RETRY_AFTER else None
    return web.json_response(body, status=status, headers=headers)


async def _still_ready(upstream: Server, grace: float = 1.0) -> bool:
    """After a failed relay: is the upstream still up? A server that just died takes a
    moment to be noticed (process reaped, plan recomputed), so watch for up to `grace`."""
    deadline = time.monotonic() + grace
    while upstream.is_ready() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return upstream.is_ready()


ExtraRoutes = Callable[[web.Application], None]
MAX_RESUMES = 2  # a request whose server went away (before or while answering) runs again at most this often
RESUME_SECS = 20.0  # ... and only while a new server is found within this of its first try
AVOID_SECS = 2.5  # a peer that failed a request is tried for it again only after this (a dead one is dropped within ~2 s)
SAME_SERVER_SECS = 1.0  # ... this node's own server, after this (a crashed one is noticed at once)
MAX_MODEL_NAME = 256  # longer `model` values name nothing: not counted as demand
PICKUP_WAIT_SECS = 30.0  # a request for a model a standby is picking up waits this long for it to appear


class UpstreamLost(Exception):
    """The server of a request went away before any of its answer reached the caller."""


class StreamRelay:
    """A streamed answer being relayed to its caller, whole events at a time, with the
    transcript of what reached it (so another server can take over mid-answer)."""

    def __init__(self, response: web.StreamResponse, transcript: Transcript, meter: ResponseMeter | None) -> None:
        self.response, self.transcript, self.meter = response, transcript, meter

    async def pump(self, up: aiohttp.ClientResponse, splice: Splice | None) -> None:
        """Relay `up`'s events (through `splice` when it continues another stream) until it ends."""
        events = SseEvents()
        async for chunk in up.content.iter_any():
            await self._send(self._relayable(events.feed(chunk), splice))
            if events.oversized:
                self.transcript.blocked = "an event was too long to hold"
        if (last := events.rest()) is not None:
            await self._send(self._relayable([last], splice))

    def _relayable(self, events: list[SseEvent], splice: Splice | None) -> bytes:
        out = bytearray()
        for event in events:
            try:
                if splice is None:
                    self.transcript.note(event)
                    out += event.raw
                elif (raw := splice.accept(event)) is not None:
                    out += raw
            except (TypeError, ValueError, KeyError, AttributeError):  # a malformed event: passed on, not understood
                self.transcript.blocked = "the server sent an event it could not be continued from"
                out += event.raw
        return bytes(out)

    async def _send(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.response.write(data)
        except (ConnectionError, RuntimeError):
            raise CallerGone(self.response) from None  # not the server's failure: nothing to continue
        if self.meter is not None:
            self.meter.feed(data, time.monotonic())

    async def end(self) -> None:
        try:
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            raise CallerGone(self.response) from None


class CallerGone(Exception):
    """The caller hung up while its answer was being relayed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the caller went away")
        self.response = response


class StreamCut(Exception):
    """A streamed answer whose server went away mid-stream: part of it reached the caller."""

    def __init__(self, message: str, relay: StreamRelay) -> None:
        super().__init__(message)
        self.relay = relay

    async def ended_already(self) -> web.StreamResponse | None:
        """The response, ended, if the answer was complete when its connection broke: its end
        marker had come (or only that was missing, which is written here), so nothing is run again."""
        transcript = self.relay.transcript
        if not (transcript.finished or transcript.stopped):
            return None
        with contextlib.suppress(ConnectionError, RuntimeError):
            if not transcript.finished:
                marker = 'event: message_stop\ndata: {"type":"message_stop"}\n\n' if transcript.dialect == "messages" else "data: [DONE]\n\n"
                await self.relay.response.write(marker.encode())
            await self.relay.response.write_eof()
        return self.relay.response

    async def give_up(self, message: str) -> web.StreamResponse:
        """End the caller's stream with the error in-band (SSE has no status to change by now)."""
        event = {"error": {"message": message, "type": "upstream_error", "code": 502}}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.relay.response.write(f"data: {json.dumps(event)}\n\n".encode())
            await self.relay.response.write_eof()
        return self.relay.response


class ApiProxy:
    def __init__(self, table: UpstreamTable, *, created: int | None = None, max_inflight: int | None = None,
                 upstream_timeout: float = UPSTREAM_START_SECS, max_connections: int = MAX_CONNECTIONS) -> None:
        self.table = table
        self.max_inflight = max_inflight  # requests in flight per server (--max-inflight); None: its slots
        self.upstream_timeout = upstream_timeout  # a peer's answer must start within this (--upstream-timeout)
        self.max_connections = max_connections
        self.status_source: Callable[[], dict[str, Any]] | None = None  # the node's status document
        self.extra_routes: list[ExtraRoutes] = []  # e.g. the runtime API, added before start
        self.created = created or int(time.time())
        self.policy = Policy()  # Host, Origin and key rules; the node sets its own before start
        self.node_id = "local"  # this node's id in the mesh, once it has one (conversations hash to node ids)
        self.metrics: NodeMetrics | None = None  # /metrics; the node sets it before start
        # Demand (placement): told of every request that names a model, served or not, by that name.
        self.on_request: Callable[[str], None] = lambda model: None
        # A model nobody serves yet that is about to be served (a standby is loading it): a request
        # for it waits up to PICKUP_WAIT_SECS instead of a 404. Returns that model's name, or None.
        self.coming: Callable[[str], str | None] = lambda model: None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        install_guard(app, self.policy, wrong_host_hint="call the API by a loopback name (127.0.0.1, localhost) or start the node with --listen-all")
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_post("/v1/{tail:.*}", self.forward)
        for add in self.extra_routes:
            add(app)
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
        self.policy.ports.add(port)
        try:
            self._runner = await listen(self.app(), host, port, port_in_use, self.max_connections)
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
        ok = "ready" in models.values()
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
        found = match_model(request.match_info["model"], self.table.names())
        if found.model is None:
            return self._unknown_model(request.match_info["model"], found)
        return web.json_response(self._model_entry(found.model))

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"no route for {request.method} {request.path}", "not_found_error")

    def _unknown_model(self, requested: str | None, found: Match) -> web.Response:
        served = self.table.models()
        if found.candidates:
            return error_response(404, f"model {requested!r} could be any of {', '.join(found.candidates)}: name one", "model_not_found",
                                  available=served, candidates=list(found.candidates))
        listing = ", ".join(served) if served else "none yet"
        return error_response(404, f"model {requested!r} is not served here; available: {listing}", "model_not_found", available=served)

    def has_room(self, server: Server) -> bool:
        return self.gate_has_room(server.gate, server.slots)

    def gate_has_room(self, gate: Gate, slots: int = SERVER_SLOTS) -> bool:
        """The in-flight cap (--max-inflight, else the server's slots): also applied where peers' requests arrive."""
        return gate.in_flight < (self.max_inflight or slots)

    def _choose(self, route: Route, session: str | None) -> Server | None:
        """The server for this request, among the ready ones with a free slot (a conversation:
        the one its session hashes to, the same from every node)."""
        views = [ServerView(s.id, s.is_ready() and self.has_room(s), s.gate.in_flight, s.rtt_ms(), self.node_id if s.id == "local" else s.id)
                 for s in route.servers]
        chosen = choose_server(views, session)
        return next(s for s in route.servers if s.id == chosen.id) if chosen is not None else None

    async def metrics_page(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return error_response(503, "the node is starting; retry shortly", "unavailable_error")
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        path = api_path(request.path)
        if path is None:  # llama-server's other endpoints (slots, props, metrics) are not the mesh's API
            return await self.not_found(request)
        answer, model = await self._answer(request, path, time.monotonic())
        if self.metrics is not None:
            self.metrics.answered(model, answer.status)
        return answer

    async def _answer(self, request: web.Request, path: str, arrived: float) -> tuple[web.StreamResponse, str | None]:
        """The response, and the served model it was for (None: the request named none)."""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds {MAX_BODY // (1024 * 1024)} MiB", "invalid_request_error"), None
        doc = request_doc(body)
        wanted = requested_model(doc)
        if wanted and len(wanted) <= MAX_MODEL_NAME:
            self.on_request(wanted)
        found = match_model(wanted, self.table.names())
        if found.model is None and wanted and not found.candidates and (coming := self.coming(wanted)) is not None:
            found = await self._arrival(wanted, coming)
        if found.model is None:
            return self._unknown_model(wanted, found), None
        route = self.table.get(found.model)
        session = session_of(doc, request.headers)
        server = self._choose(route, session)
        if server is None and route.status() != "ready" and self.coming(route.model) is not None:  # still loading there
            model = route.model
            server = await self._ready_server(model, session, time.monotonic() + PICKUP_WAIT_SECS,
                                              still=lambda: self.coming(model) is not None)
            route = self.table.get(route.model) if route.model in self.table.models() else route
        if server is None and route.status() == "ready":  # every ready server is full: say so rather than queue without end
            limits = sorted({self.max_inflight or s.slots for s in route.servers if s.is_ready()})
            return error_response(429, f"model {route.model} is busy: its servers already take {'/'.join(map(str, limits))} request(s) each; retry shortly",
                                  "rate_limit_error"), route.model
        if server is None:
            return error_response(503, f"model {route.model} is {route.status()}; retry shortly", "unavailable_error"), route.model
        resuming: StreamCut | None = None
        failed: dict[str, float] = {}  # servers that failed this request, and when
        for attempt in range(MAX_RESUMES + 1):
            server.gate.enter()
            try:
                if resuming is None:
                    return await self._relay(request, route.model, server, path, body, arrived), route.model
                return await self._continue(request, route.model, server, path, doc, resuming), route.model
            except UpstreamLost as lost:
                failure: Exception = lost
            except StreamCut as cut:
                failure, resuming = cut, cut
            except CallerGone as gone:
                return gone.response, route.model
            finally:
                server.gate.leave()
            # Its server went away (worker or host lost, re-plan): run the request again on the new
            # plan once one is ready, within RESUME_SECS of the loss; a stream under way is continued.
            if resuming is not None and (ended := await resuming.ended_already()):
                return ended, route.model
            failed[server.id] = time.monotonic()
            deadline = time.monotonic() + RESUME_SECS
            next_server = await self._ready_server(route.model, session, deadline, failed) if attempt < MAX_RESUMES else None
            if next_server is None:
                break
            server = next_server
            if self.metrics is not None:
                self.metrics.resumed(route.model)
        if resuming is not None:
            return await resuming.give_up(str(failure)), route.model
        return error_response(503, str(failure), "unavailable_error"), route.model

    async def _arrival(self, wanted: str, coming: str) -> Match:
        """Wait (bounded) for a model that is being picked up to appear in the table."""
        deadline = time.monotonic() + PICKUP_WAIT_SECS
        while ((found := match_model(wanted, self.table.names())).model is None and not found.candidates
               and time.monotonic() < deadline and self.coming(wanted) == coming):
            await asyncio.sleep(0.1)
        return found

    async def _ready_server(self, model: str, session: str | None, deadline: float, failed: dict[str, float] | None = None,
                            still: Callable[[], bool] = lambda: True) -> Server | None:
        """A server for `model` with room, once there is one (the table is replaced as plans change),
        while `still()` holds. Servers that just `failed` this request come last: another ready one
        is taken first (a dead peer still looks ready until the mesh drops it), and the same one
        again only after a moment (a re-planned local server comes back under the same id)."""
        failed = failed or {}

        def rested(s: Server, now: float) -> bool:  # a peer only once the mesh would have dropped it if dead
            return now - failed[s.id] >= (SAME_SERVER_SECS if s.id == "local" else AVOID_SECS)

        while time.monotonic() < deadline:
            if model in self.table.models():
                route, now = self.table.get(model), time.monotonic()
                for servers in ([s for s in route.servers if s.id not in failed], [s for s in route.servers if s.id not in failed or rested(s, now)]):
                    if (server := self._choose(Route(route.model, servers, route.aliases), session)) is not None:
                        return server
            if not still():  # checked after the table: what ends the wait may be the server becoming ready
                return None
            await asyncio.sleep(0.1)
        return None

    def _failed(self, model: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.failed(model, kind)

    async def _open(self, request: web.Request, model: str, upstream: Server, path: str, body: bytes) -> aiohttp.ClientResponse | web.Response:
        """Send the request upstream: its response once it starts, or the 504 for a peer that never starts."""
        assert self._session is not None
        headers = relayed_headers(request.headers.items())
        # The query as the caller encoded it, byte for byte (Claude Code sends ?beta=true): decoded and
        # re-encoded, %23 would become a fragment and %26 a new parameter.
        query = request.rel_url.raw_query_string
        url = URL(upstream.url() + path + (f"?{query}" if query else ""), encoded=True)
        # A peer that never starts its answer (wedged, or hostile) must not hold the caller for ever;
        # once it streams, a long generation is legitimate. This node's own llama-server is trusted.
        start_within = None if upstream.id == "local" else self.upstream_timeout
        try:
            return await asyncio.wait_for(self._session.request(request.method, url, data=body, headers=headers), start_within)
        except TimeoutError as exc:
            if isinstance(exc, aiohttp.ClientError):  # aiohttp's own connect timeout: a failed relay
                raise
            self._failed(model, "upstream_timeout")
            return error_response(504, f"the peer serving {model} did not start its answer within {start_within:g} s", "upstream_timeout")

    async def _relay(self, request: web.Request, model: str, upstream: Server, path: str, body: bytes, arrived: float) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        relay: StreamRelay | None = None
        try:
            started = await self._open(request, model, upstream, path, body)
            if isinstance(started, web.Response):
                return started
            async with started as up:
                out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS and not is_cors_header(k)}
                response = web.StreamResponse(status=up.status, reason=up.reason, headers=out_headers)
                if up.content_length is not None:
                    response.content_length = up.content_length
                await response.prepare(request)
                streamed = "text/event-stream" in (up.headers.get("Content-Type") or "")
                meter = ResponseMeter(arrived, streamed) if up.status == 200 else None
                dialect = DIALECTS.get(path) if streamed and up.status == 200 else None
                if dialect is not None:  # relayed event by event, so that another server can continue it
                    relay = StreamRelay(response, Transcript(dialect), meter)
                    await relay.pump(up, None)
                    if not relay.transcript.finished:  # it ended without its end: the server went away
                        raise aiohttp.ClientPayloadError("the stream ended before the answer did")
                else:
                    async for chunk in up.content.iter_any():
                        await response.write(chunk)
                        if meter is not None:
                            meter.feed(chunk, time.monotonic())
                await response.write_eof()
                if meter is not None and self.metrics is not None:
                    self.metrics.measured(model, meter.finish())
                return response
        except (TimeoutError, aiohttp.ClientError) as exc:
            message = f"upstream for {model} failed: {exc.__class__.__name__}: {exc}"
            if relay is not None:
                if not (relay.transcript.finished or relay.transcript.stopped):
                    self._failed(model, "cut_mid_answer")
                raise StreamCut(message, relay) from None  # part of the answer is out: another server may continue it
            if response is not None:  # not a stream we can continue: end it
                self._failed(model, "cut_mid_answer")
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await response.write_eof()
                return response
            # Nothing was answered: a peer that cannot be reached may have died (the mesh drops it
            # within ~2 s), and our own server may be restarting or re-planning: run it elsewhere.
            if upstream.id != "local" or not await _still_ready(upstream):
                self._failed(model, "unavailable_error")
                raise UpstreamLost(f"model {model} is {upstream.status()}; retry shortly ({message})") from None
            self._failed(model, "upstream_error")
            return error_response(502, message, "upstream_error")

    async def _continue(self, request: web.Request, model: str, upstream: Server, path: str, doc: dict[str, Any], cut: StreamCut) -> web.StreamResponse:
        """Have `upstream` continue a stream another server left unfinished, into the same response."""
        try:
            resumed, echo = resumed_request(doc, cut.relay.transcript)
            body = json.dumps(resumed).encode()
        except NotResumable as exc:
            return await cut.give_up(f"{cut} (it cannot be continued elsewhere: {exc})")
        relay = cut.relay
        try:
            started = await self._open(request, model, upstream, path, body)
            if isinstance(started, web.Response):
                return await cut.give_up(f"{cut}; the peer asked to continue it did not start in time")
            async with started as up:
                if up.status != 200 or "text/event-stream" not in (up.headers.get("Content-Type") or ""):
                    return await cut.give_up(f"{cut}; the server asked to continue it answered {up.status}")
                await relay.pump(up, Splice(relay.transcript, echo))
                if not relay.transcript.finished:
                    raise aiohttp.ClientPayloadError("the stream ended before the answer did")
                await relay.end()
                if relay.meter is not None and self.metrics is not None:
                    self.metrics.measured(model, relay.meter.finish())
                return relay.response
        except (TimeoutError, aiohttp.ClientError) as exc:
            if not (relay.transcript.finished or relay.transcript.stopped):
                self._failed(model, "cut_mid_answer")
            raise StreamCut(f"upstream for {model} failed: {exc.__class__.__name__}: {exc}", relay) from None
