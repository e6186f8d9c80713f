"""A node's changing set of models: what load, unload and spreading cost.

(a) `mesh-llm load` of Gemma 3 270M on a running node, timed from the request to
    the first streamed token, against llama-server alone started on the same file
    with the same flags, timed from its start to its first token (alternating
    rounds): `load_ratio` = mesh ÷ direct, `load_added_s` = mesh − direct.
(b) `mesh-llm unload` while a stream is running: from the stream's last byte to the
    llama-server process gone and its memory back in the node's budget (`unload_s`).
(c) Spreading: time to first token through a client node for a model served by one
    node, then by two (a second node loads it, and unloads it again between rounds):
    `spread_ttft_added_ms` = median with two − median with one.
The last line is one JSON object.

    .venv/bin/python bench/fleet.py [--rounds 3] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from common import invite_token, wait_http
from split import LOCAL, Procs

from mesh_llm.engine.llama_server import ServerConfig, choose_ctx, fallback_chat_template, server_argv
from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.engine.provision import provide_engine
from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.resolve import resolve_model
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model

GEMMA = "gemma-3-270m"


async def first_token(session: aiohttp.ClientSession, base: str, model: str, tokens: int = 4) -> float:
    """Seconds until the first streamed token of a short completion (retrying 503s: still loading)."""
    body = {"model": model, "prompt": "The history of the printing press begins", "max_tokens": tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    while True:
        async with session.post(base + "/v1/completions", json=body) as r:
            if r.status == 503:
                await asyncio.sleep(0.01)
                continue
            if r.status != 200:
                raise SystemExit(f"HTTP {r.status} from {base}: {await r.text()}")
            async for line in r.content:
                if line.startswith(b"data: ") and b'"text"' in line:
                    return time.perf_counter() - t0
    raise SystemExit("stream ended without a token")


async def node(procs: Procs, root: Path, name: str, *args: str) -> str:
    port = free_loopback_port()
    p = procs.start(name, [sys.executable, "-m", "mesh_llm", *args, *LOCAL, "--port", str(port), "--state-dir", str(root / name)])
    await wait_http(f"http://127.0.0.1:{port}/api/status", p)
    return f"http://127.0.0.1:{port}"


async def runtime(session: aiohttp.ClientSession, base: str) -> dict:
    async with session.get(base + "/api/runtime") as r:
        return await r.json()


async def load(session: aiohttp.ClientSession, base: str, ref: str) -> None:
    async with session.post(base + "/api/runtime/models", json={"model": ref}) as r:
        if r.status != 201:
            raise SystemExit(f"load {ref}: HTTP {r.status}: {await r.text()}")


async def unload(session: aiohttp.ClientSession, base: str, name: str) -> None:
    async with session.delete(f"{base}/api/runtime/models/{name}") as r:
        if r.status != 200:
            raise SystemExit(f"unload {name}: HTTP {r.status}: {await r.text()}")


async def direct_start(procs: Procs, engine, model: Path, ctx: int, session: aiohttp.ClientSession) -> float:  # type: ignore[no-untyped-def]
    """llama-server alone, the flags the node gives it: start → first token."""
    port = free_loopback_port()
    template = fallback_chat_template(inspect_model(model).metadata)
    argv = server_argv(engine.llama_server, ServerConfig(model=model, alias="direct", port=port, ctx_size=ctx, chat_template_file=template))
    t0 = time.perf_counter()
    p = procs.start("direct", argv)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    break
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.01)
    await first_token(session, base, "direct")
    took = time.perf_counter() - t0
    procs.stop(p)
    procs.procs.remove(p)
    return took


async def bench_load_unload(procs: Procs, root: Path, engine, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    gemma = resolve_model(GEMMA).path
    ctx = choose_ctx(None, inspect_model(gemma).context_length)
    first = await node(procs, root, "a", "--model", str(write_tiny_model(root / "keep.gguf", TinyModelSpec())), "--ctx-size", str(ctx))
    mesh_s, direct_s, unload_s = [], [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        await direct_start(procs, engine, gemma, ctx, s)  # warm the page cache for both
        for r in range(args.rounds):
            for which in (("mesh", "direct") if r % 2 == 0 else ("direct", "mesh")):
                if which == "direct":
                    direct_s.append(await direct_start(procs, engine, gemma, ctx, s))
                    continue
                t0 = time.perf_counter()
                await load(s, first, GEMMA)
                await first_token(s, first, GEMMA)
                mesh_s.append(time.perf_counter() - t0)
                # (b) unload with a stream running: from its last byte to process gone and memory free
                model = next(m for m in (await runtime(s, first))["models"] if m["model"].startswith("gemma"))
                pid, offer = model["pid"], (await runtime(s, first))["budget"]["offer_bytes"]
                if pid is None:
                    raise SystemExit(f"no llama-server pid for {model['model']}: {model}")
                body = {"model": GEMMA, "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": True}
                async with s.post(first + "/v1/completions", json=body) as stream:
                    unloading = asyncio.ensure_future(unload(s, first, model["model"]))
                    async for _ in stream.content:
                        pass
                    ended = time.perf_counter()
                await unloading
                while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    await asyncio.sleep(0.005)
                unload_s.append(time.perf_counter() - ended)
                after = await runtime(s, first)
                if after["budget"]["free_bytes"] != offer - sum(m["here_bytes"] for m in after["models"]):
                    raise SystemExit(f"memory not back in the budget after the unload: {after['budget']}")
                print(f"  round {r}: load → first token {mesh_s[-1]:.2f} s, unload after the last byte {unload_s[-1]:.2f} s", flush=True)
            print(f"  round {r}: llama-server alone → first token {direct_s[-1]:.2f} s", flush=True)
    m, d = statistics.median(mesh_s), statistics.median(direct_s)
    return {"load_s": round(m, 3), "direct_start_s": round(d, 3), "load_ratio": round(m / d, 3), "load_added_s": round(m - d, 3),
            "unload_s": round(statistics.median(unload_s), 3)}


async def bench_spread(procs: Procs, root: Path, args: argparse.Namespace) -> dict:
    model = write_tiny_model(root / "spread.gguf", TinyModelSpec(n_layers=4, n_embd=256, n_ff=512, name="spread"))
    a = await node(procs, root, "sa", "--model", str(model), "--ctx-size", "1024")
    token = await invite_token(root / "sa.log")
    c = await node(procs, root, "sc", "--join", token, "--ctx-size", "1024")
    client = await node(procs, root, "sclient", "--client", "--join", token)
    one: list[float] = []
    two: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:

        async def servers() -> int:
            async with s.get(client + "/api/status") as r:
                return sum(1 for m in (await r.json())["models"] if m["name"] == "spread" and m["ready"])

        async def until_servers(n: int) -> None:
            while await servers() != n:
                await asyncio.sleep(0.05)

        await until_servers(1)
        for _ in range(4):
            await first_token(s, client, "spread")  # warm-up
        for r in range(args.rounds):
            for count in ((1, 2) if r % 2 == 0 else (2, 1)):
                if count == 2:
                    if await servers() == 1:
                        await load(s, c, str(model))
                    await until_servers(2)
                else:
                    if await servers() == 2:
                        await unload(s, c, "spread")
                    await until_servers(1)
                for _ in range(args.requests):
                    (one if count == 1 else two).append(await first_token(s, client, "spread"))
            print(f"  round {r}: TTFT through a client, 1 server {statistics.median(one) * 1000:.2f} ms, 2 servers {statistics.median(two) * 1000:.2f} ms", flush=True)
    return {"ttft_one_server_ms": round(statistics.median(one) * 1000, 3), "ttft_two_servers_ms": round(statistics.median(two) * 1000, 3),
            "spread_ttft_added_ms": round((statistics.median(two) - statistics.median(one)) * 1000, 3)}


async def run(args: argparse.Namespace) -> None:
    from rich.console import Console

    engine = provide_engine(None, None, Console(stderr=True))
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    procs = Procs(root)
    try:
        print("== load and unload of Gemma 3 270M on a running node", flush=True)
        lifecycle = await bench_load_unload(procs, root, engine, args)
        procs.stop_all()
        procs.procs.clear()
        print("== one model, one server vs two, through a client node", flush=True)
        spread = await bench_spread(procs, root, args)
    finally:
        procs.stop_all()
    print(json.dumps({**lifecycle, **spread, "rounds": args.rounds, "requests": args.requests, "cpus": os.cpu_count()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=16)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
