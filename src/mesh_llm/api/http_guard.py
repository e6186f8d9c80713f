"""The aiohttp shell around api.guard (and the API keys), shared by :9337 and the console.

Every request passes, in order: its Host must be a loopback name (unless --listen-all);
a browser's Origin must be this node's own page or one the user allowed (--cors-origin),
which may use /v1 only (not the status with its token, nor the runtime API); its preflight
is answered here; a /v1 request needs a key once any
exists, and so does a call to the runtime API, /api/status, /api/events, /api/blackboard or /metrics from
anyone but a caller on this machine. CORS headers are this module's alone: whatever an upstream sent is dropped.
"""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from mesh_llm.api.guard import Origin, cors_headers, host_allowed, is_cors_header, judge_origin, local_caller, loopback_origins

OPEN_PATHS = frozenset({"/health", "/v1/health"})  # load balancers and `mesh-llm status` probe these without a key
# Once keys exist, callers not on this machine need one here too (`mesh-llm status/load/unload` call 127.0.0.1 and need none).
CONTROL_PATHS = frozenset({"/api/runtime", "/api/status", "/api/events", "/metrics", "/api/blackboard"})


class KeyCheck(Protocol):
    """The node's API keys (api.keys.KeyRing)."""

    def required(self) -> bool: ...
    def accepts(self, presented: str | None) -> bool: ...


@dataclass
class Policy:
    """What the node was started with; read per request (ports are added as listeners start)."""

    listen_all: bool = False
    cors_origins: frozenset[str] = frozenset()
    ports: set[int] = field(default_factory=set)  # the API's and the console's: pages there are ours
    keys: KeyCheck | None = None
    own_names: frozenset[str] = frozenset()  # this machine's host names (lower case): see guard.judge_origin


def presented_key(request: web.Request) -> str | None:
    """The key a caller sent: OpenAI style (Authorization: Bearer KEY) or Anthropic's x-api-key."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    # the same shape as api.proxy.error_response (not imported: proxy imports this module)
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status, headers=headers)


def _is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or posixpath.normpath(path).startswith("/v1")


def _is_control(path: str) -> bool:
    """The node's own control and status routes (the runtime API, the status with its events)."""
    normal = posixpath.normpath(path) if path.startswith("/") else path
    normal = "/" + normal.lstrip("/")
    return normal in CONTROL_PATHS or normal.startswith("/api/runtime/")


def guard_middleware(policy: Policy, *, wrong_host_hint: str, local_without_key: bool = False) -> Middleware:
    """`local_without_key`: the console's own /v1, whose page only local callers are served."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if "Host" not in request.headers:  # HTTP/1.0 may omit it (aiohttp then asks DNS for our own name): every client sends one
            return _error(400, "a Host header is needed", "invalid_request_error")
        if not host_allowed(request.host, policy.listen_all):
            return _error(403, f"host {request.host!r} is not served here: {wrong_host_hint}", "forbidden")
        origin = request.headers.get("Origin")
        verdict = origin_of(request, policy)
        if verdict is Origin.REFUSED:
            return _error(403, f"origin {origin!r} may not use this node's API (start the node with --cors-origin {origin} to allow that web app)", "forbidden")
        api = _is_api(request.path)
        if verdict is Origin.ALLOWED and not api:  # an approved app is an API client: the status (token) and runtime stay ours
            return _error(403, f"origin {origin!r} may use /v1 only", "forbidden")
        if request.method == "OPTIONS" and origin is not None and api and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204)  # the CORS headers are added as it is sent
        keys = policy.keys
        control = not api and _is_control(request.path)
        if (control or (api and posixpath.normpath(request.path) not in OPEN_PATHS)) and keys is not None and keys.required():
            exempt = (control or local_without_key) and local_caller(request.remote, request.host, verdict)
            if not exempt and not keys.accepts(presented_key(request)):
                return _error(401, "this API needs a key: send it as Authorization: Bearer KEY (OpenAI clients: api_key=KEY) or x-api-key: KEY "
                              "(Anthropic clients); keys are made with `mesh-llm auth key create`", "authentication_error",
                              {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return guard


def origin_of(request: web.Request, policy: Policy) -> Origin:
    return judge_origin(request.headers.get("Origin"), loopback_origins(policy.ports), policy.cors_origins, request.host, policy.listen_all, policy.own_names)


def cors_signal(policy: Policy) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """on_response_prepare: drop any CORS header a handler or upstream set; add ours for an allowed origin."""

    async def own_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        for name in [n for n in response.headers if is_cors_header(n)]:
            del response.headers[name]
        if origin_of(request, policy) is Origin.ALLOWED and _is_api(request.path):
            preflight = request.method == "OPTIONS" and response.status == 204
            response.headers.update(cors_headers(request.headers["Origin"], preflight, request.headers.get("Access-Control-Request-Headers")))

    return own_cors_headers


def install_guard(app: web.Application, policy: Policy, *, wrong_host_hint: str, local_without_key: bool = False) -> None:
    """Guard every route of `app` (call before the app starts: middlewares freeze then)."""
    app.middlewares.insert(0, guard_middleware(policy, wrong_host_hint=wrong_host_hint, local_without_key=local_without_key))
    app.on_response_prepare.append(cors_signal(policy))
