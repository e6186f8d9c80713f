"""End to end: a real `mesh-llm` process, real llama-server, the official openai client."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from tests.conftest import leave_mid_stream, llama_servers, wait_for

pytestmark = pytest.mark.engine


def test_stream_models_and_clean_shutdown(engine, tiny_model: Path, start_node) -> None:
    node = start_node("--model", str(tiny_model))
    node.wait_ready()
    children = psutil.Process(node.proc.pid).children(recursive=True)
    assert llama_servers(node.proc.pid)

    client = OpenAI(base_url=node.base_url + "/v1", api_key="mesh")
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]

    texts = []
    for _ in range(3):  # back to back: llama-server drops the socket after each stream
        stream = client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 5, pieces
        texts.append("".join(pieces))
    assert texts[0].strip() and texts[0] == texts[1] == texts[2]  # greedy is deterministic

    # a model nobody serves is a 404 naming what exists
    req = urllib.request.Request(node.base_url + "/v1/chat/completions", data=json.dumps({"model": "gpt-4", "messages": []}).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 404 and "tiny-llama" in err.value.read().decode()

    assert node.stop(signal.SIGINT) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"children left behind: {alive}"
    assert "ready" in node.output()


def test_crashed_llama_server_is_restarted(engine, tiny_model: Path, start_node) -> None:
    node = start_node("--model", str(tiny_model))
    node.wait_ready()
    (server,) = llama_servers(node.proc.pid)
    server.kill()
    # it comes back after a short backoff and serves again
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        servers = llama_servers(node.proc.pid)
        try:
            ok = urllib.request.urlopen(node.base_url + "/health", timeout=2).status == 200
        except OSError:
            ok = False
        if ok and servers and servers[0].pid != server.pid:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("llama-server was not restarted:\n" + node.output())
    client = OpenAI(base_url=node.base_url + "/v1", api_key="mesh")
    out = client.completions.create(model="tiny-llama", prompt="abc", max_tokens=4, temperature=0)
    assert out.choices[0].text
    assert "restarting" in node.output() and "is back" in node.output()
    node.stop()


def test_sigterm_also_stops_children(engine, tiny_model: Path, start_node) -> None:
    node = start_node("--model", str(tiny_model))
    node.wait_ready()
    children = psutil.Process(node.proc.pid).children(recursive=True)
    assert node.stop(signal.SIGTERM) == 0
    assert not psutil.wait_procs(children, timeout=10)[1]


def test_ctrl_c_while_the_model_loads_stops_cleanly_in_one_line(engine, tiny_model: Path, start_node, tmp_path: Path) -> None:
    """Its llama-server takes its time to start (a wrapper sleeps before it), so the node is
    surely still loading when Ctrl-C comes: one line, exit 0, no stray asyncio message, no child left."""
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    wrapper = slow / "llama-server"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" --model "*) sleep 120;; esac\nexec {engine.llama_server} "$@"\n')
    wrapper.chmod(0o755)
    for other in engine.llama_server.parent.iterdir():
        if other.name != "llama-server" and not (slow / other.name).exists():
            (slow / other.name).symlink_to(other)
    node = start_node("--model", str(tiny_model), "--bin-dir", str(slow))
    node.wait_output("Client token: ")  # the mesh is up; the model cannot be ready for 120 s
    children = psutil.Process(node.proc.pid).children(recursive=True)
    assert node.stop(signal.SIGINT) == 0
    out = node.output()
    assert "Stopped before the models finished loading." in out and "never retrieved" not in out and "Traceback" not in out, out
    assert not psutil.wait_procs(children, timeout=15)[1]


def test_kill_9_of_node_takes_llama_server_with_it(engine, tiny_model: Path, start_node) -> None:
    node = start_node("--model", str(tiny_model))
    node.wait_ready()
    children = psutil.Process(node.proc.pid).children(recursive=True)
    node.stop(signal.SIGKILL)
    assert not psutil.wait_procs(children, timeout=10)[1]


def test_disconnecting_client_cancels_generation(engine, tiny_model: Path, start_node) -> None:
    """A client that goes away mid-stream frees llama-server's slot instead of generating on."""
    node = start_node("--model", str(tiny_model), "--ctx-size", "16384")
    node.wait_ready()
    leave_mid_stream(node.port, while_streaming=lambda: node.busy_slots() == 1)
    # Stopped because the client left (llama-server logs the cancel), not because it finished.
    wait_for(lambda: node.cancelled_tasks() == 1 and node.busy_slots() == 0, timeout=60, what="generation cancelled")
    node.stop()
