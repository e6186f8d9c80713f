"""The web console on :3131: a page, the status API and a same-origin door to the mesh API.

The page (static files shipped in the package, nothing from a CDN) reads
/api/status once and then follows /api/events. Its chat posts to /v1 here,
which runs the very handlers of the node's API proxy, so the browser needs no
cross-origin access to :9337 and no other web page can script that API through
the console. The invite token is on this page, so on loopback (the default) a
request must name a loopback host: a DNS-rebinding page cannot read it.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from mesh_llm.api.proxy import MAX_BODY, ApiProxy, error_response, for_caller, host_allowed, listen
from mesh_llm.api.runtime import RuntimeApi
from mesh_llm.api.status_feed import StatusFeed
from mesh_llm.errors import UserError

PAGE_DIR = Path(__file__).parent / "console_page"
ASSETS = frozenset({"console.css", "console.js"})  # the only files served: no path ever reaches the disk


def console_port_in_use(host: str, port: int) -> UserError:
    return UserError(f"console port {port} on {host} is already in use: stop the other process or pass --console N")


class WebConsole:
    def __init__(self, feed: StatusFeed, proxy: ApiProxy, listen_all: bool, runtime: RuntimeApi | None = None) -> None:
        self.feed = feed
        self.proxy = proxy
        self.listen_all = listen_all
        self.runtime = runtime  # load and unload from the page (same rules as on the API port)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.asset)
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/api/events", self.feed.stream)  # the token only to local callers, as /api/status
        app.router.add_get("/v1/models", self.proxy.list_models)
        app.router.add_post("/v1/{tail:.*}", self.proxy.forward)
        if self.runtime is not None:
            self.runtime.install(app)
        app.router.add_route("*", "/{tail:.*}", self.proxy.not_found)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not host_allowed(request.host, self.listen_all):
            return error_response(403, f"host {request.host!r} is not served here: open the console at http://localhost:{request.url.port or ''}", "forbidden")
        return await handler(request)

    async def start(self, host: str, port: int) -> None:
        self._runner = await listen(self.app(), host, port, console_port_in_use)

    async def close(self) -> None:
        await self.feed.close()  # ends the event streams, or cleanup would wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            return await self.proxy.not_found(request)
        return web.FileResponse(PAGE_DIR / name, headers={"Cache-Control": "no-cache"})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(for_caller(self.feed.latest, request))  # at most a second old
