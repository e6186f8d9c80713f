"""REST control of the models a running node serves, under /api/runtime.

    GET    /api/runtime                 the models here: state, role, memory, port, requests
    GET    /api/runtime/processes       every child process: llama-servers and RPC workers
    POST   /api/runtime/models          {"model": REF} → 201 loading started; 409 already loaded;
                                        422 does not fit and cannot be split now; 404 unknown
    DELETE /api/runtime/models/{name}   → 200 once it is gone; 404 not loaded

On the API port and the console's. Only callers on this machine (addressing it by a
loopback name, so a DNS-rebinding page is no caller) may use it, unless the node was
started with --allow-remote-runtime; a POST must be JSON, which a cross-origin page
cannot send without a preflight this server never grants.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mesh_llm.api.proxy import error_response, is_local
from mesh_llm.api.routing import match_model
from mesh_llm.errors import NotFound, UserError
from mesh_llm.serving.fleet import Fleet, RuntimeRefusal
from mesh_llm.serving.runner import ModelSpec

Prepare = Callable[[str], Awaitable[ModelSpec]]


class RuntimeApi:
    def __init__(self, prepare: Prepare, allow_remote: bool = False) -> None:
        self.prepare = prepare
        self.allow_remote = allow_remote
        self.fleet: Fleet | None = None  # set once the mesh is up; until then: 503

    def install(self, app: web.Application) -> None:
        app.router.add_get("/api/runtime", self.models)
        app.router.add_get("/api/runtime/processes", self.processes)
        app.router.add_post("/api/runtime/models", self.load)
        app.router.add_delete("/api/runtime/models/{name}", self.unload)

    def _refuse(self, request: web.Request) -> web.Response | None:
        if not self.allow_remote and not is_local(request):
            return error_response(403, "the runtime API answers callers on this machine only (start the node with --allow-remote-runtime to change that)", "forbidden")
        if self.fleet is None:
            return error_response(503, "the node is starting; retry shortly", "unavailable_error")
        return None

    async def models(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.fleet is not None
        return web.json_response({"node": self.fleet.mesh.me.id, "budget": self.fleet.budget(), "models": self.fleet.snapshot()})

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
        await self.fleet.replan()  # placed at once: the answer says how it will run
        life = loaded.life
        return web.json_response({"loaded": spec.model_id, "state": life.phase.value, "detail": life.detail,
                                  "aliases": list(spec.aliases)}, status=201)

    async def unload(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.fleet is not None
        asked = request.match_info["name"]
        found = match_model(asked, {name: loaded.spec.aliases for name, loaded in self.fleet.loaded.items()})
        if found.model is None:
            loaded_names = ", ".join(self.fleet.loaded) or "none"
            why = f"could be any of {', '.join(found.candidates)}: name one" if found.candidates else f"is not loaded on this node; loaded: {loaded_names}"
            return error_response(404, f"{asked} {why}", "not_found_error")
        try:
            await self.fleet.unload(found.model)
        except RuntimeRefusal as exc:
            return error_response(exc.status, str(exc), "runtime_error")
        return web.json_response({"unloaded": found.model})
