"""Split inference: what splitting costs, direct over TCP and through the mesh.

For each model (a generated one big enough to matter on this machine, and the
real Gemma 3 270M when installed) it runs, side by side in one run:
  - solo: one llama-server holding everything;
  - direct: plain llama.cpp split over TCP: llama-server --rpc <worker>,<host's own worker>;
  - mesh: two mesh-llm nodes; the host reaches the worker through the QUIC tunnel.
Direct and mesh use the same layout (worker first, the host's own rpc-server last,
-ts 1,1), are up at the same time and are measured in alternating rounds.
Decode tok/s comes from llama-server's own timings (prompt excluded).

It also reports weight bytes crossing at load (a stock worker that receives every
weight, counted by a relay, vs ours, counted in the mesh tunnel), blocking round
trips per generated token (counted in the tunnel: requests that wait for a reply),
and decode tok/s with latency injected in the host's tunnel (0/5/10/20 ms). At each
delay the round trips the tunnel itself timed are read back; a run where they are
shorter than the injected delay stops without printing figures.
`rtt_cost_factor` = time added per token at 20 ms ÷ (20 ms × remote segments).
The last line is one JSON object (for the first model).

    .venv/bin/python bench/split.py [--rounds 3] [--tokens 48] [--no-gemma]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
from common import invite_token, served, serving_ready, tunnel_rtt_ms, wait_http

from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.engine.provision import provide_engine
from mesh_llm.engine.rpc_worker import rpc_hello, rpc_worker_argv, rpc_worker_env
from mesh_llm.mesh.rpc_traffic import RpcTraffic
from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model

PROMPT = "The history of the printing press begins"
BIG = TinyModelSpec(n_layers=12, n_embd=1024, n_ff=2816, n_heads=16, n_kv_heads=4, dtype="f16", seed=11, name="bench-300m")
LOCAL = ["--no-relay", "--bind-host", "127.0.0.1"]


class Procs:
    """Every child this bench starts, killed on exit."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


async def decode_tps(base: str, tokens: int) -> float:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=600)) as r:
            doc = await r.json()
    if "timings" not in doc:
        raise SystemExit(f"no timings in reply from {base}: {str(doc)[:300]}")
    return float(doc["timings"]["predicted_per_second"])


async def start_worker(procs: Procs, engine, name: str, model: Path | None) -> int:  # type: ignore[no-untyped-def]
    port = free_loopback_port()
    procs.start(name, rpc_worker_argv(engine.rpc_server, port), rpc_worker_env(model))
    for _ in range(100):
        if await rpc_hello(port):
            return port
        await asyncio.sleep(0.1)
    raise SystemExit(f"{name} did not answer")


async def start_llama(procs: Procs, engine, name: str, model: Path, rpc: list[str]) -> tuple[str, subprocess.Popen]:  # type: ignore[no-untyped-def]
    port = free_loopback_port()
    argv = [str(engine.llama_server), "-m", str(model), "--port", str(port), "--fit", "off", "-c", "1024", "--cache-ram", "0", "-np", "1"]
    argv += (["--rpc", ",".join(rpc), "-ngl", "all", "-ts", "1,1"] if rpc else ["-ngl", "0"])
    p = procs.start(name, argv)
    await wait_http(f"http://127.0.0.1:{port}/health", p)
    return f"http://127.0.0.1:{port}", p


async def count_stock_load(procs: Procs, engine, model: Path) -> int:  # type: ignore[no-untyped-def]
    """Weight bytes a stock worker (no local GGUF) receives: a counting relay in front of it."""
    worker = await start_worker(procs, engine, "stock-worker", None)
    own = await start_worker(procs, engine, "stock-own", model)
    traffic = RpcTraffic(frozenset(t.name for t in inspect_model(model).tensors))

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", worker)
        tap = traffic.connection()

        async def pump(src, dst, feed=None) -> None:  # type: ignore[no-untyped-def]
            while data := await src.read(1 << 16):
                if feed:
                    feed(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w, tap.feed), pump(up_r, writer), return_exceptions=True)

    relay = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = relay.sockets[0].getsockname()[1]
    base, p = await start_llama(procs, engine, "stock-llama", model, [f"127.0.0.1:{port}", f"127.0.0.1:{own}"])
    procs.stop(p)
    relay.close()
    return traffic.weight_bytes


async def start_mesh(procs: Procs, root: Path, model: Path | str, delay_ms: int, tag: str, host_args: tuple[str, ...] = ()) -> tuple[str, subprocess.Popen, subprocess.Popen]:
    """Host A (splits 1:1 with B) and worker B; returns A's API base URL."""
    pa, pb = free_loopback_port(), free_loopback_port()
    common = [sys.executable, "-m", "mesh_llm", "--model", str(model), "--ctx-size", "1024", "--split", *LOCAL]
    a = procs.start(f"mesh-a-{tag}", [*common, *host_args, "--tensor-split", "1,1", "--port", str(pa), "--state-dir", str(root / f"a-{tag}")], {"MESH_LLM_RPC_DELAY_MS": str(delay_ms)})
    token = await invite_token(root / f"mesh-a-{tag}.log")
    b = procs.start(f"mesh-b-{tag}", [*common, "--max-vram", "1", "--join", token, "--port", str(pb), "--state-dir", str(root / f"b-{tag}")])
    await wait_http(f"http://127.0.0.1:{pa}/api/status", a, ok=serving_ready)
    return f"http://127.0.0.1:{pa}", a, b


async def status(base: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/api/status") as r:
            return served(await r.json())


async def bench_model(model: Path, args: argparse.Namespace, engine) -> dict:  # type: ignore[no-untyped-def]
    root = Path(tempfile.mkdtemp(prefix="bench-split-"))
    procs = Procs(root)
    name = model.stem
    try:
        print(f"== {name} ({model.stat().st_size / 1e6:.0f} MB, {inspect_model(model).n_layers} layers)", flush=True)
        solo, _ = await start_llama(procs, engine, "solo", model, [])
        worker = await start_worker(procs, engine, "direct-worker", model)
        own = await start_worker(procs, engine, "direct-own", model)
        direct, _ = await start_llama(procs, engine, "direct", model, [f"127.0.0.1:{worker}", f"127.0.0.1:{own}"])
        mesh, _, _ = await start_mesh(procs, root, model, 0, "0ms")
        load = (await status(mesh))["rpc_traffic"]
        ours_load = sum(t["weight_bytes"] for t in load.values())
        rates: dict[str, list[float]] = {"solo": [], "direct": [], "mesh": []}
        for url in (solo, direct, mesh):  # warm-up
            await decode_tps(url, 8)
        for r in range(args.rounds):
            order = [("solo", solo), ("direct", direct), ("mesh", mesh)]
            for label, url in order if r % 2 == 0 else reversed(order):
                rates[label].append(await decode_tps(url, args.tokens))
        # blocking round trips per token: difference between a long and a short generation
        before = sum(t["round_trips"] for t in (await status(mesh))["rpc_traffic"].values())
        await decode_tps(mesh, 8)
        mid = sum(t["round_trips"] for t in (await status(mesh))["rpc_traffic"].values())
        await decode_tps(mesh, 8 + args.tokens)
        after = sum(t["round_trips"] for t in (await status(mesh))["rpc_traffic"].values())
        segments = len((await status(mesh))["split"]["workers"])
        rt_per_token = ((after - mid) - (mid - before)) / args.tokens / segments
        procs.stop_all()
        procs.procs.clear()
        stock_load = await count_stock_load(procs, engine, model)
        procs.stop_all()
        procs.procs.clear()

        by_delay: dict[int, float] = {}
        rtt_by_delay: dict[int, tuple[float, float]] = {}
        for delay in (0, 5, 10, 20):
            url, a, b = await start_mesh(procs, root, model, delay, f"{delay}ms")
            await decode_tps(url, 4)
            by_delay[delay] = statistics.median([await decode_tps(url, args.tokens) for _ in range(3)])
            rtt_by_delay[delay] = await tunnel_rtt_ms(url, delay)
            fastest, median = rtt_by_delay[delay]
            print(f"  injected RTT {delay:2d} ms: {by_delay[delay]:.2f} tok/s (round trips timed in the tunnel: fastest {fastest:.2f} ms, median {median:.2f} ms)", flush=True)
            procs.stop_all()
            procs.procs.clear()
        added = 1 / by_delay[20] - 1 / by_delay[0]
        med = {k: statistics.median(v) for k, v in rates.items()}
        result = {
            "model": name,
            "solo_tps": round(med["solo"], 2),
            "direct_tps": round(med["direct"], 2),
            "mesh_tps": round(med["mesh"], 2),
            "mesh_over_direct": round(med["mesh"] / med["direct"], 3),
            "direct_over_solo": round(med["direct"] / med["solo"], 3),
            "load_weight_bytes": ours_load,
            "stock_load_weight_bytes": stock_load,
            "round_trips_per_token_per_segment": round(rt_per_token, 3),
            "tps_by_injected_rtt_ms": {str(k): round(v, 2) for k, v in by_delay.items()},
            "tunnel_rtt_ms_by_injected_ms": {str(k): {"fastest": round(v[0], 2), "median": round(v[1], 2)} for k, v in rtt_by_delay.items()},
            "added_ms_per_token_at_20ms": round(added * 1000, 2),
            "rtt_cost_factor": round(added / (0.020 * segments), 3),
            "remote_segments": segments,
            "rounds": args.rounds,
            "tokens": args.tokens,
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


async def run(args: argparse.Namespace) -> None:
    from rich.console import Console

    engine = provide_engine(None, None, Console(stderr=True))
    models_dir = Path(tempfile.mkdtemp(prefix="bench-models-"))
    models = [write_tiny_model(models_dir / "bench-300m.gguf", BIG)]
    if not args.no_gemma:
        try:
            from mesh_llm.models.resolve import resolve_model

            models.append(resolve_model("gemma-3-270m").path)
        except Exception as exc:  # the gemma extra is optional
            print(f"(skipping Gemma 3 270M: {exc})", flush=True)
    results = [await bench_model(m, args, engine) for m in models]
    shutil.rmtree(models_dir, ignore_errors=True)
    print(json.dumps({**results[0], "models": results}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--no-gemma", action="store_true")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
