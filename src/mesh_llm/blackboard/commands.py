"""`mesh-llm blackboard`: post to, search and read the mesh's blackboard through the node on this machine.

    mesh-llm blackboard "TEXT" [--from NAME]      post (PII scrubbed first; says what it replaced)
    mesh-llm blackboard --search "Q"               best matches, then newest
    mesh-llm blackboard [--feed] [--since HOURS] [--from NAME] [--limit N]
    mesh-llm blackboard --mcp                        the same as MCP tools on stdio, for agents
    mesh-llm blackboard install-skill                the agent skill file and the MCP config snippet
    (each with --join TOKEN: when no node runs here, a client of that mesh for the call)
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

from mesh_llm.blackboard.board import DEFAULT_LIMIT, MAX_ITEMS
from mesh_llm.control import Node, node_error_text
from mesh_llm.errors import UserError
from mesh_llm.text import printable, terminal_safe

TIMEOUT_SECS = 30.0


def add_parser(sub: Any) -> None:
    bb = sub.add_parser("blackboard", help="post to the mesh's blackboard, search it, or read its feed (shared with every member and client)",
                        description="Short posts shared with every member and client of the mesh: status, findings, questions. "
                                    "E-mail addresses, phone numbers, keys and tokens, private keys and home paths are scrubbed before posting.")
    bb.add_argument("text", nargs="?", metavar="TEXT",
                    help="post TEXT (at most 4096 bytes; 10 posts a minute per node); `install-skill` writes the agent skill file instead")
    bb.add_argument("--search", metavar="Q", help="items with the words of Q in their text or author: most words first, then newest")
    bb.add_argument("--feed", action="store_true", help="the newest items (the default without TEXT or --search)")
    bb.add_argument("--since", type=float, default=None, metavar="HOURS", help="only items of the last HOURS hours")
    bb.add_argument("--from", dest="author", default=None, metavar="NAME",
                    help="posting: the author shown (default user@host); reading: only authors containing NAME")
    bb.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N", help=f"at most N items (default {DEFAULT_LIMIT}, at most {MAX_ITEMS})")
    bb.add_argument("--json", action="store_true", help="machine output: the API's JSON")
    bb.add_argument("--port", type=int, default=argparse.SUPPRESS, metavar="N", help="the node's API port (default 9337)")
    bb.add_argument("--join", dest="blackboard_join", default=None, metavar="TOKEN",
                    help="with no node running here: join the mesh with TOKEN as a client for this call (or for as long as --mcp runs)")
    bb.add_argument("--mcp", action="store_true", help="serve the blackboard's tools to an agent as an MCP server on stdio")


def blackboard_command(args: argparse.Namespace, out: Console) -> int:
    port = getattr(args, "port", 9337)
    join = [args.blackboard_join] if args.blackboard_join else []
    if args.mcp:
        from mesh_llm.blackboard.mcp_server import run_mcp

        return run_mcp(port, join)
    if args.text == SKILL_ACTION and args.search is None and not args.feed:
        from mesh_llm.blackboard.skill import install_skill_report

        out.print(install_skill_report(Path.home(), port), markup=False, highlight=False, soft_wrap=True)
        return 0
    if not join:
        return _run(args, out, BoardClient(f"http://127.0.0.1:{port}", None))
    from mesh_llm.agents.local_node import local_api

    with local_api(port, join, say=_to_stderr) as base:  # the node here, else a client of that mesh for this call
        node = BoardClient(base, join[0])
        node.wait_synced()
        code = _run(args, out, node)
        node.wait_sent()
        return code


SKILL_ACTION = "install-skill"
SYNC_WAIT_SECS = 20.0  # a client started for one call: how long it may take to join and sync


def _to_stderr(line: str) -> None:
    Console(stderr=True, soft_wrap=True).print(terminal_safe(line), markup=False, highlight=False)


def _run(args: argparse.Namespace, out: Console, node: BoardClient) -> int:
    if args.text is not None and (args.search is not None or args.feed):
        raise UserError("pass TEXT to post, or --search/--feed to read: not both")
    if not 1 <= args.limit <= MAX_ITEMS:
        raise UserError(f"--limit {args.limit} must be from 1 to {MAX_ITEMS}")
    if args.since is not None and not args.since > 0:
        raise UserError(f"--since {args.since:g} must be a positive number of hours")
    if args.text is not None:
        body: dict[str, Any] = {"text": args.text, "from": args.author}
        doc = node.call("POST", "/api/blackboard", body)
        if args.json:
            out.print(json.dumps(doc), markup=False, highlight=False, soft_wrap=True)
            return 0
        out.print("Posted:", markup=False, highlight=False)
        print_item(out, doc.get("item", {}))
        scrubbed = [(str(s.get("kind")), int(s.get("count", 0))) for s in doc.get("scrubbed", []) if isinstance(s, dict)]
        if scrubbed:
            out.print(f"scrubbed before posting: {describe_kinds(scrubbed)}", markup=False, highlight=False)
        return 0
    query: dict[str, str] = {"limit": str(args.limit)}
    if args.search is not None:
        query["search"] = args.search
    if args.since is not None:
        query["since"] = repr(args.since)
    if args.author:
        query["from"] = args.author
    doc = node.call("GET", "/api/blackboard?" + urllib.parse.urlencode(query))
    items = [i for i in doc.get("items", []) if isinstance(i, dict)]
    if args.json:
        out.print(json.dumps({"items": items}), markup=False, highlight=False, soft_wrap=True)
        return 0
    if not items:
        out.print("No matching items." if args.search is not None else "The blackboard is empty" + (" for that filter." if args.since or args.author else "."),
                  markup=False, highlight=False)
    for item in items:
        print_item(out, item)
    return 0


def describe_kinds(found: list[tuple[str, int]]) -> str:
    return ", ".join(f"{n} {printable(kind, 32).replace('-', ' ')}{'s' if n != 1 else ''}" for kind, n in found)


def print_item(out: Console, item: dict[str, Any]) -> None:
    try:
        when = datetime.datetime.fromtimestamp(float(item.get("time", 0))).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        when = "?"
    head = f"{when}  {printable(str(item.get('from', '?')), 128)}  node {printable(str(item.get('node', '?')), 64)[:8]}  id {printable(str(item.get('id', '?')), 32)[:12]}"
    out.print(head, markup=False, highlight=False)
    for line in terminal_safe(str(item.get("text", ""))).splitlines() or [""]:
        out.print(f"    {line}", markup=False, highlight=False)


class BoardClient(Node):
    """The node at `base` (this machine's), over plain HTTP (the blackboard's waits added)."""

    def __init__(self, base: str, join: str | None) -> None:
        super().__init__(0, base, "start one with `mesh-llm --client --join TOKEN` (or `mesh-llm --model NAME`), "
                                  "pass --join TOKEN to join for this call, or pass --port")
        self.join = join

    def wait_synced(self) -> None:
        """A client started for this call: until it has synced with a peer (bounded), so a read sees the mesh's board."""
        deadline = time.monotonic() + SYNC_WAIT_SECS
        while time.monotonic() < deadline:
            if self.call("GET", "/api/blackboard?limit=1").get("synced_with", 0):
                return
            time.sleep(0.2)
        _to_stderr(f"no peer answered within {SYNC_WAIT_SECS:.0f} s: this reads (or posts to) the board as this node has it")

    def wait_sent(self) -> None:
        """Until this node's pushes have gone out (bounded): a client stopped at once would lose a post."""
        deadline = time.monotonic() + SYNC_WAIT_SECS
        while time.monotonic() < deadline and self.call("GET", "/api/blackboard?limit=1").get("pending", 0):
            time.sleep(0.2)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = TIMEOUT_SECS) -> dict[str, Any]:
        return super().call(method, path, body, timeout)

    def error_text(self, err: urllib.error.HTTPError) -> str:
        return node_error_text(err, missing=f"the node at {self.base} has no blackboard: is it an older mesh-llm?")
