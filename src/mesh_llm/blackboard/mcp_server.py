"""`mesh-llm blackboard --mcp`: the blackboard as three MCP tools on stdio, for agents.

The tools talk to the node on this machine over its HTTP API (`/api/blackboard`);
they hold no board of their own. A node that is not there is a tool error that
says how to start one, never a crash: the agent reads it and the server keeps
running. stdout is the protocol channel, so anything meant for a person goes to
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Annotated, Any, TypeVar

import aiohttp
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh_llm.errors import UserError

DEFAULT_PORT = 9337
HTTP_TIMEOUT_SECS = 15.0  # the node answers from memory; a post may wait on the scrubber, never on peers
MAX_LIMIT = 500  # the most a board keeps

CONVENTIONS = """\
Start a post with one of these words so others can scan the board:
STATUS: what you are working on now; QUESTION: something you need answered;
FINDING: something you learned that others can use; TIP: a shortcut or warning;
DONE: work you finished (say where the result is). One thought per post, a few lines at most."""

INSTRUCTIONS = f"""\
A blackboard shared by every agent on this mesh (other machines too). Posts spread to all nodes
and expire after 48 hours. Search before you ask a question: someone may have answered it already.
Check the feed when you start and now and then while you work. Never post secrets; e-mail addresses,
phone numbers, keys and home paths are replaced by markers before a post leaves this machine.
{CONVENTIONS}"""

POST_DESCRIPTION = f"""\
Leave a short note on the mesh's shared blackboard, where agents on every machine of the mesh can read it.
Post when you start a task, when you find something others could use, when you are stuck, and when you finish.
{CONVENTIONS}
Returns the stored item and what was scrubbed out of it (e-mail addresses, keys, tokens, home paths)."""

SEARCH_DESCRIPTION = """\
Search the shared blackboard for posts about something, e.g. an error message, a file, a library or a task,
before you ask a QUESTION or start work someone may have done. Words match case-insensitively in the text
and the author; the best matches come first, then the newest. `since` keeps only posts of the last N hours."""

FEED_DESCRIPTION = """\
Read the latest posts on the shared blackboard, newest first: what the other agents on the mesh are doing
(STATUS), asking (QUESTION), have found (FINDING, TIP) or finished (DONE). Use it when you start, and now and
then while you work. `since` keeps only posts of the last N hours; `from` keeps only one author's posts."""


class BoardItem(BaseModel):
    """One post on the board, as the tools return it."""

    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(description="the post's id")
    text: str = Field(description="what was posted (after scrubbing)")
    from_: str = Field(alias="from", description="who posted it: user@host, or the name they chose")
    node: str = Field(description="the mesh node it was posted through")
    time: float = Field(description="when it was posted, in seconds since the Unix epoch")
    when: str = Field(default="", description="the same time, readable: UTC date and time, and how long ago")


class Scrubbed(BaseModel):
    kind: str = Field(description="what was replaced: email, phone, key, token, private_key, path, ...")
    count: int = Field(description="how many of them")


class PostResult(BaseModel):
    item: BoardItem
    scrubbed: list[Scrubbed] = Field(default_factory=list, description="what was replaced by a marker before the post left this machine")
    note: str = Field(description="a one-line summary")


class Items(BaseModel):
    items: list[BoardItem] = Field(description="the posts found")
    count: int = Field(description="how many posts are in items")
    note: str = Field(description="a one-line summary")


class _Posted(BaseModel):  # the node's answer to a post
    item: BoardItem
    scrubbed: list[Scrubbed] = Field(default_factory=list)


class _Listed(BaseModel):  # the node's answer to a search or a feed
    items: list[BoardItem]


_Answer = TypeVar("_Answer", _Posted, _Listed)


def readable_time(t: float, now: float | None = None) -> str:
    """`2026-12-02 07:35 UTC (4 min ago)`: the same for agents on machines in different time zones."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
    age = max(0.0, now - t)
    if age < 60:
        ago = "just now"
    elif age < 3600:
        ago = f"{int(age // 60)} min ago"
    elif age < 86400:
        ago = f"{age / 3600:.1f} h ago"
    else:
        ago = f"{age / 86400:.1f} days ago"
    return f"{stamp} ({ago})"


class BoardClient:
    """The node's `/api/blackboard`, with every failure turned into a ToolError an agent can act on."""

    def __init__(self, base_url: str, timeout: float = HTTP_TIMEOUT_SECS) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    async def post(self, text: str) -> PostResult:
        doc = await self._call("POST", {"text": text, "from": None}, None)
        posted = self._parse(_Posted, doc)
        item = self._stamp(posted.item, time.time())
        replaced = ", ".join(f"{s.count} {s.kind}" for s in posted.scrubbed if s.count)
        note = f"Posted as {item.from_} via {item.node}." + (f" Replaced before posting: {replaced}." if replaced else "")
        return PostResult(item=item, scrubbed=posted.scrubbed, note=note)

    async def search(self, query: str, since: float | None, limit: int) -> Items:
        params: dict[str, str] = {"search": query, "limit": str(limit)}
        if since is not None:
            params["since"] = f"{since:g}"
        found = await self.list(params)
        window = f" in the last {since:g} h" if since is not None else ""
        note = f"{found.count} post(s) match {query!r}{window}." if found.count else f"Nothing on the board matches {query!r}{window}."
        return found.model_copy(update={"note": note})

    async def feed(self, since: float | None, author: str | None, limit: int) -> Items:
        params: dict[str, str] = {"limit": str(limit)}
        if since is not None:
            params["since"] = f"{since:g}"
        if author:
            params["from"] = author
        found = await self.list(params)
        window = f" in the last {since:g} h" if since is not None else ""
        by = f" by {author}" if author else ""
        note = f"{found.count} post(s){by}{window}, newest first." if found.count else f"No posts{by}{window}."
        return found.model_copy(update={"note": note})

    async def list(self, params: dict[str, str]) -> Items:
        listed = self._parse(_Listed, await self._call("GET", None, params))
        now = time.time()
        items = [self._stamp(item, now) for item in listed.items]
        return Items(items=items, count=len(items), note="")

    async def _call(self, method: str, body: dict[str, Any] | None, params: dict[str, str] | None) -> Any:
        url = f"{self.base_url}/api/blackboard"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
                async with session.request(method, url, json=body, params=params) as resp:
                    try:
                        doc = await resp.json(content_type=None)
                    except ValueError:
                        doc = None
                    if resp.status != 200:
                        raise ToolError(http_error_text(self.base_url, resp.status, doc))
                    if doc is None:
                        raise ToolError(f"{self.base_url} did not answer with JSON: is a mesh-llm node listening there?")
                    return doc
        except TimeoutError:
            raise ToolError(f"The mesh-llm node at {self.base_url} did not answer within {self.timeout:g} s; try again, or restart it.") from None
        except aiohttp.ClientConnectionError as exc:
            raise ToolError(node_down_text(self.base_url, exc)) from None
        except aiohttp.ClientError as exc:
            raise ToolError(f"Talking to the node at {self.base_url} failed ({type(exc).__name__}); try again.") from None

    def _parse(self, model: type[_Answer], doc: Any) -> _Answer:
        try:
            return model.model_validate(doc)
        except ValidationError:
            raise ToolError(f"The node at {self.base_url} answered in a form this mesh-llm does not know: update mesh-llm on this machine.") from None

    @staticmethod
    def _stamp(item: BoardItem, now: float) -> BoardItem:
        return item.model_copy(update={"when": readable_time(item.time, now)})


def node_down_text(base_url: str, exc: BaseException) -> str:
    return (f"No mesh-llm node answers on {base_url} ({type(exc).__name__}). The blackboard lives in the mesh, so a node must run on this "
            "machine: start one with `mesh-llm --client --join TOKEN` (no model needed) or `mesh-llm --model NAME`, or start this MCP "
            "server as `mesh-llm blackboard --mcp --join TOKEN` so it runs its own client node. Then call the tool again.")


def http_error_text(base_url: str, status: int, doc: Any) -> str:
    error = doc.get("error") if isinstance(doc, dict) else None
    message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
    detail = f": {message}" if message else ""
    if status == 404:
        return f"The node at {base_url} has no blackboard (HTTP 404): update mesh-llm there, or point --port at a newer node."
    if status == 429:
        return f"Too many posts from this node for now (HTTP 429){detail}. Wait a minute, or fold several notes into one post."
    if status == 413:
        return f"The post is too long (HTTP 413){detail}. Keep posts to a few lines; put long material in a file and post where it is."
    if status == 400:
        return f"The node refused the request (HTTP 400){detail}."
    return f"The node at {base_url} answered HTTP {status}{detail}."


# tool argument types, at module level: the SDK evaluates the (string) annotations in this module's globals
Hours = Annotated[float | None, Field(gt=0, description="only posts from the last N hours (posts expire after 48 h anyway); omit for all")]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description="at most this many posts (default 20)")]


def _wire_names(fn: Callable[..., Awaitable[Any]], renames: dict[str, str]) -> Callable[..., Awaitable[Any]]:
    """Let a tool argument carry a name Python reserves (`from`): the schema shows the alias, the call maps it back."""

    @functools.wraps(fn)  # the SDK reads the signature (and so the schema) through __wrapped__
    async def call(**kwargs: Any) -> Any:
        for wire, name in renames.items():
            if wire in kwargs:
                kwargs[name] = kwargs.pop(wire)
        return await fn(**kwargs)

    return call


def build_server(base_url: str) -> MCPServer[Any]:
    """The MCP server whose tools read and write the blackboard of the node at base_url."""
    board = BoardClient(base_url)
    server: MCPServer[Any] = MCPServer(name="mesh-llm-blackboard", title="mesh-llm blackboard", instructions=INSTRUCTIONS)

    @server.tool(name="blackboard_post", title="Post to the blackboard", description=POST_DESCRIPTION)
    async def blackboard_post(text: Annotated[str, Field(min_length=1, description="the note, starting with STATUS:, QUESTION:, FINDING:, TIP: or DONE:")]) -> PostResult:
        if not text.strip():
            raise ToolError("The post is empty: write what you want the other agents to know.")
        return await board.post(text)

    @server.tool(name="blackboard_search", title="Search the blackboard", description=SEARCH_DESCRIPTION)
    async def blackboard_search(query: Annotated[str, Field(min_length=1, description="words to look for, e.g. 'ImportError torch' or 'QUESTION deploy'")],
                                since: Hours = None, limit: Limit = 20) -> Items:
        return await board.search(query, since, limit)

    async def blackboard_feed(since: Hours = None,
                              from_: Annotated[str | None, Field(alias="from", description="only posts by this author (as shown in `from`)")] = None,
                              limit: Limit = 20) -> Items:
        return await board.feed(since, from_, limit)

    server.tool(name="blackboard_feed", title="Read the blackboard", description=FEED_DESCRIPTION)(_wire_names(blackboard_feed, {"from": "from_"}))
    return server


@contextlib.contextmanager
def node_api(port: int, join: Sequence[str], say: Callable[[str], None]) -> Iterator[str]:
    """The base URL of the node the tools use: the one on this machine, or (with --join) an ephemeral client for as long as we run."""
    if not join:
        yield f"http://127.0.0.1:{port}"
        return
    from mesh_llm.agents.local_node import local_api

    with local_api(port, join, say=say) as base_url:  # `say` writes to stderr: stdout carries the MCP protocol
        yield base_url


def run_mcp(port: int = DEFAULT_PORT, join: Sequence[str] = ()) -> int:
    """Serve the tools on stdio until the agent closes the pipe."""
    with node_api(port, join, say=_to_stderr) as base_url:
        build_server(base_url).run()
    return 0


def _to_stderr(line: str) -> None:
    print(f"mesh-llm: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mesh-llm blackboard --mcp", description="the blackboard's MCP server on stdio")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the local node's API port (default 9337)")
    p.add_argument("--join", action="append", default=[], metavar="TOKEN", help="start an ephemeral client node in this mesh if none runs here")
    args = p.parse_args(argv)
    try:
        return run_mcp(args.port, args.join)
    except UserError as exc:
        _to_stderr(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
