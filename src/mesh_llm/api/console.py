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

from mesh_llm.api.http_guard import install_guard
from mesh_llm.api.proxy import MAX_BODY, ApiProxy, for_caller, listen
from mesh_llm.api.runtime import RuntimeApi
from mesh_llm.api.status_feed import StatusFeed
from mesh_llm.errors import UserError

PAGE_DIR = Path(__file__).parent / "console_page"
ASSETS = frozenset({"console.css", "console.js"})  # the only files served: no path ever reaches the disk


def console_port_in_use(host: str, port: int) -> UserError:
    return UserError(f"console port {port} on {host} is already in use: stop the other process or pass --console N")


class WebConsole:
    def __init__(self, feed: StatusFeed, proxy: ApiProxy, runtime: RuntimeApi | None = None) -> None:
        self.feed = feed
        self.proxy = proxy  # its policy (--listen-all, --cors-origin, keys) is the console's too
        self.runtime = runtime  # load and unload from the page (same rules as on the API port)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        # The proxy's rules (Host, Origin, paths, keys), except that a caller on this machine chats
        # without a key: the page is served to such callers only, so a key would guard nothing more.
        install_guard(app, self.proxy.policy, wrong_host_hint=f"open the console at http://localhost:{self.port or ''}", local_without_key=True)
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

    async def start(self, host: str, port: int) -> None:
        self.port = port
        self.proxy.policy.ports.add(port)  # the page's own origin: its chat posts here
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
