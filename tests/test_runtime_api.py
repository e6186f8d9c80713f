"""Who may use /api/runtime, and how a request that is not for it is refused (no processes)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mesh_llm.api.runtime import RuntimeApi
from mesh_llm.errors import NotFound


async def no_prepare(ref: str):  # type: ignore[no-untyped-def]
    raise NotFound(f"unknown model {ref!r}")


def fleet(client: bool = False) -> SimpleNamespace:
    return SimpleNamespace(settings=None if client else object(), mesh=SimpleNamespace(me=SimpleNamespace(id="n")),
                           budget=lambda: {"offer_bytes": 1}, snapshot=lambda: [], loaded={})


def api(client: bool = False, **kw) -> RuntimeApi:  # type: ignore[no-untyped-def]
    runtime = RuntimeApi(no_prepare, **kw)
    runtime.fleet = fleet(client)  # type: ignore[assignment]
    return runtime


async def answer(runtime: RuntimeApi, method: str, path: str, remote: str = "127.0.0.1", host: str = "127.0.0.1:9337",
                 body: object = None, content_type: str = "application/json") -> tuple[int, dict]:
    app = web.Application()
    runtime.install(app)
    raw = json.dumps(body).encode() if body is not None else b""
    request = make_mocked_request(method, path, headers={"Host": host, "Content-Type": content_type}, app=app, payload=None).clone(remote=remote)
    request._read_bytes = raw  # the body as aiohttp would have read it
    match = await app.router.resolve(request)
    request._match_info = match
    response = await match.handler(request)
    return response.status, json.loads(response.body)


async def test_callers_on_other_machines_and_rebound_names_are_refused() -> None:
    runtime = api()
    assert (await answer(runtime, "GET", "/api/runtime"))[0] == 200
    status, doc = await answer(api(listen_all=True), "GET", "/api/runtime", remote="192.168.1.9", host="192.168.1.2:9337")
    assert status == 403 and "callers on this machine only" in doc["error"]["message"]  # --listen-all alone does not open it
    status, doc = await answer(runtime, "POST", "/api/runtime/models", host="rebound.example:9337", body={"model": "x"})
    assert status == 403 and "loopback name" in doc["error"]["message"]  # DNS rebinding: a loopback peer, a foreign name
    # --allow-remote-runtime without --listen-all allows nobody more: the API listens on loopback only
    assert (await answer(api(allow_remote=True), "GET", "/api/runtime", remote="192.168.1.9", host="192.168.1.2:9337"))[0] == 403


async def test_remote_callers_when_allowed_still_cannot_name_files() -> None:
    runtime = api(allow_remote=True, listen_all=True)
    remote = {"remote": "192.168.1.9", "host": "192.168.1.2:9337"}
    assert (await answer(runtime, "GET", "/api/runtime", **remote))[0] == 200
    status, doc = await answer(runtime, "POST", "/api/runtime/models", body={"model": "/etc/passwd"}, **remote)
    assert status == 403 and "from this machine only" in doc["error"]["message"]
    status, doc = await answer(runtime, "POST", "/api/runtime/models", body={"model": "no-such-catalog-name"}, **remote)
    assert status == 404 and "unknown model" in doc["error"]["message"]  # a name goes on to be resolved


async def test_bad_bodies_and_clients_are_refused_before_anything_is_fetched() -> None:
    runtime = api()
    status, doc = await answer(runtime, "POST", "/api/runtime/models", body={"model": "x"}, content_type="text/plain")
    assert status == 415  # what a cross-origin page can send without a preflight
    for body in ({"modle": "x"}, {"model": ""}, {"model": 5}, ["x"], {"model": "x" * 3000}):
        assert (await answer(runtime, "POST", "/api/runtime/models", body=body))[0] == 400, body
    status, doc = await answer(api(client=True), "POST", "/api/runtime/models", body={"model": "gemma-3-270m"})
    assert status == 400 and "this node is a client" in doc["error"]["message"]
    status, doc = await answer(runtime, "DELETE", "/api/runtime/models/nothing")
    assert status == 404 and "nothing is not loaded on this node; loaded: none" in doc["error"]["message"]


async def test_before_the_mesh_is_up_it_says_so() -> None:
    runtime = RuntimeApi(no_prepare)
    status, doc = await answer(runtime, "GET", "/api/runtime")
    assert status == 503 and "starting" in doc["error"]["message"]
