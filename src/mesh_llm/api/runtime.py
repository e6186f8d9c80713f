"""REST control of the models a running node serves, under /api/runtime.

    GET    /api/runtime                 the models here: state, role, memory, port, requests
    GET    /api/runtime/processes       every child process: llama-servers and RPC workers
    POST   /api/runtime/models          {"model": REF} → 201 loading started; 409 already loaded;
                                        422 does not fit and cannot be split now; 404 unknown name
                                        or missing file; 400 not a model (or this node is a client)
    DELETE /api/runtime/models/{name}   → 200 once it is gone; 404 not loaded (its id or a name
                                        it was loaded by, exactly: no guessing what to unload)

On the API port and the console's. Only callers on this machine (addressing it by a
loopback name, so a DNS-rebinding page is no caller) may use it, unless the node was
started with --listen-all and --allow-remote-runtime; even then a file is loaded by path
only for callers on this machine, and once API keys exist the others need one (api.http_guard). A POST must be JSON, which a cross-origin page cannot
send without a preflight this server never grants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mesh_llm.api.proxy import error_response, host_allowed, is_local
from mesh_llm.errors import NotFound, UserError
from mesh_llm.models.catalog import name_tokens
from mesh_llm.models.reference import LocalFile, ReferenceError, parse_reference
from mesh_llm.serving.fleet import Fleet, RuntimeRefusal
from mesh_llm.serving.runner import ModelSpec

Prepare = Callable[[str], Awaitable[ModelSpec]]


class RuntimeApi:
    def __init__(self, prepare: Prepare, allow_remote: bool = False, listen_all: bool = False) -> None:
        self.prepare = prepare
        self.allow_remote = allow_remote and listen_all  # on loopback only, there is nobody remote to allow
        self.listen_all = listen_all
        self.fleet: Fleet | None = None  # set once the mesh is up; until then: 503

    def install(self, app: web.Application) -> None:
        app.router.add_get("/api/runtime", self.models)
        app.router.add_get("/api/runtime/processes", self.processes)
        app.router.add_post("/api/runtime/models", self.load)
        app.router.add_delete("/api/runtime/models/{name}", self.unload)

    def _refuse(self, request: web.Request) -> web.Response | None:
        if not host_allowed(request.host, self.listen_all):  # a page whose name was re-pointed here
            return error_response(403, f"host {request.host!r} is not served here: call the node by a loopback name (127.0.0.1, localhost)", "forbidden")
        if not self.allow_remote and not is_local(request):
            return error_response(403, "the runtime API answers callers on this machine only (start the node with --allow-remote-runtime to change that)", "forbidden")
        if self.fleet is None:
            return error_response(503, "the node is starting; retry shortly", "unavailable_error")
        return None

    async def models(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.fleet is not None
        return web.json_response({"node": self.fleet.mesh.me.id, "client": self.fleet.settings is None, "budget": self.fleet.budget(),
                                  "models": self.fleet.snapshot()})

    async def processes(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.fleet is not None
        return web.json_response({"processes": self.fleet.processes()})

    async def load(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.fleet is not None
        if request.content_type != "application/json":
            return error_response(415, "send the model as JSON: {\"model\": \"REF\"} with Content-Type: application/json", "invalid_request_error")
        try:
            doc: Any = await request.json()
        except ValueError:
            doc = None
        ref = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(ref, str) or not ref.strip() or len(ref) > 2048:
            return error_response(400, "the body must be {\"model\": \"REF\"}: a catalog name, ORG/REPO/FILE.gguf, ORG/REPO[:QUANT], URL or path", "invalid_request_error")
        if self.fleet.settings is None:  # before any download
            return error_response(400, "this node is a client: it runs no models (start a node without --client to serve one)", "runtime_error")
        if not is_local(request) and _is_path(ref):
            return error_response(403, "a model file is loaded by path from this machine only: name a catalog model or a hub file", "forbidden")
        try:
            spec = await self.prepare(ref)
            refusal = self.fleet.refusal_to_load(spec)
            if refusal is not None:
                raise refusal
            loaded = self.fleet.add(spec)
        except RuntimeRefusal as exc:
            return error_response(exc.status, str(exc), "runtime_error")
        except NotFound as exc:
            return error_response(404, str(exc), "not_found_error")
        except UserError as exc:
            return error_response(400, str(exc), "invalid_request_error")
        await asyncio.shield(self.fleet.replan())  # placed at once: the answer says how it will run (even if the caller left)
        life = loaded.life
        return web.json_response({"loaded": spec.model_id, "state": life.phase.value, "detail": life.detail,
                                  "aliases": list(spec.aliases)}, status=201)

    async def unload(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.fleet is not None
        asked = request.match_info["name"]
        name = next((n for n, loaded in self.fleet.loaded.items() if name_tokens(asked) in [name_tokens(x) for x in (n, *loaded.spec.aliases)]), None)
        if name is None:
            return error_response(404, f"{asked} is not loaded on this node; loaded: {', '.join(self.fleet.loaded) or 'none'}", "not_found_error")
        try:
            await self.fleet.unload(name)
        except RuntimeRefusal as exc:
            return error_response(exc.status, str(exc), "runtime_error")
        return web.json_response({"unloaded": name})


def _is_path(ref: str) -> bool:
    try:
        return isinstance(parse_reference(ref), LocalFile)
    except ReferenceError:
        return False
