"""The blackboard's MCP server, driven by the official SDK's stdio client, against a stand-in of the node's /api/blackboard.

The stand-in is a real HTTP server on a loopback port that keeps posts in a list and speaks the
contract the node does: POST {text, from} -> {item, scrubbed}; GET ?search&since&from&limit -> {items}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from mesh_llm.blackboard.mcp_server import readable_time
from mesh_llm.blackboard.skill import SKILL_TEXT, install_skill, install_skill_report, mcp_config_snippet, skill_path
from mesh_llm.engine.probes import free_loopback_port

SRC = Path(__file__).resolve().parents[1] / "src"
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


class StandIn:
    """The node's blackboard API, in memory."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/blackboard", self.post)
        app.router.add_get("/api/blackboard", self.get)
        return app

    @staticmethod
    def error(status: int, kind: str, message: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": kind}}, status=status)

    async def post(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("POST", {k: str(v) for k, v in body.items()}))
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            return self.error(400, "invalid_request_error", "text must be a non-empty string")
        if len(text.encode()) > 4096:
            return self.error(413, "too_large", "a post holds at most 4096 bytes")
        if text.startswith("FLOOD"):
            return self.error(429, "rate_limited", "at most 10 posts a minute per node")
        text, emails = EMAIL.subn("[email]", text)
        item = {"id": f"id{len(self.items)}", "text": text, "from": body.get("from") or "alice@laptop", "node": "node-a", "time": time.time()}
        self.items.append(item)
        return web.json_response({"item": item, "scrubbed": [{"kind": "email", "count": emails}] if emails else []})

    async def get(self, request: web.Request) -> web.Response:
        q = request.query
        self.requests.append(("GET", dict(q)))
        items = list(self.items)
        if "since" in q:
            items = [i for i in items if i["time"] > time.time() - float(q["since"]) * 3600]
        if "from" in q:
            items = [i for i in items if i["from"] == q["from"]]
        items.sort(key=lambda i: -i["time"])
        if "search" in q:
            words = q["search"].lower().split()
            scored = [(sum(w in (i["text"] + " " + i["from"]).lower() for w in words), i) for i in items]
            items = [i for hits, i in sorted(scored, key=lambda s: -s[0]) if hits]
        return web.json_response({"items": items[: int(q.get("limit", 20))]})


@asynccontextmanager
async def standin_node() -> AsyncIterator[tuple[StandIn, int]]:
    board = StandIn()
    runner = web.AppRunner(board.app())
    await runner.setup()
    port = free_loopback_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield board, port
    finally:
        await runner.cleanup()


@asynccontextmanager
async def mcp_session(port: int) -> AsyncIterator[ClientSession]:
    """The MCP server as an agent starts it: a child process on stdio."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "mesh_llm.blackboard.mcp_server", "--port", str(port)],
                                   env={"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def text_of(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


async def test_lists_exactly_the_three_tools_with_their_schemas() -> None:
    async with standin_node() as (_, port), mcp_session(port) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) == {"blackboard_post", "blackboard_search", "blackboard_feed"}
        post, search, feed = (tools[n].input_schema for n in ("blackboard_post", "blackboard_search", "blackboard_feed"))
        assert set(post["properties"]) == {"text"} and post["required"] == ["text"]
        assert set(search["properties"]) == {"query", "since", "limit"} and search["required"] == ["query"]
        assert set(feed["properties"]) == {"since", "from", "limit"} and not feed.get("required")  # `from`, as the agent writes it
        assert search["properties"]["limit"]["default"] == 20 and feed["properties"]["limit"]["default"] == 20
        for tool in tools.values():
            assert tool.description and len(tool.description) > 80
            assert tool.output_schema is not None
        for word in ("STATUS", "QUESTION", "FINDING", "TIP", "DONE"):
            assert word in (tools["blackboard_post"].description or "")


async def test_post_search_and_feed_round_trip() -> None:
    async with standin_node() as (board, port), mcp_session(port) as session:
        posted = await session.call_tool("blackboard_post", {"text": "STATUS: fixing the parser; ping me at bob@example.com"})
        assert not posted.is_error, text_of(posted)
        doc = posted.structured_content
        assert doc is not None
        assert doc["item"]["text"] == "STATUS: fixing the parser; ping me at [email]"
        assert doc["item"]["from"] == "alice@laptop" and doc["item"]["node"] == "node-a"
        assert "UTC" in doc["item"]["when"] and "just now" in doc["item"]["when"]
        assert doc["scrubbed"] == [{"kind": "email", "count": 1}] and "1 email" in doc["note"]
        await session.call_tool("blackboard_post", {"text": "FINDING: the tokenizer test is flaky under load"})

        found = await session.call_tool("blackboard_search", {"query": "PARSER", "since": 2, "limit": 5})
        assert not found.is_error, text_of(found)
        assert found.structured_content is not None
        assert [i["text"] for i in found.structured_content["items"]] == ["STATUS: fixing the parser; ping me at [email]"]
        assert board.requests[-1] == ("GET", {"search": "PARSER", "since": "2", "limit": "5"})
        nothing = await session.call_tool("blackboard_search", {"query": "kubernetes"})
        assert nothing.structured_content is not None and nothing.structured_content["count"] == 0
        assert "Nothing" in nothing.structured_content["note"]

        feed = await session.call_tool("blackboard_feed", {"from": "alice@laptop"})
        assert not feed.is_error, text_of(feed)
        assert feed.structured_content is not None
        assert [i["text"][:8] for i in feed.structured_content["items"]] == ["FINDING:", "STATUS: "]  # newest first
        assert board.requests[-1] == ("GET", {"from": "alice@laptop", "limit": "20"})
        assert not (await session.call_tool("blackboard_feed", {"since": 100})).is_error  # older than the board keeps: all of it
        other = await session.call_tool("blackboard_feed", {"from": "carol@desk", "since": 1})
        assert other.structured_content is not None and other.structured_content["items"] == []
        assert json.loads(text_of(feed))["count"] == 2  # the text block carries the same result for agents that read only text


async def test_node_errors_are_tool_errors_the_agent_can_act_on() -> None:
    async with standin_node() as (_, port), mcp_session(port) as session:
        flood = await session.call_tool("blackboard_post", {"text": "FLOOD of notes"})
        assert flood.is_error and "429" in text_of(flood) and "Wait a minute" in text_of(flood)
        big = await session.call_tool("blackboard_post", {"text": "TIP: " + "x" * 5000})
        assert big.is_error and "413" in text_of(big) and "too long" in text_of(big)
        bad = await session.call_tool("blackboard_search", {"query": "x", "limit": 0})
        assert bad.is_error  # checked against the schema before any request
        ok = await session.call_tool("blackboard_post", {"text": "DONE: still here"})
        assert not ok.is_error


async def test_node_down_is_a_tool_error_and_the_server_keeps_running() -> None:
    port = free_loopback_port()  # nothing listens there
    async with mcp_session(port) as session:
        for tool, args in (("blackboard_post", {"text": "STATUS: hello"}), ("blackboard_search", {"query": "x"}), ("blackboard_feed", {})):
            result = await session.call_tool(tool, args)
            assert result.is_error, tool
            text = text_of(result)
            assert f"127.0.0.1:{port}" in text and "mesh-llm --client --join TOKEN" in text and "--mcp --join" in text
        assert len((await session.list_tools()).tools) == 3  # still serving


def test_readable_time() -> None:
    t = 1_790_000_000.0
    assert readable_time(t, t + 5).endswith("(just now)")
    assert readable_time(t, t + 300).endswith("(5 min ago)")
    assert readable_time(t, t + 7200).endswith("(2.0 h ago)")
    assert readable_time(t, t).startswith(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)))


def test_skill_file_in_a_fresh_home(tmp_path: Path) -> None:
    path = install_skill(tmp_path)
    assert path == tmp_path / ".agents" / "skills" / "blackboard" / "SKILL.md"
    text = path.read_text()
    head, body = text.split("\n---\n", 1)
    assert head.startswith("---\nname: blackboard\ndescription: ") and len(head.splitlines()) == 3
    for word in ("STATUS:", "QUESTION:", "FINDING:", "TIP:", "DONE:"):
        assert word in body
    assert "Search before you ask" in body and "secret" in body.lower() and "short" in body.lower()
    assert install_skill(tmp_path) == path and list(path.parent.iterdir()) == [path]  # the same file again: no backup


def test_skill_backs_up_a_different_file(tmp_path: Path) -> None:
    path = skill_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("my own notes\n")
    install_skill(tmp_path)
    backups = [p for p in path.parent.iterdir() if p != path]
    assert len(backups) == 1 and backups[0].name.startswith("SKILL.md.bak-") and backups[0].read_text() == "my own notes\n"
    assert path.read_text() == SKILL_TEXT
    path.write_text("edited again\n")
    install_skill(tmp_path)
    assert sorted(p.read_text() for p in path.parent.iterdir() if p != path) == ["edited again\n", "my own notes\n"]


def test_mcp_config_snippet(tmp_path: Path) -> None:
    doc = json.loads(mcp_config_snippet(9444))
    assert doc == {"mcpServers": {"mesh-blackboard": {"command": "mesh-llm", "args": ["blackboard", "--mcp", "--port", "9444"]}}}
    report = install_skill_report(tmp_path, 9444)
    assert str(skill_path(tmp_path)) in report and json.loads(report[report.index("{"):]) == doc
