"""/api/blackboard on the node's API port: post and read this node's board.

    POST /api/blackboard  {"text": STR, "from": STR|null}
                          → 200 {"item": ITEM, "scrubbed": [{"kind": "email", "count": 1}, …]}
                          400 empty or bad text / body; 413 over 4096 bytes after scrubbing;
                          429 (Retry-After) over 10 posts a minute from this node
    GET  /api/blackboard?search=Q&since=HOURS&from=NAME&limit=N
                          → 200 {"items": [ITEM, …]}: ranked hits for Q, else newest first
    ITEM = {"id": str, "text": str, "from": str, "node": str, "time": float}

Callers on this machine only (as /api/runtime: --listen-all with --allow-remote-runtime
opens it to others, who then need an API key once keys exist). A POST must be JSON, which
a cross-origin page cannot send without a preflight this server never grants.
"""

from __future__ import annotations

import getpass
import json
import math
import socket

from aiohttp import web

from mesh_llm.api.proxy import error_response, host_allowed, is_local
from mesh_llm.blackboard.board import DEFAULT_LIMIT, MAX_AUTHOR_CHARS, MAX_ITEMS, ItemError, author_problem
from mesh_llm.blackboard.keeper import BlackboardKeeper

MAX_BODY = 64 * 1024  # a 4 KB post, JSON-escaped, fits many times over
MAX_QUERY_CHARS = 1024


def default_author() -> str:
    """user@host of this machine, bounded and printable."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "someone"
    name = "".join(ch for ch in f"{user}@{socket.gethostname()}" if ch.isprintable())
    return name[:MAX_AUTHOR_CHARS] or "someone"


class BlackboardApi:
    def __init__(self, allow_remote: bool = False, listen_all: bool = False) -> None:
        self.allow_remote = allow_remote and listen_all
        self.listen_all = listen_all
        self.keeper: BlackboardKeeper | None = None  # set once the mesh is up; until then: 503
        self.author = default_author()

    def install(self, app: web.Application) -> None:
        app.router.add_get("/api/blackboard", self.read)
        app.router.add_post("/api/blackboard", self.post)

    def _refuse(self, request: web.Request) -> web.Response | None:
        if not host_allowed(request.host, self.listen_all):
            return error_response(403, f"host {request.host!r} is not served here: call the node by a loopback name (127.0.0.1, localhost)", "forbidden")
        if not self.allow_remote and not is_local(request):
            return error_response(403, "the blackboard API answers callers on this machine only", "forbidden")
        if self.keeper is None:
            return error_response(503, "the node is starting; retry shortly", "unavailable_error")
        return None

    async def post(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.keeper is not None
        if request.content_type != "application/json":
            return error_response(415, "send the post as JSON: {\"text\": \"…\"} with Content-Type: application/json", "invalid_request_error")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return error_response(413, f"the body is over {MAX_BODY} bytes; a post holds at most 4096", "invalid_request_error")
        try:
            raw = await request.content.read(MAX_BODY + 1)
            if len(raw) > MAX_BODY:
                return error_response(413, f"the body is over {MAX_BODY} bytes; a post holds at most 4096", "invalid_request_error")
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        text = doc.get("text") if isinstance(doc, dict) else None
        author = doc.get("from") if isinstance(doc, dict) else None
        if not isinstance(text, str):
            return error_response(400, "the body must be {\"text\": \"…\", \"from\": \"NAME\" (optional)}", "invalid_request_error")
        if author is None:
            author = self.author
        if not isinstance(author, str) or author_problem(author) is not None:
            return error_response(400, f"'from' must be 1-{MAX_AUTHOR_CHARS} printable characters", "invalid_request_error")
        try:
            item, found = self.keeper.post(text, author)
        except ItemError as exc:
            response = error_response(exc.status, str(exc), "rate_limit_error" if exc.status == 429 else "invalid_request_error")
            if exc.status == 429:
                response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return response
        return web.json_response({"item": item.to_doc(), "scrubbed": [{"kind": kind, "count": n} for kind, n in found]})

    async def read(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        assert self.keeper is not None
        q = request.query
        search = q.get("search")
        author = q.get("from") or None
        try:
            since = float(q["since"]) if q.get("since") else None
            limit = int(q["limit"]) if q.get("limit") else DEFAULT_LIMIT
        except ValueError:
            return error_response(400, "since is a number of hours and limit a whole number", "invalid_request_error")
        if since is not None and not (math.isfinite(since) and since > 0):
            return error_response(400, "since must be a positive number of hours", "invalid_request_error")
        if not 1 <= limit <= MAX_ITEMS:
            return error_response(400, f"limit must be from 1 to {MAX_ITEMS}", "invalid_request_error")
        if len(search or "") > MAX_QUERY_CHARS or len(author or "") > MAX_AUTHOR_CHARS:
            return error_response(400, f"search is at most {MAX_QUERY_CHARS} characters, from at most {MAX_AUTHOR_CHARS}", "invalid_request_error")
        board = self.keeper.board
        items = board.search(search, since, author, limit) if search is not None and search.strip() else board.feed(since, author, limit)
        # how far this node is with the mesh: peers it has synced with, pushes still going out
        return web.json_response({"items": [i.to_doc() for i in items], "synced_with": len(self.keeper.synced), "pending": self.keeper.pending})
