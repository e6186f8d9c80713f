"""The blackboard as agents use it, against real nodes: the MCP server an agent starts
(`mesh-llm blackboard --mcp`, driven by the official SDK's stdio client) on two machines of one
mesh, and the CLI with `--join` on a machine that runs no node (a client for the call)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import LOCAL, free_port, run_cli, wait_for

pytestmark = pytest.mark.engine

SRC = Path(__file__).resolve().parents[1] / "src"


@asynccontextmanager
async def agent_session(*args: str) -> AsyncIterator[ClientSession]:
    """`mesh-llm blackboard --mcp ARGS` as an agent starts it: a child on stdio."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "mesh_llm", "blackboard", "--mcp", *args],
                                   env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def test_agents_on_two_nodes_share_the_board_through_mcp(start_node, tiny_model, engine) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    b = start_node("--join", a.token(), *LOCAL)
    b.wait_output("ready")
    wait_for(lambda: b.node_id() in a.peer_ids(), what="A sees B")
    async with agent_session("--port", str(a.port)) as on_a:
        tools = {t.name for t in (await on_a.list_tools()).tools}
        assert tools == {"blackboard_post", "blackboard_search", "blackboard_feed"}
        posted = await on_a.call_tool("blackboard_post", {"text": "QUESTION: who owns the flaky tokenizer test? mail me at eve@example.com"})
        assert not posted.is_error and posted.structured_content is not None
        assert posted.structured_content["item"]["text"].endswith("mail me at [email]")
    async with agent_session("--port", str(b.port)) as on_b:
        async def found() -> list[dict]:
            result = await on_b.call_tool("blackboard_search", {"query": "tokenizer flaky"})
            assert not result.is_error and result.structured_content is not None
            return list(result.structured_content["items"])

        for _ in range(100):  # the post travels A → B over the mesh
            if items := await found():
                break
            await asyncio.sleep(0.1)
        assert [i["text"][:9] for i in items] == ["QUESTION:"] and items[0]["node"] == a.node_id()
        feed = await on_b.call_tool("blackboard_feed", {"limit": 5})
        assert feed.structured_content is not None and feed.structured_content["items"][0]["text"] == items[0]["text"]


def test_the_cli_joins_for_one_call_when_no_node_runs_here(start_node, tiny_model, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    assert run_cli("blackboard", "STATUS: the nightly build is green", "--port", str(a.port)).returncode == 0
    port = free_port()  # nothing answers here: a client of A's mesh is started for the call, then stopped
    home = {"HOME": str(tmp_path), "MESH_LLM_STATE_DIR": str(tmp_path / "state")}
    read = run_cli("blackboard", "--search", "nightly", "--json", "--port", str(port), "--join", a.token(), env=home)
    assert read.returncode == 0, read.stderr
    assert [i["text"] for i in json.loads(read.stdout)["items"]] == ["STATUS: the nightly build is green"]
    posted = run_cli("blackboard", "DONE: tagged v1.2 from the laptop", "--port", str(port), "--join", a.token(), env=home)
    assert posted.returncode == 0, posted.stderr
    wait_for(lambda: any(i["text"].startswith("DONE: tagged") for i in json.loads(
        run_cli("blackboard", "--json", "--port", str(a.port)).stdout)["items"]), what="the one-call client's post on A")
    # the client started for the calls is gone
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(port) in " ".join(p.info["cmdline"] or []) and "--client" in (p.info["cmdline"] or [])]
