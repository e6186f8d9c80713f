"""How fast the console hears of the mesh changing: a node joins, leaves, or dies.

Starts node A (tiny generated model, --console) and follows its /api/events as a
browser would; then starts node B joining A and measures until an event shows
two nodes, then stops B (Ctrl-C) and measures until an event shows one. Then B
starts again and is killed with SIGKILL: the time until A drops it is the silence
bound at work (1.5 s of silence, so within 2 s). Last line: JSON.

    .venv/bin/python bench/console.py
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model

LOCAL = ["--no-relay", "--bind-host", "127.0.0.1"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mesh_llm", *args], stdout=log.open("w"), stderr=subprocess.STDOUT)


async def wait_banner(log: Path) -> str:
    for _ in range(600):
        text = log.read_text()
        if "Stop: Ctrl-C" in text:
            return text
        await asyncio.sleep(0.1)
    raise SystemExit(f"no ready banner in {log}")


async def until(resp: aiohttp.ClientResponse, cond) -> float:  # type: ignore[no-untyped-def]
    async for line in resp.content:
        if line.startswith(b"data:") and cond(json.loads(line[5:])):
            return time.monotonic()
    raise SystemExit("event stream ended")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "tiny.gguf", TinyModelSpec())
        console = free_loopback_port()
        a = start(["--model", str(model), *LOCAL, "--port", str(free_loopback_port()), "--console", str(console), "--state-dir", str(root / "a")], root / "a.log")
        b = None
        try:
            token = next(ln for ln in (await wait_banner(root / "a.log")).splitlines() if ln.startswith("Invite token:")).split()[-1]
            async with aiohttp.ClientSession() as s, s.get(f"http://localhost:{console}/api/events") as events:
                await asyncio.wait_for(until(events, lambda d: True), 10)
                t0 = time.monotonic()
                b = start(["--model", str(model), *LOCAL, "--port", str(free_loopback_port()), "--state-dir", str(root / "b"), "--join", token], root / "b.log")
                joined = await asyncio.wait_for(until(events, lambda d: d["mesh"]["node_count"] == 2), 60) - t0
                await wait_banner(root / "b.log")
                t1 = time.monotonic()
                b.send_signal(signal.SIGINT)
                left = await asyncio.wait_for(until(events, lambda d: d["mesh"]["node_count"] == 1), 60) - t1
                b.wait(30)
                b = start(["--model", str(model), *LOCAL, "--port", str(free_loopback_port()), "--state-dir", str(root / "b"), "--join", token], root / "b2.log")
                await asyncio.wait_for(until(events, lambda d: d["mesh"]["node_count"] == 2), 60)
                await wait_banner(root / "b2.log")
                t2 = time.monotonic()
                b.kill()
                died = await asyncio.wait_for(until(events, lambda d: d["mesh"]["node_count"] == 1), 60) - t2
            print(f"B started → console shows 2 nodes: {joined:.2f} s (includes B's start-up and join)")
            print(f"B Ctrl-C → console shows 1 node: {left * 1000:.0f} ms")
            print(f"B kill -9 → console shows 1 node: {died:.2f} s (bound: 2 s)")
            print(json.dumps({"join_to_event_s": round(joined, 3), "leave_to_event_ms": round(left * 1000, 1), "kill9_to_event_s": round(died, 2)}))
        finally:
            for p in (b, a):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGINT)
                    p.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
