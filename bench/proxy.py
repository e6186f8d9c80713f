"""Proxy overhead: the same requests straight to llama-server and through :9337.

Starts a real node (`mesh-llm --model …`), finds its private llama-server
port, then alternates direct and proxied streaming requests (same prompts,
order flipped every round) and reports, from the client's side:
  - decode tok/s through the proxy ÷ direct (median of per-request rates),
  - time to first token added by the proxy (median proxied − median direct),
  - 16 concurrent streams through the proxy: served, refused with 429 (past the in-flight
    cap, llama-server's 4 slots by default: they would only queue there) and other errors.
The last line is one JSON object.

    .venv/bin/python bench/proxy.py [--model gemma-3-270m] [--rounds 12] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from common import wait_http

PROMPTS = [
    "The history of the printing press begins",
    "In a quiet village by the sea, there lived",
    "The three laws of thermodynamics state that",
    "A good recipe for bread needs",
]


class Refused429(RuntimeError):
    pass


async def stream_once(session: aiohttp.ClientSession, url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    done = False
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status == 429 and r.headers.get("Retry-After"):
            raise Refused429(await r.text())
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    if not done or len(stamps) < 2:
        raise RuntimeError(f"incomplete stream ({len(stamps)} tokens, done={done})")
    return {"ttft": stamps[0] - t0, "tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps)}


def find_llama_port(node_pid: int) -> int:
    for child in psutil.Process(node_pid).children(recursive=True):
        cmd = child.cmdline()
        if cmd and cmd[0].endswith("llama-server") and "--port" in cmd:
            return int(cmd[cmd.index("--port") + 1])
    raise RuntimeError("llama-server child not found")


async def concurrent(url: str, model: str, n: int, tokens: int) -> tuple[int, int, int, float]:
    """(served, refused with 429 and Retry-After, other errors, seconds) for `n` streams at once."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_once(s, url, model, PROMPTS[i % len(PROMPTS)], tokens) for i in range(n)), return_exceptions=True)
        elapsed = time.perf_counter() - t0
    refused = [r for r in results if isinstance(r, Refused429)]
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, Refused429)]
    for e in errors[:3]:
        print(f"  concurrent error: {e!r}")
    return n - len(refused) - len(errors), len(refused), len(errors), elapsed


async def run(args: argparse.Namespace) -> dict:
    state = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    port = args.port
    proc = subprocess.Popen([sys.executable, "-m", "mesh_llm", "--model", args.model, "--port", str(port), "--state-dir", str(state)],
                            stdout=(state / "node.log").open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proxy_url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(proxy_url + "/health", proc)
        direct_url = f"http://127.0.0.1:{find_llama_port(proc.pid)}"
        async with aiohttp.ClientSession() as s, s.get(proxy_url + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        print(f"model {model}; direct {direct_url}; proxy {proxy_url}; {args.rounds} rounds × {len(PROMPTS)} prompts × {args.tokens} tokens")
        samples: dict[str, list[dict]] = {"direct": [], "proxy": []}
        # llama-server drops the connection after each stream, so neither path reuses one.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for prompt in PROMPTS:  # warm-up: load caches on both paths
                await stream_once(s, direct_url, model, prompt, 4)
                await stream_once(s, proxy_url, model, prompt, 4)
            for rnd in range(args.rounds):
                order = [("direct", direct_url), ("proxy", proxy_url)]
                if rnd % 2:
                    order.reverse()
                for prompt in PROMPTS:
                    for name, url in order:
                        samples[name].append(await stream_once(s, url, model, prompt, args.tokens))
        med = {name: {k: statistics.median(x[k] for x in xs) for k in ("ttft", "tps")} for name, xs in samples.items()}
        for name in ("direct", "proxy"):
            print(f"{name:>6}: decode {med[name]['tps']:.1f} tok/s, TTFT {med[name]['ttft'] * 1000:.2f} ms (medians of {len(samples[name])})")
        served, refused, errors, elapsed = await concurrent(proxy_url, model, 16, args.tokens // 2)
        print(f"16 concurrent streams through the proxy: {served} served, {refused} refused with 429 (in-flight cap), {errors} errors, {elapsed:.1f} s")
        return {
            "model": model,
            "tps_direct": round(med["direct"]["tps"], 2),
            "tps_proxy": round(med["proxy"]["tps"], 2),
            "tps_ratio": round(med["proxy"]["tps"] / med["direct"]["tps"], 4),
            "ttft_direct_ms": round(med["direct"]["ttft"] * 1000, 3),
            "ttft_proxy_ms": round(med["proxy"]["ttft"] * 1000, 3),
            "ttft_added_ms": round((med["proxy"]["ttft"] - med["direct"]["ttft"]) * 1000, 3),
            "concurrent_streams": 16,
            "concurrent_served": served,
            "concurrent_429": refused,
            "concurrent_errors": errors,
        }
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=9399)
    result = asyncio.run(run(p.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
